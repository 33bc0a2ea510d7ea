"""The vlapic's side of an injection done outside Python (``bhyve_devices/vlapic_accept.py``): what it plans for the
interrupt window, the acceptance of the vector the run loop took, and a request of that vector meanwhile, which is
a new one (kept for after its EOI), not merged. Pure logic: the run loop itself is tested with real guests in
``tests/conformance/test_interrupt_stress.py`` and ``test_kvm_para.py``."""

import threading

from hypothesis import given, settings, strategies as st

from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.vlapic import Vlapic


def make(tsc_hz=None):
    v = Vlapic(0, ManualTimers(), ApicBus(), tsc_hz=tsc_hz)
    v.write(R.SVR, 4, 0x1FF)
    return v


def test_plan_is_the_highest_deliverable_vector():
    v = make()
    assert v.window_plan() is None                      # nothing requested
    v.set_intr_ready(0x41)
    assert v.window_plan() == (0x41, True, False)       # edge, alone: PV EOI may end it, nothing after it
    v.set_intr_ready(0x30)
    assert v.window_plan() == (0x41, True, True)        # 0x30 waits for its end: the window again
    v.set_intr_ready(0x50, level_triggered=True)
    assert v.window_plan() == (0x50, False, False)      # level-triggered: its EOI goes to the APIC


def test_plan_respects_the_tpr_and_the_one_in_service():
    v = make()
    v.set_intr_ready(0x41)
    v.set_cr8(4)
    assert v.window_plan() is None, "the TPR holds class 4 back"
    v.set_cr8(0)
    v.set_intr_ready(0x61)
    v.intr_accepted(0x61)
    assert v.window_plan() is None, "something in service: the caller decides"
    assert v.window_plan(in_service_ends=True) == (0x41, True, False), "once 0x61 ends, 0x41 is next"
    v.set_intr_ready(0x71)
    v.intr_accepted(0x71)
    assert v.window_plan(in_service_ends=True) is None, "two in service: PV EOI ends only one"


def test_plan_leaves_a_level_in_service_and_lint0_to_the_caller():
    v = make()
    v.set_intr_ready(0x61, level_triggered=True)
    v.intr_accepted(0x61)
    v.set_intr_ready(0x41)
    assert v.window_plan(in_service_ends=True) is None, "a level-triggered vector is not ended through memory"
    w = make()
    w.write(R.LVT_LINT0, 4, R.DELMODE_EXTINT << 8)
    w.set_lint0_level(True)
    w.set_intr_ready(0x41)
    assert w.lint0_pending() and w.window_plan() is None


def test_accept_outside_moves_irr_to_isr_after_the_pv_eoi():
    v = make()
    v.set_intr_ready(0x61)
    v.intr_accepted(0x61)
    v.set_intr_ready(0x41)
    seen = []
    assert v.accept_outside(0x41, True, lambda: seen.append((v.isr, v.irr))) is False
    assert v.isr == 1 << 0x41 and v.irr == 0, "0x61 ended first, then 0x41 taken"
    assert seen == [(1 << 0x41, 0)], "done() runs once the vlapic shows the vector taken"


def test_a_request_after_the_loop_took_the_vector_is_kept():
    v = make()
    taken = set()
    v.outside = lambda vector: vector in taken
    v.set_intr_ready(0x41)
    assert v.set_intr_ready(0x41, report_merged=True) == (True, True), "before the loop took it: merged"
    taken.add(0x41)                                       # the run loop injected it
    assert v.set_intr_ready(0x41, report_merged=True) == (True, False), "after: a new request"
    assert v.set_intr_ready(0x41, report_merged=True) == (True, True), "a third merges with the second"
    assert v.accept_outside(0x41, False, taken.clear) is True
    assert v.isr == 1 << 0x41 and v.irr == 1 << 0x41, "in service, and requested again for after its EOI"
    v.eoi()
    assert v.pending_intr() == 0x41
    v.intr_accepted(0x41)
    assert v.irr == 0


def test_done_runs_under_the_lock():
    """A request racing with the acceptance sees either the loop's record (kept) or the accepted state (a new
    request on an empty IRR bit): never the record cleared with the vector still shown requested."""
    v = make()
    taken = {0x41}
    v.outside = lambda vector: vector in taken
    v.set_intr_ready(0x41)
    results = []

    def done():
        t = threading.Thread(target=lambda: results.append(v.set_intr_ready(0x41, report_merged=True)))
        t.start()
        t.join(0.2)
        assert t.is_alive(), "set_intr_ready ran inside the acceptance"
        taken.clear()
        done.thread = t

    v.accept_outside(0x41, False, done)
    done.thread.join()
    assert results == [(True, False)] and v.irr == 1 << 0x41


@settings(max_examples=200, deadline=None)
@given(irr=st.sets(st.integers(16, 255), max_size=6), level=st.sets(st.integers(16, 255), max_size=3),
       cr8=st.integers(0, 15), in_service=st.sets(st.integers(16, 255), max_size=2), ends=st.booleans())
def test_plan_agrees_with_injecting_in_python(irr, level, cr8, in_service, ends):
    """What the plan says equals what the ops layer computes at the window in Python: the PV EOI of the one in
    service (when asked), then pending_intr(), acceptance, edge_in_service_before()."""
    v = make()
    for vec in in_service:
        v.set_intr_ready(vec, level_triggered=vec in level)
        v.intr_accepted(vec)
    for vec in irr:
        v.set_intr_ready(vec, level_triggered=vec in level)
    v.set_cr8(cr8)
    plan = v.window_plan(ends)
    isr = v.isr
    lone_edge = isr and not isr & (isr - 1) and not v.tmr & isr
    if (ends and not lone_edge) or (not ends and isr):
        assert plan is None
        return
    if ends:
        v.eoi()
    vec = v.pending_intr()
    if vec is None:
        assert plan is None
        return
    v.intr_accepted(vec)
    behind = v.edge_in_service_before()
    assert plan == (vec, behind is not None, bool(behind))
    assert v.pending_intr() is None, "nothing else is deliverable right after it"


def test_offer_outside_hands_the_plan_to_post_under_the_lock():
    v = make()
    assert v.offer_outside(lambda *plan: True) is False, "no plan: nothing offered"
    v.set_intr_ready(0x61)
    v.intr_accepted(0x61)
    v.set_intr_ready(0x41)
    seen = []

    def post(*plan):
        seen.append((plan, v._lock._is_owned()))
        return True
    assert v.offer_outside(post) is False, "0x61 in service: no plan unless it ends first"
    assert v.offer_outside(post, in_service_ends=True) is True
    assert seen == [((0x41, True, False), True)]
    assert v.offer_outside(lambda *plan: False, in_service_ends=True) is False, "post refused it"


def test_a_merged_request_does_not_kick_again():
    kicks = []
    v = Vlapic(0, ManualTimers(), ApicBus(kick=kicks.append))
    v.write(R.SVR, 4, 0x1FF)
    v.set_intr_ready(0x41)
    v.set_intr_ready(0x41)
    assert kicks == [0], "the second request merged: the first one's kick stands"
    taken = {0x41}
    v.outside = lambda vector: vector in taken
    v.set_intr_ready(0x41)
    assert kicks == [0, 0], "a request after the run loop took the vector is a new one: it kicks"


def test_a_tick_fired_outside_keeps_a_request_made_since():
    """The ticker's injection never set the IRR: a request of its vector that the IRR shows at the acceptance
    (the next tick, left to Python) is a new one, kept for after its end."""
    v = make()
    v.set_intr_ready(0xEC)                  # the next deadline, fired in Python before the tick was accepted
    assert v.accept_outside(0xEC, False, lambda: None, requested=False) is True
    assert v.isr == 1 << 0xEC and v.irr == 1 << 0xEC
    w = make()
    assert w.accept_outside(0xEC, False, lambda: None, requested=False) is False
    assert w.isr == 1 << 0xEC and w.irr == 0


def test_accepting_another_vector_first_keeps_a_kept_request():
    """The ticker's record of a tick is accepted just before the loop's own injection: a request of that
    injection's vector kept meanwhile must survive the tick's acceptance (one run in three of
    ``tests/conformance/test_ticker.py``'s idle guest lost it, and its raises stopped)."""
    v = make()
    taken = {0x50}
    v.outside = lambda vector: vector in taken
    v.set_intr_ready(0x50)                                 # the raise the loop injected
    assert v.set_intr_ready(0x50, report_merged=True) == (True, False), "the next raise is kept"
    assert v.accept_outside(0x40, False, lambda: None, requested=False) is False   # the recorded tick
    v.eoi()                                                # ... which the guest had ended
    assert v.accept_outside(0x50, False, taken.clear) is True, "the kept raise is still requested"
    assert v.isr == 1 << 0x50 and v.irr == 1 << 0x50


def test_the_tick_plan():
    v = make(tsc_hz=10**9)
    assert v.tick_plan() is None                            # one-shot mode
    v.write(R.LVT_TIMER, 4, R.TIMER_TSC_DEADLINE << 17 | 0xEC)
    assert v.tick_plan() == (0xEC, False)
    v.set_intr_ready(0x41)
    assert v.tick_plan() is None and v.tick_plan(held=0x41) == (0xEC, False)   # the loop's own request
    v.intr_accepted(0x41)
    assert v.tick_plan() == (0xEC, True)                    # after the end of the one edge vector in service
    v.set_intr_ready(0x42, level_triggered=True)
    v.intr_accepted(0x42)
    assert v.tick_plan() is None                            # two in service
    u = make(tsc_hz=10**9)
    u.write(R.LVT_TIMER, 4, R.TIMER_TSC_DEADLINE << 17 | R.LVT_MASKED | 0xEC)
    assert u.tick_plan() is None
    u.write(R.LVT_TIMER, 4, R.TIMER_TSC_DEADLINE << 17 | 0x0E)
    assert u.tick_plan() is None                            # an illegal vector: Python sets the ESR bit
    u.changed = False
    u.write(R.TPR, 4, 0)
    assert u.changed, "a change under the lock marks the plan for publishing again"
