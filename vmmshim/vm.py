"""The VM above the ops layer: guest memory as bhyve lays it out, one thread per vCPU, the exit-handler table
(bhyve ``vmexit.c``'s ``vmexit_handlers``: RDMSR, WRMSR, SPINUP_AP, SUSPENDED, HLT, VMX, BOGUS, and the
debugger's DEBUG, BPT, MTRAP and DB, handed to the GDB stub ``vmmshim/gdb/``), the port and
MMIO buses, and a clean shutdown with bhyve's exit statuses (0 reset, 1 power off, 2 halt, 3 triple fault,
4 error).

The VM talks to the CPU only through the calls ``ops/vmm_api.py`` declares, and describes itself to ``vm_init``
with a ``VmSpec``. Port and MMIO exits never come up here: the ops layer completes them by calling the buses'
callbacks (``io``, ``mem``) given in that spec. The fast paths (posted writes, published reads, doorbells, the idle
poll) are taken up in ``vmmshim/fastpaths.py``.

Memory: lowmem from 0 up to ``min(memsize, 3 GiB)``, highmem above 4 GiB for the rest (bhyve's
``vm_setup_memory``), one anonymous host mapping.

Not supported: memory hot-plug, more than one memory segment per range, the bootrom (``-l bootrom``).
"""

import ctypes
import mmap
import sys
import threading
import time

from ops.vmm_api import VmSpec
from ops.vmm_ops import SegDesc, VmExitCode as E, VmRegName as R, VmSuspendHow

from .bus import Bus
from .fastpaths import FastPaths
from .msr import MsrEmulator
from .snapshot.pause import Pauser
from .timers import TimerThread

GiB = 1 << 30
LOWMEM_LIMIT = 3 * GiB
HIGHMEM_BASE = 4 * GiB
EXIT_RESET, EXIT_POWEROFF, EXIT_HALT, EXIT_TRIPLEFAULT, EXIT_ERROR = 0, 1, 2, 3, 4
SUSPEND_STATUS = {VmSuspendHow.VM_SUSPEND_RESET: EXIT_RESET, VmSuspendHow.VM_SUSPEND_POWEROFF: EXIT_POWEROFF,
                  VmSuspendHow.VM_SUSPEND_HALT: EXIT_HALT, VmSuspendHow.VM_SUSPEND_TRIPLEFAULT: EXIT_TRIPLEFAULT}
HOW_OF_STATUS = {v: k for k, v in SUSPEND_STATUS.items()}
CONTINUE, ABORT = 0, 1
HUGE_PAGE = 2 << 20
# real-mode code segment for an AP started by SIPI (access: present, code, read, accessed)
AP_CS_ACCESS = 0x9B


class HostMemory:
    """Anonymous host memory with a stable address, backing guest RAM. From 2 MiB up it starts on a 2 MiB boundary
    and is advised for transparent huge pages (``MADV_HUGEPAGE``, as QEMU does its RAM), so that the hypervisor
    can map the guest with 2 MiB pages where the host allows (THP ``always`` or ``madvise``)."""

    def __init__(self, size, path=None):
        """``path``: a checkpoint's memory file, mapped copy-on-write (the guest's writes never reach it)."""
        self.size = size
        if path is not None:
            with open(path, "rb") as f:
                self.mm = mmap.mmap(f.fileno(), size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
            self.addr = self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
            return
        pad = HUGE_PAGE if size >= HUGE_PAGE else 0
        self.mm = mmap.mmap(-1, size + pad,
                            mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0))
        base = self._base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.addr = (base + pad - 1) & ~(HUGE_PAGE - 1) if pad else base
        if pad and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                self.mm.madvise(mmap.MADV_HUGEPAGE, self.addr - base, size)
            except OSError:
                pass                    # THP compiled out or "never": 4 KiB pages, as before

    def view(self):
        """The guest RAM as one memoryview (lowmem, then highmem), for a checkpoint's memory file."""
        off = self.addr - self._base
        return memoryview(self.mm)[off:off + self.size]


class VmConfig:
    def __init__(self, ncpus=1, memsize=256 << 20, strictio=False, ignore_msrs=False, x2apic=False, name="vm",
                 kvm_pv=False, pv_eoi=False, posted_io=True, doorbells=True, answer_io=True, halt_serve=True,
                 memfile=None, tsc_deadline=False, answer_mmio=True, exit_notify=()):
        self.ncpus, self.memsize, self.strictio = ncpus, memsize, strictio
        self.memfile = memfile          # a checkpoint's memory file to map as RAM (restore), else None
        self.ignore_msrs, self.x2apic, self.name = ignore_msrs, x2apic, name
        self.kvm_pv, self.pv_eoi, self.posted_io = kvm_pv, pv_eoi, posted_io
        self.doorbells, self.answer_io, self.halt_serve = doorbells, answer_io, halt_serve
        self.tsc_deadline, self.answer_mmio = tsc_deadline, answer_mmio
        self.exit_notify = frozenset(exit_notify)   # devices (by name) whose doorbells stay exits


class VM:
    def __init__(self, ops, config, log=None):
        self.ops, self.config = ops, config
        self.log = log or (lambda msg: print(msg, file=sys.stderr))
        self.timers = TimerThread(on_error=self._timer_error)
        self.pio = Bus("port", strict=config.strictio, on_unhandled=self._unhandled, is_port_bus=True)
        self.mmio = Bus("mmio", strict=config.strictio, on_unhandled=self._unhandled)
        self.io, self.mem = self.pio.io, self.mmio.access
        self.msrs = MsrEmulator(ignore_unknown=config.ignore_msrs)
        self.status = None
        self.error = None
        self._status_lock = threading.Lock()
        self.threads = {}
        self.vcpu_cpu_s = {}        # a vCPU thread's CPU seconds when it ended
        self._loops = threading.Condition()     # guards _looping; notified when a vCPU loop ends
        self._looping = set()                   # vCPUs whose loop has not returned yet
        self.closers = []           # device close() callables, run by close()
        self.debugger = None        # the GDB stub (vmmshim/gdb/server.py) when -G asked for one
        self.pauser = Pauser(self)  # every vCPU held at a quiet point (checkpoints, ctl --pause)
        self.platform = self.pci_host = self.cfg = None     # set by the runner (checkpoints read them)
        self.extra_devices = {}     # devices outside the platform and PCI a checkpoint saves (debug-exit)
        self.exit_counts = {}       # vCPU -> list of VM exits handled here, by vm_exitcode
        self.vmi = ops.vm_init(VmSpec(timers=self.timers, io=self.io, mem=self.mem, x2apic=config.x2apic,
                                      kvm_pv=config.kvm_pv, pv_eoi=config.pv_eoi,
                                      tsc_deadline=config.tsc_deadline))
        self.fast = FastPaths(self)
        self.lowmem = min(config.memsize, LOWMEM_LIMIT)
        self.highmem = config.memsize - self.lowmem
        self.ram = HostMemory(config.memsize, config.memfile)
        ops.vm_mem_alloc(self.vmi, self.ram, 0, 0, self.lowmem)
        if self.highmem:
            ops.vm_mem_alloc(self.vmi, self.ram, self.lowmem, HIGHMEM_BASE, self.highmem)
        self.vlapics = []
        for i in range(config.ncpus):
            ops.vcpu_init(self.vmi, i)
            self.vlapics.append(ops.vlapic_init(self.vmi, i))
        self.handlers = {
            E.VM_EXITCODE_RDMSR: self._vmexit_rdmsr, E.VM_EXITCODE_WRMSR: self._vmexit_wrmsr,
            E.VM_EXITCODE_SPINUP_AP: self._vmexit_spinup_ap, E.VM_EXITCODE_SUSPENDED: self._vmexit_suspended,
            E.VM_EXITCODE_BOGUS: self._vmexit_bogus, E.VM_EXITCODE_HLT: self._vmexit_bogus,
            E.VM_EXITCODE_VMX: self._vmexit_vmx,
            E.VM_EXITCODE_DEBUG: self._vmexit_debug, E.VM_EXITCODE_BPT: self._vmexit_debug,
            E.VM_EXITCODE_MTRAP: self._vmexit_debug, E.VM_EXITCODE_DB: self._vmexit_debug,
        }

    # -- memory and devices -----------------------------------------------------------------------------------
    def view(self, gpa, size):
        """Bounds-checked view of guest RAM (``EFAULT`` outside it): the GuestMemory devices are given."""
        return self.ops.vm_gpa_view(self.vmi, gpa, size)

    def load(self, gpa, data):
        self.view(gpa, len(data))[:] = data

    def add_port_device(self, base, size, device, name=None):
        """Maps ``device`` at ports ``[base, base+size)``, with the fast paths it offers (``vmmshim/fastpaths.py``:
        posted writes, published reads)."""
        self.pio.insert(base, size, device, name)
        self.fast.port_device(base, device)

    def add_mmio_device(self, base, size, device, name=None):
        self.mmio.insert(base, size, device, name)

    def add_doorbells(self, base, pio, bells, group=None, name=None):
        """Registers doorbells the provider signals (see :meth:`vmmshim.fastpaths.FastPaths.add_doorbells`)."""
        return self.fast.add_doorbells(base, pio, bells, group, name)

    def remove_doorbells(self, keys):
        self.fast.remove_doorbells(keys)

    def bar_mapped(self, window, dev, idx, base, pio, name=None):
        """A PCI BAR is decoded at ``base``: its doorbells follow it (``vmmshim/fastpaths.py``)."""
        self.fast.bar_mapped(window, dev, idx, base, pio, name)

    def bar_unmapped(self, window):
        self.fast.bar_unmapped(window)

    @property
    def doorbells(self):
        return self.fast.doorbells

    @property
    def posted_ports(self):
        return self.fast.posted_ports

    def io_exits(self, vcpu):
        """``(port, mmio)``: the guest's port accesses that reached a device of the port bus by an exit or an
        answered read, and its MMIO exits to the MMIO bus (not the LAPIC's or IOAPIC's)."""
        st = self.ops.vcpu_stats(self.vmi, vcpu)
        return st["exits"].get("IO", 0) + st["answered_io"], st["bus_mmio"]

    def isa_irq(self, irq):
        """An IrqLine for ISA interrupt ``irq`` (8259 input and IOAPIC pin)."""
        return _IsaLine(self, irq)

    # -- registers (the boot state a loader computed) ----------------------------------------------------------
    def set_boot_state(self, vcpu, regs=None, segs=None, gdtr=None, idtr=None):
        ops, vmi = self.ops, self.vmi
        for name, (sel, base, limit, access) in (segs or {}).items():
            num = R[f"VM_REG_GUEST_{name.upper()}"]
            ops.vmsetdesc(vmi, vcpu, num, SegDesc(base, limit, access))
            ops.vmsetreg(vmi, vcpu, num, sel)
        for num, value in (("GDTR", gdtr), ("IDTR", idtr)):
            if value is not None:
                ops.vmsetdesc(vmi, vcpu, R[f"VM_REG_GUEST_{num}"], SegDesc(value[0], value[1], 0))
        order = ("cr0", "cr4", "efer", "cr3")     # CR0/CR4 before EFER so LMA follows LME and PG
        for name in sorted(regs or {}, key=lambda n: order.index(n) if n in order else len(order)):
            ops.vmsetreg(vmi, vcpu, R[f"VM_REG_GUEST_{name.upper()}"], regs[name])

    # -- running -----------------------------------------------------------------------------------------------
    def run(self, rip=None, timeout=None, vcpus=(0,), on_start=None):
        """Runs the BSP (APs start through INIT/SIPI) until the VM suspends or fails; returns the exit
        status. A restored VM starts every vCPU that had started (``vcpus``) where its state says, then calls
        ``on_start(vm)``."""
        for v in vcpus:
            self._start_vcpu(v, rip if v == 0 else None)
        if on_start is not None:
            on_start(self)
        done = self._wait(timeout)
        if not done:
            self.stop(EXIT_ERROR, "timed out")
            self._wait(10)
        self.timers.close()
        return self.status

    def _wait(self, timeout):
        """True once every vCPU loop has ended (False when ``timeout`` seconds passed first). The caller sleeps
        until a loop ends: no polling while the guest runs or idles."""
        import time
        end = None if timeout is None else time.monotonic() + timeout
        with self._loops:
            while self._looping:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._loops.wait(left)
        for t in list(self.threads.values()):
            t.join(1)                        # past its loop: only returning
        return True

    def _start_vcpu(self, vcpu, rip):
        t = threading.Thread(target=self._vcpu_loop, args=(vcpu, rip), name=f"vcpu{vcpu}", daemon=True)
        self.threads[vcpu] = t
        with self._loops:
            self._looping.add(vcpu)
        t.start()

    def _vcpu_loop(self, vcpu, rip):
        try:
            self._vcpu_run(vcpu, rip)
        finally:
            self.vcpu_cpu_s[vcpu] = time.thread_time()      # for -o vmmshim.stats
            with self._loops:
                self._looping.discard(vcpu)
                self._loops.notify_all()

    def _vcpu_run(self, vcpu, rip):
        handlers = [None] * (max(self.handlers) + 1)
        for code, handler in self.handlers.items():
            handlers[code] = handler
        vmrun = self.ops.vcpu_runner(self.vmi, vcpu)
        counts = self.exit_counts[vcpu] = [0] * len(handlers)
        try:
            while True:
                vmexit = vmrun(rip)
                rip = None
                code = vmexit.exitcode
                handler = handlers[code] if code < len(handlers) else None
                if handler is None:
                    self.stop(EXIT_ERROR, f"vm exit[{vcpu}] {vmexit!r} has no handler")
                    return
                counts[code] += 1
                if handler(vcpu, vmexit) != CONTINUE:
                    return
        except Exception as exc:  # noqa: BLE001 - a VMM bug ends the VM with status 4 and a message
            import traceback
            self.stop(EXIT_ERROR, f"vcpu{vcpu}: vmmshim failed: {describe_exception(exc)} (VMMSHIM_DEBUG=1 shows "
                      f"where)\n{traceback.format_exc()}")

    def stats(self):
        """Exits by reason per vCPU: the VM's (vm_exitcode) and the ops layer's (NVMM reasons handled there)."""
        out = {}
        for vcpu, counts in sorted(self.exit_counts.items()):
            st = self.ops.vcpu_stats(self.vmi, vcpu)
            st["vm_exits"] = {E(i).name[len("VM_EXITCODE_"):]: n for i, n in enumerate(counts) if n}
            if vcpu in self.vcpu_cpu_s:
                st["cpu_s"] = round(self.vcpu_cpu_s[vcpu], 2)     # the thread's CPU time, once it has ended
            out[vcpu] = st
        return out

    def debug_state(self):
        """One line per vCPU: RIP, RFLAGS and the counters (a debugging aid; reads racily from another thread)."""
        lines = []
        for vcpu, st in self.stats().items():
            try:
                rip = self.ops.vmgetreg(self.vmi, vcpu, R.VM_REG_GUEST_RIP)
                rflags = self.ops.vmgetreg(self.vmi, vcpu, R.VM_REG_GUEST_RFLAGS)
            except OSError:
                rip = rflags = -1
            lines.append(f"vcpu{vcpu} rip={rip:#x} rflags={rflags:#x} {st}")
        lines += self.ops.vm_debug_state(self.vmi)
        snap = getattr(self.timers, "snapshot", None)
        if snap is not None:
            lines.append(f"timers {snap()}")
        return lines

    def stop(self, status, why=None):
        """Ends the VM with ``status`` (the first stop wins) and kicks every vCPU out."""
        with self._status_lock:
            if self.status is None:
                self.status = status
                self.error = why
        if self.debugger is not None:
            self.debugger.close()           # the vCPUs it holds go on to see the suspension
        self.ops.vm_suspend(self.vmi, HOW_OF_STATUS.get(status, VmSuspendHow.VM_SUSPEND_HALT))

    def request(self, how):
        """A device asks for reset or power off (pm.c, 8042, 0xCF9)."""
        self.stop(SUSPEND_STATUS[how])

    def end(self, timeout):
        """Stops the VM if a vCPU still runs (a setup error, a bug: status 4) and gives its vCPU threads
        ``timeout`` seconds; stops the timers. True when no vCPU thread is left (then :meth:`close` is safe)."""
        done = True
        if any(t.is_alive() for t in self.threads.values()):
            self.stop(EXIT_ERROR, "stopped by the host")
            done = self._wait(timeout)
        self.timers.close()
        return done

    def close(self):
        self.fast.close()
        for close in self.closers:
            if close is not None:
                close()
        self.ops.vm_cleanup(self.vmi)

    # -- exit handlers -----------------------------------------------------------------------------------------
    def _complete_msr(self, vcpu, vmexit, value=None):
        ops, vmi = self.ops, self.vmi
        if value is not None:
            ops.vmsetreg(vmi, vcpu, R.VM_REG_GUEST_RAX, value & 0xFFFFFFFF)
            ops.vmsetreg(vmi, vcpu, R.VM_REG_GUEST_RDX, value >> 32)
        ops.vmsetreg(vmi, vcpu, R.VM_REG_GUEST_RIP, vmexit.rip + vmexit.inst_length)

    def _vmexit_rdmsr(self, vcpu, vmexit):
        value = self.msrs.rdmsr(vmexit.u.code)
        if value is None:
            self.ops.vm_inject_exception(self.vmi, vcpu, 13, 0)
        else:
            self._complete_msr(vcpu, vmexit, value)
        return CONTINUE

    def _vmexit_wrmsr(self, vcpu, vmexit):
        if self.msrs.wrmsr(vmexit.u.code, vmexit.u.wval):
            self._complete_msr(vcpu, vmexit)
        else:
            self.ops.vm_inject_exception(self.vmi, vcpu, 13, 0)
        return CONTINUE

    def _vmexit_spinup_ap(self, vcpu, vmexit):
        """bhyve's ``spinup_ap``: AP ``target`` starts in real mode at ``rip`` (CS = rip >> 4, IP 0) on its own
        thread. One exit per AP: a broadcast SIPI comes back as one per AP it started. An AP already running
        is not restarted (INIT of a running vCPU is not supported)."""
        target, rip = vmexit.u.vcpu, vmexit.u.rip
        if target in self.threads or target >= self.config.ncpus:
            return CONTINUE
        ops, vmi = self.ops, self.vmi
        ops.vmsetdesc(vmi, target, R.VM_REG_GUEST_CS, SegDesc(rip, 0xFFFF, AP_CS_ACCESS))
        ops.vmsetreg(vmi, target, R.VM_REG_GUEST_CS, rip >> 4)
        ops.vm_activate_cpu(vmi, target)
        self._start_vcpu(target, 0)
        return CONTINUE

    def _vmexit_suspended(self, vcpu, vmexit):
        with self._status_lock:
            if self.status is None:
                self.status = SUSPEND_STATUS.get(vmexit.u.how, EXIT_ERROR)
        return ABORT

    def _vmexit_bogus(self, vcpu, vmexit):
        return CONTINUE

    def _vmexit_debug(self, vcpu, vmexit):
        """bhyve's ``vmexit_debug``/``vmexit_breakpoint``/``vmexit_mtrap``: the stub parks the vCPU while gdb
        holds the guest."""
        if self.pauser.holding and vmexit.exitcode == E.VM_EXITCODE_DEBUG:
            self.pauser.park(vcpu)              # a checkpoint's quiet point (vmmshim/snapshot/pause.py)
        elif self.debugger is not None:
            self.debugger.vcpu_exit(vcpu, vmexit)
        return CONTINUE

    def _vmexit_vmx(self, vcpu, vmexit):
        try:
            why = self.ops.vcpu_failure(self.vmi, vcpu, vmexit.u.exit_reason)
        except OSError as exc:          # the vCPU's state is gone too: say what is known
            why = (f"vcpu{vcpu}: the CPU could not run the guest at rip {vmexit.rip:#x} (hardware exit reason "
                   f"{vmexit.u.exit_reason:#x}; its state could not be read: {exc.strerror})")
        self.stop(EXIT_ERROR, why)
        return ABORT

    def _timer_error(self, exc):
        import traceback
        self.stop(EXIT_ERROR, f"a device timer failed: {describe_exception(exc)}\n"
                  f"{''.join(traceback.format_exception(exc))}")

    def _unhandled(self, bus, addr, is_write, size):
        self.stop(EXIT_ERROR, f"unhandled {bus} {'write' if is_write else 'read'} of {size} bytes at {addr:#x} "
                  "(strict I/O, -e)")


def describe_exception(exc):
    """An exception as words, not a repr: ``OSError`` as its errno name and text, others as type and message."""
    import errno
    if isinstance(exc, OSError) and exc.errno:
        text = exc.strerror or str(exc)
        return f"{text} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _IsaLine:
    def __init__(self, vm, irq):
        self.vm, self.irq = vm, irq

    def set_level(self, level):
        self.vm.ops.vm_isa_set_irq(self.vm.vmi, self.irq, level)

    def pulse(self):
        """False when the edge merged with one still pending (``vm_isa_pulse_irq``), else True."""
        return self.vm.ops.vm_isa_pulse_irq(self.vm.vmi, self.irq)
