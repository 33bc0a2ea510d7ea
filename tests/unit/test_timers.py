"""The timer thread (vmmshim/timers.py) on both of its ways to sleep, a timerfd (Linux) and a condition variable,
with the real monotonic clock: deadlines fire in order and not early, a cancelled timer never fires, an earlier
deadline armed while the thread sleeps fires on time, a deadline already past fires at once, a callback's
exception is reported and the timers go on, and close() stops the thread. With the timerfd, arming and
re-arming (a guest's LAPIC timer at every tick) does not wake the thread: it wakes once per deadline that fires;
and a watched fd (a vCPU's IA32_TSC_DEADLINE timerfd) runs its function on the same thread."""

import os
import threading
import time

import pytest

from vmmshim.timers import TimerThread

MS = 1_000_000


def _make(kind, **kw):
    t = TimerThread(use_timerfd=(kind == "timerfd"), **kw)
    if t.sleeps_on != kind:
        t.close()
        pytest.skip(f"this host has no {kind}")
    return t


@pytest.fixture(params=["timerfd", "condition"])
def timers(request):
    t = _make(request.param)
    yield t
    t.close()


def _wait_for(cond, timeout=5):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.002)
    return cond()


def test_deadlines_fire_in_order_and_not_early(timers):
    fired = []
    now = timers.now_ns()
    for name, ms in (("c", 60), ("a", 20), ("b", 40)):
        deadline = now + ms * MS
        timers.arm(deadline, lambda n=name, d=deadline: fired.append((n, timers.now_ns() >= d)))
    assert _wait_for(lambda: len(fired) == 3)
    assert fired == [("a", True), ("b", True), ("c", True)]


def test_a_cancelled_timer_never_fires(timers):
    fired = []
    h = timers.arm(timers.now_ns() + 20 * MS, lambda: fired.append("cancelled"))
    timers.arm(timers.now_ns() + 40 * MS, lambda: fired.append("kept"))
    timers.cancel(h)
    timers.cancel(None)
    assert _wait_for(lambda: fired == ["kept"])
    time.sleep(0.03)
    assert fired == ["kept"]


def test_an_earlier_deadline_armed_while_the_thread_sleeps_fires_on_time(timers):
    fired = threading.Event()
    timers.arm(timers.now_ns() + 10_000 * MS, lambda: None)     # the thread sleeps for this one
    time.sleep(0.02)
    t0 = time.monotonic()
    timers.arm(timers.now_ns() + 20 * MS, fired.set)
    assert fired.wait(5) and time.monotonic() - t0 < 2


def test_a_deadline_already_past_fires_at_once(timers):
    fired = threading.Event()
    timers.arm(timers.now_ns() - 50 * MS, fired.set)
    assert fired.wait(2)


def test_a_callback_that_raises_is_reported_and_the_timers_go_on():
    seen = []
    for kind in ("timerfd", "condition"):
        t = TimerThread(use_timerfd=(kind == "timerfd"), on_error=seen.append)
        try:
            ok = threading.Event()
            t.arm(t.now_ns() + 5 * MS, lambda: 1 / 0)
            t.arm(t.now_ns() + 10 * MS, ok.set)
            assert ok.wait(5)
            assert isinstance(t.errors[-1], ZeroDivisionError) and seen[-1] is t.errors[-1]
            assert t.snapshot()["alive"]
        finally:
            t.close()


def test_close_stops_the_thread_with_timers_pending(timers):
    timers.arm(timers.now_ns() + 10_000 * MS, lambda: None)
    t0 = time.monotonic()
    timers.close()
    assert time.monotonic() - t0 < 2 and not timers.snapshot()["alive"]


def test_rearming_does_not_wake_the_timerfd_thread():
    """A LAPIC timer armed again and again before it fires (TMICT written at each idle entry and exit): cancel
    and arm, 50 times, each further out. The thread wakes once, for the one deadline that fires."""
    t = _make("timerfd")
    try:
        fired = []
        time.sleep(0.01)
        woke = t.wakes
        h = None
        for i in range(50):
            t.cancel(h)
            h = t.arm(t.now_ns() + (30 + i) * MS, lambda i=i: fired.append(i))
        assert _wait_for(lambda: fired)
        time.sleep(0.03)
        assert fired == [49] and t.wakes - woke == 1
    finally:
        t.close()


def test_a_cancelled_earliest_timer_does_not_wake_the_timerfd_thread():
    """A timer cancelled while it is the earliest (the posted-write flush a halting vCPU cancels) moves the timerfd
    to the next live deadline: the thread sleeps through the cancelled one and wakes once, for the later timer."""
    t = _make("timerfd")
    try:
        fired = []
        time.sleep(0.01)
        woke = t.wakes
        later = t.arm(t.now_ns() + 80 * MS, lambda: fired.append("later"))
        for _ in range(5):
            t.cancel(t.arm(t.now_ns() + 20 * MS, lambda: fired.append("cancelled")))
        assert later is not None and _wait_for(lambda: fired)
        time.sleep(0.03)
        assert fired == ["later"] and t.wakes - woke == 1
    finally:
        t.close()


def test_a_watched_fd_runs_its_function_on_the_timer_thread_beside_the_heap():
    t = _make("timerfd")
    r, w = os.pipe()
    os.set_blocking(r, False)
    seen, fired = [], []
    try:
        assert t.can_watch and t.watch(r, lambda: seen.append((os.read(r, 64), threading.current_thread().name)))
        t.arm(t.now_ns() + 20 * MS, lambda: fired.append(1))
        os.write(w, b"x")
        assert _wait_for(lambda: seen) and seen == [(b"x", t._thread.name)]
        assert _wait_for(lambda: fired)                  # the heap's deadline still fires
        t.unwatch(r)
        os.write(w, b"y")
        time.sleep(0.05)
        assert len(seen) == 1
    finally:
        t.close()
        os.close(r)
        os.close(w)
    c = _make("condition")
    assert not c.can_watch and not c.watch(r, print)
    c.close()
