"""The NVMM primitives on Linux KVM: the provider (``/dev/kvm``) and the machine (a KVM VM).

KVM with a userspace interrupt controller has NVMM's shape: no ``KVM_CREATE_IRQCHIP``, so no in-kernel LAPIC,
IOAPIC, PIC or PIT; interrupts go in with ``KVM_INTERRUPT``. Guest memory is a set of KVM memory slots, one per
``gpa_map``; a mapping without write permission becomes a ``KVM_MEM_READONLY`` slot, whose writes exit as MMIO
(an NVMM MEMORY exit). MSRs that NVMM sends to userland exit here too: unknown MSRs through
``KVM_CAP_X86_USER_SPACE_MSR``, and through an MSR filter APIC_BASE, the x2APIC range and TSC_DEADLINE, because
the vlapic that owns them is in Python, and KVM's own paravirtual MSRs (kvmclock and the rest), which NVMM does
not know: the ops layer answers the clock ones itself (``ops/pvclock.py``), on every provider alike. The same filter
denies the MSRs the guest's CPUID does not offer (``ops/nvmm/x86/msr_policy.py``: KVM answers some of them
whatever CPUID says), so that they exit and the ops layer raises #GP; each vCPU adds its own at its first run.

Not supported: dirty-page logging, more machines or slots than the kernel allows (reported as ``ENOBUFS``).
"""

import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading

from .. import api
from .. import capability as capmod
from .. import constants as C
from .. import ProviderUnavailable
from ..x86 import cpuid_bits
from . import cpuid as cpuidmod
from . import cpuid_probe
from . import fastrun
from . import ioctls as K
from . import layouts as L
from . import msr_filter
from .kick import SIG_KICK

KVM_DEVICE = "/dev/kvm"
TSS_ADDR = 0xFFFBD000          # three pages below the BIOS area, as QEMU places them
IDENTITY_MAP_ADDR = 0xFFFBC000
MAX_CPUID_ENTRIES = 256
PAGE_SIZE = 4096
ENTRY_SIZE = L.RING_ENTRY_FMT.size
RING_ENTRIES = (PAGE_SIZE - L.RING_HDR_FMT.size) // ENTRY_SIZE     # KVM_COALESCED_MMIO_MAX
RING_DATA = L.RING_HDR_FMT.size     # the first entry
_U32 = struct.Struct("<I")
MSR_TSC_DEADLINE = 0x6E0
MSR_KVM_WALL_CLOCK, MSR_KVM_PV_BASE, MSR_KVM_PV_COUNT = 0x11, 0x4B564D00, 0x100   # 0x11-0x12: the old kvmclock
#: MSR ranges that must exit to userland although KVM knows them: (first, count).
USERLAND_MSR_RANGES = ((C.MSR_APICBASE, 1), (C.MSR_X2APIC_BASE, C.MSR_X2APIC_LAST - C.MSR_X2APIC_BASE + 1),
                      (MSR_TSC_DEADLINE, 1), (MSR_KVM_WALL_CLOCK, 2), (MSR_KVM_PV_BASE, MSR_KVM_PV_COUNT))
#: The same with KVM's own kvmclock answering MSR_KVM_WALL_CLOCK_NEW and MSR_KVM_SYSTEM_TIME_NEW (the first two
#: paravirtual MSRs); the others (PV EOI needs our local APIC) still exit.
KERNEL_CLOCK_MSRS = 2
USERLAND_MSR_RANGES_KERNEL_CLOCK = USERLAND_MSR_RANGES[:-1] + (
    (MSR_KVM_PV_BASE + KERNEL_CLOCK_MSRS, MSR_KVM_PV_COUNT - KERNEL_CLOCK_MSRS),)

_kick_handler_installed = False
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)


def ioctl_ulong(fd, request, value):
    """An ioctl whose argument is an ``unsigned long`` (``fcntl.ioctl`` only passes a C ``int``)."""
    ret = _libc.ioctl(fd, request, value)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def _install_kick_handler():
    global _kick_handler_installed
    if _kick_handler_installed:
        return
    if threading.current_thread() is not threading.main_thread():
        if signal.getsignal(SIG_KICK) in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise ProviderUnavailable(errno.EINVAL, "the KVM provider must first be opened from the main "
                                      "thread (it installs the vCPU kick signal handler)")
    else:
        signal.signal(SIG_KICK, lambda signum, frame: None)
        signal.siginterrupt(SIG_KICK, True)
    _kick_handler_installed = True


def is_paravirtual():
    """True when this /dev/kvm is kvm_pvm (runs guest supervisor code in an instruction emulator)."""
    return os.path.exists("/sys/module/kvm_pvm")


def hardware_kind():
    """``"kvm_intel"``, ``"kvm_amd"``, ``"kvm_pvm"`` or ``"unknown"``: which module backs /dev/kvm."""
    for mod in ("kvm_pvm", "kvm_intel", "kvm_amd"):
        if os.path.exists(f"/sys/module/{mod}"):
            return mod
    return "unknown"


#: What KVM_SET_GUEST_DEBUG gives on each kind of KVM (tests/kvm/test_gdb.py checks them): all of it by default;
#: kvm_pvm steps and matches execute breakpoints in debug registers, but its int3 is an EXCEPTION exit, not
#: USE_SW_BP's DEBUG exit, and data breakpoints never fire (tested on 6.18's kvm_pvm).
GUEST_DEBUG_ALL = (api.FEATURE_DEBUG_STEP, api.FEATURE_DEBUG_BP, api.FEATURE_DEBUG_HW, api.FEATURE_DEBUG_WATCH)
GUEST_DEBUG_BY_KIND = {"kvm_pvm": (api.FEATURE_DEBUG_STEP, api.FEATURE_DEBUG_HW)}


class KvmProvider(api.Provider):
    name = "kvm"

    def __init__(self):
        try:
            self.fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise ProviderUnavailable(errno.ENOENT, f"{KVM_DEVICE} does not exist (no KVM on this host: load "
                                      "kvm_intel or kvm_amd, or run in the nested lab)") from None
        except PermissionError:
            raise ProviderUnavailable(errno.EACCES, f"no permission to open {KVM_DEVICE} (join the kvm group "
                                      "or run as root)") from None
        version = fcntl.ioctl(self.fd, K.KVM_GET_API_VERSION)
        if version != K.KVM_API_VERSION:
            raise ProviderUnavailable(errno.EPROTO, f"KVM API version {version}, expected {K.KVM_API_VERSION}")
        for cap, what in ((K.KVM_CAP_SYNC_REGS, "sync regs"), (K.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"),
                          (K.KVM_CAP_X86_USER_SPACE_MSR, "user-space MSR exits"),
                          (K.KVM_CAP_X86_MSR_FILTER, "MSR filters")):
            if not self.check_extension(cap):
                raise ProviderUnavailable(errno.ENOTSUP, f"this KVM lacks {what} (capability {cap})")
        self.readonly_mem = bool(self.check_extension(K.KVM_CAP_READONLY_MEM))
        self.max_vcpus = self.check_extension(K.KVM_CAP_MAX_VCPUS) or self.check_extension(K.KVM_CAP_NR_VCPUS)
        self.max_slots = self.check_extension(K.KVM_CAP_NR_MEMSLOTS) or 32
        # posted port writes: the coalesced ring's page in a vCPU's mmap, 0 where this KVM has none for ports
        page = self.check_extension(K.KVM_CAP_COALESCED_MMIO) if self.check_extension(K.KVM_CAP_COALESCED_PIO) \
            else 0
        self.mmap_size = fcntl.ioctl(self.fd, K.KVM_GET_VCPU_MMAP_SIZE)
        self.ring_offset = page * PAGE_SIZE if page and (page + 1) * PAGE_SIZE <= self.mmap_size else 0
        # doorbells: ioeventfd, with a length of 0 (any MMIO write) where KVM has it
        self.ioeventfd = bool(self.check_extension(K.KVM_CAP_IOEVENTFD))
        self.ioeventfd_any_length = bool(self.check_extension(K.KVM_CAP_IOEVENTFD_ANY_LENGTH))
        self.supported_cpuid = self._supported_cpuid()
        self.kind = hardware_kind()
        _install_kick_handler()

    def check_extension(self, cap):
        return fcntl.ioctl(self.fd, K.KVM_CHECK_EXTENSION, cap)

    def _supported_cpuid(self):
        buf = bytearray(cpuidmod.pack_entries([[0] * 7] * MAX_CPUID_ENTRIES))
        struct.pack_into("<I", buf, 0, MAX_CPUID_ENTRIES)
        fcntl.ioctl(self.fd, K.KVM_GET_SUPPORTED_CPUID, buf)
        return cpuidmod.parse_entries(buf, struct.unpack_from("<I", buf, 0)[0])

    def capability(self):
        xcr0 = 0
        for e in self.supported_cpuid:
            if e[0] == 0xD and e[1] == 0:
                xcr0 = e[3] | (e[6] << 32)
        limits = {api.LIMIT_CPUID_EXIT, api.LIMIT_NMI_WINDOW, api.LIMIT_TPR_EXIT, api.LIMIT_CPUID_LATE}
        if self.kind == "kvm_pvm":
            limits |= {api.LIMIT_PAGING32, api.LIMIT_CPUID_MASK_1_7, api.LIMIT_SOFT_INT, api.LIMIT_IRQ_WINDOW_LATE,
                       capmod.LIMIT_TSC_WRITE}
            # offered where the guest's CPUID cannot be masked, and unusable (docs/msr.md)
            limits |= {capmod.limit_unusable(f) for f in cpuidmod.UNUSABLE_BY_KIND[self.kind]}
        features = {api.FEATURE_KERNEL_PVCLOCK}
        if self.ring_offset:
            features.add(api.FEATURE_POSTED_IO)
        if self.ioeventfd:
            features.add(api.FEATURE_DOORBELL)
        if fastrun.load() is not None:          # the compiled run loop answers published reads
            features |= {api.FEATURE_ANSWERED_IO, api.FEATURE_ANSWERED_MMIO}
        if self.check_extension(K.KVM_CAP_SET_GUEST_DEBUG):
            features |= set(GUEST_DEBUG_BY_KIND.get(self.kind, GUEST_DEBUG_ALL))
        if api.FEATURE_DEBUG_STEP not in features:
            limits.add(api.LIMIT_GUEST_DEBUG)
        if api.FEATURE_DEBUG_BP not in features:
            limits.add(capmod.LIMIT_GUEST_DEBUG_INT3)
        if api.FEATURE_DEBUG_WATCH not in features:
            limits.add(capmod.LIMIT_GUEST_DEBUG_WATCH)
        return api.Capability(
            max_machines=128, max_vcpus=self.max_vcpus, max_ram=1 << 46,
            arch=api.CapMd(vcpu_conf_support=C.NVMM_CAP_ARCH_VCPU_CONF_CPUID, xcr0_mask=xcr0,
                           mxcsr_mask=0xFFBF, conf_cpuid_maxops=MAX_CPUID_ENTRIES),
            limits=frozenset(limits), features=frozenset(features))

    def machine_create(self):
        return KvmMachine(self)

    def cpuid_table(self, apic_id, masks):
        """The table ``KVM_SET_CPUID2`` gets for a vCPU (``cpuid.filtered`` for this kind of KVM)."""
        return cpuidmod.filtered(self.supported_cpuid, apic_id, masks, self.kind)

    def guest_view(self, table):
        """``cpuid(leaf, index)`` as the guest's CPUID instruction answers with ``table`` set: the table, except
        where this kind of KVM answers registers itself (kvm_pvm: probed once, ``cpuid_probe.py``)."""
        view = cpuid_bits.table_lookup(table)
        if self.kind == "kvm_pvm":
            view = cpuid_probe.overlay(view, cpuid_probe.probe(self))
        return view


class KvmMachine(api.Machine):
    def __init__(self, provider):
        super().__init__(provider)
        self.vmfd = fcntl.ioctl(provider.fd, K.KVM_CREATE_VM, 0)
        self.probing = False                 # cpuid_probe's machine: its vCPU denies no MSRs
        self._userland_ranges = USERLAND_MSR_RANGES
        self._denied = (frozenset(), frozenset())     # (reads, writes) the guests' CPUID refuses
        self._filter_lock = threading.Lock()
        try:
            ioctl_ulong(self.vmfd, K.KVM_SET_TSS_ADDR, TSS_ADDR)
            self._enable_cap(K.KVM_CAP_X86_USER_SPACE_MSR, K.KVM_MSR_EXIT_REASON_INVAL |
                             K.KVM_MSR_EXIT_REASON_UNKNOWN | K.KVM_MSR_EXIT_REASON_FILTER)
            self._set_msr_filter()
        except OSError:
            os.close(self.vmfd)
            raise
        self._free_slots = list(range(provider.max_slots - 1, -1, -1))
        self._slot_of = {}
        self.posted = []                # (first port, end, callback) of the posted ranges; the vCPUs' run
        self._ring = None               # paths test it, so it stays this one list
        self._ring_lock = threading.Lock()
        self._answers = None            # fastrun.Answers once answer_io is called and the loop is built
        self._mmio_answers = None       # fastrun.MmioAnswers once answer_mmio is called ...
        self.waketimer = None           # intwin.WakeTimer once wake_timer is called
        self.intwins = []               # the vCPUs' intwin.IntWindow (they sleep in HLT in the loop)

    def _enable_cap(self, cap, arg0):
        buf = L.KVM_ENABLE_CAP.build(dict(cap=cap, flags=0, args=[arg0, 0, 0, 0], pad=bytes(64)))
        fcntl.ioctl(self.vmfd, K.KVM_ENABLE_CAP, buf)

    def _kernel_pvclock(self):
        """KVM's kvmclock keeps each vCPU's time record in step with the guest TSC at every entry, also where
        KVM rewinds that TSC because the host's is unstable (the nested lab's L1: a record written from user
        space then ran ahead of the guest and froze its clock). Its two MSRs stop exiting."""
        with self._filter_lock:
            before = self._userland_ranges
            self._userland_ranges = USERLAND_MSR_RANGES_KERNEL_CLOCK
            try:
                self._set_msr_filter()
            except OSError:
                self._userland_ranges = before
                return False
        return True

    def _kernel_clock(self, ns):
        buf = bytearray(L.KVM_CLOCK_DATA.sizeof())
        if ns is None:
            fcntl.ioctl(self.vmfd, K.KVM_GET_CLOCK, buf)
            return struct.unpack_from("<Q", buf)[0]
        struct.pack_into("<Q", buf, 0, ns)
        fcntl.ioctl(self.vmfd, K.KVM_SET_CLOCK, buf)
        return ns

    def deny_msrs(self, reads, writes):
        """Makes RDMSR of ``reads`` and WRMSR of ``writes`` exit to userland too (a vCPU's CPUID refuses them)."""
        with self._filter_lock:
            old_r, old_w = self._denied
            if reads <= old_r and writes <= old_w:
                return
            self._denied = (old_r | frozenset(reads), old_w | frozenset(writes))
            self._set_msr_filter()

    def _set_msr_filter(self):
        """The userland ranges and the CPUID refusals as one filter (``msr_filter.py``)."""
        buf, self._msr_bitmaps = msr_filter.build(self._userland_ranges, *self._denied)   # kept alive: the
        fcntl.ioctl(self.vmfd, K.KVM_X86_SET_MSR_FILTER, buf)                              # kernel copies them

    def _set_slot(self, slot, flags, gpa, size, hva):
        buf = L.KVM_USERSPACE_MEMORY_REGION.build(dict(slot=slot, flags=flags, guest_phys_addr=gpa,
                                                       memory_size=size, userspace_addr=hva))
        fcntl.ioctl(self.vmfd, K.KVM_SET_USER_MEMORY_REGION, buf)

    def _gpa_map(self, hva, gpa, size, prot):
        if not self._free_slots:
            raise api.nvmm_error(errno.ENOBUFS, f"no KVM memory slot left ({self.provider.max_slots} in use)")
        flags = 0
        if not prot & C.NVMM_PROT_WRITE:
            if not self.provider.readonly_mem:
                raise api.nvmm_error(errno.ENOTSUP, "this KVM has no read-only memory slots")
            flags |= K.KVM_MEM_READONLY
        slot = self._free_slots.pop()
        try:
            self._set_slot(slot, flags, gpa, size, hva)
        except OSError as exc:
            self._free_slots.append(slot)
            raise api.nvmm_error(exc.errno, f"KVM refused the mapping of gpa {gpa:#x}+{size:#x}") from None
        self._slot_of[gpa] = slot

    def _gpa_unmap(self, area):
        slot = self._slot_of.pop(area.start)
        self._set_slot(slot, 0, area.start, 0, area.hva)
        self._free_slots.append(slot)

    def _vcpu_create(self, cpuid):
        from .vcpu import KvmVcpu
        return KvmVcpu(self, cpuid)

    # -- posted port writes: KVM's coalesced PIO ring (KVM API, KVM_REGISTER_COALESCED_MMIO) --------------------
    def _post_io(self, port, size, cb):
        if not 0 < size <= 0x10000 - port or port < 0:
            raise api.nvmm_error(errno.EINVAL, f"port range {port:#x}+{size} outside the I/O space")
        if not self.provider.ring_offset:
            return False
        zone = L.KVM_COALESCED_MMIO_ZONE.build(dict(addr=port, size=size, pio=1))
        try:
            fcntl.ioctl(self.vmfd, K.KVM_REGISTER_COALESCED_MMIO, zone)
        except OSError:
            return False
        self.posted.append((port, port + size, cb))
        return True

    # -- answered port reads: the compiled run loop (fastrun.c) -------------------------------------------------
    def _answer_io(self, port, value):
        table = self._answer_table("_answers", fastrun.Answers)
        if table is None:
            return False
        table.set(port, value)
        return True

    def _answer_mmio(self, gpa, value):
        table = self._answer_table("_mmio_answers", fastrun.MmioAnswers)
        return table is not None and table.set(gpa, value)

    def _answer_table(self, attr, make):
        """The published-reads table kept in ``attr``, made (``make(ffi)``) on the first call; None where the
        compiled loop cannot be built."""
        table = getattr(self, attr)
        if table is None:
            loaded = fastrun.load()
            if loaded is None:
                return None
            table = make(loaded[0])
            setattr(self, attr, table)
        return table

    # -- doorbells: KVM_IOEVENTFD (KVM API 4.59; it needs no in-kernel interrupt controller) ------------------
    def _doorbell(self, addr, size, pio, datamatch, fd, assign):
        if size not in ((1, 2, 4) if pio else (0, 1, 2, 4, 8)) or (size == 0 and datamatch is not None):
            raise api.nvmm_error(errno.EINVAL, f"doorbell of size {size} (datamatch {datamatch})")
        if not self.provider.ioeventfd or (size == 0 and not self.provider.ioeventfd_any_length):
            return False
        flags = (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (0 if assign else K.KVM_IOEVENTFD_FLAG_DEASSIGN)
        if datamatch is not None:
            flags |= K.KVM_IOEVENTFD_FLAG_DATAMATCH
        buf = L.KVM_IOEVENTFD.build(dict(datamatch=datamatch or 0, addr=addr, len=size, fd=fd, flags=flags,
                                         pad=bytes(36)))
        try:
            fcntl.ioctl(self.vmfd, K.KVM_IOEVENTFD, buf)
        except OSError:
            if assign:
                return False
        return True

    def _drain_posted(self):
        """Consumes the ring (KVM appends at ``last``, we consume from ``first``), in order, under a lock: any
        vCPU thread, or the VM's flush timer, may drain it. The ring is the VM's, at the same page of every vCPU's
        mmap; the machine maps that page once for itself, so the mapping lives as long as the machine."""
        if not self.posted:
            return
        with self._ring_lock:
            ring = self._ring
            if ring is None:
                vcpu = next(iter(self.vcpus.values()), None)
                if vcpu is None:
                    return                                  # no vCPU: nothing can have been posted
                try:
                    ring = self._ring = mmap.mmap(vcpu.fd, PAGE_SIZE, mmap.MAP_SHARED,
                                                  mmap.PROT_READ | mmap.PROT_WRITE, offset=self.provider.ring_offset)
                except OSError:
                    return                                  # the vCPUs are being destroyed: nothing runs any more
            hdr, entries, posted = L.RING_HDR_FMT.unpack_from, L.RING_ENTRY_FMT.iter_unpack, self.posted
            first, last = hdr(ring, 0)
            run_port, run_cb, run = None, None, bytearray()     # a run of one-byte writes to a one-port range
            while first != last:
                if last >= RING_ENTRIES:                    # the kernel's indexes, checked all the same
                    break
                if first >= RING_ENTRIES:
                    first = 0
                    continue
                end = last if last > first else RING_ENTRIES      # what the kernel had appended, up to the wrap
                for port, n, _pio, data in entries(ring[RING_DATA + first * ENTRY_SIZE:RING_DATA + end * ENTRY_SIZE]):
                    if port == run_port and n == 1:
                        run.append(data[0])
                        continue
                    if run:
                        run_cb(run_port, bytes(run))
                        run.clear()
                        run_port = None
                    for lo, hi, cb in posted:
                        if lo <= port < hi:
                            if hi - lo == 1 and n == 1:
                                run_port, run_cb = port, cb
                                run.append(data[0])
                            else:
                                cb(port, data[:n] if n < 8 else data)
                            break
                first = end % RING_ENTRIES
                _U32.pack_into(ring, 0, first)              # consumed: the kernel may reuse those slots
                last = hdr(ring, 0)[1]
            if run:
                run_cb(run_port, bytes(run))

    def _wake_timer(self, period_ns):
        from . import intwin
        if self.waketimer is None:
            self.waketimer = intwin.make_waketimer(period_ns)
            for w in self.intwins:
                w.configure_halt(self.provider.ring_offset, self.waketimer)
        return self.waketimer

    def _destroy(self):
        if self.waketimer is not None:
            for w in self.intwins:
                w.configure_halt(self.provider.ring_offset, None)
            self.waketimer.close()
        with self._ring_lock:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
        os.close(self.vmfd)
