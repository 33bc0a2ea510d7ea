"""``-l com1,...`` console backends from the command line: ``unix:`` never deletes a user's file, a missing path
is one line and status 4 (not a new file), and bhyve's ``tcp=ADDR:PORT`` console."""

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.guests.asm import multiboot_elf
from tests.kvm.test_cli import ROOT, vmmshim

CONNECT_S = 30          # how long the client keeps trying to reach the VM's console
VM_TIMEOUT_S = 60


def _one_line_status_4(p, needle):
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmmshim: ") and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


def test_unix_console_on_a_regular_file_leaves_it_alone(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"data\n")
    p = vmmshim("-m", "64M", "-l", f"com1,unix:{f}", "-f", "hello")
    _one_line_status_4(p, str(f))
    assert f.read_bytes() == b"data\n"


def test_unix_console_on_a_relative_regular_file_leaves_it_alone(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"data\n")
    p = subprocess.run([sys.executable, "-m", "vmmshim", "-m", "64M", "-l", "com1,unix:f", "-f", "hello"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                       timeout=VM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    _one_line_status_4(p, "f")
    assert f.read_bytes() == b"data\n"


def test_missing_console_path_is_an_error_not_a_new_file(tmp_path):
    p = subprocess.run([sys.executable, "-m", "vmmshim", "-m", "64M", "-l", "com1,nmdm0A", "-f", "hello"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
                       timeout=VM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    _one_line_status_4(p, "nmdm0A")
    assert "No such file or directory" in p.stderr
    assert os.listdir(tmp_path) == []


def test_tcp_console_port_in_use_is_one_line_and_status_4():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = vmmshim("-m", "64M", "-l", f"com1,tcp=127.0.0.1:{port}", "-f", "hello")
    _one_line_status_4(p, f"127.0.0.1:{port}")


# Waits for a byte on COM1 (polling LSR.DR), then prints "got X" and halts (IF clear: status 2). The guest cannot
# finish before a client has connected and sent its byte, so the test does not race the VM.
ECHO_KERNEL = r"""
.code32
.globl _start
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  cli
  mov $0x3fd, %dx
1: in %dx, %al
  test $1, %al
  jz 1b
  mov $0x3f8, %dx
  in %dx, %al
  mov %al, %bl
  mov $'g', %al
  out %al, %dx
  mov $'o', %al
  out %al, %dx
  mov $'t', %al
  out %al, %dx
  mov $' ', %al
  out %al, %dx
  mov %bl, %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  hlt
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _connect(port, proc):
    end = time.monotonic() + CONNECT_S
    while time.monotonic() < end:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=CONNECT_S)
        except ConnectionRefusedError:
            time.sleep(0.05)
    pytest.fail("the VM never listened on its tcp= console")


def test_tcp_console_both_ways(kvm_provider, tmp_path):
    elf = multiboot_elf(ECHO_KERNEL, str(tmp_path))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vmmshim", "-m", "32M", "-l", f"com1,tcp=127.0.0.1:{port}",
                             "-f", f"multiboot,{elf}"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True)
    try:
        c = _connect(port, proc)
        with c:
            c.sendall(b"K")
            got = b""
            while not got.endswith(b"\n"):
                chunk = c.recv(100)
                if not chunk:
                    break
                got += chunk
        assert got == b"got K\n"
        assert proc.wait(VM_TIMEOUT_S) == 2, proc.stderr.read()
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_tcp_console_hello_runs_and_halts(kvm_provider):
    """Output with no client connected is dropped (bhyve): the hello guest halts whether or not one connects."""
    spec = f"tcp=127.0.0.1:{_free_port()}"
    p = vmmshim("-m", "64M", "-l", f"com1,{spec}", "-f", "hello")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert not os.path.exists(os.path.join(ROOT, spec))     # not a file named after the spec
