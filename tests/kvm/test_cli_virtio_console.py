"""``-s N,virtio-console,...`` from the command line: the positional backend (``autopty``, ``file:``, ``tcp=``, a
path) is opened, bhyve's ``NAME=PATH`` ports listen on Unix sockets while the VM runs and the sockets are gone
when it ends (halt, SIGTERM, an error later in the setup), and a file at PATH that is not a stale socket is
left alone with status 4."""

import os
import signal
import socket
import subprocess
import sys

from tests.guests.asm import multiboot_elf
from tests.kvm.test_cli import ROOT, SPIN_KERNEL, vmmshim

VM_TIMEOUT_S = 60
BASE = ("-m", "64M", "-s", "0:0,hostbridge", "-s", "31,lpc")


def _status_4(p, needle):
    """Status 4, the error on the first stderr line (the usage line may follow it), no traceback."""
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("vmmshim: ") and needle in lines[0], p.stderr
    assert all(line.startswith(("vmmshim: ", "usage: ")) for line in lines), p.stderr
    assert "Traceback" not in p.stderr


def _hello(*console):
    return vmmshim(*BASE, "-s", ",".join(("4", "virtio-console") + console), "-f", "hello", timeout=VM_TIMEOUT_S)


def test_positional_autopty_is_opened(kvm_provider):
    """The form the docs give: before, the option was dropped and no pty was made."""
    p = _hello("autopty")
    assert p.returncode == 2, p.stderr
    assert "vmmshim: com port on /dev/pts/" in p.stderr and "Traceback" not in p.stderr


def test_positional_file_backend_is_opened(kvm_provider, tmp_path):
    log = tmp_path / "hvc0.log"
    p = _hello(f"file:{log}")
    assert p.returncode == 2, p.stderr
    assert log.exists()


def test_positional_tcp_backend(kvm_provider):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = _hello(f"tcp=127.0.0.1:{port}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr and not os.path.exists(os.path.join(ROOT, f"tcp=127.0.0.1:{port}"))


def test_positional_missing_path_is_an_error(kvm_provider, tmp_path):
    missing = tmp_path / "nmdm0A"
    _status_4(_hello(str(missing)), str(missing))
    assert os.listdir(tmp_path) == []


def test_named_ports_are_removed_when_the_guest_halts(kvm_provider, tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    p = _hello(f"port1={a}", f"org.qemu.guest_agent.0={b}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert os.listdir(tmp_path) == []


def test_named_port_listens_while_the_vm_runs_and_goes_with_sigterm(kvm_provider, tmp_path):
    sock = tmp_path / "port1.sock"
    elf = multiboot_elf(SPIN_KERNEL, str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "vmmshim", *BASE, "-l", "com1,stdio",
                             "-s", f"4,virtio-console,port1={sock}", "-f", f"multiboot,{elf}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.read(1) == b"R", proc.stderr.read()     # running: the devices are built
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(VM_TIMEOUT_S)
            c.connect(str(sock))
            c.sendall(b"hello port1")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(VM_TIMEOUT_S) == 1
        assert "Traceback" not in proc.stderr.read().decode()
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_named_port_goes_when_a_later_device_fails(kvm_provider, tmp_path):
    sock = tmp_path / "port1.sock"
    p = vmmshim(*BASE, "-s", f"4,virtio-console,port1={sock}", "-s", f"5,virtio-blk,{tmp_path / 'no.img'}",
                "-f", "hello", timeout=VM_TIMEOUT_S)
    _status_4(p, "virtio-blk")
    assert os.listdir(tmp_path) == []


def test_regular_file_at_a_port_path_is_left_alone(kvm_provider, tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"data\n")
    before = f.stat()
    _status_4(_hello(f"port1={f}"), str(f))
    assert f.read_bytes() == b"data\n" and f.stat().st_mtime_ns == before.st_mtime_ns


def test_a_failing_second_port_leaves_no_socket_of_the_first(kvm_provider, tmp_path):
    a, f = tmp_path / "a.sock", tmp_path / "f"
    f.write_bytes(b"data\n")
    _status_4(_hello(f"port1={a}", f"port2={f}"), "port2")
    assert sorted(os.listdir(tmp_path)) == ["f"] and f.read_bytes() == b"data\n"


def test_live_socket_at_a_port_path_is_left_alone(kvm_provider, tmp_path):
    path = tmp_path / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen(4)
        _status_4(_hello(f"port1={path}"), str(path))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(path))                    # still the owner's listener


def test_stale_socket_at_a_port_path_is_replaced_then_removed(kvm_provider, tmp_path):
    path = tmp_path / "stale.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()
    p = _hello(f"port1={path}")
    assert p.returncode == 2, p.stderr
    assert not path.exists()


def test_too_many_ports_is_one_error(kvm_provider, tmp_path):
    ports = [f"p{i}={tmp_path / f's{i}'}" for i in range(17)]
    _status_4(_hello(*ports), "too many ports")
    assert os.listdir(tmp_path) == []
