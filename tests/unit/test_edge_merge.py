"""The judge of merged ISA edges (``ops/edge_merge.py``, issue 24 item 5): an edge that merged while the vCPU
thread used little CPU time was held up by the host and goes out again; one that merged after the vCPU ran with the
request pending was declined by the guest and is lost, as on a PC. Pure logic with an injected clock, the Linux
thread clock itself, and IRQ0 as the platform wires it into the PIT."""

import threading
import time

import pytest

from bhyve_devices.base import LateTimers
from bhyve_devices.vatpit import PIT8254
from ops.edge_merge import DECLINED_CPU_NS, IS_LINUX, EdgeJudge, thread_cpu_ns
from tests.unit.test_vatpit import LATCH_1KHZ, _period_ns, _platform_irq0


def test_the_cpu_time_since_the_edge_was_raised_decides():
    cpu = [0]
    j = EdgeJudge(lambda: cpu[0])
    assert j.merged(0) is False                 # never raised: held up
    j.raised(0)
    cpu[0] = DECLINED_CPU_NS - 1
    assert j.merged(0) is False
    cpu[0] = DECLINED_CPU_NS
    assert j.merged(0) is True and j.merged(0) is True    # still the same pending edge: declined again
    j.raised(0)                                 # a new request: the clock starts over
    assert j.merged(0) is False
    assert j.merged(8) is False                 # per IRQ
    assert (j.declined, j.held_up) == (2, 4)


def test_an_unknown_clock_counts_as_held_up():
    j = EdgeJudge(lambda: None)
    j.raised(0)
    assert j.merged(0) is False and j.held_up == 1


@pytest.mark.skipif(not IS_LINUX, reason="the thread clock is read on Linux only")
def test_the_thread_clock_follows_a_thread_and_refuses_an_ended_one():
    assert thread_cpu_ns(None) is None
    tid = threading.get_native_id()
    a = thread_cpu_ns(tid)
    end = time.monotonic() + 0.02
    while time.monotonic() < end:
        pass
    assert thread_cpu_ns(tid) - a >= 10_000_000
    ended = []
    t = threading.Thread(target=lambda: ended.append(threading.get_native_id()))
    t.start()
    t.join()
    sleeper_cpu = thread_cpu_ns(ended[0])
    assert sleeper_cpu is None or sleeper_cpu < 10_000_000     # gone (EINVAL), or a reused id's small clock


def _pit_on_platform_line(cpu):
    hpet = [False]
    engine, lapic, line = _platform_irq0(hpet, cpu)
    engine.vioapic.write_reg(0x14, 0x30)        # pin 2: vector 0x30, fixed, edge, unmasked
    engine.vioapic.write_reg(0x15, 0)
    t = LateTimers(start_ns=10**12)
    pit = PIT8254(t, line)
    pit.write(3, 1, 0x34)
    pit.write(0, 1, LATCH_1KHZ & 0xFF)
    pit.write(0, 1, LATCH_1KHZ >> 8)
    return engine, lapic, pit, t


def test_a_guest_that_runs_with_the_tick_pending_loses_the_merged_ticks():
    cpu = [0]
    engine, lapic, pit, t = _pit_on_platform_line(cpu)
    start, period = t.now_ns(), _period_ns()
    engine.edges.threshold_ns = period // 2     # 1 kHz here: half a period of CPU time declines a tick
    for k in range(1, 11):                      # ten periods with interrupts off: the vCPU runs all along
        cpu[0] = k * period
        t.run_on_time_until(start + int((k + 0.2) * period))
    assert pit.pulses == 10 and pit.merged == 0 and engine.edges.declined == 9
    lapic.intr_accepted(0x30)                   # interrupts on: one tick is taken, then the next on time
    t.run_on_time_until(start + int(10.9 * period))
    assert pit.pulses == 10 and not lapic.irr >> 0x30 & 1     # no burst of re-sent ticks
    t.run_on_time_until(start + int(11.1 * period))
    assert pit.pulses == 11 and lapic.irr >> 0x30 & 1


def test_a_vcpu_the_host_does_not_run_gets_the_merged_ticks_again():
    engine, lapic, pit, t = _pit_on_platform_line([0])     # the vCPU thread's clock stands still
    start, period = t.now_ns(), _period_ns()
    t.run_on_time_until(start + int(3.2 * period))
    assert pit.pulses == 1 and pit.merged >= 2 and engine.edges.declined == 0
    for _ in range(3):
        lapic.intr_accepted(0x30)
        t.run_on_time_until(t.now_ns() + period // 2 + 1)
    assert pit.pulses == 4


def test_a_guest_with_its_window_open_declines_nothing():
    """However long the vCPU ran, an edge that merged while the guest had interrupts open (no window asked for,
    or the window exit came) was held up by the VMM: the guest never held it back."""
    cpu, masked = [0], [False]
    j = EdgeJudge(lambda: cpu[0], lambda: masked[0])
    j.raised(0)
    cpu[0] = 10 * DECLINED_CPU_NS
    assert j.merged(0) is False
    masked[0] = True
    assert j.merged(0) is True and (j.declined, j.held_up) == (1, 1)
