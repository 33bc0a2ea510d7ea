"""The slirp backend (``vmmshim/backends/slirp.py``) over the real libslirp, under virtio-net driven by the test
driver: the guest's side is hand-built frames (Ethernet, ARP, IPv4, UDP, DHCP, TCP with their checksums).

Each exchange runs on the Python backend and on the compiled one (its loop in C, ``slirp_fast.py``). Checked: DHCP
discover/offer/request/ack with QEMU's addresses, an ARP for the gateway, a TCP connection through
``hostfwd`` from a host socket to the guest (the SYN at the guest's address and port, data both ways), the guest's
outbound connection to a host listener (accepted, or reset with ``restrict=on``), a full transmit queue that slows
and then drops, the bounded receive queue, the timer plumbing and a host port in use. The options, a missing
libslirp, ``SlirpConfig``'s layout and the backend names: ``test_net_slirp_options.py``.
"""

import errno
import socket
import struct
import threading
import time

import pytest

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio import net as N
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends import slirp as S
from vmmshim.backends import slirp_fast as SF
from vmmshim.backends import slirp_ffi
from vmmshim.backends import slirp_options as SO

try:
    LIBSLIRP = slirp_ffi.version()
except OSError as exc:
    LIBSLIRP = None
    WHY = exc.strerror
needs_libslirp = pytest.mark.skipif(LIBSLIRP is None, reason="libslirp0 is not installed")

WAIT_S = 5
BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806
PROTO_TCP, PROTO_UDP = 6, 17
SYN, RST, PSH, ACK = 0x02, 0x04, 0x08, 0x10
DHCP_DISCOVER, DHCP_OFFER, DHCP_REQUEST, DHCP_ACK = 1, 2, 3, 5
OPT_MASK, OPT_ROUTER, OPT_DNS, OPT_REQUESTED, OPT_TYPE, OPT_SERVER, OPT_END = 1, 3, 6, 50, 53, 54, 255
DHCP_MAGIC = 0x63825363
_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
HDR = bytes(N.VIRTIO_NET_HDR_LEN)       # the virtio-net header the device hands the backend with each frame
GUEST, GATEWAY, DNS = socket.inet_aton("10.0.2.15"), socket.inet_aton("10.0.2.2"), socket.inet_aton("10.0.2.3")


# ---- frames ---------------------------------------------------------------------------------------------------------
def checksum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def eth(dst, src, etype, payload):
    return dst + src + struct.pack("!H", etype) + payload


def ipv4(src, dst, proto, payload, ident=1):
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0, src, dst)
    return hdr[:10] + struct.pack("!H", checksum(hdr)) + hdr[12:] + payload


def udp(sport, dport, payload):
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def tcp(src, dst, sport, dport, seq, ack, flags, payload=b"", window=65535):
    hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    pseudo = src + dst + struct.pack("!BBH", 0, PROTO_TCP, len(hdr) + len(payload))
    c = checksum(pseudo + hdr + payload)
    return hdr[:16] + struct.pack("!H", c) + hdr[18:] + payload


def arp_request(mac, sip, tip):
    return eth(BROADCAST, mac, ETH_ARP, struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, mac, sip, bytes(6), tip))


def dhcp(mac, xid, msgtype, requested=None, server=None):
    opts = bytes([OPT_TYPE, 1, msgtype])
    if requested:
        opts += bytes([OPT_REQUESTED, 4]) + requested
    if server:
        opts += bytes([OPT_SERVER, 4]) + server
    bootp = _BOOTP.pack(1, 1, 6, 0, xid, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4), mac.ljust(16, b"\0"),
                        bytes(64), bytes(128), DHCP_MAGIC) + opts + bytes([OPT_END])
    return eth(BROADCAST, mac, ETH_IP, ipv4(bytes(4), b"\xff" * 4, PROTO_UDP, udp(68, 67, bootp)))


def parse(frame):
    """An Ethernet frame as a dict: dst, src, type, and for IPv4 ip_src, ip_dst, proto and the UDP/TCP fields."""
    f = dict(dst=frame[:6], src=frame[6:12], type=struct.unpack_from("!H", frame, 12)[0], raw=frame)
    body = frame[14:]
    if f["type"] == ETH_ARP:
        op, sha, spa, tha, tpa = struct.unpack_from("!6xH6s4s6s4s", body)
        f.update(op=op, sha=sha, spa=spa, tha=tha, tpa=tpa)
    elif f["type"] == ETH_IP:
        ihl = (body[0] & 0xF) * 4
        total, proto = struct.unpack_from("!H", body, 2)[0], body[9]
        f.update(ip_src=body[12:16], ip_dst=body[16:20], proto=proto)
        p = body[ihl:total]
        if proto == PROTO_UDP:
            f.update(sport=struct.unpack_from("!H", p)[0], dport=struct.unpack_from("!H", p, 2)[0], data=p[8:])
        elif proto == PROTO_TCP:
            sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", p)
            f.update(sport=sport, dport=dport, seq=seq, ack=ack, flags=flags, data=p[(off >> 4) * 4:])
    return f


def parse_dhcp(data):
    fields = _BOOTP.unpack_from(data)
    opts, i, raw = {}, _BOOTP.size, data
    while i < len(raw) and raw[i] != OPT_END:
        if raw[i] == 0:
            i += 1
            continue
        opts[raw[i]] = raw[i + 2:i + 2 + raw[i + 1]]
        i += 2 + raw[i + 1]
    return dict(op=fields[0], xid=fields[4], yiaddr=fields[8], opts=opts)


def is_dhcp(xid, msgtype):
    def match(f):
        if f.get("proto") != PROTO_UDP or f["sport"] != 67:
            return False
        d = parse_dhcp(f["data"])
        return d["xid"] == xid and d["opts"].get(OPT_TYPE) == bytes([msgtype]) and d
    return match


# ---- a NIC on the backend, driven by the test driver ------------------------------------------------------------------
RX_BUFS, RX_BUF_SIZE = 64, 2048


class Nic:
    """virtio-net over ``backend``: :meth:`send` transmits a frame, :meth:`wait` collects received ones."""

    def __init__(self, backend, slot=2):
        self.be = backend
        self.mem = BytesMemory(4 << 20)
        self.dev = N.VirtioNet(backend, slot=slot, func=0, vmname="vm1")
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=True)
        self.drv.init(msix=True)
        self.rx, self.tx = self.drv.queues[0], self.drv.queues[1]
        self.mac = self.dev.mac
        self.hl = self.dev.hdr_len
        self.bufs = {}
        self.seen = []
        for _ in range(RX_BUFS):
            self._post(self.drv.alloc.alloc(RX_BUF_SIZE))
        self.drv.notify(0)

    def _post(self, buf):
        self.bufs[self.rx.add(inn=[(buf, RX_BUF_SIZE)])] = buf

    def send(self, frame):
        a = self.drv.alloc
        hdr = a.put(bytes(self.hl))
        body = a.put(frame)
        self.tx.add(out=[(hdr, self.hl), (body, len(frame))])
        self.drv.notify(1)
        assert len(self.tx.get_used()) == 1

    def frames(self):
        got = self.rx.get_used()
        for head, n in got:
            buf = self.bufs.pop(head)
            self.seen.append(self.drv.alloc.read(buf, n)[self.hl:])
            self._post(buf)
        if got:
            self.drv.notify(0)
        return self.seen

    def wait(self, match, timeout=WAIT_S):
        """The first received frame (parsed) for which ``match`` is true; it is consumed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, raw in enumerate(self.frames()):
                f = parse(raw)
                m = match(f)
                if m:
                    del self.seen[i]
                    return m if isinstance(m, dict) else f
            time.sleep(0.005)
        raise AssertionError(f"no matching frame in {timeout}s; got {[parse(r) for r in self.seen]}")

    def dhcp(self, xid=0x1234):
        self.send(dhcp(self.mac, xid, DHCP_DISCOVER))
        offer = self.wait(is_dhcp(xid, DHCP_OFFER))
        self.send(dhcp(self.mac, xid, DHCP_REQUEST, requested=offer["yiaddr"], server=offer["opts"][OPT_SERVER]))
        return offer, self.wait(is_dhcp(xid, DHCP_ACK))

    def close(self):
        self.dev.close()


@pytest.fixture(params=["python", "compiled"])
def nic_factory(request):
    """NICs on the Python slirp backend, or on the compiled one (``slirp_fast.py``) where it builds."""
    made = []
    if request.param == "compiled" and SF.unavailable() is not None:
        pytest.skip(f"the compiled slirp loop does not build here: {SF.unavailable()}")
    cls = SF.SlirpFastBackend if request.param == "compiled" else S.SlirpBackend

    def make(**options):
        nic = Nic(cls(SO.parse_options(options), announce=None))
        made.append(nic)
        return nic
    yield make
    for nic in made:
        nic.close()


def listener():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    s.settimeout(WAIT_S)
    return s


# ---- over libslirp --------------------------------------------------------------------------------------------------
@needs_libslirp
def test_dhcp_discover_offer_request_ack(nic_factory):
    nic = nic_factory()
    offer, ack = nic.dhcp()
    assert offer["yiaddr"] == ack["yiaddr"] == GUEST
    o = offer["opts"]
    assert o[OPT_SERVER] == GATEWAY and o[OPT_ROUTER] == GATEWAY and o[OPT_DNS] == DNS
    assert o[OPT_MASK] == socket.inet_aton("255.255.255.0")
    assert ack["opts"][OPT_ROUTER] == GATEWAY
    assert nic.be.stats["tx_frames"] == 2
    # the receive thread counts a batch after it published it in the used ring, where the test saw the ACK
    deadline = time.monotonic() + WAIT_S
    while nic.dev.stats["rx_frames"] < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert nic.dev.stats["rx_frames"] >= 2


@needs_libslirp
def test_arp_for_the_gateway(nic_factory):
    nic = nic_factory()
    nic.send(arp_request(nic.mac, GUEST, GATEWAY))
    f = nic.wait(lambda f: f["type"] == ETH_ARP and f["op"] == 2)
    assert f["spa"] == GATEWAY and f["tpa"] == GUEST and f["tha"] == nic.mac and f["dst"] == nic.mac
    assert f["sha"] == bytes([0x52, 0x55]) + GATEWAY       # libslirp's host MAC, 52:55 + its address


def _guest_answers_syn(nic, syn, iss=1000):
    nic.send(eth(syn["src"], nic.mac, ETH_IP, ipv4(GUEST, syn["ip_src"], PROTO_TCP,
             tcp(GUEST, syn["ip_src"], syn["dport"], syn["sport"], iss, syn["seq"] + 1, SYN | ACK))))
    return iss + 1


@needs_libslirp
def test_hostfwd_connection_reaches_the_guest(nic_factory):
    nic = nic_factory(hostfwd="tcp:127.0.0.1:0-:2222")
    (proto, haddr, hport, gaddr, gport), = nic.be.forwards
    assert (proto, haddr, gaddr, gport) == ("tcp", "127.0.0.1", "10.0.2.15", 2222) and hport > 0
    nic.dhcp()
    host = socket.create_connection(("127.0.0.1", hport), timeout=WAIT_S)
    try:
        syn = nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["flags"] & SYN)
        assert syn["ip_dst"] == GUEST and syn["dport"] == 2222 and syn["ip_src"] == GATEWAY
        assert syn["dst"] == nic.mac
        seq = _guest_answers_syn(nic, syn)
        nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["flags"] & ACK and f["ack"] == seq)
        host.sendall(b"ping")
        data = nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["data"])
        assert data["data"] == b"ping"
        nic.send(eth(syn["src"], nic.mac, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_TCP, tcp(
            GUEST, GATEWAY, 2222, syn["sport"], seq, data["seq"] + 4, PSH | ACK, b"pong"), ident=2)))
        assert host.recv(16) == b"pong"
    finally:
        host.close()


def _guest_connects(nic, port):
    nic.send(arp_request(nic.mac, GUEST, GATEWAY))
    gw = nic.wait(lambda f: f["type"] == ETH_ARP and f["op"] == 2)["sha"]
    nic.send(eth(gw, nic.mac, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_TCP, tcp(GUEST, GATEWAY, 40000, port, 7, 0,
                                                                             SYN))))
    return nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["dport"] == 40000)


@needs_libslirp
def test_outbound_connection_to_a_host_listener(nic_factory):
    nic = nic_factory()
    nic.dhcp()
    with listener() as lsock:
        reply = _guest_connects(nic, lsock.getsockname()[1])
        assert reply["flags"] & (SYN | ACK) == SYN | ACK and reply["ack"] == 8
        conn, _ = lsock.accept()
        conn.close()


@needs_libslirp
def test_restrict_on_gets_no_connection(nic_factory):
    nic = nic_factory(restrict="on")
    offer, _ = nic.dhcp()
    assert OPT_ROUTER not in offer["opts"] and OPT_DNS not in offer["opts"]      # nowhere to go
    with listener() as lsock:
        reply = _guest_connects(nic, lsock.getsockname()[1])
        assert reply["flags"] & RST
        lsock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            lsock.accept()


@needs_libslirp
def test_a_full_transmit_queue_slows_then_drops(monkeypatch, nic_factory):
    """The slirp thread is held in the device's ready(): the queue takes TX_QUEUE_FRAMES, each further frame waits
    TX_WAIT_S and is dropped; once the thread runs again the queue drains and frames pass."""
    monkeypatch.setattr(S, "TX_QUEUE_FRAMES", 4)
    monkeypatch.setattr(S, "TX_WAIT_S", 0.02)
    be = S.SlirpBackend(SO.parse_options({}), announce=None)
    be.set_vnet_hdr_len(len(HDR))
    hold, held = threading.Event(), threading.Event()

    def ready():
        held.set()
        hold.wait(WAIT_S)
        return False
    try:
        be.start_rx(ready, lambda: 0)
        mac = bytes.fromhex("020000000001")
        be.send([HDR, arp_request(mac, GUEST, GATEWAY)])    # its reply makes the thread ask ready()
        assert held.wait(WAIT_S)
        t0 = time.monotonic()
        for _ in range(10):
            be.send([HDR, arp_request(mac, GUEST, GATEWAY)])
        assert time.monotonic() - t0 >= 6 * 0.02
        assert be.stats["tx_dropped"] == 6 and len(be._txq) == 4 and be._txq.waits == 6
        hold.set()
        deadline = time.monotonic() + WAIT_S
        while len(be._txq) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(be._txq) == 0 and be.stats["tx_frames"] == 5
    finally:
        hold.set()
        be.close()


@needs_libslirp
def test_frames_for_a_guest_without_buffers_are_bounded(monkeypatch):
    monkeypatch.setattr(S, "RX_QUEUE_FRAMES", 2)
    be = S.SlirpBackend(SO.parse_options({}), announce=None)
    be.set_vnet_hdr_len(len(HDR))
    try:
        mac = bytes.fromhex("020000000001")
        for _ in range(5):
            be.send([HDR, arp_request(mac, GUEST, GATEWAY)])
        deadline = time.monotonic() + WAIT_S
        while be.stats["rx_dropped"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert be.stats["rx_frames"] == 2 and be.stats["rx_dropped"] == 3
        got = bytearray(128)
        assert be.recv_into([memoryview(got)]) >= len(HDR) + 42 and parse(bytes(got[len(HDR):]))["op"] == 2
    finally:
        be.close()


@needs_libslirp
def test_libslirps_timers_fire_on_the_slirp_thread():
    be = S.SlirpBackend(SO.parse_options({}), announce=None)
    fired = []
    cb = slirp_ffi.ffi.callback("void(void *)", lambda opaque: fired.append(threading.current_thread().name))
    try:
        t = S._timer_new(cb, slirp_ffi.ffi.NULL, be._handle)
        S._timer_mod(t, time.monotonic_ns() // S.NS_PER_MS + 20, be._handle)
        be.rx_kick()                                        # the thread looks at its timers again
        deadline = time.monotonic() + WAIT_S
        while not fired and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fired == ["slirp"] and be.stats["timers_fired"] == 1
        S._timer_free(t, be._handle)
        assert not be._timers
    finally:
        be.close()


@needs_libslirp
def test_a_host_port_in_use_is_one_line():
    with listener() as lsock:
        port = lsock.getsockname()[1]
        with pytest.raises(OSError) as e:
            S.SlirpBackend(SO.parse_options({"hostfwd": f"tcp:127.0.0.1:{port}-:22"}), announce=None)
    assert e.value.errno == errno.EADDRINUSE
    assert f"'tcp:127.0.0.1:{port}-:22'" in e.value.strerror and "\n" not in e.value.strerror
