"""xhyve's flags and bhyve's ``-o key=value``/``-k file`` onto one configuration tree (``vmmshim.config``).

Follows bhyve(8)'s and xhyve's option lists (``usr.sbin/bhyve/bhyverun.c``, ``main``'s ``getopt`` loop): each flag
is a shorthand for a ``bhyve_config(5)`` key, set in the order given, so a later ``-o`` overrides an earlier flag
and the reverse. ``-s help`` and ``-l help`` (any prefix of ``help``, as bhyve compares) ask for the lists of PCI
emulations and LPC devices. :func:`parse_args` is the one parser; :mod:`vmmshim.cli` (the command) and
:mod:`vmmshim.default_guest` (``vmmshim linux``) both use it, and :mod:`vmmshim.runner` runs what it returns.
:class:`ArgumentParser` is argparse for vmmshim's subcommands with bhyve's error status, 4.

``-H`` and ``-P`` set their keys and change nothing: a vCPU always leaves the guest on HLT (its local APIC is in
userspace, so the vCPU thread sleeps there until an interrupt), and PAUSE exits are KVM's pause-loop exiting.

``-G [w][ADDR:]PORT`` sets ``gdb.port``, ``gdb.address`` and ``gdb.wait`` (bhyve's ``parse_gdb_options``).

Not supported: ``-b`` (bvmconsole), ``-M`` (vmnet MAC), ``-g`` (bhyve's old debug port; ``-G`` is the stub),
``-l bootrom`` (UEFI), each
refused in one line; bhyve's ``-a``, ``-D``, ``-I``, ``-K``, ``-p``, ``-r``, ``-S`` and long options.
"""

import argparse
import getopt
import sys

from .config import (LPC_DEVICES, MAX_VCPUS, TOPOLOGY_KEYS, Config, ConfigError, parse_lpc, parse_memsize, parse_slot,
                     range_words, split_option, strtol)

EXIT_USAGE = 4                  # bhyve's status for a bad command line (its "error" status)
OPTSTRING = "AbCehHPuvwWxYc:f:F:g:G:k:l:m:o:r:s:U:M"
HELP_WORD = "help"
LONG_HELP = "help"              # --help, as -h
USAGE = """usage: vmmshim [-ACeHPuwWxY] [-c [[cpus=]N][,sockets=S][,cores=C][,threads=T]] [-f firmware]
               [-F pidfile] [-k file] [-l lpc] [-m mem] [-o key=value] [-r file] [-s pci] [-U uuid]
               [vmname]
       vmmshim ctl --vm=NAME --checkpoint=FILE | --suspend=FILE | --pause | --resume | --status
       vmmshim -h | --help | -v | -s help | -l help
       vmmshim doctor | vmmshim conformance [--record DIR] [--diff DIR]
       vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest, here or in the lab)

flags (each sets the bhyve_config(5) key in parentheses):
  -A  create ACPI tables (acpi_tables)
  -c  vCPUs, 1-64 (cpus; default 1); sockets x cores x threads must equal it when given
  -C  accepted (memory.guest_in_core): vmmshim writes no core files
  -e  exit on an access to an unemulated I/O port (x86.strictio)
  -f  firmware (firmware.spec): kexec,KERNEL[,INITRD[,"CMDLINE"]] (a Linux bzImage, as xhyve)
      | multiboot,KERNEL[,MODULES[,"CMDLINE"]] (hyperkit; MODULES: MOD[;ARGS][:MOD[;ARGS]]...,
        empty for none: multiboot,KERNEL,,"CMDLINE")
      | hello (vmmshim's built-in smoke guest)
  -F  write vmmshim's process ID to this file while the VM runs (pidfile)
  -G  the GDB stub: [w][ADDR:]PORT (gdb.port, gdb.address: 127.0.0.1 by default; w: gdb.wait,
      the vCPUs wait at the first instruction until gdb attaches and continues)
  -h  this help (also --help)
  -H  accepted for bhyve compatibility (x86.vmexit_on_hlt): a vCPU always exits on HLT,
      because its local APIC is emulated in userspace
  -k  read key=value lines from a file (a line starting with # is a comment)
  -l  an LPC device: comN,BACKEND (com1-com4; backends below) | debug-exit[,PORT] | help
  -m  guest memory (memory.size; default 256M): 512M, 2G, 0x40000000; suffixes K M G T P E
      (powers of 1024, either case); a bare number below 1048576 is MiB; 1 MiB to 1 TiB
  -o  set a configuration key, KEY=VALUE; %(KEY) in a value is replaced by KEY's value
  -P  accepted for bhyve compatibility (x86.vmexit_on_pause): PAUSE exits are left to KVM's
      pause-loop exiting
  -r  resume a checkpoint (restore): FILE from vmmshim ctl --checkpoint/--suspend; the configuration
      comes from FILE.meta, flags given here override it (a console, a disk path, the provider)
  -s  a PCI device: SLOT[:FUNC],EMULATION[,CONF] (bus 0 only) | help (list the emulations)
  -u  the RTC keeps UTC (rtc.use_localtime=false)
  -U  the VM's UUID (uuid)
  -v  print the version
  -w  ignore unimplemented MSRs (x86.strictmsr=false)
  -W  virtio devices use MSI, not MSI-X (virtio_msix=false)
  -x  local APICs in x2APIC mode (x86.x2apic)
  -Y  no MP table (x86.mptable=false)
  not supported yet, refused: -g (bhyve's old debug port; -G is the GDB stub),
  -l bootrom (UEFI, lpc.bootrom), -b (bvmconsole), -M (vmnet MAC)"""

HELP_MORE = """
console backends (-l comN,BACKEND, N = 1 to 4; lpc.comN.path):
  stdio          vmmshim's stdin and stdout. On a tty: Ctrl-A x powers the VM off at once,
                 Ctrl-A b presses the ACPI power button, Ctrl-A h lists the keys,
                 Ctrl-A Ctrl-A sends Ctrl-A
  autopty        a new pseudo-terminal; its path is printed on stderr
  /dev/TTY       an existing tty
  tcp=ADDR:PORT  listen there (bhyve's TCP console); one client at a time
  unix:PATH      listen on a Unix socket (a stale socket there is replaced, other files refused)
  file:PATH      the guest's output appended to a file (created if missing); no input

signals: SIGTERM, SIGHUP and SIGINT press the ACPI power button; a second signal, or
  vmmshim.poweroff_timeout_s seconds later, powers the VM off.
debug-exit (QEMU's isa-debug-exit; -l debug-exit[,PORT], port 0xf4 by default): a guest write of
  VALUE ends the VM with exit status (VALUE << 1) | 1, modulo 256 (a write of 0 exits 1).
exit status: 0 reset, 1 power off, 2 halt, 3 triple fault, 4 error (one line on stderr);
  -o config.dump=1 prints every key=value and exits 1 without running the VM, as bhyve does.
"""


class UsageError(Exception):
    pass


class ArgumentParser(argparse.ArgumentParser):
    """argparse for ``vmmshim linux`` and ``vmmshim conformance``: an argument error is one line, ``PROG:
    MESSAGE``, and exit status 4 (bhyve's error status), not argparse's usage block and status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: {message}\n")
        sys.exit(EXIT_USAGE)


def help_text():
    """What ``-h`` prints: the synopsis and flags, the consoles, signals and exit statuses, then the keys."""
    from .config_keys import help_sections
    return "\n".join([USAGE, HELP_MORE, *help_sections()])


def listing(what):
    """``-s help``'s PCI emulations or ``-l help``'s LPC devices, one per line as bhyve prints them."""
    if what == "pci":
        from bhyve_devices.pci.registry import names
        return "\n".join(names())
    return "\n".join(LPC_DEVICES)


def help_asked(cfg):
    """``"usage"`` (``-h``), ``"pci"`` (``-s help``), ``"lpc"`` (``-l help``) or None."""
    what = cfg.get("vmmshim.help", "false")
    if what in ("pci", "lpc"):
        return what
    return "usage" if cfg.get_bool("vmmshim.help") else None


def _asks_help(val):
    """bhyve's test for ``-s help``/``-l help``: the argument is a prefix of ``help``."""
    return HELP_WORD.startswith(val)


def parse_topology(text, config):
    """bhyve's ``-c [[cpus=]N][,sockets=S][,cores=C][,threads=T]`` into keys (``-c ""`` is one vCPU); each value
    must be a whole number from 1 to 64 (their product is checked by :meth:`Config.validate`)."""
    if text == "":
        for key in ("cpus",) + TOPOLOGY_KEYS:
            config.set(key, "1")
        return
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep:
            key, value = "cpus", part
        elif key not in ("cpus",) + TOPOLOGY_KEYS:
            raise ConfigError(f"-c {text}: unknown topology field {key!r} (cpus, sockets, cores, threads)")
        n = strtol(value)
        if n is None:
            raise ConfigError(f"-c {text}: {key}={value} is not a whole number")
        if not 1 <= n <= MAX_VCPUS:
            raise ConfigError(f"-c {text}: {key}={value} must be {range_words(1, MAX_VCPUS)}")
        config.set(key, value)


def parse_args(argv):
    """The configuration tree for ``argv``, checked by :meth:`Config.validate` unless it asks for help, the
    version or ``config.dump`` (bhyve dumps before it checks); raises UsageError/ConfigError with one line."""
    try:
        opts, args = getopt.getopt(argv, OPTSTRING, [LONG_HELP])
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
        elif opt in ("-h", "--" + LONG_HELP):
            cfg.set("vmmshim.help", "true")
        elif opt == "-v":
            cfg.set("vmmshim.version", "true")
        elif opt == "-c":
            parse_topology(val, cfg)
        elif opt == "-m":
            parse_memsize(val, f"-m {val}")
            cfg.set("memory.size", val)
        elif opt == "-f":
            cfg.set("firmware.spec", val)
        elif opt == "-F":
            cfg.set("pidfile", val)
        elif opt == "-k":
            cfg.load_file(val)
        elif opt == "-l" and _asks_help(val):
            cfg.set("vmmshim.help", "lpc")
        elif opt == "-l":
            parse_lpc(val, cfg)
        elif opt == "-o":
            try:
                key, value = split_option(val)
            except ConfigError as exc:
                raise ConfigError(f"-o {exc}") from None
            cfg.set(key, value)
        elif opt == "-s" and _asks_help(val):
            cfg.set("vmmshim.help", "pci")
        elif opt == "-s":
            parse_slot(val, cfg)
        elif opt == "-U":
            cfg.set("uuid", val)
        elif opt == "-r":
            cfg.set("restore", val)
        elif opt == "-G":
            parse_gdb(val, cfg)
        elif opt == "-g":
            raise ConfigError(f"-g {val}: bhyve's old debug port is not supported (-G PORT is the GDB stub)")
        elif opt in ("-b", "-M"):
            raise ConfigError(f"{opt} is not supported by vmmshim ({'bvmconsole' if opt == '-b' else 'vmnet'})")
    if len(args) > 1:
        raise UsageError(f"one VM name expected, got {' '.join(args)}")
    if args:
        cfg.set("name", args[0])
    if not help_asked(cfg) and not cfg.get_bool("vmmshim.version") and not cfg.get_bool("config.dump"):
        cfg.validate()
    return cfg


def parse_gdb(val, cfg):
    """bhyve's ``-G [w][ADDR:]PORT``: ``gdb.wait``, ``gdb.address`` (an IPv6 address in brackets), ``gdb.port``."""
    spec = val
    if spec.startswith("w"):
        cfg.set("gdb.wait", "true")
        spec = spec[1:]
    addr, sep, port = spec.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535 or (sep and not addr):
        raise ConfigError(f"-G {val}: expected [w][ADDR:]PORT with a port from 0 to 65535")
    if addr:
        cfg.set("gdb.address", addr.strip("[]"))
    cfg.set("gdb.port", port)
