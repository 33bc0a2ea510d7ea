"""The ticker thread (``ops/nvmm/kvm/fasttick.c``, ``tscdeadline.py``'s ``attach_ticker``/``plan``/``take_folds``)
on a slot with no vCPU behind it: a deadline that falls due is posted to the slot as a kick when the plan allows
and the slot is empty, or folds an injection the guest ended through its PV EOI word; in every other case it is
left to Python, once. The deadline is set with ``TscDeadline.set`` (no guest TSC needed); the kick's signal goes
to this thread, whose handler does nothing."""

import errno
import signal
import time

import pytest

from ops.nvmm.kvm import fastrun, intwin as W, layouts as L, tscdeadline
from ops.nvmm.kvm.kick import SIG_KICK
from tests.conftest import require_compiled

VECTOR = 0xEC
WAIT_S = 2.0


@pytest.fixture
def rig(monkeypatch):
    require_compiled(fastrun, "run loop", fastrun.load)
    monkeypatch.setenv(tscdeadline.ENV_TICKER, "1")
    ffi, lib = fastrun.load()
    old = signal.signal(SIG_KICK, lambda *a: None)
    win = W.IntWindow(ffi, lib)
    word = ffi.new("uint32_t *")
    win.struct.pv_eoi = int(ffi.cast("uintptr_t", word))
    run = ffi.new("uint8_t[]", 4096)
    dl = tscdeadline.TscDeadline(ffi, lib, -1, 1_000_000_000)
    assert dl.attach_ticker(win, int(ffi.cast("uintptr_t", run)), SIG_KICK)
    dl.bind()
    yield dl, win, word, run
    dl.close()
    win.close()
    signal.signal(SIG_KICK, old)


def _due(dl):
    dl.set(12345, time.monotonic_ns())


def _wait(cond):
    end = time.monotonic() + WAIT_S
    while not cond():
        assert time.monotonic() < end, "the ticker did not serve the deadline"
        time.sleep(0.001)


def _handed(dl):
    """The tick went to Python: its eventfd is readable, and expire() takes it once."""
    _wait(lambda: dl.ticks_handed)
    assert dl.expire() and not dl.expire()
    assert dl.value() == 0


def test_an_empty_slot_gets_the_tick_as_a_kick(rig):
    dl, win, _, run = rig
    win.struct.state = W.IN
    kicks = win.struct.kicks_posted
    dl.plan(VECTOR, arm=True)
    _due(dl)
    _wait(lambda: dl.ticks_posted)
    assert win.struct.state == W.IN | W.KICK | W.POSTED | W.TICK | W.ARM | VECTOR
    assert win.struct.kicks_posted == kicks + 1
    assert run[L.RUN_IMMEDIATE_EXIT] == 1
    assert dl.value() == 0 and not dl.expire() and dl.take_folds() is None


def test_the_plan_waits_for_an_end_in_memory(rig):
    dl, win, _, _ = rig
    win.struct.state = W.IN
    dl.plan(VECTOR, after_eoi=True, arm=True)
    _due(dl)
    _wait(lambda: dl.ticks_posted)
    assert win.struct.state == W.IN | W.KICK | W.POSTED | W.TICK | W.AFTER_EOI | W.ARM | VECTOR


@pytest.mark.parametrize("state", [W.IN | W.POSTED | 0x41, W.IN | W.KICK | W.POSTED | 0x41, 0, W.TAKEN | 0x41,
                                   W.IN | W.TAKEN | W.BUSY | 0x41])
def test_a_busy_slot_leaves_the_tick_to_python(rig, state):
    dl, win, _, _ = rig
    win.struct.state = state
    win.struct.result = W.RES_ARMED
    dl.plan(VECTOR, arm=True)
    _due(dl)
    _handed(dl)
    assert win.struct.state == state and not dl.ticks_posted


def test_no_plan_leaves_the_tick_to_python(rig):
    dl, win, _, _ = rig
    win.struct.state = W.IN
    dl.plan(VECTOR, arm=True)
    dl.hold()
    _due(dl)
    _handed(dl)
    assert win.struct.state == W.IN


def test_an_injection_ended_in_memory_is_folded(rig):
    dl, win, word, _ = rig
    win.struct.state = W.IN | W.TAKEN | 0x41
    win.struct.result = W.RES_EOI | W.RES_ARMED
    word[0] = 0                             # the guest cleared its PV EOI bit: 0x41 ended
    dl.plan(VECTOR, after_eoi=True, arm=True)
    _due(dl)
    _wait(lambda: dl.ticks_posted)
    # nothing is in service any more: no wait for an end
    assert win.struct.state == W.IN | W.KICK | W.POSTED | W.TICK | W.ARM | VECTOR
    assert dl.folded(0x41) and not win.taken(0x41)
    # the loop injects the tick, the guest ends it, the next deadline folds it as a count
    win.struct.state = W.IN | W.TAKEN | W.TICK | VECTOR
    win.struct.result = W.RES_ARMED
    _due(dl)
    _wait(lambda: dl.ticks_posted == 2)
    assert dl.take_folds() == ((0x41, True, True, False), 2)
    assert dl.take_folds() is None and not dl.folded(0x41)


def test_an_injection_still_in_service_is_not_folded(rig):
    dl, win, word, _ = rig
    for result, bit in ((W.RES_ARMED, 1), (0, 0)):      # its bit still set; or the word not armed for it
        win.struct.state = W.IN | W.TAKEN | 0x41
        win.struct.result = result
        word[0] = bit
        dl.plan(VECTOR, arm=True)
        handed = dl.ticks_handed
        _due(dl)
        _wait(lambda: dl.ticks_handed > handed)
        assert dl.expire()
        assert win.struct.state == W.IN | W.TAKEN | 0x41 and dl.take_folds() is None


def test_a_second_record_is_not_made(rig):
    dl, win, word, _ = rig
    word[0] = 0
    dl.plan(VECTOR, arm=True)
    win.struct.state, win.struct.result = W.IN | W.TAKEN | 0x41, W.RES_ARMED
    _due(dl)
    _wait(lambda: dl.ticks_posted)
    win.struct.state, win.struct.result = W.IN | W.TAKEN | 0x42, W.RES_ARMED     # posted by Python meanwhile
    _due(dl)
    _handed(dl)
    assert dl.take_folds() == ((0x41, False, True, False), 1)


def test_the_ticker_forgets_a_closed_deadline(rig):
    dl, win, _, _ = rig
    tick = dl.tick
    _, lib = fastrun.load()
    assert lib.vmmshim_ticker_remove(tick) == 0
    assert lib.vmmshim_ticker_remove(tick) == -errno.ENOENT
    assert lib.vmmshim_ticker_add(tick) == 0            # the fixture's close() removes it again


def test_switched_off_by_the_environment(monkeypatch):
    require_compiled(fastrun, "run loop", fastrun.load)
    monkeypatch.setenv(tscdeadline.ENV_TICKER, "0")
    ffi, lib = fastrun.load()
    win = W.IntWindow(ffi, lib)
    dl = tscdeadline.TscDeadline(ffi, lib, -1, 1_000_000_000)
    try:
        assert not dl.attach_ticker(win, 0, SIG_KICK) and dl.tick is None and dl.fd == dl.timerfd
    finally:
        dl.close()
        win.close()
    assert dl.fd == dl.timerfd == -1


def test_paused_the_ticker_takes_no_deadline(rig):
    dl, win, _, _ = rig
    win.struct.state = W.IN
    dl.plan(VECTOR, arm=True)
    with dl.paused():
        _due(dl)
        time.sleep(0.05)
        assert dl.value() == 12345 and win.struct.state == W.IN     # a checkpoint still sees it armed
    _wait(lambda: dl.ticks_posted)
    assert dl.value() == 0
