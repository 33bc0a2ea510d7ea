"""The run loop's slot taken over by another thread (``ops/nvmm/kvm/intwin.py``'s ``take_over``/``release``,
``fastrun.c``): only a slot whose loop runs holding an unaccepted injection and nothing posted can be taken; the
taker gets the injection's vector and results; its release posts as a kick does or leaves the slot empty; and the
loop's return waits while the slot is held (a compiled ``vmmshim_kvm_run`` on a bad fd, so no KVM is needed)."""

import errno
import threading

import pytest

from ops.nvmm.kvm import fastrun, intwin as W
from tests.conftest import require_compiled


@pytest.fixture
def win():
    require_compiled(fastrun, "run loop", fastrun.load)
    ffi, lib = fastrun.load()
    w = W.IntWindow(ffi, lib)
    yield w
    w.close()


@pytest.mark.parametrize("state", [W.IN, W.TAKEN | 0x41, W.IN | W.TAKEN | W.POSTED | W.KICK | 0x41,
                                   W.IN | W.POSTED | 0x41, W.IN | W.TAKEN | W.BUSY | 0x41, 0])
def test_only_a_running_loop_holding_an_unaccepted_injection_is_taken(win, state):
    win.struct.state = state
    assert not win.can_take_over() and win.take_over() is None
    assert win.struct.state == state


def test_take_over_then_post(win):
    win.struct.state = W.IN | W.TAKEN | 0x41
    win.struct.result = W.RES_EOI | W.RES_ARMED
    assert win.can_take_over() and not win.can_kick()
    assert win.take_over() == (0x41, True, True, False)
    assert win.struct.state == W.IN | W.TAKEN | W.BUSY | 0x41
    assert win.take_over() is None                      # held: nobody else takes it
    assert win.taken(0x41)                              # still the loop's until released
    posted = win.struct.kicks_posted
    assert win.release(0x50)
    assert win.struct.state == W.IN | W.KICK | W.POSTED | 0x50 and win.struct.kicks_posted == posted + 1
    assert not win.taken(0x41)


def test_take_over_then_nothing_to_post(win):
    win.struct.state = W.IN | W.TAKEN | 0x41
    assert win.take_over() is not None
    assert not win.release()
    assert win.struct.state == W.IN and win.can_kick()


def test_a_post_naming_another_pv_eoi_word_is_not_made(win):
    win.struct.state = W.IN | W.TAKEN | 0x41
    win.take_over()
    assert not win.release(0x50, arm=True, word=memoryview(bytearray(4)))     # not the word posted last
    assert win.struct.state == W.IN


def test_switched_off_by_the_environment(monkeypatch):
    require_compiled(fastrun, "run loop", fastrun.load)
    monkeypatch.setenv(W.ENV_TAKE_OVER_OFF, "0")
    w = W.IntWindow(*fastrun.load())
    try:
        w.struct.state = W.IN | W.TAKEN | 0x41
        assert not w.can_take_over()
    finally:
        w.close()


def test_the_loop_returns_only_once_the_slot_is_released(win):
    ffi, lib = fastrun.load()
    run = ffi.new("uint8_t[]", 4096)
    lay = ffi.new("struct vmmshim_run_layout *", dict(kvm_run=0xAE80, run_size=4096))
    stats = ffi.new("struct vmmshim_run_stats *")
    win.struct.state = W.TAKEN | W.BUSY | 0x41          # held; the run marks itself IN
    got, done = [], threading.Event()

    def run_it():
        got.append(lib.vmmshim_kvm_run(-1, run, lay, ffi.NULL, ffi.NULL, stats, ffi.NULL, win.struct))
        done.set()
    t = threading.Thread(target=run_it, daemon=True)
    t.start()
    assert not done.wait(0.3), "the loop returned while another thread held its slot"
    assert win.struct.state & W.IN
    assert lib.vmmshim_intwin_release(win.struct, 0) == 0
    assert done.wait(5)
    assert got == [errno.EBADF] and win.struct.state == 0
