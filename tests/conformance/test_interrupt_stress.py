"""No interrupt is lost under load: a guest takes PIT interrupts (through the vioapic) and LAPIC timer interrupts
while it toggles IF with ``cli``/``sti``, sleeps with ``sti; hlt`` and exits to the VMM on every EOI, the
pattern Linux's timer checks and APIC calibration follow. On KVM the run loop injects at the interrupt window
and at the timer thread's kicks (``ops/nvmm/kvm/intwin.py``), which ``cli``/``sti`` exercises. A lost injection leaves its vector in the ISR and the
counters stop; the test then times out instead of reaching its counts."""

import pytest

from ops.nvmm import api
from tests.conftest import requires

from tests.conformance.test_platform_guest import IDT, RESULT, platform_vm, results  # noqa: F401
from tests.guests.vmboot import boot64, gate
from vmmshim.vm import EXIT_HALT

PIT_COUNT = 1193182 // 2000          # 2 kHz
WANT = 1500                          # interrupts of each source


@pytest.mark.parametrize("pattern", ["cli-sti", "sti-hlt", "rdmsr", "rdmsr-gp"])
def test_no_timer_interrupt_is_lost(platform_vm, provider, pattern):   # noqa: F811
    if pattern == "rdmsr-gp":
        # every entry carries a #GP, so interrupts wait for the window after the handler's iretq; a provider
        # whose window exit comes late only injects when a window exit happens to land between two faults
        requires(provider, api.LIMIT_IRQ_WINDOW_LATE)
    vm = platform_vm()
    if pattern == "cli-sti":
        body = """
  cli
  mov $200, %ecx
2:pause
  loop 2b
  sti
  mov $200, %ecx
3:pause
  loop 3b"""
    elif pattern == "sti-hlt":
        body = """
  cli
  sti
  hlt"""
    elif pattern == "rdmsr":           # an APIC_BASE read the ops layer completes: inject at an MSR exit
        body = """
  sti
  mov $0x1b, %ecx
  rdmsr"""
    else:                              # an x2APIC MSR with x2APIC off: #GP queued while completing the exit
        body = """
  sti
  mov $0x802, %ecx
  rdmsr"""
    boot64(vm, gate(0x30, "pit_handler") + gate(0x40, "lapic_handler") + gate(13, "gp_handler") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC software enabled
  movl $0x3, 0x3E0(%rsi)       # timer divide by 16
  movl $0x20040, 0x320(%rsi)   # LVT timer: periodic, vector 0x40
  movl $30000, 0x380(%rsi)     # initial count
  mov $0xFEC00000, %edi
  movl $0x14, (%rdi)           # redirection entry for pin 2
  movl $0x30, 0x10(%rdi)       # vector 0x30, fixed, edge, unmasked
  movl $0x15, (%rdi)
  movl $0x0, 0x10(%rdi)
  mov $0x34, %al               # PIT channel 0, mode 2
  out %al, $0x43
  mov ${PIT_COUNT & 0xFF}, %al
  out %al, $0x40
  mov ${PIT_COUNT >> 8}, %al
  out %al, $0x40
1:{body}
  cmpl ${WANT}, {RESULT}
  jb 1b
  cmpl ${WANT}, {RESULT + 4}
  jb 1b
  cli
  hlt
pit_handler:
  incl {RESULT}
  movl $0, 0xB0(%rsi)
  iretq
lapic_handler:
  incl {RESULT + 4}
  movl $0, 0xB0(%rsi)
  iretq
gp_handler:                    # rdmsr faulted: skip it (2 bytes)
  add $8, %rsp
  addq $2, (%rsp)
  iretq
""" + IDT)
    status = vm.run(timeout=60)
    got = results(vm, 2)
    assert status == EXIT_HALT, (vm.error, got, vm.debug_state())
    assert got[0] >= WANT and got[1] >= WANT
    win = vm.vmi.vcpus[0].intwin            # the KVM run loop's injection at the window (ops/nvmm/kvm/intwin.py)
    if win is not None and pattern == "cli-sti":
        assert win.served > 0, "the run loop injected nothing at the window while interrupts waited for sti"
        assert win.served_kicks > 0, "the run loop injected nothing at a kick while the guest ran with IF set"


def test_nmi_and_interrupt_pending_at_one_entry_are_both_delivered(platform_vm):   # noqa: F811
    """An NMI and a LAPIC interrupt that become pending during one exit: NVMM (and the soft CPU) has one event
    slot per entry, so the interrupt must wait for a window instead of replacing the NMI."""
    vm = platform_vm()
    ops, vmi = vm.ops, vm.vmi

    class Trigger:
        def read(self, offset, size):
            return 0

        def write(self, offset, size, value):
            ops.vm_inject_nmi(vmi, 0)
            ops.vm_lapic_msi(vmi, 0xFEE00000, 0x40)
    vm.add_port_device(0x510, 1, Trigger(), "trigger")
    boot64(vm, gate(2, "nmi_handler") + gate(0x40, "lapic_handler") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC software enabled
  sti
  mov $0x510, %dx
  out %al, (%dx)               # the NMI and vector 0x40 become pending while this exit is handled
  mov $100000000, %ecx
1:cmpl $0, {RESULT}
  je 2f
  cmpl $0, {RESULT + 4}
  jne 3f
2:loop 1b
3:cli
  hlt
nmi_handler:
  incl {RESULT}
  iretq
lapic_handler:
  incl {RESULT + 4}
  movl $0, 0xB0(%rsi)
  iretq
""" + IDT)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert results(vm, 2) == (1, 1), "the NMI or the interrupt was lost"
