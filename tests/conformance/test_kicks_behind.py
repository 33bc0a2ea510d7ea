"""Interrupts raised from another thread while the guest sits in a long handler it ends through its PV EOI word:
two more raises (``HIGH`` and ``LOW``, in either order) must wait for that end. On KVM the provider's run loop holds
the first of them posted for after the end, and the second needs no kick: the post becomes ``HIGH``'s, and the loop
is told to come back to Python once it is injected (``IntWindow.again``, ``ops/vmm_lapic.py``'s ``post_behind``).
Every provider must deliver each raise exactly once and in priority order (Intel SDM vol. 3A 10.8.3.1: the
highest vector in the IRR above the PPR goes first), and leave nothing in service."""

import struct
import threading
import time

import pytest

from tests.conformance.test_kvm_para import OUT, SETUP, WORD
from tests.conformance.test_taken_kicks import _END
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT

LOW, HIGH, FIRST = 0x48, 0x50, 0x60       # LOW below HIGH: the CPU takes HIGH first
ROUNDS = 150
COUNTS = OUT                              # three counters: FIRST, HIGH, LOW
GO = OUT + 12                             # the raiser's round once it raised HIGH and LOW: FIRST's handler ends
LOG_IDX, LOG = OUT + 16, OUT + 0x100      # the order the handlers ran in: 1 FIRST, 2 HIGH, 3 LOW


def _handler(name, n):
    return f"""{name}:
  push %rax
  incl {COUNTS + 4 * (n - 1)}
  movl {LOG_IDX}, %eax
  movb ${n}, {LOG}(%rax)
  incl {LOG_IDX}
  pop %rax
"""


# without PV EOI: the IDT loaded, the APIC software-enabled at %rsi (every end of an interrupt is a real EOI)
SETUP_NO_PV_EOI = """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)
"""


def guest(setup):
    return gate(FIRST, "first_handler") + gate(HIGH, "high_handler") + gate(LOW, "low_handler") + setup + BODY


BODY = f"""
  sti
spin:
  pause                         # no exit: whatever is delivered comes by the run loop or a kick
  cmpl ${ROUNDS}, {COUNTS + 8}
  jb spin
  cli
  hlt
""" + _handler("first_handler", 1) + f"""  push %rax
  mov {COUNTS}, %eax
1:
  pause                         # in service until the other two were raised
  cmp {GO}, %eax
  jne 1b
  pop %rax
""" + _END + _handler("high_handler", 2) + _END + _handler("low_handler", 3) + _END + idt(FIRST + 1)
GUEST = guest(SETUP)


def counts(vm):
    return struct.unpack_from("<3I", vm.view(COUNTS, 12))


def raiser(vm, order):
    """Per round: FIRST, and once its handler runs, the two of ``order`` at once; then the handler may end."""
    ops, vmi = vm.ops, vm.vmi

    def wait(i, which):
        end = time.monotonic() + 5
        while counts(vm)[which] <= i and time.monotonic() < end:
            time.sleep(0.0001)

    def go():
        time.sleep(0.05)
        for i in range(ROUNDS):
            ops.vm_lapic_msi(vmi, 0xFEE00000, FIRST)
            wait(i, 0)
            for vector in order:
                ops.vm_lapic_msi(vmi, 0xFEE00000, vector)
            struct.pack_into("<I", vm.view(GO, 4), 0, i + 1)
            wait(i, 2)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("order", [(HIGH, LOW), (LOW, HIGH)], ids=["high-then-low", "low-then-high"])
@pytest.mark.parametrize("pv_eoi", [True, False], ids=["pv-eoi", "eoi"])
def test_two_raises_behind_a_handler_come_in_priority_order(make_vm, order, pv_eoi):
    """Without PV EOI the loop's injection of FIRST is held unaccepted while its handler runs: the next raise
    accepts it (``post_kick_taken``), finds nothing it may post, and needs no kick either, FIRST's EOI exiting."""
    vm = make_vm(kvm_pv=True, pv_eoi=pv_eoi)
    boot64(vm, GUEST if pv_eoi else guest(SETUP_NO_PV_EOI))
    t = raiser(vm, order)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    t.join()
    assert counts(vm) == (ROUNDS, ROUNDS, ROUNDS), vm.stats()
    log = bytes(vm.view(LOG, 3 * ROUNDS))
    assert log == bytes([1, 2, 3]) * ROUNDS, [log[i:i + 3] for i in range(0, len(log), 3) if log[i:i + 3] != b"\1\2\3"]
    ctx = vm.vmi.vcpus[0]
    isr = [ctx.vlapic.read(0x100 + 0x10 * i, 4) for i in range(8)]
    assert not any(isr), f"left in service: {isr}"
    if ctx.intwin is not None:          # the KVM run loop: some second raises found the first posted, kicked nothing
        assert ctx.kicks_spared > 0, vm.stats()
