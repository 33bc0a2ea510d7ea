"""xhyve's flags and bhyve's ``-o key=value``/``-k file`` onto one configuration tree (``vmmshim.config``).

Follows bhyve(8)'s and xhyve's option lists (``usr.sbin/bhyve/bhyverun.c``, ``main``'s ``getopt`` loop): each flag
is a shorthand for a ``bhyve_config(5)`` key, set in the order given, so a later ``-o`` overrides an earlier flag
and the reverse. :func:`parse_args` is the one parser; :mod:`vmmshim.cli` (the command) and
:mod:`vmmshim.default_guest` (``vmmshim linux``) both use it, and :mod:`vmmshim.runner` runs what it returns.

Not supported: ``-b`` (bvmconsole), ``-g`` (debug port), ``-M`` (vmnet MAC) (each refused with a ConfigError),
bhyve's long options and its ``-G``/``-p``/``-r``/``-S`` flags.
"""

import getopt

from .config import Config, ConfigError, parse_lpc, parse_size, parse_slot

OPTSTRING = "AbCehHPuvwWxYc:f:F:g:k:l:m:o:s:U:M"
USAGE = """usage: vmmshim [-AbCehHPuvwWxY] [-c vcpus] [-f firmware] [-F pidfile] [-k file] [-l lpc]
               [-m mem] [-o key=value] [-s pci] [-U uuid] [vmname]
       vmmshim doctor | vmmshim conformance [--record DIR] [--diff DIR]
       vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest, here or in the nested lab)
  -A  create ACPI tables             -c  number of vCPUs (default 1)
  -e  exit on unhandled I/O port     -f  firmware: kexec,KERNEL,INITRD,"CMDLINE" | multiboot,KERNEL[,MODS],"CMDLINE"
  -h  this help                      |   hello (built-in smoke guest)
  -H  vmexit on HLT (always sleeps)  -k  configuration file of key=value lines
  -l  LPC device: comN,stdio | comN,autopty | comN,/dev/TTY | comN,tcp=ADDR:PORT | comN,unix:PATH |
      comN,file:PATH | debug-exit[,PORT] (QEMU isa-debug-exit)
  -m  memory size (K/M/G suffix; default 256M)          -o  set a configuration key (bhyve_config(5))
  -P  vmexit on PAUSE                -s  PCI slot: slot[:func],emulation[,conf]
  -u  RTC keeps UTC                  -U  VM UUID
  -v  version                        -w  ignore unimplemented MSRs
  -W  single-vector virtio MSI       -x  x2APIC mode
  -Y  no MP table
exit status: 0 reset, 1 power off, 2 halt, 3 triple fault, 4 error"""


class UsageError(Exception):
    pass


def parse_args(argv):
    """The configuration tree for ``argv`` (raises UsageError/ConfigError with a one-line message)."""
    try:
        opts, args = getopt.getopt(argv, OPTSTRING)
    except getopt.GetoptError as exc:
        raise UsageError(str(exc)) from None
    cfg = Config()
    flag_keys = {"-A": ("acpi_tables", "true"), "-e": ("x86.strictio", "true"), "-H": ("x86.vmexit_on_hlt", "true"),
                 "-P": ("x86.vmexit_on_pause", "true"), "-u": ("rtc.use_localtime", "false"),
                 "-w": ("x86.strictmsr", "false"), "-W": ("virtio_msix", "false"), "-x": ("x86.x2apic", "true"),
                 "-Y": ("x86.mptable", "false"), "-C": ("memory.guest_in_core", "true")}
    for opt, val in opts:
        if opt in flag_keys:
            cfg.set(*flag_keys[opt])
        elif opt == "-h":
            cfg.set("vmmshim.help", "true")
        elif opt == "-v":
            cfg.set("vmmshim.version", "true")
        elif opt == "-c":
            if not val.isdigit() or not 1 <= int(val) <= 64:
                raise ConfigError(f"invalid vCPU count {val!r} (1-64)")
            cfg.set("cpus", val)
        elif opt == "-m":
            cfg.set("memory.size", str(parse_size(val)))
        elif opt == "-f":
            cfg.set("firmware.spec", val)
        elif opt == "-F":
            cfg.set("pidfile", val)
        elif opt == "-k":
            cfg.load_file(val)
        elif opt == "-l":
            parse_lpc(val, cfg)
        elif opt == "-o":
            cfg.set_option(val)
        elif opt == "-s":
            parse_slot(val, cfg)
        elif opt == "-U":
            cfg.set("uuid", val)
        elif opt in ("-b", "-g", "-M"):
            raise ConfigError(f"{opt} is not supported by vmmshim")
    if len(args) > 1:
        raise UsageError(f"one VM name expected, got {' '.join(args)}")
    if args:
        cfg.set("name", args[0])
    return cfg
