"""A vCPU asleep in HLT on every provider: woken by device interrupts raised from another thread, by an NMI, and
ended by the VM's stop. Where the provider's run loop sleeps in HLT itself (the KVM provider's ``intwin``,
``ops/nvmm/kvm/fasthalt.c``), the interrupts must end the sleep there (the ops layer sees no HLT exit for them)
and the NMI and the stop, which the loop leaves to Python, must still reach the guest and the VM."""

import threading
import time

from tests.conformance.test_platform_guest import IDT, RESULT, platform_vm, results  # noqa: F401
from tests.guests.vmboot import boot64, gate
from vmmshim.vm import EXIT_HALT, EXIT_POWEROFF

from ops.nvmm import constants as C

VECTOR = 0x40
RAISES = 60
GAP_S = 0.003

SLEEPER = gate(2, "nmi_handler") + gate(VECTOR, "handler") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC software enabled
1:sti
  hlt                          # woken by each interrupt
  cmpl $WANT, {RESULT}
  jb 1b
  cmpl $NMIS, {RESULT + 4}
  jb 1b
  cli
  hlt
handler:
  incl {RESULT}
  movl $0, 0xB0(%rsi)          # EOI (an MMIO exit: the injection is accepted before the next HLT)
  iretq
nmi_handler:
  incl {RESULT + 4}
  iretq
""" + IDT


def _counted(vm, slot, want):
    """Waits (up to 5 s) until the guest's counter ``slot`` reaches ``want``: the next request then cannot merge
    with this one in the IRR (two edges of one vector before the CPU takes the first are one interrupt)."""
    end = time.monotonic() + 5
    while results(vm, 2)[slot] < want and time.monotonic() < end:
        time.sleep(0.0005)


def _raiser(vm, n, nmis=0):
    ops, vmi = vm.ops, vm.vmi

    def go():
        time.sleep(0.05)
        for i in range(n):
            ops.vm_lapic_msi(vmi, 0xFEE00000, VECTOR)
            _counted(vm, 0, i + 1)
            time.sleep(GAP_S)               # the guest is back in its HLT by now, most times
        for i in range(nmis):
            ops.vm_inject_nmi(vmi, 0)
            _counted(vm, 1, i + 1)
            time.sleep(GAP_S)
    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def test_device_interrupts_wake_a_sleeping_vcpu(platform_vm):   # noqa: F811
    vm = platform_vm()
    boot64(vm, SLEEPER.replace("WANT", str(RAISES)).replace("NMIS", "0"))
    t = _raiser(vm, RAISES)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    t.join()
    assert results(vm, 1) == (RAISES,)
    ctx = vm.vmi.vcpus[0]
    win = ctx.intwin
    if win is not None and win.halt_loop:
        assert win.halt_wakes >= RAISES // 2, f"{win.halts} sleeps in the loop, {win.halt_wakes} ended there"
        assert ctx.exits[C.NVMM_VCPU_EXIT_HALTED & 0xFFFF] < RAISES // 2, "most HLTs still went to Python"


def test_an_nmi_wakes_a_vcpu_asleep_in_the_loop(platform_vm):   # noqa: F811
    vm = platform_vm()
    boot64(vm, SLEEPER.replace("WANT", "3").replace("NMIS", "2"))
    t = _raiser(vm, 3, nmis=2)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    t.join()
    assert results(vm, 2) == (3, 2)


def test_the_vms_stop_ends_a_sleep_in_the_loop(platform_vm):   # noqa: F811
    vm = platform_vm()
    boot64(vm, SLEEPER.replace("WANT", "1000000").replace("NMIS", "0"))
    stopper = threading.Timer(0.3, lambda: vm.stop(EXIT_POWEROFF))
    stopper.start()
    t0 = time.monotonic()
    assert vm.run(timeout=30) == EXIT_POWEROFF, vm.error
    assert time.monotonic() - t0 < 10
    win = vm.vmi.vcpus[0].intwin
    if win is not None and win.halt_loop:
        assert win.halts >= 1 and not win.sleeping
