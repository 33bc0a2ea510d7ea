"""The libnvmm cdefs and the shared state layouts, pinned to NetBSD 10's measured NVMM ABI.

Every table (``nvmm_abi_tables.py``) is copied row for row from ``shared/reference/nvmm-abi.md`` (gcc 12 on the
NetBSD 10 headers: ``sizeof``, ``_Alignof``, ``offsetof``, bitfields found by setting one field to -1 and scanning the
bits). The tests compare them to ``ffi.sizeof``/``ffi.alignof``/``ffi.offsetof`` of ``ops/nvmm/libnvmm/cdefs.py``, to
``ops/nvmm/constants.py`` and to the construct layouts of ``ops/nvmm/state.py``. No libnvmm is needed.

Not covered: anything a compiler would catch only on NetBSD itself (no NetBSD here).
"""

import re

import pytest

from ops.nvmm import constants as C
from ops.nvmm import state as S
from ops.nvmm.libnvmm.cdefs import ffi, make_ffi
from tests.unit.nvmm_abi_tables import ANONYMOUS, BITFIELDS, CONSTANTS, FIELDS, NOT_IN_CONSTANTS, STRUCTS


def _walk(ctype, path):
    """``(offset, field type, CField)`` of a dotted path (``segs[1]``, ``u.io.port``) by cffi's own fields."""
    t, off, cf = ffi.typeof(ctype), 0, None
    for part in path.split("."):
        name, index = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part).groups()
        cf = dict(t.fields)[name]
        off, t = off + cf.offset, cf.type
        if index is not None:
            t = t.item
            off += int(index) * ffi.sizeof(t)
    return off, t, cf


def _offsetof_args(path):
    args = []
    for part in path.split("."):
        name, index = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part).groups()
        args.append(name)
        if index is not None:
            args.append(int(index))
    return args


ROWS = [(ctype, row) for ctype, rows in FIELDS.items() for row in rows]


def test_every_struct_is_declared():
    assert len(STRUCTS) == 43 and len(ROWS) == 204 and len(BITFIELDS) == 24 and len(CONSTANTS) == 125
    assert set(FIELDS) <= set(STRUCTS)


@pytest.mark.parametrize("ctype", list(STRUCTS))
def test_struct_size_and_align(ctype):
    assert (ffi.sizeof(ctype), ffi.alignof(ctype)) == STRUCTS[ctype]


@pytest.mark.parametrize("ctype,row", ROWS, ids=[f"{c.split()[-1]}.{r[0]}" for c, r in ROWS])
def test_field_offset_size_align(ctype, row):
    path, offset, size, align = row
    off, t, _ = _walk(ctype, path)
    assert off == offset
    assert ffi.offsetof(ctype, *_offsetof_args(path)) == offset
    assert ffi.sizeof(t) == size
    assert ffi.alignof(t) == align


@pytest.mark.parametrize("ctype,path,size,align", ANONYMOUS)
def test_anonymous_members(ctype, path, size, align):
    _, t, _ = _walk(ctype, path)
    assert (ffi.sizeof(t), ffi.alignof(t)) == (size, align)


@pytest.mark.parametrize("ctype,path,unit,unit_off,first,width,mask", BITFIELDS,
                         ids=[f"{b[0].split()[-1]}.{b[1]}" for b in BITFIELDS])
def test_bitfield(ctype, path, unit, unit_off, first, width, mask):
    off, t, cf = _walk(ctype, path)
    assert (off, t.cname, cf.bitshift, cf.bitsize) == (unit_off, unit, first, width)
    assert mask == ((1 << width) - 1) << first
    # the measurement's own method: zero an object, set the field to all ones, see which bits became 1
    obj = ffi.new(ctype + " *")
    *outer, leaf = path.split(".")
    target = obj[0]
    for name in outer:
        target = getattr(target, name)
    setattr(target, leaf, (1 << width) - 1)
    raw = bytes(ffi.buffer(obj))
    nbytes = ffi.sizeof(unit)
    assert int.from_bytes(raw[unit_off:unit_off + nbytes], "little") == mask
    assert not any(raw[:unit_off]) and not any(raw[unit_off + nbytes:])


def test_alignment_dependent_facts():
    """The facts cffi cannot read from ``__aligned``: the comm page still has 8 bytes of padding before state."""
    page = {f: ffi.offsetof("struct nvmm_comm_page", f) for f in ("state", "event_commit", "event", "stop")}
    assert page == {"state": 32, "event_commit": 1040, "event": 1048, "stop": 1064}
    assert ffi.sizeof("struct nvmm_comm_page") == 1072
    assert ffi.alignof("struct fxsave") == ffi.alignof("struct nvmm_x64_state") == 16
    assert [ffi.offsetof("struct fxsave", "fx_87_ac", i) for i in range(8)] == [32 + 16 * i for i in range(8)]
    assert [ffi.offsetof("struct fxsave", "fx_xmm", i) for i in range(16)] == [160 + 16 * i for i in range(16)]


def test_ffi_needs_no_library():
    fresh = make_ffi()
    assert fresh.sizeof("struct nvmm_vcpu") == 56


# -- constants -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in CONSTANTS if not NOT_IN_CONSTANTS.match(n)])
def test_constant(name):
    assert getattr(C, name) == CONSTANTS[name]


def test_vcpu_conf_md_macro():
    md = lambda op: op - C.NVMM_VCPU_CONF_MD_BEGIN  # noqa: E731 - NVMM_VCPU_CONF_MD(op)
    assert md(C.NVMM_VCPU_CONF_CPUID) == CONSTANTS["NVMM_VCPU_CONF_MD(NVMM_VCPU_CONF_CPUID)"]
    assert md(C.NVMM_VCPU_CONF_TPR) == CONSTANTS["NVMM_VCPU_CONF_MD(NVMM_VCPU_CONF_TPR)"]


@pytest.mark.parametrize("name", [n for n in CONSTANTS if n.startswith("NVMM_IOC_")])
def test_ioctl_length_is_argument_size(name):
    """NetBSD ioctl encoding: direction bits 30-31, length bits 16-28, group 'N', number. The length must be
    sizeof of the argument struct declared in cdefs."""
    value = CONSTANTS[name]
    assert (value >> 8) & 0xFF == ord("N")
    assert value >> 29 in (0b010, 0b100, 0b110)
    argument = "struct nvmm_ioc_" + name[len("NVMM_IOC_"):].lower()
    assert (value >> 16) & 0x1FFF == ffi.sizeof(argument)


def test_no_other_constant_is_missing():
    assert {n for n in CONSTANTS if not hasattr(C, n)} == {n for n in CONSTANTS if NOT_IN_CONSTANTS.match(n)}


# -- ops/nvmm/state.py's layouts -----------------------------------------------------------------------------------
def _construct_offsets(layout):
    """``{name: (offset, size)}`` of the named top-level fields of a construct ``Struct`` (trailing ``_`` dropped)."""
    out, off = {}, 0
    for sub in layout.subcons:
        if sub.name:
            out[sub.name.rstrip("_")] = (off, sub.sizeof())
        off += sub.sizeof()
    return out


@pytest.mark.parametrize("layout,ctype", [
    (S.X64_STATE, "struct nvmm_x64_state"), (S.X64_STATE_SEG, "struct nvmm_x64_state_seg"),
    (S.X86_EVENT, "struct nvmm_x86_event"), (S.X86_EXIT, "struct nvmm_x86_exit"),
    (S.X86_EXIT_MEMORY, "struct nvmm_x86_exit_memory"), (S.X86_EXIT_IO, "struct nvmm_x86_exit_io"),
    (S.X86_EXIT_RDMSR, "struct nvmm_x86_exit_rdmsr"), (S.X86_EXIT_WRMSR, "struct nvmm_x86_exit_wrmsr"),
    (S.X86_EXIT_INSN, "struct nvmm_x86_exit_insn"), (S.X86_EXIT_INVALID, "struct nvmm_x86_exit_invalid"),
])
def test_construct_layouts_match_cdefs(layout, ctype):
    assert layout.sizeof() == ffi.sizeof(ctype)
    fields = dict(ffi.typeof(ctype).fields)
    for name, (off, size) in _construct_offsets(layout).items():
        if name == "error":                 # X86_EVENT flattens u.excp.error
            assert (off, size) == (ffi.offsetof(ctype, "u", "excp", "error"), 8)
            continue
        assert (off, size) == (fields[name].offset, ffi.sizeof(fields[name].type)), name


def test_state_module_constants():
    assert S.STATE_SIZE == ffi.sizeof("struct nvmm_x64_state") == 1008
    assert S.EVENT_SIZE == 16 and S.EXIT_SIZE == 64 and S.SEG_SIZE == 16
    for name in ("segs", "gprs", "crs", "drs", "msrs", "intr", "fpu"):
        assert getattr(S, "OFF_" + name.upper()) == ffi.offsetof("struct nvmm_x64_state", name)
    assert S.OFF_EXITSTATE == ffi.offsetof("struct nvmm_x86_exit", "exitstate") == 40
    assert S.X86_EXITSTATE.sizeof() == 24
    for fmt, name in ((S.EXIT_IO_FMT, "io"), (S.EXIT_MEM_FMT, "mem"), (S.EXIT_RDMSR_FMT, "rdmsr"),
                      (S.EXIT_WRMSR_FMT, "wrmsr")):
        assert fmt.size == ffi.sizeof(_walk("struct nvmm_x86_exit", "u." + name)[1])


BITS = {b[1]: b[6] for b in BITFIELDS}


def test_state_module_bit_constants():
    assert S.ATTRIB_TYPE_MASK == BITS["attrib.type"]
    assert S.ATTRIB_S == BITS["attrib.s"] and S.ATTRIB_P == BITS["attrib.p"] and S.ATTRIB_AVL == BITS["attrib.avl"]
    assert S.ATTRIB_L == BITS["attrib.l"] and S.ATTRIB_DEF == BITS["attrib.def"] and S.ATTRIB_G == BITS["attrib.g"]
    assert 3 << S.ATTRIB_DPL_SHIFT == BITS["attrib.dpl"]
    assert S.INTR_INT_SHADOW == BITS["int_shadow"] == BITS["exitstate.int_shadow"]
    assert S.INTR_INT_WINDOW_EXITING == BITS["int_window_exiting"] == BITS["exitstate.int_window_exiting"]
    assert S.INTR_NMI_WINDOW_EXITING == BITS["nmi_window_exiting"] == BITS["exitstate.nmi_window_exiting"]
    assert S.INTR_EVT_PENDING == BITS["evt_pending"] == BITS["exitstate.evt_pending"]


@pytest.mark.parametrize("name,mask", [(b[1].split(".")[-1], b[6]) for b in BITFIELDS
                                       if b[0] == "struct nvmm_x64_state_seg"])
def test_construct_seg_attrib_bits(name, mask):
    parsed = S.SEG_ATTRIB.parse(mask.to_bytes(2, "little"))
    key = "def_" if name == "def" else name
    for field, value in parsed.items():
        if field.startswith("_"):
            continue
        assert bool(value) == (field == key), field


@pytest.mark.parametrize("name,mask", [(b[1], b[6]) for b in BITFIELDS if b[0] == "struct nvmm_x64_state_intr"])
def test_construct_intr_bits(name, mask):
    parsed = S.X64_STATE_INTR.parse(mask.to_bytes(8, "little"))
    for field, value in parsed.items():
        if not field.startswith("_"):
            assert bool(value) == (field == name), field
