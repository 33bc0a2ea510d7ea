"""The ``vmmshim`` command: xhyve's flags and bhyve's ``-o key=value``/``-k file`` on one configuration tree.

    vmmshim [-ACeHPuwWxY] [-c [[cpus=]N][,sockets=S][,cores=C][,threads=T]] [-f firmware] [-F pidfile]
            [-k file] [-l lpc] [-m mem] [-o key=value] [-s pci] [-U uuid] [vmname]
    vmmshim -h | --help | -v | -s help | -l help
    vmmshim doctor
    vmmshim ctl --vm=NAME --checkpoint=FILE | --suspend=FILE | --pause | --resume | --status
    vmmshim conformance [--providers kvm,soft] [--record DIR] [--diff DIR]
    vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest: here on a hardware KVM, else in the lab)

Firmware (``-f``, the ``firmware.spec`` key): ``kexec,KERNEL,INITRD,"CMDLINE"`` (Linux bzImage, xhyve),
``multiboot,KERNEL[,MODULES[,"CMDLINE"]]`` (hyperkit), and ``hello`` (vmmshim's built-in smoke guest). Exit
status: 0 reset, 1 power off, 2 halt, 3 triple fault, 4 error (bad flags, bad images and missing hypervisors too,
with one line on stderr). ``-h`` prints :func:`vmmshim.flags.help_text`: every flag, the console backends and
escape keys, the signals, debug-exit's status mapping and every ``vmmshim.*`` key. ``-o config.dump=1`` prints
the configuration and exits with status 1 before a VM is made, as bhyve's ``main`` does. The flags are parsed by
:mod:`vmmshim.flags` and the VM is built and run by :mod:`vmmshim.runner` (``run_vm``), which ``vmmshim linux``
uses too.

Not supported: ``-b`` (bvmconsole), ``-g`` (bhyve's old debug port; ``-G`` is the GDB stub, ``vmmshim/gdb/``),
``-M`` (vmnet MAC), ``-l bootrom``, ``fbsd`` firmware.
"""

import sys

from .config import ConfigError
from .flags import (EXIT_USAGE, OPTSTRING, USAGE, UsageError, help_asked, help_text, listing,  # noqa: F401
                    parse_args)
from .runner import EXIT_ERROR, GIL_SWITCH_AUTO_S, gil_switch, reported, run_vm  # noqa: F401

VERSION = "vmmshim 0.1 (bhyve vmm_ops on NVMM primitives)"
#: bhyve's ``main`` exits 1 after ``config.dump``.
DUMP_STATUS = 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:
        from .doctor import main as doctor
        return doctor(argv[1:])
    if argv[:1] == ["linux"]:
        from .default_guest import main as linux
        return linux(argv[1:])
    if argv[:1] == ["ctl"]:
        from .ctl import main as ctl
        return ctl(argv[1:])
    if argv[:1] == ["conformance"]:
        from .conformance import main as conformance
        return conformance(argv[1:])
    return reported(lambda: _command(argv))


def _command(argv):
    """The xhyve command proper: ``-h``, ``-v``, ``-s help``, ``-l help``, ``config.dump``, or the VM the flags
    describe (its exit status). A bad command line is one line on stderr and status 4."""
    try:
        cfg = parse_args(argv)
        asked = help_asked(cfg)
        dump = cfg.get_bool("config.dump")
    except UsageError as exc:
        print(f"vmmshim: {exc} (vmmshim -h lists the flags)", file=sys.stderr)
        return EXIT_USAGE
    except ConfigError as exc:
        print(f"vmmshim: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if asked:
        print(help_text() if asked == "usage" else listing(asked))
        return 0
    if cfg.get_bool("vmmshim.version"):
        print(VERSION)
        return 0
    if dump:
        print("\n".join(cfg.dump()))
        return DUMP_STATUS
    return run_vm(cfg)
