"""The ``vmmshim`` command as a user runs it: the default guest, and bad input ending in one line and status 4."""

import os
import subprocess
import sys

import pytest

from tests.guests.asm import multiboot_elf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vmmshim(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmmshim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_hello_guest_prints_on_com1_and_halts(kvm_provider):
    p = vmmshim("-m", "64M", "-l", "com1,stdio", "-f", "hello")
    assert p.returncode == 2, p.stderr
    assert p.stdout.splitlines() == ["Hello from vmmshim: a real-mode guest on COM1, halting now."]


def test_hello_output_to_a_file_backend(kvm_provider, tmp_path):
    log = tmp_path / "com1.log"
    p = vmmshim("-m", "16M", "-l", f"com1,file:{log}", "-f", "hello")
    assert p.returncode == 2, p.stderr
    assert log.read_bytes().startswith(b"Hello from vmmshim")


@pytest.mark.parametrize("args,needle", [
    (("-m", "12X", "-f", "hello"), "-m 12X is not a memory size"),
    (("-c", "0", "-f", "hello"), "-c 0: cpus=0 must be between 1 and 64"),
    (("-Q",), "option -Q not recognized"),
    (("-s", "40,virtio-blk,x.img", "-f", "hello"), "out of range"),
    (("-l", "com9,stdio", "-f", "hello"), "unknown LPC device"),
    (("-o", "novalue", "-f", "hello"), "key=value"),
    (("-f", "kexec,/nonexistent/vmlinuz"), "/nonexistent/vmlinuz"),
    (("-f", "bogus"), "unknown firmware"),
    ((), "no firmware"),
    (("-o", "vmmshim.provider=libnvmm", "-f", "hello"), "libnvmm"),
    (("-o", "vmmshim.gil_switch_ms=0", "-f", "hello"), "gil_switch_ms"),
])
def test_bad_input_is_one_clear_line_and_status_4(args, needle):
    p = vmmshim(*args)
    assert p.returncode == 4
    first = p.stderr.splitlines()[0]
    assert first.startswith("vmmshim: ") and needle in first, p.stderr
    assert "Traceback" not in p.stderr


def test_not_a_bzimage_is_refused_before_the_guest_starts(tmp_path):
    bogus = tmp_path / "vmlinuz"
    bogus.write_bytes(b"\x7fELF" + bytes(8192))
    p = vmmshim("-f", f"kexec,{bogus},,console=ttyS0")
    assert p.returncode == 4 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_help_and_version():
    assert vmmshim("-h").returncode == 0
    p = vmmshim("-v")
    assert p.returncode == 0 and "vmmshim" in p.stdout


def test_doctor_reports_the_kvm_kind(kvm_provider):
    p = vmmshim("doctor")
    assert p.returncode == 0
    assert "provider kvm" in p.stdout and "/dev/kvm present" in p.stdout


SPIN_KERNEL = r"""
.code32
.globl _start
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov $0x3f8, %dx
  mov $'R', %al
  out %al, %dx
1: pause
  jmp 1b
"""


def test_sigterm_presses_the_power_button(kvm_provider, tmp_path):
    """bhyve: SIGTERM is the ACPI power button; a guest that never enabled ACPI is powered off (status 1)."""
    import signal
    import time
    elf = multiboot_elf(SPIN_KERNEL, str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "vmmshim", "-m", "32M", "-l", "com1,stdio", "-f",
                          f"multiboot,{elf}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.read(1) == b"R", "the guest did not start"
        time.sleep(0.3)
        assert p.poll() is None, "the guest stopped by itself"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
