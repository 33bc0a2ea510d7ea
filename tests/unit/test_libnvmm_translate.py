"""Exit, state and event translation between libnvmm's structures (cffi) and ``ops/nvmm/state.py``'s views.

The libnvmm provider hands ``State``/``Event``/``Exit`` the comm-page memory itself, so these views must decode
exactly what the kernel writes through the C structures, and write exactly what the kernel reads. Structures are
filled through the cffi declarations of ``ops/nvmm/libnvmm/cdefs.py`` (laid out per ``nvmm-abi.md``) and read
back through the views, and the reverse.

Not covered: the kernel itself (no NetBSD here).
"""

from hypothesis import given
from hypothesis import strategies as st

from ops.nvmm import constants as C
from ops.nvmm.libnvmm.cdefs import ffi
from ops.nvmm.state import (ATTRIB_AVL, ATTRIB_DEF, ATTRIB_DPL_SHIFT, ATTRIB_G, ATTRIB_L, ATTRIB_P, ATTRIB_S,
                            INTR_EVT_PENDING, INTR_INT_SHADOW, INTR_INT_WINDOW_EXITING, INTR_NMI_WINDOW_EXITING,
                            STATE_SIZE, Event, Exit, State)

U64 = st.integers(0, 2**64 - 1)


def new_exit(reason):
    c = ffi.new("struct nvmm_x86_exit *")
    c.reason = reason
    return c, Exit(ffi.buffer(c, 64))


def new_state():
    c = ffi.new("struct nvmm_x64_state *")
    return c, State(ffi.buffer(c, STATE_SIZE))


# -- exits ---------------------------------------------------------------------------------------------------------
def test_io_exit():
    c, ex = new_exit(C.NVMM_VCPU_EXIT_IO)
    io = c.u.io
    setattr(io, "in", True)
    io.port, io.seg, io.address_size, io.operand_size = 0x3F8, -1, 8, 4
    io.rep, io.npc = True, 0xFFFF_8000_0000_1234
    setattr(io, "str", True)
    assert ex.load().reason == C.NVMM_VCPU_EXIT_IO
    assert ex.io == (True, 0x3F8, -1, 8, 4, True, True, 0xFFFF_8000_0000_1234)
    assert ex.io.in_ and ex.io.str_ and ex.io.seg == -1


def test_io_exit_out_without_string():
    c, ex = new_exit(C.NVMM_VCPU_EXIT_IO)
    c.u.io.port, c.u.io.seg, c.u.io.operand_size, c.u.io.npc = 0x80, C.NVMM_X64_SEG_ES, 1, 0x1002
    io = ex.load().io
    assert (io.in_, io.port, io.seg, io.operand_size, io.rep, io.str_, io.npc) == (False, 0x80, 0, 1, False,
                                                                                   False, 0x1002)


def test_memory_exit():
    c, ex = new_exit(C.NVMM_VCPU_EXIT_MEMORY)
    c.u.mem.prot = C.NVMM_PROT_WRITE
    c.u.mem.gpa = 0xFEE0_0300
    c.u.mem.inst_len = 6
    c.u.mem.inst_bytes[0:6] = [0x89, 0x05, 0x00, 0x03, 0xE0, 0xFE]
    mem = ex.load().mem
    assert ex.reason == C.NVMM_VCPU_EXIT_MEMORY
    assert (mem.prot, mem.gpa, mem.inst_len) == (C.NVMM_PROT_WRITE, 0xFEE0_0300, 6)
    assert mem.inst_bytes == bytes([0x89, 0x05, 0x00, 0x03, 0xE0, 0xFE]) + bytes(9)


def test_rdmsr_and_wrmsr_exits():
    c, ex = new_exit(C.NVMM_VCPU_EXIT_RDMSR)
    c.u.rdmsr.msr, c.u.rdmsr.npc = C.MSR_APICBASE, 0x7C02
    assert ex.load().rdmsr == (0x1B, 0x7C02)
    c.reason = C.NVMM_VCPU_EXIT_WRMSR
    c.u.wrmsr.msr, c.u.wrmsr.val, c.u.wrmsr.npc = 0x830, 0xFFFF_FFFF_0000_00FE, 0x7C04
    assert ex.load().reason == C.NVMM_VCPU_EXIT_WRMSR
    assert ex.wrmsr == (0x830, 0xFFFF_FFFF_0000_00FE, 0x7C04)


def test_invalid_insn_and_special_reasons():
    c, ex = new_exit(C.NVMM_VCPU_EXIT_INVALID)
    c.u.inv.hwcode = 0x30
    assert ex.load().reason == 0xFFFF_FFFF_FFFF_FFFF and ex.inv.hwcode == 0x30
    c.reason = C.NVMM_VCPU_EXIT_CPUID
    c.u.insn.npc = 0x1234
    assert ex.load().insn.npc == 0x1234
    c.reason = C.NVMM_VCPU_EXIT_STOPPED
    assert ex.load().reason == 0xFFFF_FFFF_FFFF_FFFE


def test_exitstate_bits():
    names = ("int_shadow", "int_window_exiting", "nmi_window_exiting", "evt_pending")
    for i, name in enumerate(names):
        c, ex = new_exit(C.NVMM_VCPU_EXIT_HALTED)
        c.exitstate.rflags, c.exitstate.cr8 = 0x202, 0xF
        setattr(c.exitstate, name, 1)
        es = ex.load().exitstate
        assert (es.rflags, es.cr8) == (0x202, 0xF)
        assert [getattr(es, n) for n in names] == [j == i for j in range(4)]
    c, ex = new_exit(C.NVMM_VCPU_EXIT_NONE)
    c.exitstate.rsvd = (1 << 60) - 1           # reserved bits never read as flags
    assert not any(ex.load().exitstate[2:])


@given(U64, U64, st.integers(0, 15))
def test_exitstate_round_trip(rflags, cr8, bits):
    c, ex = new_exit(C.NVMM_VCPU_EXIT_INT_READY)
    c.exitstate.rflags, c.exitstate.cr8 = rflags, cr8
    c.exitstate.int_shadow, c.exitstate.int_window_exiting = bits & 1, bits >> 1 & 1
    c.exitstate.nmi_window_exiting, c.exitstate.evt_pending = bits >> 2 & 1, bits >> 3 & 1
    es = ex.load().exitstate
    assert es == (rflags, cr8, bool(bits & 1), bool(bits & 2), bool(bits & 4), bool(bits & 8))


# -- state ---------------------------------------------------------------------------------------------------------
def test_state_read_through_view():
    c, s = new_state()
    c.gprs[C.NVMM_X64_GPR_RIP], c.gprs[C.NVMM_X64_GPR_RFLAGS] = 0xFFF0, 0x2
    c.crs[C.NVMM_X64_CR_CR0], c.crs[C.NVMM_X64_CR_XCR0] = 0x6000_0010, 1
    c.drs[C.NVMM_X64_DR_DR7], c.msrs[C.NVMM_X64_MSR_TSC] = 0x400, 0x1234_5678_9ABC
    cs = c.segs[C.NVMM_X64_SEG_CS]
    cs.selector, cs.limit, cs.base = 0xF000, 0xFFFF, 0xFFFF_0000
    cs.attrib.type, cs.attrib.s, cs.attrib.p = 0xB, 1, 1
    c.intr.int_shadow, c.intr.evt_pending = 1, 1
    c.fpu.fx_cw, c.fpu.fx_mxcsr = 0x40, 0x1F80
    c.fpu.fx_xmm[15].xmm_bytes[15] = 0xAB
    assert s.gprs[C.NVMM_X64_GPR_RIP] == 0xFFF0 and s.gprs[C.NVMM_X64_GPR_RFLAGS] == 2
    assert s.crs[C.NVMM_X64_CR_CR0] == 0x6000_0010 and s.crs[C.NVMM_X64_CR_XCR0] == 1
    assert s.drs[C.NVMM_X64_DR_DR7] == 0x400 and s.msrs[C.NVMM_X64_MSR_TSC] == 0x1234_5678_9ABC
    assert s.segs[C.NVMM_X64_SEG_CS].get() == (0xF000, 0xB | ATTRIB_S | ATTRIB_P, 0xFFFF, 0xFFFF_0000)
    assert s.intr == INTR_INT_SHADOW | INTR_EVT_PENDING
    assert bytes(s.fpu[0:2]) == b"\x40\x00" and bytes(s.fpu[24:28]) == (0x1F80).to_bytes(4, "little")
    assert s.fpu[160 + 16 * 15 + 15] == 0xAB
    assert s.parse().segs[C.NVMM_X64_SEG_CS].attrib.type == 0xB


def test_seg_attrib_bits_one_by_one():
    c, s = new_state()
    seg, view = c.segs[C.NVMM_X64_SEG_TR], s.segs[C.NVMM_X64_SEG_TR]
    for name, value, word in (("type", 0xF, 0xF), ("s", 1, ATTRIB_S), ("dpl", 3, 3 << ATTRIB_DPL_SHIFT),
                              ("p", 1, ATTRIB_P), ("avl", 1, ATTRIB_AVL), ("l", 1, ATTRIB_L), ("def", 1, ATTRIB_DEF),
                              ("g", 1, ATTRIB_G), ("rsvd", 0xF, 0xF000)):
        ffi.buffer(ffi.addressof(seg, "attrib"))[:] = b"\0\0"
        setattr(seg.attrib, name, value)
        assert view.attrib == word, name


def test_state_written_through_view():
    c, s = new_state()
    s.gprs[C.NVMM_X64_GPR_RAX] = 0xDEAD_BEEF_0000_0001
    s.gprs[C.NVMM_X64_GPR_RIP] = 0x1000
    s.crs[C.NVMM_X64_CR_CR4] = C.CR4_PAE
    s.msrs[C.NVMM_X64_MSR_EFER] = C.EFER_LME | C.EFER_LMA
    s.segs[C.NVMM_X64_SEG_SS].set(0x10, 0x93 | ATTRIB_G | ATTRIB_DEF, 0xFFFFF, 0)
    s.segs[C.NVMM_X64_SEG_CS].base = 0x1_0000
    s.intr = INTR_INT_WINDOW_EXITING | INTR_NMI_WINDOW_EXITING
    s.fpu[24:28] = (0x1F80).to_bytes(4, "little")
    assert c.gprs[0] == 0xDEAD_BEEF_0000_0001 and c.gprs[16] == 0x1000
    assert c.crs[3] == C.CR4_PAE and c.msrs[0] == C.EFER_LME | C.EFER_LMA
    ss = c.segs[C.NVMM_X64_SEG_SS]
    assert (ss.selector, ss.limit, ss.base) == (0x10, 0xFFFFF, 0)
    assert (ss.attrib.type, ss.attrib.s, ss.attrib.dpl, ss.attrib.p) == (3, 1, 0, 1)
    assert (ss.attrib.avl, ss.attrib.l, getattr(ss.attrib, "def"), ss.attrib.g) == (0, 0, 1, 1)
    assert c.segs[C.NVMM_X64_SEG_CS].base == 0x1_0000
    assert (c.intr.int_shadow, c.intr.int_window_exiting, c.intr.nmi_window_exiting, c.intr.evt_pending) == \
        (0, 1, 1, 0)
    assert c.fpu.fx_mxcsr == 0x1F80


@given(st.lists(U64, min_size=18, max_size=18), st.integers(0, 9), st.integers(0, 0xFFFF), U64)
def test_state_round_trip(gprs, segno, attrib, base):
    c, s = new_state()
    for i, v in enumerate(gprs):
        s.gprs[i] = v
    s.segs[segno].set(segno, attrib, 0xFFFF_FFFF, base)
    assert list(c.gprs) == gprs
    a = c.segs[segno].attrib
    got = a.type | a.s << 4 | a.dpl << 5 | a.p << 7 | a.avl << 8 | a.l << 9 | getattr(a, "def") << 10 | \
        a.g << 11 | a.rsvd << 12
    assert (c.segs[segno].selector, got, c.segs[segno].base) == (segno, attrib, base)


def test_state_inside_comm_page_keeps_neighbours():
    page = ffi.new("struct nvmm_comm_page *")
    page.state_commit = 0x55
    page.event_commit = True
    s = State(ffi.buffer(ffi.addressof(page, "state"), STATE_SIZE))
    s.segs[0].set(0xFFFF, 0xFFFF, 0xFFFF_FFFF, 2**64 - 1)
    s.fpu[:] = b"\xff" * 512
    assert page.state.segs[0].selector == 0xFFFF and page.state.fpu.fx_rsvd[95] == 0xFF
    raw = bytes(ffi.buffer(page))
    assert raw[24:32] == bytes(8)               # the padding before the 16-aligned state
    assert page.state_commit == 0x55 and page.event_commit and page.stop == 0


# -- event ---------------------------------------------------------------------------------------------------------
def test_event_both_ways():
    c = ffi.new("struct nvmm_x86_event *")
    ev = Event(ffi.buffer(c, 16))
    ev.set(C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0x18)
    assert (c.type, c.vector, c.u.excp.error) == (C.NVMM_VCPU_EVENT_EXCP, 13, 0x18)
    c.type, c.vector, c.u.excp.error = C.NVMM_VCPU_EVENT_INTR, 0x30, 0
    assert ev.get() == (C.NVMM_VCPU_EVENT_INTR, 0x30, 0)
    ev.vector = 2
    assert c.vector == 2 and c.type == C.NVMM_VCPU_EVENT_INTR


def test_views_over_vcpu_pointers():
    """What the provider does: views over ``vcpu->state``/``event``/``exit`` pointers, no copies."""
    page, exit_ = ffi.new("struct nvmm_comm_page *"), ffi.new("struct nvmm_x86_exit *")
    vcpu = ffi.new("struct nvmm_vcpu *")
    vcpu.state, vcpu.event, vcpu.exit = ffi.addressof(page, "state"), ffi.addressof(page, "event"), exit_
    s, ev, ex = State(ffi.buffer(vcpu.state, STATE_SIZE)), Event(ffi.buffer(vcpu.event, 16)), \
        Exit(ffi.buffer(vcpu.exit, 64))
    s.gprs[C.NVMM_X64_GPR_RCX] = 7
    ev.set(C.NVMM_VCPU_EVENT_INTR, 0x20)
    exit_.reason = C.NVMM_VCPU_EXIT_SHUTDOWN
    assert page.state.gprs[1] == 7 and page.event.vector == 0x20
    assert ex.load().reason == C.NVMM_VCPU_EXIT_SHUTDOWN
