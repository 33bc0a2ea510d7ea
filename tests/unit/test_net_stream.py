"""The stream backend (``vmmshim/backends/stream.py``): QEMU's ``-netdev stream`` framing (a 4-byte big-endian
length before each frame) over Unix and TCP sockets, as server and client; two virtio-net devices joined through
it; and a DHCP offer from ``passt --socket`` (skipped, with the reason, where passt is not installed)."""

import os
import shutil
import socket
import struct
import subprocess
import time

import pytest

from vmmshim.backends import net as NB
from vmmshim.backends import stream as ST
from tests.unit.test_net_slirp import DHCP_OFFER, Nic, is_dhcp, dhcp, eth

WAIT_S = 5
_LEN = struct.Struct(">I")
ETH_LOCAL_EXPERIMENTAL = 0x88B5         # IEEE 802 local experimental EtherType: not parsed as IP


def wait_for(cond, timeout=WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


class Sink:
    """The device's side for a bare backend: ``ready()`` always, frames collected by :meth:`receive`."""

    def __init__(self, be):
        self.be, self.frames, self.ends = be, [], 0
        be.start_rx(lambda: self.ends == 0, self.receive)

    def receive(self):
        n = 0
        while True:
            buf = bytearray(ST.MAX_FRAME)
            got = self.be.recv_into([memoryview(buf)])
            if got is None:
                return n
            if got == 0:
                self.ends += 1
                return n
            self.frames.append(bytes(buf[:got]))
            n += 1


def framed(*frames):
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def recv_exactly(s, n):
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        assert chunk, "peer closed"
        out += chunk
    return out


@pytest.fixture
def server(tmp_path):
    be = ST.StreamBackend(f"unix:{tmp_path / 'net.sock'}", server=True)
    yield be, str(tmp_path / "net.sock")
    be.close()


def peer(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(WAIT_S)
    s.connect(path)
    return s


def test_addresses_and_options():
    assert ST.parse_address("unix:/tmp/x") == (socket.AF_UNIX, "/tmp/x")
    assert ST.parse_address("tcp:127.0.0.1:5555") == (socket.AF_INET, ("127.0.0.1", 5555))
    assert ST.parse_address("tcp:[::1]:5555") == (socket.AF_INET6, ("::1", 5555))
    assert ST.parse_options({"stream": "unix:/x", "server": "on"}) == ("unix:/x", True)
    for bad in ("unix:", "tcp:host", "tcp::1:2", "tcp:h:99999", "udp:h:1", "/tmp/x"):
        with pytest.raises(ValueError, match="expected unix:PATH or tcp:HOST:PORT"):
            ST.parse_address(bad)
    with pytest.raises(ValueError, match="unknown option 'hostfwd'"):
        ST.parse_options({"stream": "unix:/x", "hostfwd": "tcp::1-:2"})
    with pytest.raises(ValueError, match="server=maybe"):
        ST.parse_options({"stream": "unix:/x", "server": "maybe"})


def test_frames_cross_with_a_length_before_each(server):
    be, path = server
    sink = Sink(be)
    with peer(path) as s:
        assert wait_for(lambda: be.connected)
        s.sendall(framed(b"hello", b"", b"x" * 3000))
        assert wait_for(lambda: len(sink.frames) == 2)
        assert sink.frames == [b"hello", b"x" * 3000]           # the empty frame is skipped
        be.send([memoryview(b"ab"), memoryview(b"cde")])
        be.send([b"f" * 70])
        assert recv_exactly(s, 4 + 5 + 4 + 70) == framed(b"abcde", b"f" * 70)
        for b in framed(b"byte by byte"):                       # a frame split over many reads
            s.send(bytes([b]))
        assert wait_for(lambda: len(sink.frames) == 3) and sink.frames[2] == b"byte by byte"
    assert be.stats["tx_frames"] == 2 and be.stats["rx_frames"] == 3


def test_server_takes_one_peer_and_the_next_after_it_leaves(server):
    be, path = server
    sink = Sink(be)
    first = peer(path)
    assert wait_for(lambda: be.connected)
    with peer(path) as second:
        assert second.recv(16) == b""                           # closed at once: one peer at a time
    first.close()
    assert wait_for(lambda: not be.connected)
    with peer(path) as third:
        third.sendall(framed(b"again"))
        assert wait_for(lambda: sink.frames == [b"again"])
    assert sink.ends == 0 and be.stats["peers"] == 2


def test_a_bad_length_drops_the_peer(server):
    be, path = server
    Sink(be)
    with peer(path) as s:
        s.sendall(_LEN.pack(ST.MAX_FRAME + 1) + b"junk")
        assert s.recv(16) == b""
    assert be.stats["rx_errors"] == 1


def test_frames_without_a_peer_are_dropped(server):
    be, _ = server
    be.send([b"lost"])
    assert be.stats["tx_dropped"] == 1 and be.stats["tx_frames"] == 0


def test_client_over_tcp_and_the_end_of_its_peer():
    srv = ST.StreamBackend("tcp:127.0.0.1:0", server=True)
    try:
        port = srv.address[1]
        cli = ST.StreamBackend(f"tcp:127.0.0.1:{port}")
        try:
            a, b = Sink(srv), Sink(cli)
            assert wait_for(lambda: srv.connected)
            cli.send([b"to the server"])
            srv.send([b"to the client"])
            assert wait_for(lambda: a.frames == [b"to the server"] and b.frames == [b"to the client"])
            srv.close()
            assert wait_for(lambda: b.ends == 1)                # the device hears of the end once
            assert not cli.connected
        finally:
            cli.close()
    finally:
        srv.close()


def test_connect_refused_is_one_line(tmp_path):
    with pytest.raises(OSError) as e:
        ST.StreamBackend(f"unix:{tmp_path / 'nobody'}")
    assert f"stream=unix:{tmp_path / 'nobody'}: cannot connect" in e.value.strerror and "\n" not in e.value.strerror


def test_unix_server_replaces_only_a_stale_socket_and_removes_its_own(tmp_path):
    path = tmp_path / "s"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    be = ST.StreamBackend(f"unix:{path}", server=True)
    be.close()
    assert not path.exists()
    path.write_text("mine")
    with pytest.raises(OSError, match="not a socket"):
        ST.StreamBackend(f"unix:{path}", server=True)
    assert path.read_text() == "mine"


def test_two_nics_joined_by_a_stream(tmp_path):
    """Two virtio-net devices (two VMs' NICs): ``stream=unix:P,server=on`` and ``stream=unix:P``."""
    path = tmp_path / "link"
    a = Nic(NB.open_backend("stream", {"stream": f"unix:{path}", "server": "on"}), slot=2)
    try:
        b = Nic(NB.open_backend("stream", {"stream": f"unix:{path}"}), slot=3)
        try:
            assert a.mac != b.mac
            assert wait_for(lambda: a.be.connected)
            frame = eth(b.mac, a.mac, ETH_LOCAL_EXPERIMENTAL, b"a to b" * 20)
            a.send(frame)
            assert b.wait(lambda f: f["src"] == a.mac)["raw"] == frame
            b.send(eth(a.mac, b.mac, ETH_LOCAL_EXPERIMENTAL, b"b to a"))
            assert a.wait(lambda f: f["src"] == b.mac)["raw"].endswith(b"b to a")
        finally:
            b.close()
    finally:
        a.close()


PASST = shutil.which("passt")


def open_when_listening(spec, timeout=WAIT_S):
    """Connect to a server that creates its socket file before it listens (passt binds, then calls listen()):
    a refused connect in between is retried until ``timeout``; a refused connect never reaches the server's
    accept, so ``--one-off`` is not spent on it."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return NB.open_backend("stream", {"stream": spec})
        except ConnectionRefusedError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


@pytest.mark.skipif(PASST is None, reason="passt is not installed (Debian package passt)")
def test_passt_offers_an_address_over_the_stream(tmp_path):
    sock = tmp_path / "passt.sock"
    log = open(tmp_path / "passt.log", "wb")
    proc = subprocess.Popen([PASST, "--foreground", "--one-off", "--runas", str(os.getuid()), "--socket",
                             str(sock)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        if not wait_for(sock.exists) or proc.poll() is not None:
            pytest.skip(f"passt did not start here: {(tmp_path / 'passt.log').read_text()[-300:]}")
        nic = Nic(open_when_listening(f"unix:{sock}"))
        try:
            nic.send(dhcp(nic.mac, 0x5A5A, 1))
            offer = nic.wait(is_dhcp(0x5A5A, DHCP_OFFER))
            assert offer["yiaddr"] != bytes(4)
        finally:
            nic.close()
    finally:
        proc.kill()
        proc.wait()
        log.close()
