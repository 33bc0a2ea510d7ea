"""The ``vmmshim`` command: xhyve's flags and bhyve's ``-o key=value``/``-k file`` on one configuration tree.

    vmmshim [-AbCehHPuvwWxY] [-c vcpus] [-f firmware] [-F pidfile] [-g port] [-k file] [-l lpc]
            [-m mem] [-o key=value] [-s pci] [-U uuid] [vmname]
    vmmshim doctor
    vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest: here on a hardware KVM, else in the lab)

Firmware (``-f``): ``kexec,KERNEL,INITRD,"CMDLINE"`` (Linux bzImage, xhyve), ``multiboot,KERNEL[,MOD:MOD...],
"CMDLINE"`` (hyperkit), and ``hello`` (vmmshim's built-in smoke guest). Exit status: 0 reset, 1 power off,
2 halt, 3 triple fault, 4 error (bad flags, bad images and missing hypervisors too, with one line on stderr).
SIGTERM presses the ACPI power button, as bhyve does. The flags are parsed by :mod:`vmmshim.flags` and the VM is
built and run by :mod:`vmmshim.runner` (``run_vm``), which ``vmmshim linux`` uses too.

Not supported: ``-b`` (bvmconsole), ``-g`` (debug port), ``-M`` (vmnet MAC), ``-l bootrom``, ``fbsd`` firmware.
"""

import sys

from .flags import OPTSTRING, USAGE, UsageError, parse_args  # noqa: F401 (the command's flags; importable here)
from .firmware.boot import boot_image  # noqa: F401
from .runner import EXIT_ERROR, GIL_SWITCH_AUTO_S, gil_switch, reported, run_vm  # noqa: F401

VERSION = "vmmshim 0.1 (bhyve vmm_ops on NVMM primitives)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from .doctor import doctor
        return doctor()
    if argv[:1] == ["linux"]:
        from .default_guest import main as linux
        return linux(argv[1:])
    if argv[:1] == ["conformance"]:
        from .conformance import main as conformance
        return conformance(argv[1:])
    return reported(lambda: _command(argv))


def _command(argv):
    """The xhyve command proper: ``-h``, ``-v``, or the VM the flags describe (its exit status)."""
    cfg = parse_args(argv)
    if cfg.get_bool("vmmshim.help"):
        print(USAGE)
        return 0
    if cfg.get_bool("vmmshim.version"):
        print(VERSION)
        return 0
    return run_vm(cfg)
