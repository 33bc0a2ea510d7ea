"""``-l com1,...`` backends that must not touch the user's files (``unix:``, a missing path) and bhyve's
``tcp=ADDR:PORT`` console (one client at a time)."""

import errno
import os
import socket

import pytest

from bhyve_devices.base import RecordingLine
from bhyve_devices.uart16550 import UART16550
from vmmshim.backends.uart import TcpBackend, UnixSocketBackend, open_backend, parse_tcp_address

from .test_uart16550 import _drain, _wait as _wait_until  # the UART tests' helpers

WAIT_S = 5


def _wait(cond, timeout=WAIT_S):
    return _wait_until(cond, timeout)


def test_unix_path_holding_a_regular_file_is_refused_and_left_alone(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"data\n")
    with pytest.raises(OSError) as ei:
        open_backend(f"unix:{f}")
    assert str(f) in ei.value.strerror and "\n" not in ei.value.strerror
    assert f.read_bytes() == b"data\n"


def test_unix_path_holding_a_directory_is_refused_and_left_alone(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    with pytest.raises(OSError) as ei:
        open_backend(f"unix:{d}")
    assert str(d) in ei.value.strerror
    assert d.is_dir()


def test_stale_unix_socket_is_replaced(tmp_path):
    path = str(tmp_path / "com1.sock")
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(path)
    old.close()                                      # the file stays; nobody listens: stale
    be = open_backend(f"unix:{path}")
    try:
        assert isinstance(be, UnixSocketBackend)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)                              # the new listener
        c.close()
    finally:
        be.close()


def test_live_unix_socket_is_refused_and_keeps_listening(tmp_path):
    path = str(tmp_path / "com1.sock")
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(path)
    live.listen(1)
    try:
        with pytest.raises(OSError) as ei:
            open_backend(f"unix:{path}")
        assert path in ei.value.strerror
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(path)                              # still the first listener's
        c.close()
    finally:
        live.close()


def test_missing_path_is_an_error_not_a_new_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for spec in ("nmdm0A", str(tmp_path / "nope")):
        with pytest.raises(OSError) as ei:
            open_backend(spec)
        assert ei.value.errno == errno.ENOENT
        assert spec in ei.value.strerror and "No such file or directory" in ei.value.strerror
    assert os.listdir(tmp_path) == []


def test_explicit_file_spec_still_creates_the_file(tmp_path):
    p = tmp_path / "new.log"
    be = open_backend(f"file:{p}")
    be.write(b"x")
    be.close()
    assert p.read_bytes() == b"x"


def test_parse_tcp_address():
    assert parse_tcp_address("127.0.0.1:1234") == ("127.0.0.1", 1234)
    assert parse_tcp_address("[::1]:23") == ("::1", 23)
    for bad in ("1234", "127.0.0.1:", "127.0.0.1:x", "::1:23", "[::1]23", "h:70000"):
        with pytest.raises(ValueError):
            parse_tcp_address(bad)


def _recv_exactly(c, n):
    got = b""
    while len(got) < n:
        chunk = c.recv(n - len(got))
        if not chunk:
            break
        got += chunk
    return got


def _connected(be, c):
    """Waits until ``be`` has taken ``c`` as its client (output before that is dropped, as in bhyve)."""
    local = c.getsockname()

    def taken():
        client = be._client
        try:
            return client is not None and client.getpeername() == local
        except OSError:
            return False
    return _wait(taken)


def test_tcp_backend_one_client_at_a_time():
    be = open_backend("tcp=127.0.0.1:0")
    assert isinstance(be, TcpBackend)
    u = UART16550(RecordingLine(), be)
    be.start(u)
    try:
        addr = be.address
        c1 = socket.create_connection(addr, timeout=WAIT_S)
        assert _connected(be, c1)
        for b in b"hi\n":
            u.write(0, 1, b)
        assert _recv_exactly(c1, 3) == b"hi\n"
        c1.sendall(b"k")
        got = bytearray()
        assert _wait(lambda: (got.extend(_drain(u)), bytes(got) == b"k")[1])

        c2 = socket.create_connection(addr, timeout=WAIT_S)  # a second client: accepted and closed at once
        assert c2.recv(10) == b""
        c2.close()
        u.write(0, 1, ord("!"))
        assert c1.recv(10) == b"!"                           # the first one still has the console

        c1.close()                                           # the next one gets in
        assert _wait(lambda: be._client is None)
        c3 = socket.create_connection(addr, timeout=WAIT_S)
        assert _connected(be, c3)
        u.write(0, 1, ord("3"))
        assert c3.recv(10) == b"3"
        c3.sendall(b"z")
        got.clear()
        assert _wait(lambda: (got.extend(_drain(u)), bytes(got) == b"z")[1])
        c3.close()
    finally:
        be.close()


def test_tcp_backend_ipv6_in_brackets():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        be = open_backend("tcp=[::1]:0")
    except OSError as e:
        pytest.skip(f"no IPv6 loopback: {e}")
    try:
        c = socket.create_connection(be.address, timeout=WAIT_S)
        c.close()
    finally:
        be.close()


def test_tcp_port_in_use_is_one_line_naming_the_address():
    be = open_backend("tcp=127.0.0.1:0")
    try:
        port = be.address[1]
        with pytest.raises(OSError) as ei:
            open_backend(f"tcp=127.0.0.1:{port}")
        assert f"127.0.0.1:{port}" in ei.value.strerror
    finally:
        be.close()
