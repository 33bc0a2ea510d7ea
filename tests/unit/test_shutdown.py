"""The host's off switch in isolation (pure logic, no VM): the console escape filter and the order of power
button, forced power off and timeout in :class:`vmmshim.shutdown.Shutdown`."""

import signal
import time

import pytest

from vmmshim.backends.escape import ESCAPE_CHAR, KEY_BUTTON, KEY_POWEROFF, EscapeFilter
from vmmshim.shutdown import Interrupted, Shutdown

CTRL_A = bytes([ESCAPE_CHAR])


def test_plain_input_passes_untouched():
    assert EscapeFilter().feed(b"ls -l\r") == (b"ls -l\r", [])


def test_ctrl_a_x_is_a_key_not_input():
    assert EscapeFilter().feed(b"ab" + CTRL_A + b"xcd") == (b"abcd", [KEY_POWEROFF])


def test_ctrl_a_ctrl_a_sends_one_ctrl_a():
    assert EscapeFilter().feed(CTRL_A + CTRL_A + b"x") == (CTRL_A + b"x", [])


def test_an_escape_split_across_reads():
    f = EscapeFilter()
    assert f.feed(b"a" + CTRL_A) == (b"a", [])
    assert f.feed(b"b") == (b"", [KEY_BUTTON])
    assert f.feed(b"b") == (b"b", [])


def test_an_unknown_key_is_dropped_with_its_escape():
    assert EscapeFilter().feed(CTRL_A + b"q" + b"z") == (b"z", [])


class _Machine:
    def __init__(self, acpi=True):
        self.acpi, self.pressed, self.off = acpi, 0, []

    def button(self):
        self.pressed += 1
        return self.acpi

    def power_off(self, why):
        self.off.append(why)


def _running(machine, timeout_s=60.0):
    s = Shutdown(timeout_s=timeout_s)
    s.running(machine.button, machine.power_off)
    return s


def test_first_request_presses_the_button_second_powers_off():
    m = _Machine()
    s = _running(m)
    s.request("SIGTERM")
    assert m.pressed == 1 and m.off == []
    s.request("SIGINT")
    assert m.off == ["powered off by a second signal (SIGTERM, then SIGINT)"]
    s.cancel()


def test_a_guest_without_acpi_is_powered_off_at_once():
    m = _Machine(acpi=False)
    s = _running(m)
    s.request("SIGHUP")
    assert len(m.off) == 1 and m.off[0].startswith("SIGHUP: powered off")
    s.cancel()


def test_the_timeout_powers_off_a_guest_that_ignores_the_button():
    m = _Machine()
    s = _running(m, timeout_s=0.05)
    s.request("SIGTERM")
    deadline = time.monotonic() + 5
    while not m.off and time.monotonic() < deadline:
        time.sleep(0.01)
    assert m.off and "ignored the ACPI power button (SIGTERM) for 0.05 s" in m.off[0]


def test_cancel_stops_the_timeout():
    m = _Machine()
    s = _running(m, timeout_s=0.05)
    s.request("SIGTERM")
    s.cancel()
    time.sleep(0.2)
    assert m.off == []


def test_escape_keys():
    m = _Machine()
    s = _running(m)
    s.escape(KEY_BUTTON)
    assert m.pressed == 1 and m.off == []
    s.escape(KEY_POWEROFF)
    assert m.off == ["powered off (Ctrl-A x)"]


def test_a_signal_before_the_guest_runs_unwinds_the_setup():
    s = Shutdown().install()
    try:
        with pytest.raises(Interrupted, match="SIGTERM before the guest started"):
            signal.raise_signal(signal.SIGTERM)
    finally:
        s.uninstall()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_an_ignored_signal_stays_ignored():
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)      # nohup
    try:
        s = Shutdown().install()
        signal.raise_signal(signal.SIGHUP)                    # nothing happens
        s.uninstall()
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)
