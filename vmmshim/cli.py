"""The ``vmmshim`` command: xhyve's flags and bhyve's ``-o key=value``/``-k file`` on one configuration tree.

    vmmshim [-AbCehHPuvwWxY] [-c vcpus] [-f firmware] [-F pidfile] [-g port] [-k file] [-l lpc]
            [-m mem] [-o key=value] [-s pci] [-U uuid] [vmname]
    vmmshim doctor
    vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest: here on a hardware KVM, else in the lab)

Firmware (``-f``): ``kexec,KERNEL,INITRD,"CMDLINE"`` (Linux bzImage, xhyve), ``multiboot,KERNEL[,MOD:MOD...],
"CMDLINE"`` (hyperkit), and ``hello`` (vmmshim's built-in smoke guest). Exit status: 0 reset, 1 power off,
2 halt, 3 triple fault, 4 error (bad flags, bad images and missing hypervisors too, with one line on stderr).
SIGTERM presses the ACPI power button, as bhyve does.

Not supported: ``-b`` (bvmconsole), ``-g`` (debug port), ``-M`` (vmnet MAC), ``-l bootrom``, ``fbsd`` firmware.
"""

import getopt
import os
import signal
import sys

from .config import Config, ConfigError, parse_lpc, parse_size, parse_slot

EXIT_ERROR = 4
OPTSTRING = "AbCehHPuvwWxYc:f:F:g:k:l:m:o:s:U:M"
VERSION = "vmmshim 0.1 (bhyve vmm_ops on NVMM primitives)"
USAGE = """usage: vmmshim [-AbCehHPuvwWxY] [-c vcpus] [-f firmware] [-F pidfile] [-k file] [-l lpc]
               [-m mem] [-o key=value] [-s pci] [-U uuid] [vmname]
       vmmshim doctor | vmmshim conformance [--record DIR] [--diff DIR]
       vmmshim linux [-c N] [-m MEM] [--run CMD]   (the default Linux guest, here or in the nested lab)
  -A  create ACPI tables             -c  number of vCPUs (default 1)
  -e  exit on unhandled I/O port     -f  firmware: kexec,KERNEL,INITRD,"CMDLINE" | multiboot,KERNEL[,MODS],"CMDLINE"
  -h  this help                      |   hello (built-in smoke guest)
  -H  vmexit on HLT (always sleeps)  -k  configuration file of key=value lines
  -l  LPC device: com1,stdio | com2,autopty | comN,PATH | debug-exit[,PORT] (QEMU isa-debug-exit)
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


def boot_image(cfg, lowmem, highmem):
    """The BootImage ``-f`` asks for (LoaderError on a bad image)."""
    from .firmware.hello import hello_image
    from .loader import LoaderError, load_kexec, load_multiboot
    spec = cfg.get("firmware.spec")
    if not spec:
        raise ConfigError("no firmware: give -f kexec,KERNEL,INITRD,\"CMDLINE\" (or -f hello)")
    parts = spec.split(",", 3)
    kind = parts[0]
    if kind == "hello":
        return hello_image()
    if kind == "kexec":
        if len(parts) < 2 or not parts[1]:
            raise ConfigError("-f kexec needs a kernel: kexec,KERNEL[,INITRD[,\"CMDLINE\"]]")
        initrd = parts[2] if len(parts) > 2 and parts[2] else None
        cmdline = parts[3] if len(parts) > 3 else ""
        return load_kexec(parts[1], initrd, cmdline.strip('"'), lowmem, highmem)
    if kind == "multiboot":
        parts = spec.split(",")
        if len(parts) < 2 or not parts[1]:
            raise ConfigError("-f multiboot needs a kernel: multiboot,KERNEL[,MOD:MOD...][,\"CMDLINE\"]")
        cmdline = parts[-1].strip('"') if len(parts) > 2 else ""
        mods = [(m, None) for m in parts[2].split(":") if m] if len(parts) > 3 else []
        return load_multiboot(parts[1], mods, cmdline, lowmem, highmem)
    raise LoaderError(f"unknown firmware {kind!r} (kexec, multiboot, hello)")


GIL_SWITCH_AUTO_S = 0.05


def gil_switch(cfg):
    """Applies ``vmmshim.gil_switch_ms`` (``sys.setswitchinterval``); returns the interval in seconds.

    Python makes a thread that holds the GIL hand it over once another has waited this long, and then waits until
    that thread has taken it. vmmshim's threads (vCPUs, doorbells, the timer) release the GIL whenever they block,
    which natively is within tens of microseconds; where Python runs slowly (the nested lab's L1 runs it under
    TCG, some 80 times slower) a device's request takes milliseconds of Python, and Python's 5 ms default split
    requests in two, with a hand-over each way between threads on different L1 CPUs. 50 ms made sequential
    virtio-blk 5-15% faster there (docs/lab.md). ``auto`` keeps Python's 5 ms for the soft CPU, whose vCPU
    threads run the guest in Python and never block: there the interval is how often the timer and device threads
    get in."""
    if cfg.get("vmmshim.gil_switch_ms") == "auto":
        if cfg.get("vmmshim.provider") == "soft":
            return sys.getswitchinterval()
        seconds = GIL_SWITCH_AUTO_S
    else:
        seconds = cfg.get_int("vmmshim.gil_switch_ms", 1, 10_000) / 1000
    sys.setswitchinterval(seconds)
    return seconds


def run_vm(cfg):
    from ops.nvmm import nvmm_init
    from ops.nvmm_ops import VmmOpsNvmm
    from .platform import Platform
    from .vm import VM, VmConfig
    ncpus, memsize = cfg.get_int("cpus", 1, 64), cfg.get_int("memory.size", 1 << 20)
    gil_switch(cfg)
    provider = nvmm_init(cfg.get("vmmshim.provider"))
    vm = VM(VmmOpsNvmm(provider), VmConfig(ncpus=ncpus, memsize=memsize, strictio=cfg.get_bool("x86.strictio"),
                                            ignore_msrs=not cfg.get_bool("x86.strictmsr"),
                                            x2apic=cfg.get_bool("x86.x2apic"), name=cfg.get("name"),
                                            kvm_pv=cfg.get_bool("x86.kvm_pv"),
                                            pv_eoi=cfg.get_bool("x86.pv_eoi"),
                                            posted_io=cfg.get_bool("vmmshim.posted_io"),
                                            doorbells=cfg.get_bool("vmmshim.doorbells"),
                                            halt_serve=cfg.get_bool("vmmshim.halt_serve"),
                                            answer_io=cfg.get_bool("vmmshim.answer_io")))
    image = boot_image(cfg, vm.lowmem, vm.highmem)
    uarts = {name: cfg.get(f"lpc.{name}.path") for name in ("com1", "com2", "com3", "com4")
             if cfg.get(f"lpc.{name}.path")}
    platform = Platform(vm, utc=not cfg.get_bool("rtc.use_localtime"), uarts=uarts)
    if cfg.get("lpc.debug_exit.port"):
        from bhyve_devices.debugexit import PORT_SIZE, DebugExit
        vm.add_port_device(cfg.get_int("lpc.debug_exit.port", 0, 0xFFFF), PORT_SIZE,
                           DebugExit(lambda status: vm.stop(status)), "debug-exit")
    from .machine import build_pci_and_tables
    build_pci_and_tables(vm, cfg, platform)
    for gpa, data in image.writes:
        vm.load(gpa, data)
    vm.set_boot_state(0, image.regs, image.segs, image.gdtr, image.idtr)
    signal.signal(signal.SIGTERM, lambda *_: platform.power_button())
    pidfile = cfg.get("pidfile")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if os.environ.get("VMMSHIM_TRACE_MMIO"):
        vm.mmio.trace = sys.stderr
    dump = os.environ.get("VMMSHIM_DEBUG_DUMP")       # seconds between state dumps on stderr
    if dump:
        import threading
        import time

        def dumper():
            while vm.status is None:
                time.sleep(float(dump))
                for line in vm.debug_state() + platform.debug_state():
                    print(f"[vmmshim] {line}", file=sys.stderr, flush=True)
        threading.Thread(target=dumper, daemon=True).start()
    try:
        status = vm.run()
    finally:
        if cfg.get_bool("vmmshim.stats"):
            for vcpu, st in vm.stats().items():
                print(f"vmmshim: vcpu{vcpu} {st}", file=sys.stderr)
        platform.close()
        if pidfile:
            try:
                os.unlink(pidfile)
            except OSError:
                pass
    if vm.error:
        print(f"vmmshim: {vm.error.splitlines()[0]}", file=sys.stderr)
    return status


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
    try:
        cfg = parse_args(argv)
        if cfg.get_bool("vmmshim.help"):
            print(USAGE)
            return 0
        if cfg.get_bool("vmmshim.version"):
            print(VERSION)
            return 0
        return run_vm(cfg)
    except (UsageError, ConfigError) as exc:
        print(f"vmmshim: {exc}\n{USAGE.splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:     # LoaderError, ProviderUnavailable, unreadable files
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"vmmshim: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a vmmshim bug: one line, status 4 (VMMSHIM_DEBUG=1 re-raises)
        if os.environ.get("VMMSHIM_DEBUG"):
            raise
        print(f"vmmshim: internal error: {exc!r} (VMMSHIM_DEBUG=1 shows where)", file=sys.stderr)
        return EXIT_ERROR
