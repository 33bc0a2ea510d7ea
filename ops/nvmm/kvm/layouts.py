"""Linux KVM's x86 structures (``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h``).

Declared with construct (``KVM_REGS``, ``KVM_SREGS``, ``KVM_VCPU_EVENTS``, ``KVM_RUN_HEADER`` ...) for ioctl sizes,
documentation and round-trip tests; the vCPU code uses the ``struct`` formats and offsets derived here, never
construct, per exit. The conversions between KVM's registers and NVMM's state layout live here too, so the
mapping of one register set onto the other is written once.

Not here: the non-x86 parts of ``kvm_run``, nested state, XSAVE beyond the legacy FXSAVE area.
"""

import struct

import construct as cs

from .. import constants as C
from .. import state as S

U64 = cs.Int64ul

KVM_USERSPACE_MEMORY_REGION = cs.Struct(
    "slot" / cs.Int32ul, "flags" / cs.Int32ul, "guest_phys_addr" / cs.Int64ul, "memory_size" / cs.Int64ul,
    "userspace_addr" / cs.Int64ul)
KVM_ENABLE_CAP = cs.Struct("cap" / cs.Int32ul, "flags" / cs.Int32ul, "args" / cs.Array(4, cs.Int64ul),
                           "pad" / cs.Bytes(64))
KVM_MSR_FILTER_RANGE = cs.Struct("flags" / cs.Int32ul, "nmsrs" / cs.Int32ul, "base" / cs.Int32ul,
                                 cs.Padding(4), "bitmap" / cs.Int64ul)
KVM_MSR_FILTER = cs.Struct("flags" / cs.Int32ul, cs.Padding(4), "ranges" / cs.Array(16, KVM_MSR_FILTER_RANGE))
KVM_INTERRUPT = cs.Struct("irq" / cs.Int32ul)
#: ``struct kvm_coalesced_mmio_zone`` (KVM_REGISTER_COALESCED_MMIO): a guest-physical or, with ``pio``, port range
#: whose writes KVM appends to the coalesced ring instead of exiting.
KVM_COALESCED_MMIO_ZONE = cs.Struct("addr" / cs.Int64ul, "size" / cs.Int32ul, "pio" / cs.Int32ul)
#: ``struct kvm_ioeventfd`` (KVM_IOEVENTFD): writes to ``addr`` (``len`` bytes, 0: any length, MMIO only; with the
#: DATAMATCH flag only the value ``datamatch``) signal the eventfd ``fd`` instead of exiting.
KVM_IOEVENTFD = cs.Struct("datamatch" / cs.Int64ul, "addr" / cs.Int64ul, "len" / cs.Int32ul, "fd" / cs.Int32sl,
                          "flags" / cs.Int32ul, "pad" / cs.Bytes(36))
#: ``struct kvm_coalesced_mmio``: one buffered write in the ring (``data`` holds ``len`` bytes).
KVM_COALESCED_MMIO = cs.Struct("phys_addr" / cs.Int64ul, "len" / cs.Int32ul, "pio" / cs.Int32ul,
                               "data" / cs.Bytes(8))
#: ``struct kvm_coalesced_mmio_ring``'s header: the consumer's and the producer's index, then the entries.
KVM_COALESCED_RING_HDR = cs.Struct("first" / cs.Int32ul, "last" / cs.Int32ul)
KVM_MSRS_HDR = cs.Struct("nmsrs" / cs.Int32ul, cs.Padding(4))
KVM_MSR_ENTRY = cs.Struct("index" / cs.Int32ul, cs.Padding(4), "data" / cs.Int64ul)
KVM_MSR_LIST_HDR = cs.Struct("nmsrs" / cs.Int32ul)
KVM_CPUID2_HDR = cs.Struct("nent" / cs.Int32ul, cs.Padding(4))
KVM_CPUID_ENTRY2 = cs.Struct("function" / cs.Int32ul, "index" / cs.Int32ul, "flags" / cs.Int32ul,
                             "eax" / cs.Int32ul, "ebx" / cs.Int32ul, "ecx" / cs.Int32ul, "edx" / cs.Int32ul,
                             cs.Padding(12))
KVM_REGS = cs.Struct(*(n / cs.Int64ul for n in (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15", "rip", "rflags")))
KVM_SEGMENT = cs.Struct("base" / cs.Int64ul, "limit" / cs.Int32ul, "selector" / cs.Int16ul,
                        *(n / cs.Int8ul for n in ("type", "present", "dpl", "db", "s", "l", "g", "avl",
                                                  "unusable")), cs.Padding(1))
KVM_DTABLE = cs.Struct("base" / cs.Int64ul, "limit" / cs.Int16ul, cs.Padding(6))
KVM_SREGS = cs.Struct(*(n / KVM_SEGMENT for n in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
                      "gdt" / KVM_DTABLE, "idt" / KVM_DTABLE,
                      *(n / cs.Int64ul for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")),
                      "interrupt_bitmap" / cs.Array(4, cs.Int64ul))
KVM_VCPU_EVENTS = cs.Struct(
    "exception" / cs.Struct("injected" / cs.Int8ul, "nr" / cs.Int8ul, "has_error_code" / cs.Int8ul,
                            "pending" / cs.Int8ul, "error_code" / cs.Int32ul),
    "interrupt" / cs.Struct("injected" / cs.Int8ul, "nr" / cs.Int8ul, "soft" / cs.Int8ul,
                            "shadow" / cs.Int8ul),
    "nmi" / cs.Struct("injected" / cs.Int8ul, "pending" / cs.Int8ul, "masked" / cs.Int8ul, cs.Padding(1)),
    "sipi_vector" / cs.Int32ul, "flags" / cs.Int32ul,
    "smi" / cs.Struct("smm" / cs.Int8ul, "pending" / cs.Int8ul, "smm_inside_nmi" / cs.Int8ul,
                      "latched_init" / cs.Int8ul),
    "triple_fault_pending" / cs.Int8ul, cs.Padding(26), "exception_has_payload" / cs.Int8ul,
    "exception_payload" / cs.Int64ul)
KVM_DEBUGREGS = cs.Struct("db" / cs.Array(4, cs.Int64ul), "dr6" / cs.Int64ul, "dr7" / cs.Int64ul,
                          "flags" / cs.Int64ul, "reserved" / cs.Array(9, cs.Int64ul))
#: ``struct kvm_guest_debug`` (KVM_SET_GUEST_DEBUG): control flags, then x86's ``debugreg[8]`` (DR0-3, DR6, DR7 at 7).
KVM_GUEST_DEBUG = cs.Struct("control" / cs.Int32ul, cs.Padding(4), "debugreg" / cs.Array(8, cs.Int64ul))
#: ``struct kvm_clock_data`` (KVM_GET_CLOCK / KVM_SET_CLOCK; 48 bytes).
KVM_CLOCK_DATA = cs.Struct("clock" / cs.Int64ul, "flags" / cs.Int32ul, "pad0" / cs.Int32ul,
                           "realtime" / cs.Int64ul, "host_tsc" / cs.Int64ul, "pad" / cs.Array(4, cs.Int32ul))
KVM_XCRS = cs.Struct("nr_xcrs" / cs.Int32ul, "flags" / cs.Int32ul,
                     "xcrs" / cs.Array(16, cs.Struct("xcr" / cs.Int32ul, cs.Padding(4), "value" / cs.Int64ul)),
                     "padding" / cs.Array(16, cs.Int64ul))
KVM_FPU = cs.Struct("fpr" / cs.Array(8, cs.Bytes(16)), "fcw" / cs.Int16ul, "fsw" / cs.Int16ul,
                    "ftwx" / cs.Int8ul, cs.Padding(1), "last_opcode" / cs.Int16ul, "last_ip" / cs.Int64ul,
                    "last_dp" / cs.Int64ul, "xmm" / cs.Array(16, cs.Bytes(16)), "mxcsr" / cs.Int32ul,
                    cs.Padding(4))

#: ``struct kvm_xsave``: the FXSAVE image (NVMM's FPU category) is its first 512 bytes, then the XSAVE header.
KVM_XSAVE = cs.Bytes(4096)
XSAVE_LEGACY_SIZE = 512
XSAVE_XSTATE_BV = 512
XSTATE_FP_SSE = 0x3

#: The fixed head of ``struct kvm_run`` (x86), up to and including the sync-regs area.
KVM_RUN_HEADER = cs.Struct(
    "request_interrupt_window" / cs.Int8ul, "immediate_exit" / cs.Int8ul, cs.Padding(6),
    "exit_reason" / cs.Int32ul, "ready_for_interrupt_injection" / cs.Int8ul, "if_flag" / cs.Int8ul,
    "flags" / cs.Int16ul, "cr8" / cs.Int64ul, "apic_base" / cs.Int64ul,
    "u" / cs.Bytes(256),
    "kvm_valid_regs" / cs.Int64ul, "kvm_dirty_regs" / cs.Int64ul,
    "s" / cs.Padded(2048, cs.Struct("regs" / KVM_REGS, "sregs" / KVM_SREGS, "events" / KVM_VCPU_EVENTS)),
)

# -- offsets into the kvm_run page (checked against the declaration by the unit tests) -------------------------
RUN_REQUEST_IRQ_WINDOW = 0
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_READY_FOR_INTR = 12
RUN_IF_FLAG = 13
RUN_CR8 = 16
RUN_U = 32
RUN_VALID_REGS = 288
RUN_DIRTY_REGS = 296
RUN_S_REGS = 304
RUN_S_SREGS = RUN_S_REGS + KVM_REGS.sizeof()
RUN_S_EVENTS = RUN_S_SREGS + KVM_SREGS.sizeof()
# exit payloads (the union at RUN_U)
IO_FMT = struct.Struct("<BBHIQ")                 # direction, size, port, count, data_offset
MMIO_GPA, MMIO_DATA, MMIO_LEN, MMIO_IS_WRITE = RUN_U, RUN_U + 8, RUN_U + 16, RUN_U + 20
MSR_ERROR, MSR_REASON, MSR_INDEX, MSR_DATA = RUN_U, RUN_U + 8, RUN_U + 12, RUN_U + 16
DEBUG_EXIT_FMT = struct.Struct("<IIQQQ")           # kvm_debug_exit_arch: exception, pad, pc, dr6, dr7
GUEST_DEBUG_FMT = struct.Struct("<II8Q")
assert GUEST_DEBUG_FMT.size == 72
INTERNAL_FMT = struct.Struct("<II")              # suberror, ndata (then u64 data[16])

RING_HDR_FMT = struct.Struct("<II")
RING_ENTRY_FMT = struct.Struct("<QII8s")
assert RING_HDR_FMT.size == KVM_COALESCED_RING_HDR.sizeof()
assert RING_ENTRY_FMT.size == KVM_COALESCED_MMIO.sizeof()

REGS_FMT = struct.Struct("<18Q")
SEG_FMT = struct.Struct("<QIHBBBBBBBBBx")
DTABLE_FMT = struct.Struct("<QH6x")
SREGS_FMT = struct.Struct("<" + "QIHBBBBBBBBBx" * 8 + "QH6x" * 2 + "7Q" + "4Q")
EVENTS_FMT = struct.Struct("<BBBBI BBBB BBBx II BBBB B26xBQ".replace(" ", ""))
DEBUGREGS_FMT = struct.Struct("<4QQQQ9Q")
assert REGS_FMT.size == KVM_REGS.sizeof() and SREGS_FMT.size == KVM_SREGS.sizeof()
assert EVENTS_FMT.size == KVM_VCPU_EVENTS.sizeof() and SEG_FMT.size == KVM_SEGMENT.sizeof()

# kvm_regs order -> NVMM gprs order: NVMM index i is kvm_regs field KVM_GPR_OF_NVMM[i]
KVM_GPR_OF_NVMM = (0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17)
# kvm_sregs segment order -> NVMM segment index
KVM_SEG_ORDER = (C.NVMM_X64_SEG_CS, C.NVMM_X64_SEG_DS, C.NVMM_X64_SEG_ES, C.NVMM_X64_SEG_FS,
                 C.NVMM_X64_SEG_GS, C.NVMM_X64_SEG_SS, C.NVMM_X64_SEG_TR, C.NVMM_X64_SEG_LDT)
_SEG_FIELDS = 12   # values per segment in SREGS_FMT
_DT0 = 8 * _SEG_FIELDS
_CR0 = _DT0 + 4


def regs_to_gprs(regs, gprs):
    """kvm_regs values (a tuple) into NVMM's ``gprs`` array."""
    for i, k in enumerate(KVM_GPR_OF_NVMM):
        gprs[i] = regs[k]


def gprs_to_regs(gprs):
    """NVMM ``gprs`` into a kvm_regs value tuple."""
    out = [0] * 18
    for i, k in enumerate(KVM_GPR_OF_NVMM):
        out[k] = gprs[i]
    return out


def kvm_seg_to_attrib(type_, present, dpl, db, s, l, g, avl, unusable):
    """NVMM's ``attrib`` word for a KVM segment (an unusable segment is a not-present one in NVMM)."""
    p = bool(present) and not unusable
    return ((type_ & 0xF) | (S.ATTRIB_S if s else 0) | ((dpl & 3) << S.ATTRIB_DPL_SHIFT) |
            (S.ATTRIB_P if p else 0) | (S.ATTRIB_AVL if avl else 0) | (S.ATTRIB_L if l else 0) |
            (S.ATTRIB_DEF if db else 0) | (S.ATTRIB_G if g else 0))


def attrib_to_kvm_seg(attrib):
    """``(type, present, dpl, db, s, l, g, avl, unusable)`` for an NVMM ``attrib`` word."""
    p = 1 if attrib & S.ATTRIB_P else 0
    return (attrib & S.ATTRIB_TYPE_MASK, p, (attrib >> S.ATTRIB_DPL_SHIFT) & 3,
            1 if attrib & S.ATTRIB_DEF else 0, 1 if attrib & S.ATTRIB_S else 0, 1 if attrib & S.ATTRIB_L else 0,
            1 if attrib & S.ATTRIB_G else 0, 1 if attrib & S.ATTRIB_AVL else 0, 0 if p else 1)


def sregs_to_state(sregs, state, segs=True, crs=True):
    """Unpacked kvm_sregs values into NVMM ``segs`` and/or ``crs`` (CR0, CR2, CR3, CR4, CR8; not XCR0)."""
    if segs:
        for j, idx in enumerate(KVM_SEG_ORDER):
            base, limit, sel, *bits = sregs[j * _SEG_FIELDS:(j + 1) * _SEG_FIELDS]
            state.segs[idx].set(sel, kvm_seg_to_attrib(*bits), limit, base)
        state.segs[C.NVMM_X64_SEG_GDT].set(0, 0, sregs[_DT0 + 1], sregs[_DT0])
        state.segs[C.NVMM_X64_SEG_IDT].set(0, 0, sregs[_DT0 + 3], sregs[_DT0 + 2])
    if crs:
        cr0, cr2, cr3, cr4, cr8 = sregs[_CR0:_CR0 + 5]
        state.crs[C.NVMM_X64_CR_CR0] = cr0
        state.crs[C.NVMM_X64_CR_CR2] = cr2
        state.crs[C.NVMM_X64_CR_CR3] = cr3
        state.crs[C.NVMM_X64_CR_CR4] = cr4
        state.crs[C.NVMM_X64_CR_CR8] = cr8


def sregs_efer(sregs):
    return sregs[_CR0 + 5]


def state_to_sregs(state, sregs, segs=True, crs=True, efer=None):
    """NVMM ``segs``/``crs``/EFER written over a list of kvm_sregs values (the rest kept)."""
    if segs:
        for j, idx in enumerate(KVM_SEG_ORDER):
            sel, attrib, limit, base = state.segs[idx].get()
            sregs[j * _SEG_FIELDS:(j + 1) * _SEG_FIELDS] = [base, limit, sel, *attrib_to_kvm_seg(attrib)]
        _, _, limit, base = state.segs[C.NVMM_X64_SEG_GDT].get()
        sregs[_DT0:_DT0 + 2] = [base, limit & 0xFFFF]
        _, _, limit, base = state.segs[C.NVMM_X64_SEG_IDT].get()
        sregs[_DT0 + 2:_DT0 + 4] = [base, limit & 0xFFFF]
    if crs:
        c = state.crs
        sregs[_CR0:_CR0 + 5] = [c[C.NVMM_X64_CR_CR0], c[C.NVMM_X64_CR_CR2], c[C.NVMM_X64_CR_CR3],
                                c[C.NVMM_X64_CR_CR4], c[C.NVMM_X64_CR_CR8]]
    if efer is not None:
        sregs[_CR0 + 5] = efer
    return sregs


#: MSRs of NVMM's MSRS category that KVM keeps outside kvm_sregs, in NVMM index order (EFER is in sregs).
MSRS_VIA_IOCTL = (
    (C.NVMM_X64_MSR_STAR, 0xC0000081), (C.NVMM_X64_MSR_LSTAR, 0xC0000082),
    (C.NVMM_X64_MSR_CSTAR, 0xC0000083), (C.NVMM_X64_MSR_SFMASK, 0xC0000084),
    (C.NVMM_X64_MSR_KERNELGSBASE, 0xC0000102), (C.NVMM_X64_MSR_SYSENTER_CS, 0x174),
    (C.NVMM_X64_MSR_SYSENTER_ESP, 0x175), (C.NVMM_X64_MSR_SYSENTER_EIP, 0x176),
    (C.NVMM_X64_MSR_PAT, 0x277), (C.NVMM_X64_MSR_TSC, 0x10),
)
