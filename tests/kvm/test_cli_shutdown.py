"""Ending a running VM from the host as a user does (issue 19 items 3 and 4): SIGINT, SIGTERM and SIGHUP end it
with status 1 on every provider and no traceback; a guest that ignores the ACPI power button is powered off after
``vmmshim.poweroff_timeout_s`` or at a second signal; on a tty, ``Ctrl-A x`` powers off; and the terminal is
given back as it was on every exit path (a real pty, its termios compared before and after)."""

import os
import pty
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from tests.conftest import open_or_skip
from tests.guests.asm import multiboot_elf
from tests.kvm.test_cli import ROOT, SPIN_KERNEL

START_S = 30            # how long the guest may take to print its first byte
END_S = 30              # how long the VM may take to end once asked
EXIT_POWEROFF, EXIT_ERROR = 1, 4
SMI_CMD, ACPI_ENABLE = 0xB2, 0xA0

#: Enables ACPI (so the power button raises an SCI instead of powering off), prints R and spins with interrupts
#: off: it never answers the button.
DEAF_KERNEL = SPIN_KERNEL.replace("_start:\n", f"""_start:
  cli
  mov ${ACPI_ENABLE}, %al
  out %al, ${SMI_CMD}
""")


def _start(elf, *extra, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, provider="kvm"):
    return subprocess.Popen([sys.executable, "-m", "vmmshim", "-m", "32M", "-o", f"vmmshim.provider={provider}",
                             *extra, "-l", "com1,stdio", "-f", f"multiboot,{elf}"], cwd=ROOT, stdin=stdin,
                            stdout=stdout, stderr=subprocess.PIPE)


def _wait_for_r(fd):
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r and b"R" in os.read(fd, 100):
            return
    pytest.fail("the guest did not start")


def _end(p):
    try:
        status = p.wait(END_S)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    err = p.stderr.read().decode()
    assert "Traceback" not in err, err
    return status, err


@pytest.mark.parametrize("provider", ["kvm", "soft"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_powers_off_a_guest_without_acpi(sig, provider, tmp_path):
    open_or_skip(provider)
    p = _start(multiboot_elf(SPIN_KERNEL, str(tmp_path)), provider=provider)
    _wait_for_r(p.stdout.fileno())
    p.send_signal(sig)
    status, err = _end(p)
    assert status == EXIT_POWEROFF, err          # was 130 with a traceback (kvm), 139 (soft)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and sig.name in lines[0] and "powered off" in lines[0], err


def test_a_guest_that_ignores_the_power_button_is_powered_off_after_the_timeout(kvm_provider, tmp_path):
    p = _start(multiboot_elf(DEAF_KERNEL, str(tmp_path)), "-A", "-o", "vmmshim.poweroff_timeout_s=1")
    _wait_for_r(p.stdout.fileno())
    t0 = time.monotonic()
    p.send_signal(signal.SIGTERM)
    status, err = _end(p)
    assert status == EXIT_POWEROFF, err
    assert time.monotonic() - t0 >= 1, "powered off before the guest had its time"
    assert "ignored the ACPI power button (SIGTERM) for 1 s" in err, err


def test_a_second_signal_powers_off_a_guest_that_ignores_the_button(kvm_provider, tmp_path):
    p = _start(multiboot_elf(DEAF_KERNEL, str(tmp_path)), "-A", "-o", "vmmshim.poweroff_timeout_s=600")
    _wait_for_r(p.stdout.fileno())
    p.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert p.poll() is None, "the first signal should only press the button"
    p.send_signal(signal.SIGINT)
    status, err = _end(p)
    assert status == EXIT_POWEROFF and "second signal (SIGTERM, then SIGINT)" in err, err


@pytest.fixture
def tty():
    """A real pty: the VM's stdin and stdout are its slave; yields (master, slave, termios before)."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    yield master, slave, before
    os.close(master)
    os.close(slave)


def test_ctrl_a_x_powers_off_and_gives_the_terminal_back(kvm_provider, tmp_path, tty):
    master, slave, before = tty
    p = _start(multiboot_elf(SPIN_KERNEL, str(tmp_path)), stdin=slave, stdout=slave)
    _wait_for_r(master)
    assert termios.tcgetattr(slave) != before, "the console should be raw while the VM runs"
    os.write(master, b"\x01h")
    os.write(master, b"\x01x")
    status, err = _end(p)
    assert status == EXIT_POWEROFF and "Ctrl-A x" in err, err
    assert termios.tcgetattr(slave) == before


@pytest.mark.parametrize("bad", [
    ["-s", "0:0,hostbridge", "-s", "31,lpc", "-s", "4,virtio-blk,/nonexistent/disk.img"],   # a bad -s path
    ["-s", "0:0,hostbridge", "-s", "31,lpc", "-l", "debug-exit,0x3f8"],                     # a port overlap
    ["-l", "com2,/nonexistent/tty"],                                                          # a later console
], ids=["disk", "overlap", "com2"])
def test_a_setup_error_after_the_console_went_raw_gives_the_terminal_back(kvm_provider, tmp_path, tty, bad):
    master, slave, before = tty
    p = _start(multiboot_elf(SPIN_KERNEL, str(tmp_path)), *bad, stdin=slave, stdout=slave)
    status, err = _end(p)
    assert status == EXIT_ERROR, err
    assert len(err.strip().splitlines()) == 1, err
    assert termios.tcgetattr(slave) == before, "the terminal was left raw"


def test_a_bad_pidfile_directory_is_one_line_and_the_terminal_is_untouched(kvm_provider, tmp_path, tty):
    master, slave, before = tty
    p = _start(multiboot_elf(SPIN_KERNEL, str(tmp_path)), "-F", "/nonexistent/x.pid", stdin=slave, stdout=slave)
    status, err = _end(p)
    assert status == EXIT_ERROR and err.strip() == "vmmshim: -F /nonexistent/x.pid: No such file or directory", err
    assert termios.tcgetattr(slave) == before
