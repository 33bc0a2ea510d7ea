"""Details of the software (unicorn) NVMM provider that the provider-parametrized conformance suite does not pin:
event delivery through the IVT/IDT in real, 32-bit and 64-bit mode, string I/O, MEMORY exits, HLT, STOPPED from
another thread, and INT_READY only with IF=1 outside an interrupt shadow."""

import struct
import threading
import time

import pytest

from ops.nvmm import constants as C
from tests.guests.asm import assemble

pytest.importorskip("unicorn")

RIP, RSP, RAX, RCX, RSI, RDI, RFLAGS = (C.NVMM_X64_GPR_RIP, C.NVMM_X64_GPR_RSP, C.NVMM_X64_GPR_RAX,
                                        C.NVMM_X64_GPR_RCX, C.NVMM_X64_GPR_RSI, C.NVMM_X64_GPR_RDI,
                                        C.NVMM_X64_GPR_RFLAGS)
GDT, IDT, HANDLER, CODE = 0x500, 0x700, 0x9000, 0x2000



def _tables(g, code_desc, gate):
    g.load(GDT, struct.pack("<3Q", 0, code_desc, 0x00CF92000000FFFF))
    g.load(IDT, gate)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_ALL)
    v.state.segs[C.NVMM_X64_SEG_GDT].set(0, 0, 23, GDT)
    v.state.segs[C.NVMM_X64_SEG_IDT].set(0, 0, 0xFFF, IDT)
    v.setstate(C.NVMM_X64_STATE_SEGS)


def _inject(v, type_, vector, error=0):
    v.event.set(type_, vector, error)
    v.inject()


def test_real_mode_interrupt_goes_through_the_ivt(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code16\nsti\nhlt\n", CODE))
    g.load(HANDLER, assemble(".code16\nout %al, $0x90\nhlt\n", HANDLER))
    g.load(0x20 * 4, struct.pack("<HH", HANDLER & 0xF, HANDLER >> 4))
    g.setup_real(CODE)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[RSP] = 0x7000
    v.setstate(C.NVMM_X64_STATE_GPRS)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    _inject(v, C.NVMM_VCPU_EVENT_INTR, 0x20)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x90
    v.getstate(C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_SEGS)
    assert v.state.gprs[RSP] == 0x7000 - 6
    ip, cs, flags = struct.unpack("<HHH", g.read(0x7000 - 6, 6))
    assert (ip, cs) == (CODE + 2, 0) and flags & C.RFLAGS_IF
    assert not v.state.gprs[RFLAGS] & C.RFLAGS_IF
    assert v.state.segs[C.NVMM_X64_SEG_CS].get()[0] == HANDLER >> 4


def test_protected_mode_exception_with_error_code_through_the_idt(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code32\nhlt\n", CODE))
    g.load(HANDLER, assemble(".code32\nout %al, $0x91\nhlt\n", HANDLER))
    g.setup_prot32(CODE)
    gate = bytes(8 * 13) + struct.pack("<HHHH", HANDLER & 0xFFFF, 0x08, 0x8E00, HANDLER >> 16)
    _tables(g, 0x00CF9A000000FFFF, gate)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[RSP] = 0x8000
    v.setstate(C.NVMM_X64_STATE_GPRS)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    _inject(v, C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0x1234)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x91
    err, eip, cs, eflags = struct.unpack("<4I", g.read(0x8000 - 16, 16))
    assert (err, eip, cs) == (0x1234, CODE + 1, 0x08) and eflags & 2
    assert g.gpr(RSP) == 0x8000 - 16


def test_long_mode_interrupt_through_a_64_bit_gate(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nhlt\nhlt\n", CODE))
    g.load(HANDLER, assemble(".code64\nout %al, $0x92\niretq\n", HANDLER))
    g.setup_long64(CODE)
    gate = bytes(16 * 0x21) + struct.pack("<HHHHII", HANDLER & 0xFFFF, 0x08, 0x8E00, HANDLER >> 16, 0, 0)
    _tables(g, 0x00AF9A000000FFFF, gate)
    v = g.vcpu
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[RFLAGS] |= C.RFLAGS_IF
    v.setstate(C.NVMM_X64_STATE_GPRS)
    _inject(v, C.NVMM_VCPU_EVENT_INTR, 0x21)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x92
    assert not ex.exitstate.rflags & C.RFLAGS_IF, "an interrupt gate clears IF"
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", g.read(0x1F0000 - 40, 40))
    assert (rip, cs, rsp, ss) == (CODE + 1, 0x08, 0x1F0000, 0x10) and rflags & C.RFLAGS_IF
    v.assist_io()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED     # iretq back to the second hlt
    assert g.gpr(RSP) == 0x1F0000


def test_triple_fault_is_shutdown(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nhlt\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_SEGS)
    v.state.segs[C.NVMM_X64_SEG_IDT].set(0, 0, 0, 0)      # an empty IDT: #GP, #DF, shutdown
    v.setstate(C.NVMM_X64_STATE_SEGS)
    _inject(v, C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0)
    assert v.run().reason == C.NVMM_VCPU_EXIT_SHUTDOWN


def test_rep_string_io(soft_guest):
    g = soft_guest()
    g.load(0x1000, b"hello")
    g.load(CODE, assemble(".code64\nmov $0x1000, %rsi\nmov $5, %rcx\nmov $0x40, %dx\nrep outsb\n"
                          "mov $0x1100, %rdi\nmov $3, %rcx\nrep insw\nhlt\n", CODE))
    g.setup_long64(CODE)
    g.io_in[0x40] = b"abcdef"
    ex = g.vcpu.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO
    io = ex.io
    assert (io.port, io.in_, io.str_, io.rep, io.operand_size, io.address_size) == (0x40, False, True, True, 1, 8)
    g.vcpu.assist_io()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert [d for p, i, d in g.io_log if not i] == [b"h", b"e", b"l", b"l", b"o"]
    assert g.read(0x1100, 6) == b"abcdef"
    assert g.gpr(RCX) == 0 and g.gpr(RSI) == 0x1005 and g.gpr(RDI) == 0x1106


def test_in_merges_by_size(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nmov $-1, %rax\ninb $0x50, %al\nmov %rax, %rbx\nmov $-1, %rax\n"
                          "inl $0x50, %eax\nhlt\n", CODE))
    g.setup_long64(CODE)
    g.io_in[0x50] = b"\x12\x34\x56\x78"
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 0xFFFFFFFFFFFFFF12
    assert g.gpr(RAX) == 0x12785634, "a 4-byte IN zero-extends RAX (the harness rotated its input by one byte)"


def test_memory_exit_then_assist(soft_guest):
    g = soft_guest(holes=[(0x1000, 0x2000)])
    g.load(CODE, assemble(".code64\nmovq $0x1122334455667788, %rax\nmov %rax, 0x1010\nmov 0x1010, %ebx\n"
                          "hlt\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_MEMORY
    assert ex.mem.gpa == 0x1010 and ex.mem.prot == C.NVMM_PROT_WRITE
    v.getstate(C.NVMM_X64_STATE_GPRS)
    assert v.state.gprs[RIP] == CODE + 10, "the exit comes before the access"
    v.assist_mem()
    assert g.mem_log == [(0x1010, True, struct.pack("<Q", 0x1122334455667788))]
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_MEMORY and ex.mem.prot == C.NVMM_PROT_READ
    v.assist_mem()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 0x55667788


def test_hlt_leaves_rip_after_it(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nnop\nhlt\nhlt\n", CODE))
    g.setup_long64(CODE)
    assert g.vcpu.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.gpr(RIP) == CODE + 2


def test_stop_from_another_thread(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\n1: jmp 1b\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    t = threading.Timer(0.2, v.stop)
    t.start()
    t0 = time.monotonic()
    assert v.run().reason == C.NVMM_VCPU_EXIT_STOPPED
    assert time.monotonic() - t0 < 10
    t.join()
    v.stop()          # before a run: the next run returns STOPPED at once
    assert v.run().reason == C.NVMM_VCPU_EXIT_STOPPED


def test_int_ready_only_with_if_and_no_shadow(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\ncli\nnop\nnop\nsti\nnop\nnop\nhlt\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_INTR)
    v.state.intr |= 1 << 1          # int_window_exiting
    v.setstate(C.NVMM_X64_STATE_INTR)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_INT_READY
    assert g.gpr(RIP) == CODE + 5, "the window opens after the instruction in STI's shadow"
    assert not ex.exitstate.int_window_exiting, "the exit disarms the window"
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED


def test_int_ready_at_once_when_open(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nnop\nhlt\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_INTR)
    v.state.gprs[RFLAGS] |= C.RFLAGS_IF
    v.state.intr |= 1 << 1
    v.setstate(C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_INTR)
    assert v.run().reason == C.NVMM_VCPU_EXIT_INT_READY
    assert g.gpr(RIP) == CODE
    v.getstate(C.NVMM_X64_STATE_INTR)
    v.state.intr |= 1 << 0 | 1 << 1   # an interrupt shadow holds the window one instruction
    v.setstate(C.NVMM_X64_STATE_INTR)
    assert v.run().reason == C.NVMM_VCPU_EXIT_INT_READY
    assert g.gpr(RIP) == CODE + 1


def test_capability_names_its_limits():
    from ops.nvmm import api, nvmm_init
    cap = nvmm_init("soft").capability()
    assert (cap.version, cap.state_size) == (2, 1008)
    assert api.LIMIT_NMI_WINDOW in cap.limits and api.LIMIT_CPUID_EXIT not in cap.limits
