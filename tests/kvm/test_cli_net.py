"""``-s N,virtio-net,...`` from the command line: bhyve's ``slirp[,hostfwd=...]`` and the ``stream=`` backend open
(the hello guest does not use its NICs: it halts with status 2 and the backends close), a second and third NIC
start, and bad input (a malformed rule, a host port in use, an unknown backend, a missing libslirp, a stream
address nobody listens at) ends with one line and status 4."""

import re
import socket
import subprocess
import sys

import pytest

from tests.kvm.test_cli import ROOT, vmmshim
from vmmshim.backends import slirp_ffi

VM_TIMEOUT_S = 60
BASE = ("-m", "64M", "-s", "0:0,hostbridge", "-s", "31,lpc")

try:
    slirp_ffi.load()
    NO_LIBSLIRP = None
except OSError as exc:
    NO_LIBSLIRP = exc.strerror
needs_libslirp = pytest.mark.skipif(NO_LIBSLIRP is not None, reason=f"{NO_LIBSLIRP}")


def _hello(*slots):
    args = [a for s in slots for a in ("-s", s)]
    return vmmshim(*BASE, *args, "-f", "hello", timeout=VM_TIMEOUT_S)


def _status_4(p, needle):
    """Status 4, the error on the first stderr line (the usage line may follow it), no traceback."""
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("vmmshim: ") and needle in lines[0], p.stderr
    assert all(line.startswith(("vmmshim: ", "usage: ")) for line in lines), p.stderr
    assert "Traceback" not in p.stderr


@needs_libslirp
def test_slirp_with_a_forward_starts_and_ends(kvm_provider):
    p = _hello("2,virtio-net,slirp,hostfwd=tcp:127.0.0.1:0-:22")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert re.search(r"vmmshim: slirp hostfwd tcp 127\.0\.0\.1:\d+ -> 10\.0\.2\.15:22", p.stderr), p.stderr


@needs_libslirp
def test_three_nics_start(kvm_provider, tmp_path):
    path = tmp_path / "link.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as lsock:
        lsock.bind(str(path))
        lsock.listen(1)
        p = _hello("2,virtio-net,slirp", "3,virtio-net,slirp,restrict=on", f"4,virtio-net,stream=unix:{path}")
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr
        lsock.settimeout(1)
        conn, _ = lsock.accept()                   # the third NIC connected (and has gone with the VM)
        assert conn.recv(16) == b""
        conn.close()


@needs_libslirp
@pytest.mark.parametrize("rule,needle", [("tcp:127.0.0.1:2222", "hostfwd rule 'tcp:127.0.0.1:2222' is malformed"),
                                         ("tcp::2222-:0", "bad port '0'"),
                                         ("icmp::1-:1", "is malformed")])
def test_a_malformed_rule_is_status_4(kvm_provider, rule, needle):
    _status_4(_hello(f"2,virtio-net,slirp,hostfwd={rule}"), needle)


@needs_libslirp
def test_a_host_port_in_use_is_status_4(kvm_provider):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        _status_4(_hello(f"2,virtio-net,slirp,hostfwd=tcp:127.0.0.1:{port}-:22"), "Address already in use")


def test_an_unknown_backend_is_status_4_with_the_list(kvm_provider):
    p = _hello("2,virtio-net,nosuch")
    _status_4(p, "unknown backend 'nosuch'")
    assert "tapN, vmnetN, slirp" in p.stderr and "stream=" in p.stderr


def test_a_stream_nobody_listens_at_is_status_4(kvm_provider, tmp_path):
    _status_4(_hello(f"2,virtio-net,stream=unix:{tmp_path / 'none'}"), "cannot connect")


def test_a_missing_libslirp_is_status_4(kvm_provider):
    code = ("import runpy, sys; from vmmshim.backends import slirp_ffi; slirp_ffi.LIBNAMES = ('libslirp-gone.so.9',); "
            "sys.argv[0] = 'vmmshim'; runpy.run_module('vmmshim', run_name='__main__')")
    p = subprocess.run([sys.executable, "-c", code, *BASE, "-s", "2,virtio-net,slirp", "-f", "hello"], cwd=ROOT,
                       capture_output=True, text=True, timeout=VM_TIMEOUT_S, stdin=subprocess.DEVNULL)
    _status_4(p, "libslirp.so.0 not found: install libslirp0")
