"""Building and running one VM from its configuration tree: bhyve's ``bhyverun.c`` after the options are read.

Follows bhyve's ``main`` (``usr.sbin/bhyve/bhyverun.c``) from ``vm_create`` on: the VM with its vCPUs and memory,
the boot image the firmware key names (:func:`vmmshim.firmware.boot.boot_image`), the platform devices, the
LPC and PCI devices and the firmware tables (``init_pci``, ``acpi_build``, ``mptable_build``), the boot vCPU's state, then the vCPU loops until
the VM resets, powers off, halts or triple-faults; :func:`run_vm` returns that exit status (bhyve's: 0 reset,
1 power off, 2 halt, 3 triple fault). :func:`reported` turns the errors a user can cause into one line on stderr
and status 4. The ``vmmshim`` command (:mod:`vmmshim.cli`) and ``vmmshim linux`` (:mod:`vmmshim.default_guest`)
both run VMs through here.

Not supported: bhyve's checkpoint/restore, the GDB stub, ``vm_reinit`` after a reset (a reset ends the process
with status 0, as bhyve's does), more than one VM per process.
"""

import os
import sys
import threading

from .config import ConfigError
from .flags import UsageError
from .snapshot.files import CheckpointError

EXIT_POWEROFF, EXIT_ERROR = 1, 4
END_WAIT_S = 10                 # how long the vCPUs get to stop when the run ends some other way than by the guest


GIL_SWITCH_AUTO_S = 0.05


def gil_switch(cfg):
    """Applies ``vmmshim.gil_switch_ms`` (``sys.setswitchinterval``); returns the interval in seconds.

    Python makes a thread that holds the GIL hand it over once another has waited this long, and then waits until
    that thread has taken it. vmmshim's threads (vCPUs, doorbells, the timer) release the GIL whenever they block,
    which natively comes long before the interval; where Python runs slowly (the nested lab's L1 runs it under
    TCG) a device's request takes milliseconds of Python, and Python's 5 ms default split requests in two, with a
    hand-over each way between threads on different L1 CPUs. The longer interval made sequential virtio-blk
    faster there (the A/B is in docs/lab.md, "Python's switch interval"). ``auto`` keeps Python's 5 ms for the
    soft CPU, whose vCPU threads run the guest in Python and never block: there the interval is how often the
    timer and device threads get in."""
    if cfg.get("vmmshim.gil_switch_ms") == "auto":
        if cfg.get("vmmshim.provider") == "soft":
            return sys.getswitchinterval()
        seconds = GIL_SWITCH_AUTO_S
    else:
        seconds = cfg.get_int("vmmshim.gil_switch_ms", 1, 10_000) / 1000
    sys.setswitchinterval(seconds)
    return seconds


def run_vm(cfg):
    """Builds the VM ``cfg`` describes, runs it until it ends and returns its exit status (0 reset, 1 power off,
    2 halt, 3 triple fault). Bad input raises ConfigError, LoaderError or ProviderUnavailable (see
    :func:`reported`); a signal before the guest runs raises :class:`vmmshim.shutdown.Interrupted`.

    Whatever ends it (the guest, a signal, a setup error, a vmmshim bug), the vCPU threads are stopped before the
    VM's memory goes, every console and device is closed (a Unix socket removed, a tty set back) and the terminal
    is given back as it was."""
    from .shutdown import Shutdown
    shutdown = Shutdown(timeout_s=float(cfg.get("vmmshim.poweroff_timeout_s"))).install()  # shutdown.py
    terminal = _Terminal()
    pidfile = _write_pidfile(cfg.get("pidfile"))
    vm = platform = control = restore = None
    try:
        if cfg.get("restore"):
            from .snapshot.restore import prepare
            restore, cfg = prepare(cfg)           # the checkpoint's configuration, this command line's keys over it
        vm = _create_vm(cfg, memfile=restore.memory_path if restore else None)
        vm.cfg = cfg
        image = None
        if restore is None:
            from .firmware.boot import boot_image
            image = boot_image(cfg, vm.lowmem, vm.highmem)
        uarts = {name: cfg.get(f"lpc.{name}.path") for name in ("com1", "com2", "com3", "com4")
                 if cfg.get(f"lpc.{name}.path")}
        from .platform import Platform
        platform = Platform(vm, utc=not cfg.get_bool("rtc.use_localtime"), uarts=uarts, on_escape=shutdown.escape)
        if cfg.get("lpc.debug_exit.port"):
            from bhyve_devices.debugexit import PORT_SIZE, DebugExit
            vm.extra_devices["debug-exit"] = DebugExit(lambda status: vm.stop(status))
            vm.add_port_device(cfg.get_int("lpc.debug_exit.port", 0, 0xFFFF), PORT_SIZE,
                               vm.extra_devices["debug-exit"], "debug-exit")
        vm.platform = platform
        from .machine import build_pci_and_tables
        vm.pci_host = build_pci_and_tables(vm, cfg, platform, tables=restore is None)
        if restore is None:
            for gpa, data in image.writes:
                vm.load(gpa, data)
            vm.set_boot_state(0, image.regs, image.segs, image.gdtr, image.idtr)
        else:
            restore.apply(vm)
        if os.environ.get("VMMSHIM_TRACE_MMIO"):
            vm.mmio.trace = sys.stderr
        _debug_dumper(vm, platform)
        if cfg.get_int("gdb.port", 0, 0xFFFF) if cfg.get("gdb.port") else 0:
            from .gdb.server import GdbStub
            vm.debugger = GdbStub(vm, cfg.get("gdb.address", "127.0.0.1"), cfg.get_int("gdb.port", 0, 0xFFFF),
                                  wait=cfg.get_bool("gdb.wait"))
            vm.closers.append(vm.debugger.close)
        if cfg.get_bool("vmmshim.control"):
            from .control import ControlSocket
            control = ControlSocket.open(vm)      # vmmshim ctl; None where it cannot be made
        shutdown.say = platform.say
        shutdown.running(platform.press_power_button, lambda why: vm.stop(EXIT_POWEROFF, why))
        if restore is not None:
            status = vm.run(vcpus=restore.started, on_start=restore.after_start)
        else:
            status = vm.run()
    finally:
        if control is not None:
            control.close()
        shutdown.cancel()
        _tear_down(cfg, vm, platform)
        _remove_pidfile(pidfile)
        terminal.restore()
        shutdown.uninstall()
    if vm.error:
        lines = vm.error.splitlines()
        print(f"vmmshim: {lines[0]}", file=sys.stderr)
        if os.environ.get("VMMSHIM_DEBUG"):
            print("\n".join(lines[1:]), file=sys.stderr)
    return status


def _create_vm(cfg, memfile=None):
    from ops.nvmm import nvmm_init
    from ops.nvmm_ops import VmmOpsNvmm
    from .vm import VM, VmConfig
    ncpus, memsize = cfg.get_int("cpus", 1, 64), cfg.get_int("memory.size", 1 << 20)
    gil_switch(cfg)
    provider = nvmm_init(cfg.get("vmmshim.provider"))
    return VM(VmmOpsNvmm(provider), VmConfig(ncpus=ncpus, memsize=memsize, strictio=cfg.get_bool("x86.strictio"),
                                             ignore_msrs=not cfg.get_bool("x86.strictmsr"),
                                             x2apic=cfg.get_bool("x86.x2apic"), name=cfg.get("name"),
                                             kvm_pv=cfg.get_bool("x86.kvm_pv"),
                                             pv_eoi=cfg.get_bool("x86.pv_eoi"),
                                             tsc_deadline=cfg.get_bool("x86.tsc_deadline"),
                                             posted_io=cfg.get_bool("vmmshim.posted_io"),
                                             doorbells=cfg.get_bool("vmmshim.doorbells"),
                                             halt_serve=cfg.get_bool("vmmshim.halt_serve"),
                                             answer_io=cfg.get_bool("vmmshim.answer_io"),
                                             answer_mmio=cfg.get_bool("vmmshim.answer_mmio"),
                                             exit_notify=cfg.get_names("vmmshim.exit_notify"), memfile=memfile))


def _tear_down(cfg, vm, platform):
    """Stops the vCPUs (a setup error or a bug may leave one running), then closes the consoles, the devices and
    the VM, in that order: a device is never closed under a running vCPU, nor memory unmapped under one."""
    stopped = vm is None or vm.end(END_WAIT_S)
    if vm is not None and vm.status is not None and cfg.get_bool("vmmshim.stats"):
        for vcpu, st in vm.stats().items():
            print(f"vmmshim: vcpu{vcpu} {st}", file=sys.stderr)
        bells = vm.doorbells
        print(f"vmmshim: doorbells rings {bells.rings} (served by a halting vCPU {bells.idle_served}), "
              f"in the hypervisor {bells.hardware}", file=sys.stderr)
        cpu = os.times()
        print(f"vmmshim: CPU seconds: process {cpu.user + cpu.system:.2f}, threads still running "
              f"{_thread_cpu()}", file=sys.stderr)
    if platform is not None:
        platform.close()
    if vm is not None and stopped:
        vm.close()


def _thread_cpu():
    """``{thread name: CPU seconds}`` of the process's live threads (``/proc``; empty where there is none)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out = {}
    for t in threading.enumerate():
        try:
            with open(f"/proc/self/task/{t.native_id}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            continue
        out[t.name] = round((int(fields[11]) + int(fields[12])) / tick, 2)     # utime, stime
    return out


def _write_pidfile(path):
    """xhyve's ``-F``: the process ID in ``path`` while the VM exists (an error names the path and the flag)."""
    if not path:
        return None
    try:
        with open(path, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as e:
        raise OSError(e.errno, f"-F {path}: {e.strerror}") from None
    return path


def _remove_pidfile(path):
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


class _Terminal:
    """The termios state of stdin when the command started, set back on every exit path (the stdio console sets
    it raw; a setup error or a bug must not leave the user's shell that way)."""

    def __init__(self, fd=0):
        self.fd, self.saved = fd, None
        try:
            if os.isatty(fd):
                import termios
                self.saved = termios.tcgetattr(fd)
        except OSError:
            pass

    def restore(self):
        if self.saved is not None:
            import termios
            try:
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            except OSError:
                pass


def _debug_dumper(vm, platform):
    """``VMMSHIM_DEBUG_DUMP=S``: the devices' and vCPUs' state on stderr every S seconds."""
    dump = os.environ.get("VMMSHIM_DEBUG_DUMP")
    if not dump:
        return
    import threading
    import time

    def dumper():
        while vm.status is None:
            time.sleep(float(dump))
            for line in vm.debug_state() + platform.debug_state():
                print(f"[vmmshim] {line}", file=sys.stderr, flush=True)
    threading.Thread(target=dumper, daemon=True).start()


def reported(body):
    """``body()``'s exit status, or EXIT_ERROR with one line on stderr for a bad flag, a bad image, a missing
    hypervisor or a vmmshim bug (``VMMSHIM_DEBUG=1`` re-raises the last)."""
    from .shutdown import Interrupted
    try:
        return body()
    except (Interrupted, KeyboardInterrupt) as exc:
        print(f"vmmshim: {exc or 'interrupted'}", file=sys.stderr)
        return EXIT_ERROR
    except UsageError as exc:
        print(f"vmmshim: {exc} (vmmshim -h lists the flags)", file=sys.stderr)
        return EXIT_ERROR
    except (ConfigError, CheckpointError) as exc:
        print(f"vmmshim: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except (ValueError, OSError) as exc:     # LoaderError, ProviderUnavailable, unreadable files
        msg = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"vmmshim: {msg}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # noqa: BLE001 - a vmmshim bug: one line, status 4 (VMMSHIM_DEBUG=1 re-raises)
        if os.environ.get("VMMSHIM_DEBUG"):
            raise
        from .vm import describe_exception
        print(f"vmmshim: internal error: {describe_exception(exc)} (VMMSHIM_DEBUG=1 shows where)", file=sys.stderr)
        return EXIT_ERROR
