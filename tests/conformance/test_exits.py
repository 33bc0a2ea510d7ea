"""Exits and events on every provider: RDMSR/WRMSR, CPUID masks and exits, HLT, the interrupt window, an
external interrupt, an exception with its error code and an NMI, each taken by a handler in the guest's IDT.

The guest's handlers report to port 0x90 (the vector) and 0x94 (an error code), then ``iretq``.
"""

import struct

import pytest

from ops.nvmm import api
from ops.nvmm import constants as C
from tests.conftest import requires
from tests.guests.asm import assemble, symbols
from tests.guests.harness import CODE

VEC_PORT, ERR_PORT, MARK_PORT = 0x90, 0x94, 0x98

# Handlers for vectors 2 (NMI), 13 (#GP, with an error code), 0x40 (an external interrupt).
#   handler_nmi:  b0 02        mov $2,%al ; e6 90  out %al,$0x90 ; 48 cf  iretq
#   handler_gp:   58           pop %rax (error code) ; e7 94  out %eax,$0x94 ; ... iretq
HANDLERS = """
handler_nmi:
  mov $2, %al
  out %al, $0x90
  iretq
handler_gp:
  pop %rax
  out %eax, $0x94
  mov $13, %al
  out %al, $0x90
  iretq
handler_ext:
  mov $0x40, %al
  out %al, $0x90
  iretq
"""


def _guest(guest_factory, body):
    src = ".code64\n.globl start\nstart:\n" + body + "\n" + HANDLERS
    g = guest_factory()
    g.load(CODE, assemble(src, CODE))
    g.setup_long64(CODE, large=True)
    sym = symbols(src, CODE)
    g.setup_idt64({2: sym["handler_nmi"], 13: sym["handler_gp"], 0x40: sym["handler_ext"]})
    g.sym = sym
    return g, sym


def _vectors(g):
    return [d[0] for p, i, d in g.io_log if p == VEC_PORT]


def test_rdmsr_wrmsr_exits_and_completion(guest_factory):
    g, sym = _guest(guest_factory, """
  mov $0x4b564d99, %ecx      # an MSR nobody implements
  rdmsr
  out %eax, $0x90
  mov %edx, %eax
  out %eax, $0x94
  mov $0x4b564d98, %ecx
  mov $0xdead, %eax
  mov $0xbeef, %edx
rd_done:
  wrmsr
  hlt
""")
    v = g.vcpu
    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR
    msr, npc = ex.rdmsr
    assert msr == 0x4B564D99
    assert npc == CODE + 5 + 2            # mov $imm32,%ecx is 5 bytes, rdmsr 2
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[C.NVMM_X64_GPR_RAX] = 0x11223344
    v.state.gprs[C.NVMM_X64_GPR_RDX] = 0x55667788
    v.state.gprs[C.NVMM_X64_GPR_RIP] = npc
    v.setstate(C.NVMM_X64_STATE_GPRS)
    ex = g.run(until=(C.NVMM_VCPU_EXIT_WRMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_WRMSR
    assert ex.wrmsr.msr == 0x4B564D98 and ex.wrmsr.val == 0xBEEF0000DEAD
    assert ex.wrmsr.npc == sym["rd_done"] + 2
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[C.NVMM_X64_GPR_RIP] = ex.wrmsr.npc
    v.setstate(C.NVMM_X64_STATE_GPRS)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert (VEC_PORT, False, struct.pack("<I", 0x11223344)) in g.io_log
    assert (ERR_PORT, False, struct.pack("<I", 0x55667788)) in g.io_log


@pytest.mark.parametrize("msr", [C.MSR_APICBASE, 0x830, 0x6E0])
def test_apic_msrs_exit_to_userland(guest_factory, msr):
    """APIC_BASE, the x2APIC range and TSC_DEADLINE belong to the Python vlapic: they must exit."""
    g, _ = _guest(guest_factory, f"mov ${msr:#x}, %ecx\nrdmsr\nhlt\n")
    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR and ex.rdmsr.msr == msr


def test_gp_injected_on_msr_exit(guest_factory):
    """#GP is a fault: the handler runs, its iretq returns to the RDMSR, which exits again at the same RIP."""
    g, _ = _guest(guest_factory, "mov $0x4b564d99, %ecx\nrdmsr\nhlt\n")
    v = g.vcpu
    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR
    first_npc = ex.rdmsr.npc
    v.event.set(C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0)
    v.inject()
    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR and ex.rdmsr.npc == first_npc
    assert _vectors(g) == [13]
    assert (ERR_PORT, False, b"\0\0\0\0") in g.io_log


def test_exception_injected_with_error_code(guest_factory):
    g, _ = _guest(guest_factory, "nop\nhlt\n")
    v = g.vcpu
    v.event.set(C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0x1234)
    v.inject()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [13]
    assert (ERR_PORT, False, struct.pack("<I", 0x1234)) in g.io_log


def test_nmi_injected(guest_factory):
    g, _ = _guest(guest_factory, "nop\nhlt\n")
    v = g.vcpu
    v.event.set(C.NVMM_VCPU_EVENT_INTR, C.X86_EXC_NMI)
    v.inject()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [2]


def test_an_interrupt_a_stop_held_back_stays_named_until_delivered(guest_factory):
    """What a checkpoint saves of a run stopped before its entry (``Vcpu.queued_event``): the injected interrupt is
    named until a run delivers it (KVM keeps it queued past a stopped run, the soft CPU delivers it first), then
    none; the handler runs once."""
    g, _ = _guest(guest_factory, "nop\nhlt\n")
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.queued_event() is None
    v.event.set(C.NVMM_VCPU_EVENT_INTR, 0x40)
    v.inject()
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.queued_event() == (C.NVMM_VCPU_EVENT_INTR, 0x40, None)
    v.stop()
    assert v.run().reason == C.NVMM_VCPU_EXIT_STOPPED
    v.getstate(C.NVMM_X64_STATE_INTR | C.NVMM_X64_STATE_GPRS)
    if v.queued_event() is None:                  # delivered before the stop was seen: the handler is next
        assert v.state.gprs[C.NVMM_X64_GPR_RIP] == g.sym["handler_ext"]
    else:
        assert v.queued_event() == (C.NVMM_VCPU_EVENT_INTR, 0x40, None)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [0x40]
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.queued_event() is None


def test_a_queued_exception_is_named_with_its_error_code(guest_factory):
    g, _ = _guest(guest_factory, "nop\nhlt\n")
    v = g.vcpu
    v.event.set(C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0x1234)
    v.inject()
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert v.queued_event() == (C.NVMM_VCPU_EVENT_EXCP, C.X86_EXC_GP, 0x1234)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [13]


WINDOW_GUEST = """
  cli
  out %al, $0x98          # exit 1: the test asks for the interrupt window here
  mov $1, %ebx
  out %al, $0x98          # exit 2: IF is still clear, so no INT_READY before it
  sti
  mov $2, %ebx            # the STI shadow
.globl after_shadow
after_shadow:
  nop
  out %al, $0x98          # exit 3: where a late window (limit irq-window-late) may not be reported yet
  mov $100000, %ecx       # a spin with IF set: a late window is reported here at the latest
1:dec %ecx
  jnz 1b
  hlt
"""


def _window_requested_while_if_clear(guest_factory):
    g, sym = _guest(guest_factory, WINDOW_GUEST)
    v = g.vcpu
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO
    v.assist_io()
    v.getstate(C.NVMM_X64_STATE_INTR)
    v.state.intr = v.state.intr | 0x2           # int_window_exiting
    v.setstate(C.NVMM_X64_STATE_INTR)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO, "INT_READY while IF=0"
    v.assist_io()
    return g, sym


def _take_interrupt(g):
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_INTR)
    assert not v.state.intr & 0x2, "the window request is cleared at INT_READY"
    v.event.set(C.NVMM_VCPU_EVENT_INTR, 0x40)
    v.inject()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [0x40]


def test_interrupt_window_opens_only_with_if_and_no_shadow(guest_factory, provider):
    requires(provider, api.LIMIT_IRQ_WINDOW_LATE)
    g, sym = _window_requested_while_if_clear(guest_factory)
    ex = g.vcpu.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_INT_READY
    es = ex.exitstate
    assert es.rflags & C.RFLAGS_IF and not es.int_shadow
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 2, "the STI shadow instruction ran before the window opened"
    assert g.gpr(C.NVMM_X64_GPR_RIP) == sym["after_shadow"]
    _take_interrupt(g)


def test_interrupt_window_never_while_if_clear(guest_factory):
    """Every provider: no INT_READY before STI; INT_READY with IF set and out of the shadow, at once where the
    provider is precise, else (limit irq-window-late) while the guest runs on with IF set."""
    g, sym = _window_requested_while_if_clear(guest_factory)
    v = g.vcpu
    ex = v.run()
    if ex.reason == C.NVMM_VCPU_EXIT_IO:         # a late window (limit irq-window-late) comes after this exit
        assert api.LIMIT_IRQ_WINDOW_LATE in g.provider.capability().limits
        v.assist_io()
        ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_INT_READY
    assert ex.exitstate.rflags & C.RFLAGS_IF and not ex.exitstate.int_shadow
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 2
    _take_interrupt(g)


def test_hlt_then_interrupt_wakes_guest(guest_factory):
    g, _ = _guest(guest_factory, "sti\nhlt\nout %al, $0x98\nhlt\n")
    ex = g.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_HALTED
    assert ex.exitstate.rflags & C.RFLAGS_IF
    g.vcpu.event.set(C.NVMM_VCPU_EVENT_INTR, 0x40)
    g.vcpu.inject()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert _vectors(g) == [0x40]
    assert [p for p, _, _ in g.io_log] == [VEC_PORT, MARK_PORT], "handler ran, then the code after hlt"


def test_cpuid_hypervisor_signature_and_mask(guest_factory):
    g, _ = _guest(guest_factory, """
  mov $0x40000000, %eax
  cpuid
  mov %ebx, %eax
  out %eax, $0x98
  mov %ecx, %eax
  out %eax, $0x98
  mov %edx, %eax
  out %eax, $0x98
  mov $0x80000001, %eax
  cpuid
  mov %edx, %eax
  out %eax, $0x94
  hlt
""")
    nx = 1 << 20
    g.vcpu.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=0x80000001, mask=True,
                                                           del_=(0, 0, 0, nx), set=(0, 0, 0, 1 << 11)))
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    sig = b"".join(d for p, _, d in g.io_log if p == MARK_PORT)
    assert sig == b"___ NVMM ___"
    edx = struct.unpack("<I", [d for p, _, d in g.io_log if p == ERR_PORT][0])[0]
    assert not edx & nx, "CPUID mask did not clear NX"
    assert edx & (1 << 11), "CPUID mask did not set SYSCALL"


def test_cpuid_leaf1_mask(guest_factory, provider):
    requires(provider, api.LIMIT_CPUID_MASK_1_7)
    g, _ = _guest(guest_factory, "mov $1, %eax\ncpuid\nmov %ecx, %eax\nout %eax, $0x94\nhlt\n")
    g.vcpu.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=1, mask=True, del_=(0, 0, 1 << 31, 0)))
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    ecx = struct.unpack("<I", g.io_log[-1][2])[0]
    assert not ecx & (1 << 31)


def test_cpuid_exit(guest_factory, provider):
    requires(provider, api.LIMIT_CPUID_EXIT)
    g, _ = _guest(guest_factory, "mov $0x4000000a, %eax\ncpuid\nhlt\n")
    g.vcpu.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=0x4000000A, exit=True))
    ex = g.run(until=(C.NVMM_VCPU_EXIT_CPUID,))
    assert ex.reason == C.NVMM_VCPU_EXIT_CPUID
    assert ex.insn.npc == CODE + 5 + 2


def test_cpuid_exit_refused_with_a_named_limit(kvm_provider):
    """Where CPUID cannot exit, configuring it says so by the limit's name instead of silently not exiting."""
    m = kvm_provider.machine_create()
    try:
        v = m.vcpu_create(0)
        with pytest.raises(OSError) as err:
            v.configure(C.NVMM_VCPU_CONF_CPUID, api.ConfCpuid(leaf=1, exit=True))
        assert api.LIMIT_CPUID_EXIT in str(err.value)
    finally:
        m.destroy()
