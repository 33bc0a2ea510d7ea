"""An NVMM vCPU on a KVM vCPU: the comm-page contract over ``kvm_run`` (run, exits, events, assists, stop).

Linux KVM API (``Documentation/virt/kvm/api.rst``): the ``KVM_RUN`` ioctl and section 5, "The kvm_run structure".
The register state half (``getstate``/``setstate`` over the sync-regs area, written back before each entry) is
:class:`ops.nvmm.kvm.vcpu_state.KvmStateCache`, which :class:`KvmVcpu` inherits.

Exits are mapped to NVMM's (``_EXIT_MAP``); their payloads are decoded only when read (:class:`KvmExit`). KVM
completes an I/O, MMIO or MSR instruction itself at the next ``KVM_RUN``: the assists hand the callbacks a view of
``kvm_run``'s data, and an RDMSR/WRMSR completed the NVMM way (RAX/RDX and RIP = npc, or a #GP event) is turned
into KVM's completion (``msr.error``/``msr.data``) before the next entry.

The CPUID table is set at the first run (``KVM_SET_CPUID2``: :mod:`ops.nvmm.kvm.vcpu_cpuid`).

``stop()`` sets ``immediate_exit`` and sends ``SIG_KICK`` (:mod:`ops.nvmm.kvm.kick`) to the thread inside
``KVM_RUN``; the run returns ``EINTR`` and becomes a STOPPED exit. ``kick_posted()`` (vmmshim's extension) does the
same for an interrupt posted to the compiled loop (:mod:`ops.nvmm.kvm.intwin`), whose EINTR the loop keeps.

CR8 lives in ``kvm_run.cr8`` (KVM loads it at each entry and stores it at each exit without an in-kernel LAPIC):
NVMM's ``exitstate.cr8``; KVM's exit when the guest lowers it (``KVM_EXIT_SET_TPR``) is NVMM's TPR_CHANGED. KVM
answers CPUID.1:EDX.APIC from its own IA32_APIC_BASE.EN, which a leaf 1 mask on that bit sets.

Not supported (see ``capability().limits``): CPUID exits, configured TPR_CHANGED exits and NMI_READY exits (KVM
handles the NMI window itself); IO and MMIO exits must be completed with the assists, not by moving RIP by hand.
"""

import errno
import fcntl
import mmap
import os
import signal
import struct
import threading

from .. import api
from .. import constants as C
from .exit import KvmExit
from . import fastrun
from . import guest_debug as GD
from . import ioctls as K
from . import layouts as L
from . import intwin
from . import tscdeadline
from .kick import SIG_KICK
from .vcpu_cpuid import VcpuCpuidMixin
from .vcpu_state import KvmStateCache

_IOCTL = fcntl.ioctl

# KVM exit reason -> NVMM exit reason (None: decoded by _exit_special)
_EXIT_MAP = [C.NVMM_VCPU_EXIT_INVALID] * K.KVM_EXIT_NR
_EXIT_MAP[K.KVM_EXIT_IO] = C.NVMM_VCPU_EXIT_IO
_EXIT_MAP[K.KVM_EXIT_MMIO] = C.NVMM_VCPU_EXIT_MEMORY
_EXIT_MAP[K.KVM_EXIT_HLT] = C.NVMM_VCPU_EXIT_HALTED
_EXIT_MAP[K.KVM_EXIT_IRQ_WINDOW_OPEN] = C.NVMM_VCPU_EXIT_INT_READY
_EXIT_MAP[K.KVM_EXIT_SHUTDOWN] = C.NVMM_VCPU_EXIT_SHUTDOWN
_EXIT_MAP[K.KVM_EXIT_INTR] = C.NVMM_VCPU_EXIT_STOPPED
_EXIT_MAP[K.KVM_EXIT_X86_RDMSR] = C.NVMM_VCPU_EXIT_RDMSR
_EXIT_MAP[K.KVM_EXIT_X86_WRMSR] = C.NVMM_VCPU_EXIT_WRMSR
# Without an in-kernel LAPIC KVM exits when the guest lowers CR8 (the new value in kvm_run.cr8): NVMM's TPR_CHANGED
_EXIT_MAP[K.KVM_EXIT_SET_TPR] = C.NVMM_VCPU_EXIT_TPR_CHANGED
# KVM_SET_GUEST_DEBUG's exits (an int3, a single step, a debug register): vmmshim's NVMM_VCPU_EXIT_DEBUG
_EXIT_MAP[K.KVM_EXIT_DEBUG] = api.NVMM_VCPU_EXIT_DEBUG
_IO_PREFIXES = frozenset((0x66, 0x67, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0xF0))
# exits whose instruction KVM completes at the next KVM_RUN
_NEEDS_COMPLETION = frozenset((K.KVM_EXIT_IO, K.KVM_EXIT_MMIO, K.KVM_EXIT_X86_RDMSR, K.KVM_EXIT_X86_WRMSR))
_MMIO_FMT = struct.Struct("<Q8sIB")      # kvm_run.mmio: phys_addr, data, len, is_write
assert _MMIO_FMT.size - 1 + L.MMIO_GPA == L.MMIO_IS_WRITE
K_PIO_DATA_OFFSET = 4096   # KVM_PIO_PAGE_OFFSET * PAGE_SIZE: where KVM puts port-I/O data


class KvmVcpu(VcpuCpuidMixin, KvmStateCache, api.Vcpu):
    def __init__(self, machine, cpuid):
        super().__init__(machine, cpuid)
        self.exit = KvmExit(self)
        prov = machine.provider
        self.fd = _IOCTL(machine.vmfd, K.KVM_CREATE_VCPU, cpuid)
        self.mm = mmap.mmap(self.fd, prov.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._mv = memoryview(self.mm)
        self._cached = 0          # categories already converted into self.state
        self._commit = 0          # categories setstate marked for the next run
        self._msr_pending = None  # (is_rdmsr, rip) of an MSR exit KVM will complete at the next run
        self._tsc_buf = None      # guest_tsc's KVM_GET_MSRS buffer
        self._cpuid_masks = {}
        self._cpuid_applied = False
        self._cpuid_view = None         # guest_cpuid's function, until the masks change
        self._xcr0 = 1
        self._thread = None
        self._in_run = False            # inside the run path's KVM_RUN: a stop() signals the thread
        self.run_stats = None           # the compiled loop's counters (fastrun.c's vmmshim_run_stats), once used
        self.tscdl = None               # IA32_TSC_DEADLINE in the compiled loop (tscdeadline.py), once asked for
        self.intwin = None              # the interrupt the compiled loop injects at the window (intwin.py)
        self._tick_run = None           # the ticker's view of kvm_run (tsc_deadline)
        self._tick_thread = None        # the thread the ticker's kicks signal (its get_ident)
        self._kicks = 0           # stop() calls, so _complete_exit does not swallow one
        self._lock = threading.Lock()
        # The first entry has no exit behind it: fill the sync area ourselves so it is always current.
        regs = bytearray(L.KVM_REGS.sizeof())
        sregs = bytearray(L.KVM_SREGS.sizeof())
        events = bytearray(L.KVM_VCPU_EVENTS.sizeof())
        _IOCTL(self.fd, K.KVM_GET_REGS, regs)
        _IOCTL(self.fd, K.KVM_GET_SREGS, sregs)
        _IOCTL(self.fd, K.KVM_GET_VCPU_EVENTS, events)
        self._mv[L.RUN_S_REGS:L.RUN_S_REGS + len(regs)] = regs
        self._mv[L.RUN_S_SREGS:L.RUN_S_SREGS + len(sregs)] = sregs
        self._mv[L.RUN_S_EVENTS:L.RUN_S_EVENTS + len(events)] = events
        struct.pack_into("<QQ", self.mm, L.RUN_VALID_REGS, K.KVM_SYNC_X86_ALL, 0)
        self._slow = True         # the next run must commit state or apply CPUID first
        self._install_fast_paths()

    # -- events ------------------------------------------------------------------------------------------------
    def inject(self):
        type_, vector, error = self.event.get()
        if type_ == C.NVMM_VCPU_EVENT_INTR:
            self.complete_exit()
            if vector == C.X86_EXC_NMI:
                _IOCTL(self.fd, K.KVM_NMI)
                return
            try:
                _IOCTL(self.fd, K.KVM_INTERRUPT, struct.pack("<I", vector))
            except OSError as exc:
                raise api.nvmm_error(exc.errno, f"KVM refused interrupt vector {vector}") from None
            return
        if type_ != C.NVMM_VCPU_EVENT_EXCP:
            raise api.nvmm_error(errno.EINVAL, f"unknown event type {type_}")
        if vector >= 32 or vector in C.NVMM_EXCP_REFUSED:
            raise api.nvmm_error(errno.EINVAL, f"exception vector {vector} cannot be injected")
        if self._msr_pending is not None and vector == C.X86_EXC_GP:
            self._msr_pending = None          # KVM raises the #GP itself when it completes the MSR access
            self.mm[L.MSR_ERROR] = 1
            return
        has_error = vector in C.X86_EXC_HAS_ERROR
        struct.pack_into("<BBBBI", self.mm, L.RUN_S_EVENTS, 1, vector, int(has_error), 0,
                         error & 0xFFFFFFFF if has_error else 0)
        self._events_flags(struct.unpack_from("<I", self.mm, L.RUN_S_EVENTS + 20)[0] &
                           ~K.KVM_VCPUEVENT_VALID_PAYLOAD)
        struct.pack_into("<Q", self.mm, L.RUN_DIRTY_REGS,
                         struct.unpack_from("<Q", self.mm, L.RUN_DIRTY_REGS)[0] | K.KVM_SYNC_X86_EVENTS)

    def complete_exit(self):
        if self.exit.kvm_reason not in _NEEDS_COMPLETION:
            return False
        self._complete_exit()
        return True

    def _complete_exit(self):
        """Let KVM finish the instruction that exited (an I/O, MMIO or MSR access completes only at the next
        ``KVM_RUN``) before an interrupt is queued: ``KVM_RUN`` with ``immediate_exit`` completes it and returns
        ``EINTR`` without entering the guest (KVM API, ``kvm_run.immediate_exit``). Queued before the completion,
        an interrupt was lost after a user-space RDMSR that failed: the #GP KVM queued while completing it took
        the entry, and KVM 6.1 cleared the interrupt with it (the vlapic had it in service, the guest never ran
        its handler: the lab's hang after "Mountpoint-cache"). Done once per exit (``kvm_reason`` becomes INTR)."""
        if self._commit:
            self._commit_state()
        self._msr_pending = None
        kicks = self._kicks
        self.mm[L.RUN_IMMEDIATE_EXIT] = 1
        try:
            _IOCTL(self.fd, K.KVM_RUN)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise api.nvmm_error(exc.errno, "KVM_RUN (completing the exit) failed") from None
        self.mm[L.RUN_IMMEDIATE_EXIT] = 0
        if self._kicks != kicks:            # a stop() meanwhile: keep its request for the next run
            self.mm[L.RUN_IMMEDIATE_EXIT] = 1
        self._cached = 0
        self.exit.kvm_reason = K.KVM_EXIT_INTR

    # -- run ---------------------------------------------------------------------------------------------------
    def _install_fast_paths(self):
        """``run`` and ``assist_io`` as closures over their locals: the per-exit path does no attribute or
        global look-up it can avoid (measured by ``bench/exit_bench.py``)."""
        vcpu, fd, mm, ex, views, machine = self, self.fd, self.mm, self.exit, self._io_fast_views(), self.machine
        ioctl, krun, kio, io = _IOCTL, K.KVM_RUN, K.KVM_EXIT_IO, C.NVMM_VCPU_EXIT_IO
        get_ident, slow_run, exit_other, run_error = threading.get_ident, self._run_slow, self._exit_other, \
            self._run_error
        unpack_io, data_off, assist_slow, cb = L.IO_FMT.unpack_from, K_PIO_DATA_OFFSET, self._assist_io_slow, \
            self.cbs.io

        posted, drain, ring_hdr, ring_off = machine.posted, machine._drain_posted, L.RING_HDR_FMT.unpack_from, \
            machine.provider.ring_offset

        compiled, after_io, after_mmio, kmmio = None, False, False, K.KVM_EXIT_MMIO
        intwin = self.intwin
        winst = intwin.struct if intwin is not None else None

        def run():
            nonlocal compiled, after_io, after_mmio
            if vcpu._slow:
                return slow_run()
            ident = vcpu._thread = get_ident()
            vcpu._in_run = True
            if ident != vcpu._tick_thread and vcpu.tscdl is not None:
                vcpu._tick_thread = ident
                vcpu.tscdl.bind()           # the thread its ticks signal
            answers, mmio = machine._answers, machine._mmio_answers
            tscdl = vcpu.tscdl
            # The compiled loop where it injects interrupts (intwin.py: a kick may post one while it runs), after a
            # port or MMIO exit (a console's IER access starts the run of LSR reads it answers; an AHCI handler's
            # status write, the reads after it) and while it serves IA32_TSC_DEADLINE; else the plain ioctl, which
            # costs less per call (measured natively: docs/lab.md)
            if winst is not None or (after_io and answers is not None and answers.count) or \
                    (after_mmio and mmio is not None and mmio.count) or (tscdl is not None and tscdl.struct.enabled):
                if compiled is None:
                    compiled = vcpu._compiled_run()
                err = compiled(answers.table if answers is not None else None,
                               mmio.struct if mmio is not None else None)       # KVM_RUN, in C
                failed = OSError(err, os.strerror(err)) if err else None
                if winst is not None and winst.state:
                    intwin.settle()         # the vlapic accepts what the loop injected before anything else
            else:
                try:
                    ioctl(fd, krun)
                    failed = None
                except OSError as exc:
                    failed = exc
            vcpu._in_run = False
            if failed is not None:
                if posted:
                    drain()
                return run_error(failed)
            if posted:
                first, last = ring_hdr(mm, ring_off)
                if first != last:
                    drain()                 # posted writes reach their device before this exit is handled
            vcpu._cached = 0
            k = mm[8]
            ex.kvm_reason = k
            if k == kio:
                after_io = True
                ex.reason = io
                return ex
            after_io, after_mmio = False, k == kmmio
            return exit_other(ex, k)

        def assist_io():
            if ex.reason != io:
                raise api.nvmm_error(errno.EINVAL, "assist_io after a non-IO exit")
            direction, size, port, count, off = unpack_io(mm, 32)
            if count == 1 and off == data_off:
                cb(port, direction == 0, views[size])
            else:
                assist_slow(direction, size, port, count, off)

        self.run, self.assist_io = run, assist_io

    def _compiled_run(self):
        """The compiled loop (``fastrun.c``) bound to this vCPU: ``f(answers, mmio) -> errno`` (0: an exit to handle).
        Only called once the machine has published a read, so the library is loaded."""
        ffi, lib = fastrun.load()
        lay = ffi.new("struct vmmshim_run_layout *", dict(
            kvm_run=K.KVM_RUN, reason_off=L.RUN_EXIT_REASON, io_off=L.RUN_U, exit_io=K.KVM_EXIT_IO,
            io_in=K.KVM_EXIT_IO_IN, data_off=K_PIO_DATA_OFFSET, run_size=len(self.mm), timing=fastrun.TIMING,
            exit_mmio=K.KVM_EXIT_MMIO))
        # the view keeps the mapping alive (a later mm.close() in _destroy then leaves it to the last reference)
        runp = ffi.from_buffer("uint8_t[]", self.mm)
        stats, fd, crun = ffi.new("struct vmmshim_run_stats *"), self.fd, lib.vmmshim_kvm_run
        self.run_stats = stats
        null = ffi.NULL
        tscdl = self.tscdl.struct if self.tscdl is not None else null
        intwin = self.intwin.struct if self.intwin is not None else null
        return lambda table, mmio: crun(fd, runp, lay, null if table is None else table,
                                        null if mmio is None else mmio, stats, tscdl, intwin)

    def tsc_deadline(self, tsc_hz):
        """vmmshim's extension: this vCPU's IA32_TSC_DEADLINE kept by the compiled loop (:mod:`.tscdeadline`), or
        None where it cannot be. Asked for once, before the first run, after :meth:`interrupt_window` (fasttick.c)."""
        if self.tscdl is None:
            self.tscdl = tscdeadline.make(self.fd, tsc_hz)
            if self.tscdl is not None and self.intwin is not None:
                ffi = fastrun.load()[0]     # the view keeps kvm_run mapped until _destroy took the tick back
                self._tick_run = ffi.from_buffer("uint8_t[]", self.mm)
                if not self.tscdl.attach_ticker(self.intwin, int(ffi.cast("uintptr_t", self._tick_run)), SIG_KICK):
                    ffi.release(self._tick_run)     # no ticker (it is opt-in): nothing needs the view
                    self._tick_run = None
            self._install_fast_paths()      # a new compiled loop, bound to it
        return self.tscdl

    def interrupt_window(self):
        """vmmshim's extension: this vCPU's interrupt for the window, injected by the compiled loop (:mod:`.intwin`),
        or None where it cannot be. Asked for once, before the first run."""
        if self.intwin is None:
            self.intwin = intwin.make()
            if self.intwin is not None:
                self.intwin.configure_halt(self.machine.provider.ring_offset, self.machine.waketimer)
                self.machine.intwins.append(self.intwin)
                self._install_fast_paths()      # a new compiled loop, bound to it
        return self.intwin

    def _callbacks_changed(self):
        self._install_fast_paths()

    def _io_fast_views(self):
        return [None] + [self._mv[K_PIO_DATA_OFFSET:K_PIO_DATA_OFFSET + n] for n in range(1, 9)]

    def _run_slow(self):
        if self._commit:
            self._commit_state()
        self._msr_pending = None
        if not self._cpuid_applied:
            self._apply_cpuid()
        self._slow = False
        return self.run()           # the fast path, now that nothing is pending

    def _run_error(self, exc):
        if exc.errno != errno.EINTR:
            raise api.nvmm_error(exc.errno, "KVM_RUN failed") from None
        self.clear_stop()
        self._cached = 0
        self.exit.reason = C.NVMM_VCPU_EXIT_STOPPED
        self.exit.kvm_reason = K.KVM_EXIT_INTR
        return self.exit

    def _exit_other(self, ex, kreason):
        mm = self.mm
        if mm[L.RUN_EXIT_REASON + 1] or mm[L.RUN_EXIT_REASON + 2] or mm[L.RUN_EXIT_REASON + 3]:
            kreason = struct.unpack_from("<I", mm, L.RUN_EXIT_REASON)[0]
            ex.kvm_reason = kreason
            ex.reason = C.NVMM_VCPU_EXIT_INVALID
            return ex
        ex.reason = _EXIT_MAP[kreason] if kreason < K.KVM_EXIT_NR else C.NVMM_VCPU_EXIT_INVALID
        if kreason == K.KVM_EXIT_IRQ_WINDOW_OPEN:
            mm[L.RUN_REQUEST_IRQ_WINDOW] = 0     # NVMM: the kernel disables window exiting itself
        elif kreason in (K.KVM_EXIT_X86_RDMSR, K.KVM_EXIT_X86_WRMSR):
            ex.rip = struct.unpack_from("<Q", mm, L.RUN_S_REGS + 16 * 8)[0]
            self._msr_pending = (kreason == K.KVM_EXIT_X86_RDMSR, ex.rip)
            self._slow = True
        elif kreason == K.KVM_EXIT_INTR:
            self.clear_stop()
        elif kreason == K.KVM_EXIT_DEBUG:
            self.debug_exit = GD.decode_exit(self)
        return ex

    # -- guest debugging (guest_debug.py) ---------------------------------------------------------------------
    _debug = (0, ())         # (kvm_guest_debug.control, hw slots) last set

    def set_guest_debug(self, step=False, sw_bp=False, hw=()):
        GD.set_guest_debug(self, step, sw_bp, hw)

    def inject_bp(self):
        GD.inject_bp(self)

    def tsc_frequency(self):
        """``KVM_GET_TSC_KHZ``: the rate KVM runs this vCPU's TSC at."""
        try:
            khz = fcntl.ioctl(self.fd, K.KVM_GET_TSC_KHZ)
        except OSError:
            return None
        return khz * 1000 if khz > 0 else None

    def stop(self):
        """``nvmm_vcpu_stop`` plus the kick: safe from any thread, before or during a run. The signal goes only
        to a thread inside ``KVM_RUN`` (``_in_run``): a thread outside it sees ``immediate_exit`` at its next
        entry. Both flags are set and read under the GIL, so a run that starts after the test finds
        ``immediate_exit`` already set."""
        self._kicks += 1
        if self.intwin is not None:
            self.intwin.stop(True)          # this EINTR is Python's, not a kick the compiled loop serves
        self.mm[L.RUN_IMMEDIATE_EXIT] = 1
        self._signal()
        if self.intwin is not None:
            self.intwin.wake()              # the loop may sleep in a HLT (fasthalt.c)

    def kick_posted(self):
        """vmmshim's extension: the kick after :meth:`.intwin.IntWindow.kick` posted an interrupt (any thread): the
        compiled loop takes its EINTR itself, or ends its sleep in a HLT with it."""
        self.mm[L.RUN_IMMEDIATE_EXIT] = 1
        self._signal()
        self.intwin.wake()

    def _signal(self):
        with self._lock:
            tid = self._thread
            if self._in_run and tid is not None and tid != threading.get_ident():
                try:
                    signal.pthread_kill(tid, SIG_KICK)
                except ProcessLookupError:
                    pass

    def clear_stop(self):
        if self.intwin is not None:
            self.intwin.stop(False)
        self.mm[L.RUN_IMMEDIATE_EXIT] = 0

    def answered_io(self):
        return self.run_stats.answered if self.run_stats is not None else 0

    def answered_mmio(self):
        return self.run_stats.answered_mmio if self.run_stats is not None else 0

    # -- assists -----------------------------------------------------------------------------------------------
    def _assist_io_slow(self, direction, size, port, count, off):
        """String (REP INS/OUTS) forms and unusual data offsets: one callback per element, as libnvmm."""
        if off + count * size > len(self._mv) or size not in (1, 2, 4):
            raise api.nvmm_error(errno.EFAULT, f"KVM reported I/O data outside kvm_run ({off:#x}+{count}x{size})")
        is_in, mv, cb = direction == K.KVM_EXIT_IO_IN, self._mv, self.cbs.io
        for i in range(count):
            cb(port, is_in, mv[off + i * size:off + (i + 1) * size])

    def assist_mem(self):
        if self.exit.reason != C.NVMM_VCPU_EXIT_MEMORY:
            raise api.nvmm_error(errno.EINVAL, "assist_mem after a non-MEMORY exit")
        gpa, _, length, is_write = _MMIO_FMT.unpack_from(self.mm, L.MMIO_GPA)
        self.cbs.mem(gpa, bool(is_write), self._mv[L.MMIO_DATA:L.MMIO_DATA + min(length, 8)])

    def decode_io_insn(self):
        """``(rep, str, length, address_size)`` of the I/O instruction at CS:RIP (for ``exit.io``)."""
        rip = struct.unpack_from("<Q", self.mm, L.RUN_S_REGS + 16 * 8)[0]
        self.exit.rip = rip
        sregs = self._sregs()
        cs_base, cs_l, cs_db = sregs[0], sregs[8], sregs[6]
        efer = L.sregs_efer(sregs)
        long64 = bool(efer & C.EFER_LMA) and cs_l
        addr_size = 8 if long64 else (4 if cs_db else 2)
        try:
            gpa, _ = self.gva_to_gpa(cs_base + rip if not long64 else rip)
            code = self.machine.read_phys(gpa, 15)
        except OSError:
            return False, False, 1, addr_size
        i, rep = 0, False
        while i < 14 and (code[i] in _IO_PREFIXES or (long64 and 0x40 <= code[i] <= 0x4F)):
            rep |= code[i] in (0xF2, 0xF3)
            if code[i] == 0x67:
                addr_size = 4 if long64 else (2 if addr_size == 4 else 4)
            i += 1
        op = code[i]
        str_ = 0x6C <= op <= 0x6F
        length = i + (2 if op in (0xE4, 0xE5, 0xE6, 0xE7) else 1)
        return rep and str_, str_, length, addr_size

    def _destroy(self):
        with self._lock:
            self._thread = None
        if self.tscdl is not None:
            self.tscdl.close()          # the ticker first lets go of the tick (and of kvm_run)
        if self._tick_run is not None:
            fastrun.load()[0].release(self._tick_run)
            self._tick_run = None
        if self.intwin is not None:
            self.intwin.close()
        self.run = self.assist_io = _destroyed
        try:
            self._mv.release()
            self.mm.close()
        except BufferError:
            pass   # a device still holds a view of kvm_run; the mapping goes with the last reference
        os.close(self.fd)


def _destroyed(*_):
    raise api.nvmm_error(errno.ENOENT, "vCPU destroyed")
