"""The vCPU state, event and exit records of NVMM, in NetBSD 10's byte layout.

Layouts follow ``struct nvmm_x64_state`` (with ``nvmm_x64_state_seg`` and ``nvmm_x64_state_intr``),
``struct nvmm_x86_event`` and ``struct nvmm_x86_exit`` of ``sys/dev/nvmm/x86/nvmm_x86.h`` 1.21, whose sizes and
offsets are recorded in ``shared/reference/nvmm-abi.md``. They are declared once with construct
(``X64_STATE``, ``X86_EVENT``, ``X86_EXIT``) for documentation and round-trip tests; the accessors used per exit
are typed ``memoryview`` casts and ``struct`` formats whose offsets are taken from those declarations, so construct
never runs on the hot path.

Every provider keeps its state in this layout: the libnvmm provider's buffer *is* the comm page, the KVM and
software providers convert into it on ``getstate`` and out of it when a ``setstate`` is committed.

Not supported: the XSAVE area beyond the 512-byte FXSAVE image (NVMM has none either).
"""

import struct

import construct as cs

from .constants import NVMM_X64_NSEG, NVMM_X64_NGPR, NVMM_X64_NCR, NVMM_X64_NDR, NVMM_X64_NMSR

# -- construct declarations ------------------------------------------------------------------------------------

#: ``nvmm_x64_state_seg.attrib``: uint16_t bitfields allocated from bit 0 (type is bits 0-3).
SEG_ATTRIB = cs.ByteSwapped(cs.BitStruct(     # fields listed from the most significant bit down
    "rsvd" / cs.BitsInteger(4), "g" / cs.Flag, "def_" / cs.Flag, "l" / cs.Flag, "avl" / cs.Flag,
    "p" / cs.Flag, "dpl" / cs.BitsInteger(2), "s" / cs.Flag, "type" / cs.BitsInteger(4)))

#: ``struct nvmm_x64_state_seg`` (16 bytes).
X64_STATE_SEG = cs.Struct(
    "selector" / cs.Int16ul, "attrib" / SEG_ATTRIB,
    "limit" / cs.Int32ul, "base" / cs.Int64ul)

#: ``struct nvmm_x64_state_intr``: one uint64_t of bitfields.
X64_STATE_INTR = cs.ByteSwapped(cs.BitStruct(
    "rsvd" / cs.BitsInteger(60), "evt_pending" / cs.Flag, "nmi_window_exiting" / cs.Flag,
    "int_window_exiting" / cs.Flag, "int_shadow" / cs.Flag))

#: ``struct nvmm_x64_state`` (1008 bytes; the FXSAVE image at 496 is 16-aligned in the comm page).
X64_STATE = cs.Struct(
    "segs" / cs.Array(NVMM_X64_NSEG, X64_STATE_SEG),
    "gprs" / cs.Array(NVMM_X64_NGPR, cs.Int64ul),
    "crs" / cs.Array(NVMM_X64_NCR, cs.Int64ul),
    "drs" / cs.Array(NVMM_X64_NDR, cs.Int64ul),
    "msrs" / cs.Array(NVMM_X64_NMSR, cs.Int64ul),
    "intr" / X64_STATE_INTR,
    "fpu" / cs.Bytes(512),
)

#: ``struct nvmm_x86_event`` (16 bytes).
X86_EVENT = cs.Struct("type" / cs.Int32ul, "vector" / cs.Int8ul, cs.Padding(3), "error" / cs.Int64ul)

X86_EXIT_MEMORY = cs.Struct("prot" / cs.Int32sl, cs.Padding(4), "gpa" / cs.Int64ul,
                            "inst_len" / cs.Int8ul, "inst_bytes" / cs.Bytes(15))
X86_EXIT_IO = cs.Struct("in_" / cs.Flag, cs.Padding(1), "port" / cs.Int16ul, "seg" / cs.Int8sl,
                        "address_size" / cs.Int8ul, "operand_size" / cs.Int8ul, "rep" / cs.Flag,
                        "str_" / cs.Flag, cs.Padding(7), "npc" / cs.Int64ul)
X86_EXIT_RDMSR = cs.Struct("msr" / cs.Int32ul, cs.Padding(4), "npc" / cs.Int64ul)
X86_EXIT_WRMSR = cs.Struct("msr" / cs.Int32ul, cs.Padding(4), "val" / cs.Int64ul, "npc" / cs.Int64ul)
X86_EXIT_INSN = cs.Struct("npc" / cs.Int64ul)
X86_EXIT_INVALID = cs.Struct("hwcode" / cs.Int64ul)
X86_EXITSTATE = cs.Struct("rflags" / cs.Int64ul, "cr8" / cs.Int64ul, "bits" / X64_STATE_INTR)

#: ``struct nvmm_x86_exit`` (64 bytes): reason, a 32-byte union, exitstate.
X86_EXIT = cs.Struct(
    "reason" / cs.Int64ul,
    "u" / cs.Padded(32, cs.Union("raw", "mem" / X86_EXIT_MEMORY, "io" / X86_EXIT_IO, "rdmsr" / X86_EXIT_RDMSR,
                   "wrmsr" / X86_EXIT_WRMSR, "insn" / X86_EXIT_INSN, "inv" / X86_EXIT_INVALID,
                   "raw" / cs.Bytes(32))),
    "exitstate" / X86_EXITSTATE,
)

STATE_SIZE = X64_STATE.sizeof()
SEG_SIZE = X64_STATE_SEG.sizeof()
EVENT_SIZE = X86_EVENT.sizeof()
EXIT_SIZE = 64


def _offset(layout, name):
    """Byte offset of a top-level field of a construct ``Struct``."""
    off = 0
    for sub in layout.subcons:
        if sub.name == name:
            return off
        off += sub.sizeof()
    raise KeyError(name)


OFF_SEGS = _offset(X64_STATE, "segs")
OFF_GPRS = _offset(X64_STATE, "gprs")
OFF_CRS = _offset(X64_STATE, "crs")
OFF_DRS = _offset(X64_STATE, "drs")
OFF_MSRS = _offset(X64_STATE, "msrs")
OFF_INTR = _offset(X64_STATE, "intr")
OFF_FPU = _offset(X64_STATE, "fpu")
OFF_EXITSTATE = _offset(X86_EXIT, "exitstate")

# -- hot-path formats derived from the declarations ------------------------------------------------------------
SEG_FMT = struct.Struct("<HHIQ")            # selector, attrib, limit, base
EVENT_FMT = struct.Struct("<IB3xQ")         # type, vector, error
EXIT_IO_FMT = struct.Struct("<?xHbBB??7xQ")  # in, port, seg, address_size, operand_size, rep, str, npc
EXIT_MEM_FMT = struct.Struct("<i4xQB15s")   # prot, gpa, inst_len, inst_bytes
EXIT_RDMSR_FMT = struct.Struct("<I4xQ")     # msr, npc
EXIT_WRMSR_FMT = struct.Struct("<I4xQQ")    # msr, val, npc
EXITSTATE_FMT = struct.Struct("<QQQ")       # rflags, cr8, bits
assert SEG_FMT.size == SEG_SIZE and EVENT_FMT.size == EVENT_SIZE
assert EXIT_IO_FMT.size == X86_EXIT_IO.sizeof() and EXIT_MEM_FMT.size == X86_EXIT_MEMORY.sizeof()

# attrib bit positions (nvmm-abi.md, "nvmm_x64_state_seg" bitfields)
ATTRIB_TYPE_MASK = 0x000F
ATTRIB_S = 1 << 4
ATTRIB_DPL_SHIFT = 5
ATTRIB_P = 1 << 7
ATTRIB_AVL = 1 << 8
ATTRIB_L = 1 << 9
ATTRIB_DEF = 1 << 10
ATTRIB_G = 1 << 11

# nvmm_x64_state_intr / exitstate bits
INTR_INT_SHADOW = 1 << 0
INTR_INT_WINDOW_EXITING = 1 << 1
INTR_NMI_WINDOW_EXITING = 1 << 2
INTR_EVT_PENDING = 1 << 3


class Seg:
    """One ``nvmm_x64_state_seg`` inside a state buffer, read and written in place."""

    __slots__ = ("_buf", "_off")

    def __init__(self, buf, off):
        self._buf, self._off = buf, off

    def get(self):
        """``(selector, attrib, limit, base)`` with ``attrib`` as the raw 16-bit word."""
        return SEG_FMT.unpack_from(self._buf, self._off)

    def set(self, selector, attrib, limit, base):
        SEG_FMT.pack_into(self._buf, self._off, selector & 0xFFFF, attrib & 0xFFFF, limit & 0xFFFFFFFF,
                          base & 0xFFFFFFFFFFFFFFFF)

    def _field(i):  # noqa: N805 - property factory
        def fget(self):
            return SEG_FMT.unpack_from(self._buf, self._off)[i]

        def fset(self, value):
            vals = list(SEG_FMT.unpack_from(self._buf, self._off))
            vals[i] = value
            self.set(*vals)
        return property(fget, fset)

    selector = _field(0)
    attrib = _field(1)
    limit = _field(2)
    base = _field(3)
    del _field

    def __repr__(self):
        sel, attrib, limit, base = self.get()
        return f"Seg(selector={sel:#x}, attrib={attrib:#x}, limit={limit:#x}, base={base:#x})"


class State:
    """``struct nvmm_x64_state`` over a writable buffer of ``STATE_SIZE`` bytes.

    ``gprs``, ``crs``, ``drs`` and ``msrs`` are uint64 arrays indexed by NVMM's ``NVMM_X64_*`` indexes;
    ``segs[i]`` is a :class:`Seg`; ``intr`` is the raw ``nvmm_x64_state_intr`` word; ``fpu`` the FXSAVE bytes.
    """

    __slots__ = ("buf", "gprs", "crs", "drs", "msrs", "segs", "fpu", "_intr")

    def __init__(self, buf=None):
        if buf is None:
            buf = bytearray(STATE_SIZE)
        mv = memoryview(buf).cast("B")
        if len(mv) < STATE_SIZE:
            raise ValueError(f"state buffer of {len(mv)} bytes, need {STATE_SIZE}")
        self.buf = mv[:STATE_SIZE]
        self.gprs = self.buf[OFF_GPRS:OFF_GPRS + 8 * NVMM_X64_NGPR].cast("Q")
        self.crs = self.buf[OFF_CRS:OFF_CRS + 8 * NVMM_X64_NCR].cast("Q")
        self.drs = self.buf[OFF_DRS:OFF_DRS + 8 * NVMM_X64_NDR].cast("Q")
        self.msrs = self.buf[OFF_MSRS:OFF_MSRS + 8 * NVMM_X64_NMSR].cast("Q")
        self._intr = self.buf[OFF_INTR:OFF_INTR + 8].cast("Q")
        self.segs = tuple(Seg(self.buf, OFF_SEGS + i * SEG_SIZE) for i in range(NVMM_X64_NSEG))
        self.fpu = self.buf[OFF_FPU:OFF_FPU + 512]

    @property
    def intr(self):
        return self._intr[0]

    @intr.setter
    def intr(self, value):
        self._intr[0] = value & 0xFFFFFFFFFFFFFFFF

    def parse(self):
        """The whole state as a construct container (for tests and debugging, never per exit)."""
        return X64_STATE.parse(bytes(self.buf))


class Event:
    """``struct nvmm_x86_event``: what ``Vcpu.inject`` queues (``type``, ``vector``, ``error``)."""

    __slots__ = ("buf",)

    def __init__(self, buf=None):
        self.buf = memoryview(buf if buf is not None else bytearray(EVENT_SIZE)).cast("B")[:EVENT_SIZE]

    def _field(i):  # noqa: N805 - property factory
        def fget(self):
            return EVENT_FMT.unpack_from(self.buf, 0)[i]

        def fset(self, value):
            vals = list(EVENT_FMT.unpack_from(self.buf, 0))
            vals[i] = value
            EVENT_FMT.pack_into(self.buf, 0, *vals)
        return property(fget, fset)

    type = _field(0)
    vector = _field(1)
    error = _field(2)
    del _field

    def set(self, type_, vector, error=0):
        EVENT_FMT.pack_into(self.buf, 0, type_, vector, error)

    def get(self):
        return EVENT_FMT.unpack_from(self.buf, 0)


# -- exits -----------------------------------------------------------------------------------------------------
from collections import namedtuple  # noqa: E402

ExitIo = namedtuple("ExitIo", "in_ port seg address_size operand_size rep str_ npc")
ExitMemory = namedtuple("ExitMemory", "prot gpa inst_len inst_bytes")
ExitRdmsr = namedtuple("ExitRdmsr", "msr npc")
ExitWrmsr = namedtuple("ExitWrmsr", "msr val npc")
ExitInsn = namedtuple("ExitInsn", "npc")
ExitInvalid = namedtuple("ExitInvalid", "hwcode")
ExitState = namedtuple("ExitState",
                       "rflags cr8 int_shadow int_window_exiting nmi_window_exiting evt_pending")

_U = 8  # offset of the union in nvmm_x86_exit


class Exit:
    """``struct nvmm_x86_exit``. ``reason`` is a plain attribute (the only field read on every exit); the
    payloads are decoded on access: ``io``, ``mem``, ``rdmsr``, ``wrmsr``, ``insn`` (MONITOR, MWAIT, CPUID),
    ``inv`` and ``exitstate``. This base class reads them from a 64-byte buffer in NVMM's layout; a provider
    whose hypervisor reports exits differently overrides the properties, never the meaning."""

    __slots__ = ("reason", "buf")

    def __init__(self, buf=None):
        self.buf = memoryview(buf if buf is not None else bytearray(EXIT_SIZE)).cast("B")[:EXIT_SIZE]
        self.reason = 0

    def load(self):
        """Refresh ``reason`` from the buffer (after the hypervisor wrote it)."""
        self.reason = struct.unpack_from("<Q", self.buf, 0)[0]
        return self

    @property
    def io(self):
        return ExitIo(*EXIT_IO_FMT.unpack_from(self.buf, _U))

    @property
    def mem(self):
        return ExitMemory(*EXIT_MEM_FMT.unpack_from(self.buf, _U))

    @property
    def mem_gpa(self):
        """``mem.gpa`` alone (what the ops layer reads on every MEMORY exit; a provider may read it cheaper)."""
        return self.mem.gpa

    @property
    def rdmsr(self):
        return ExitRdmsr(*EXIT_RDMSR_FMT.unpack_from(self.buf, _U))

    @property
    def wrmsr(self):
        return ExitWrmsr(*EXIT_WRMSR_FMT.unpack_from(self.buf, _U))

    @property
    def insn(self):
        return ExitInsn(*struct.unpack_from("<Q", self.buf, _U))

    @property
    def inv(self):
        return ExitInvalid(*struct.unpack_from("<Q", self.buf, _U))

    @property
    def cr8(self):
        """``exitstate.cr8`` alone (what the ops layer reads before every entry; a provider may read it cheaper)."""
        return self.exitstate.cr8

    @property
    def exitstate(self):
        rflags, cr8, bits = EXITSTATE_FMT.unpack_from(self.buf, OFF_EXITSTATE)
        return ExitState(rflags, cr8, bool(bits & INTR_INT_SHADOW), bool(bits & INTR_INT_WINDOW_EXITING),
                         bool(bits & INTR_NMI_WINDOW_EXITING), bool(bits & INTR_EVT_PENDING))

    def __repr__(self):
        from .constants import EXIT_NAMES
        return f"<Exit {EXIT_NAMES.get(self.reason, hex(self.reason))}>"
