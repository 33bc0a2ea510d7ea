"""NVMM's state, event and exit layouts: construct declarations round-trip, and the hot-path accessors agree
with them byte for byte."""

import struct

from hypothesis import given, strategies as st

from ops.nvmm import constants as C
from ops.nvmm import state as S


def test_sizes_and_offsets_match_netbsd10():
    assert S.STATE_SIZE == 1008 and S.X64_STATE_SEG.sizeof() == 16 and S.X86_EVENT.sizeof() == 16
    assert (S.OFF_SEGS, S.OFF_GPRS, S.OFF_CRS, S.OFF_DRS, S.OFF_MSRS, S.OFF_INTR, S.OFF_FPU) == \
        (0, 160, 304, 352, 400, 488, 496)
    assert S.X86_EXIT.sizeof() == 64 and S.OFF_EXITSTATE == 40


@given(st.binary(min_size=1008, max_size=1008))
def test_state_round_trip_through_construct(raw):
    parsed = S.X64_STATE.parse(raw)
    assert S.X64_STATE.build(parsed) == raw
    state = S.State(bytearray(raw))
    assert list(state.gprs) == list(parsed.gprs)
    assert list(state.msrs) == list(parsed.msrs)
    sel, attrib, limit, base = state.segs[C.NVMM_X64_SEG_CS].get()
    cs = parsed.segs[C.NVMM_X64_SEG_CS]
    assert (sel, limit, base) == (cs.selector, cs.limit, cs.base)
    assert attrib & 0xF == cs.attrib.type and bool(attrib & S.ATTRIB_L) == cs.attrib.l
    assert bool(state.intr & S.INTR_INT_SHADOW) == parsed.intr.int_shadow


def test_state_writes_land_where_construct_reads_them():
    state = S.State()
    state.gprs[C.NVMM_X64_GPR_RIP] = 0xFFF0
    state.crs[C.NVMM_X64_CR_CR4] = C.CR4_PAE
    state.segs[C.NVMM_X64_SEG_TR].set(0x18, 0x8B, 0x67, 0x1000)
    state.intr = S.INTR_INT_WINDOW_EXITING
    p = state.parse()
    assert p.gprs[C.NVMM_X64_GPR_RIP] == 0xFFF0 and p.crs[C.NVMM_X64_CR_CR4] == C.CR4_PAE
    tr = p.segs[C.NVMM_X64_SEG_TR]
    assert (tr.selector, tr.attrib.type, tr.attrib.p, tr.limit, tr.base) == (0x18, 0xB, True, 0x67, 0x1000)
    assert p.intr.int_window_exiting and not p.intr.int_shadow


@given(st.binary(min_size=64, max_size=64))
def test_exit_payloads_agree_with_construct(raw):
    ex = S.Exit(raw)
    p = S.X86_EXIT.parse(raw)
    io = ex.io
    assert (io.port, io.seg, io.address_size, io.operand_size, io.npc) == \
        (p.u.io.port, p.u.io.seg, p.u.io.address_size, p.u.io.operand_size, p.u.io.npc)
    assert (ex.mem.gpa, ex.mem.inst_len, ex.mem.inst_bytes) == (p.u.mem.gpa, p.u.mem.inst_len, p.u.mem.inst_bytes)
    assert ex.wrmsr == (p.u.wrmsr.msr, p.u.wrmsr.val, p.u.wrmsr.npc)
    es = ex.exitstate
    assert (es.rflags, es.cr8, es.evt_pending) == (p.exitstate.rflags, p.exitstate.cr8, p.exitstate.bits.evt_pending)
    assert ex.load().reason == struct.unpack_from("<Q", raw)[0]


def test_event_round_trip():
    ev = S.Event()
    ev.set(C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_PF, 0x1234)
    assert S.X86_EVENT.parse(bytes(ev.buf)) == dict(type=0, vector=14, error=0x1234)
    ev.vector = 13
    assert ev.get() == (0, 13, 0x1234)
