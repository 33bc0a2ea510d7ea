"""PIT interrupts keep wall time while the host is busy (issue 24, item 5): a KVM guest counts channel 0's IRQ0
interrupts (mode 2 at 250 Hz, Debian's HZ, through the vioapic) while three host processes spin. Linux without
ACPI calibrates its APIC timer by counting these interrupts (``calibrate_APIC_clock``), so a tick lost on the
way fails that calibration's verification.

Two places lose ticks under load: the PIT, when its timer thread wakes a period or more late (it now delivers
every edge, ``bhyve_devices/vatpit.py``), and the interrupt path, when an edge reaches the LAPIC while the one
before is still in its IRR because the vCPU thread has not run (the edges merge). The PIT sends an edge again
when its line's ``pulse()`` returns False, which the platform's IRQ0 line does for such an edge (the vlapic
reports the vector already requested, through the APIC bus, the vioapic's pin 2 and ``vm_isa_pulse_irq``) and
the vCPU thread has used little CPU time since the edge before it was raised (``ops/edge_merge.py``: a guest that
ran with the tick pending declined it, and loses it, as on a PC); the test runs that line as the platform wires it.
This guest never declines a tick, but on kvm_pvm the judge now and then takes one for declined (4 of about 560
edges in 1 of 5 runs: the guest's ring-0 code runs in KVM's emulator, which the vCPU thread's CPU time counts), so
the test allows at most :data:`MISJUDGED` of the pulses judged so, and no more."""

import subprocess
import sys
import threading
import time

import pytest

from tests.conformance.test_platform_guest import IDT, RESULT, platform_vm  # noqa: F401
from tests.guests.vmboot import boot64, gate
from vmmshim.vm import EXIT_HALT

PIT_HZ = 1193182
TICK_HZ = 250
VECTOR = 0x30
HOGS = 3
WARMUP_S = 0.5
MEASURE_S = 2.0
TOLERANCE = 0.10
MISJUDGED = 0.02                    # the share of pulses the edge judge may take for declined (see the docstring)
STOP = RESULT + 8                   # the host writes 1 here to end the guest's loop
MASKED_S, OPEN_S = 0.3, 0.02        # the masked guest's stretch with interrupts off, then on


#: The guest's start: the vioapic routes pin 2 (IRQ0) to VECTOR, the PIT's channel 0 ticks at TICK_HZ (mode 2).
_PIT_SETUP = gate(VECTOR, "pit_handler") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)      # LAPIC software enabled
  mov $0xFEC00000, %edi
  movl $0x14, (%rdi)           # redirection entry for pin 2
  movl ${VECTOR}, 0x10(%rdi)   # fixed, edge, unmasked
  movl $0x15, (%rdi)
  movl $0x0, 0x10(%rdi)
  mov $0x34, %al               # channel 0, lobyte/hibyte, mode 2
  out %al, $0x43
  mov ${round(PIT_HZ / TICK_HZ) & 0xFF}, %al
  out %al, $0x40
  mov ${round(PIT_HZ / TICK_HZ) >> 8}, %al
  out %al, $0x40
"""
#: Its handler: counts the ticks at RESULT.
_PIT_HANDLER = f"""
pit_handler:
  incl {RESULT}
  movl $0, 0xB0(%rsi)          # EOI
  iretq
""" + IDT


def _count(vm):
    return int.from_bytes(bytes(vm.view(RESULT, 4)), "little")


def _pit(vm):
    return next(dev for _, _, dev, name in vm.pio._ranges if name == "atpit")


def _owed(pit, now):
    """Channel 0's edges that have risen and are not delivered yet."""
    c = pit.channels[0]
    return c.ticks(now) // c.step - (c.next_edge - 1)


def test_pit_ticks_follow_wall_time_with_the_host_busy(platform_vm, provider):  # noqa: F811
    if provider.name != "kvm":
        pytest.skip("a timing test: KVM only")
    vm = platform_vm()
    pit = _pit(vm)
    boot64(vm, _PIT_SETUP + f"""
  sti
1:cmpl $1, {STOP}
  jne 1b
  cli
  hlt
""" + _PIT_HANDLER)
    seen = {}

    def measure():
        try:
            time.sleep(WARMUP_S)
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(HOGS)]
            try:
                time.sleep(0.2)         # the hogs are spinning
                t0, c0 = time.monotonic(), _count(vm)
                time.sleep(MEASURE_S)
                t1, c1 = time.monotonic(), _count(vm)
                with pit._lock:
                    owed = _owed(pit, pit._timers.now_ns())
                seen.update(guest=c1 - c0, expected=(t1 - t0) * TICK_HZ, owed=owed)
            finally:
                for h in hogs:
                    h.kill()
                for h in hogs:
                    h.wait()
        finally:
            vm.view(STOP, 4)[:] = (1).to_bytes(4, "little")

    th = threading.Thread(target=measure, daemon=True)
    th.start()
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    th.join(10)
    assert seen, "the measuring thread did not finish"
    seen.update(pulses=pit.pulses, merged=pit.merged, dropped=pit.dropped, guest_total=_count(vm),
                declined=vm.vmi.edges.declined)
    # the guest runs with interrupts on: an edge judged declined by it is the judge's mistake (ops/edge_merge.py)
    assert seen["declined"] <= MISJUDGED * seen["pulses"], seen
    # every pulse the PIT counts as delivered reached the guest's handler, once (the last may be left pending at
    # the STOP), but one judged declined merged there; one it counts as merged found the vector still requested, so
    # the guest saw none for it
    assert seen["pulses"] - seen["declined"] - 1 <= seen["guest_total"] <= seen["pulses"], seen
    if abs(seen["guest"] - seen["expected"]) > TOLERANCE * seen["expected"]:
        if seen["owed"] + seen["dropped"] > TOLERANCE * seen["expected"]:
            pytest.skip(f"the host ran the vCPU too little to take {TICK_HZ} interrupts a second: the PIT still "
                        f"owed {seen['owed']} ticks (not lost), dropped {seen['dropped']}: {seen}")
        pytest.fail(f"the guest's ticks do not follow wall time: {seen}")


def test_ticks_a_guest_keeps_masked_are_lost_as_on_a_pc(platform_vm, provider):  # noqa: F811
    """The other half of the judge: a guest that runs with interrupts off for 300 ms (Linux calibrating, in the
    kernels that did so with interrupts off) lets the PIT's edges merge in the LAPIC's IRR; on a PC they are gone,
    and the guest takes one tick when it opens its window. Sent again, 75 ticks would arrive at once."""
    if provider.name != "kvm":
        pytest.skip("a timing test: KVM only")
    vm = platform_vm()
    pit = _pit(vm)
    boot64(vm, _PIT_SETUP + f"""
1:cmpl $1, {STOP}              # interrupts off until the host says so
  jne 1b
  movl $0, {RESULT}
  sti                          # interrupts on until the host says so again (OPEN_S)
2:cmpl $2, {STOP}
  jne 2b
  cli
  hlt
""" + _PIT_HANDLER)

    def release():
        time.sleep(MASKED_S)
        vm.view(STOP, 4)[:] = (1).to_bytes(4, "little")
        time.sleep(OPEN_S)
        vm.view(STOP, 4)[:] = (2).to_bytes(4, "little")
    th = threading.Thread(target=release, daemon=True)
    th.start()
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    th.join(10)
    seen = dict(pulses=pit.pulses, merged=pit.merged, declined=vm.vmi.edges.declined, taken=_count(vm))
    assert seen["pulses"] >= MASKED_S * TICK_HZ / 2, seen       # the PIT ran through the masked stretch
    # the tick left pending, those of the open stretch, and slack for a late release; not the masked stretch's
    assert seen["taken"] <= 1 + 2 * OPEN_S * TICK_HZ, f"ticks the guest kept masked came in after its STI: {seen}"
