"""Software checksum, segmentation and receive coalescing (``vmmshim/backends/offload.py``): as pure logic, and
through libslirp and virtio-net with the test driver (a 40 KiB TSO segment from the guest reaches a host socket
through ``hostfwd``; 300 KB from the host reach the guest in coalesced GSO frames, in order and whole), on the Python
backend and on the compiled one (``slirpfast.c``: whole segments and completed checksums, no coalescing).

The logic is checked against an independent RFC 1071 sum (``checksum`` in ``test_net_slirp.py``, a word loop): the completed
checksums, every segment's IP and TCP checksums, the lengths, sequence numbers, identifications and flags TSO
gives; hostile headers and frames never raise; coalesced frames cut again by :func:`segment` give back the
segments that went in; the header layout agrees with the device's construct declaration.
"""

import socket
import struct
import threading
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from bhyve_devices.virtio import net as N
from tests.unit import test_net_slirp as TS
from tests.unit.test_net_slirp import nic_factory  # noqa: F401,F811 (a fixture)
from tests.unit.test_net_slirp import ACK, ETH_IP, GATEWAY, GUEST, PROTO_TCP, PROTO_UDP, PSH, checksum, eth, ipv4, \
    tcp, udp
from vmmshim.backends import offload as O
from vmmshim.backends import slirp_fast as SF

MAC_A, MAC_B = bytes.fromhex("525500000202"), bytes.fromhex("020000000001")
ETH_IPV6 = 0x86DD
FIN, SYN, CWR = 0x01, 0x02, 0x80
MSS = 1460


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0):
    return O.HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset)


def pseudo4(src, dst, length):
    return src + dst + struct.pack("!BBH", 0, PROTO_TCP, length)


def ones(data):
    """The folded ones' complement sum, 0 for nothing (the reference for ``offload.ones_sum``)."""
    return ~checksum(bytes(data)) & 0xFFFF


def tcp_ok(frame, v6=False):
    """Whether the frame's IP header (IPv4) and TCP checksums verify."""
    if v6:
        ip, l4 = frame[14:54], frame[54:]
        return checksum(ip[8:40] + struct.pack("!IxxxB", len(l4), PROTO_TCP) + l4) == 0
    ip = frame[14:34]
    l4 = frame[34:14 + struct.unpack_from("!H", frame, 16)[0]]
    return checksum(ip) == 0 and checksum(pseudo4(ip[12:16], ip[16:20], len(l4)) + l4) == 0


def gso_v4(payload, seq=1000, flags=ACK | PSH, ident=7):
    """A frame as Linux hands it to a TSO device: whole lengths, IP checksum over them, the TCP checksum field
    holding the pseudo-header's sum (NEEDS_CSUM)."""
    th = struct.pack("!HHIIBBHHH", 40000, 5000, seq, 99, 5 << 4, flags, 65535, 0, 0)
    part = ones(pseudo4(GUEST, GATEWAY, len(th) + len(payload)))
    th = th[:16] + struct.pack("!H", part) + th[18:]
    return bytearray(eth(MAC_A, MAC_B, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_TCP, th + payload, ident=ident)))


def gso_v6(payload, seq=1000, flags=ACK):
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    th = struct.pack("!HHIIBBHHH", 40000, 5000, seq, 99, 5 << 4, flags, 65535, 0, 0)
    part = ones(src + dst + struct.pack("!IxxxB", len(th) + len(payload), PROTO_TCP))
    th = th[:16] + struct.pack("!H", part) + th[18:]
    ip6 = struct.pack("!IHBB", 6 << 28, len(th) + len(payload), PROTO_TCP, 64) + src + dst
    return bytearray(eth(MAC_A, MAC_B, ETH_IPV6, ip6 + th + payload))


def test_header_layout_agrees_with_the_device():
    assert O.HDR.size == N.VIRTIO_NET_HDR_LEGACY_LEN
    raw = N.VIRTIO_NET_HDR.build(dict(flags=1, gso_type=4, hdr_len=54, gso_size=1440, csum_start=54,
                                      csum_offset=16, num_buffers=3))
    assert O.HDR.unpack(raw[:O.HDR.size]) == (1, 4, 54, 1440, 54, 16)


@given(st.binary(max_size=3000), st.integers(0, 0x3FFFF))
def test_ones_sum_is_rfc_1071(data, start):
    padded = data + b"\0" * (len(data) % 2)
    s = O.ones_sum(data, start)
    ref = ones(padded + struct.pack("!HH", start >> 16, start & 0xFFFF))
    assert s == ref or (s == 0xFFFF and ref == 0)          # two zeros of ones' complement
    if any(data):                                           # the stored checksum makes the whole verify
        assert checksum(padded + struct.pack("!H", O.fold_checksum(O.ones_sum(data)))) == 0


@given(st.binary(min_size=1, max_size=1400))
def test_needs_csum_of_a_udp_datagram_is_completed(payload):
    u = bytearray(udp(5000, 53, payload))
    frame = bytearray(eth(MAC_A, MAC_B, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_UDP, bytes(u))))
    ph = GUEST + GATEWAY + struct.pack("!BBH", 0, PROTO_UDP, len(u))
    struct.pack_into("!H", frame, 34 + 6, ones(ph))
    out = O.transmit_frames(hdr(O.F_NEEDS_CSUM, csum_start=34, csum_offset=6), frame)
    assert out == [frame]
    l4 = bytes(frame[34:])
    assert checksum(ph + l4) in (0, 0xFFFF) and struct.unpack_from("!H", frame, 40)[0] != 0


@given(st.binary(min_size=1, max_size=200_000).map(lambda b: b[:65000]), st.integers(1, 9000),
       st.sampled_from([ACK, ACK | PSH, ACK | FIN | PSH, ACK | CWR]))
@settings(max_examples=60, deadline=None)
def test_tso_segments_verify_and_carry_the_stream(payload, mss, flags):
    frame = gso_v4(payload, seq=0xFFFFF000, flags=flags, ident=0xFFFE)
    segs = O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, mss, 34, 16), frame)
    assert len(segs) == -(-len(payload) // mss)
    got = b""
    for i, s in enumerate(segs):
        assert tcp_ok(s)
        total = struct.unpack_from("!H", s, 16)[0]
        assert total == len(s) - 14 and len(s) - 54 <= mss
        assert struct.unpack_from("!H", s, 18)[0] == (0xFFFE + i) & 0xFFFF
        assert struct.unpack_from("!I", s, 38)[0] == (0xFFFFF000 + i * mss) & 0xFFFFFFFF
        last = i == len(segs) - 1
        assert s[47] == flags & ~((0 if last else FIN | PSH) | (CWR if i else 0))
        got += s[54:]
    assert got == payload


@given(st.binary(min_size=1, max_size=20000), st.integers(500, 4000))
@settings(max_examples=30, deadline=None)
def test_tso_over_ipv6(payload, mss):
    segs = O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV6, 74, mss, 54, 16), gso_v6(payload))
    assert b"".join(bytes(s[74:]) for s in segs) == payload
    assert all(tcp_ok(s, v6=True) and struct.unpack_from("!H", s, 18)[0] == len(s) - 54 for s in segs)


def test_a_whole_gso_frame_goes_as_one_packet_with_its_checksum():
    payload = bytes(range(256)) * 200
    frame = gso_v4(payload)
    out = O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, MSS, 34, 16), frame, whole=True)
    assert len(out) == 1 and len(out[0]) == 54 + len(payload) and tcp_ok(out[0])
    bad = gso_v4(payload)
    struct.pack_into("!H", bad, 16, 1500)                 # lengths that do not describe the frame: cut it
    cut = O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, MSS, 34, 16), bad, whole=True)
    assert len(cut) > 1


def test_frames_it_cannot_serve_are_dropped():
    frame = gso_v4(b"x" * 3000)
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_UDP, 42, 1400, 34, 6), frame) == []
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV6, 54, 1400, 34, 16), frame) == []   # it is IPv4
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, 0, 34, 16), frame) == []
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, csum_start=len(frame) - 1, csum_offset=0), frame) == []
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, csum_start=60000, csum_offset=60000), frame) == []
    assert O.transmit_frames(hdr(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, 1400, 34, 16), bytearray(20)) == []


@given(st.binary(min_size=10, max_size=10), st.binary(max_size=300))
@settings(max_examples=400)
def test_hostile_headers_and_frames_never_raise(h, frame):
    O.transmit_frames(h, bytearray(frame), whole=True)
    O.transmit_frames(h, bytearray(frame))
    c = O.Coalescer(8, 1 << 20)
    c.set_features(True, True, 12)
    c.add(frame)
    c.add(frame)
    while len(c):
        c.pop()


# ---- receive coalescing -------------------------------------------------------------------------------------------
def slirp_segments(data, mss=MSS, seq=5000, ack=77, window=8760, last_flags=ACK | PSH):
    """What libslirp sends one connection's way: MSS-sized segments, complete checksums, one ident each."""
    out = []
    for i in range(0, len(data), mss):
        chunk = data[i:i + mss]
        flags = last_flags if i + mss >= len(data) else ACK
        out.append(eth(MAC_B, MAC_A, ETH_IP, ipv4(GATEWAY, GUEST, PROTO_TCP, tcp(
            GATEWAY, GUEST, 5000, 40000, seq + i, ack, flags, chunk, window=window), ident=100 + i // mss)))
    return out


def drain(c):
    out = []
    while len(c):
        out.append(c.pop())
    return out


@given(st.binary(min_size=1, max_size=120_000), st.sampled_from([536, 1460]))
@settings(max_examples=40, deadline=None)
def test_coalesced_frames_cut_again_give_the_segments_back(data, mss):
    c = O.Coalescer(512, 4 << 20)
    c.set_features(True, True, 12)
    segs = slirp_segments(data, mss)
    for s in segs:
        assert c.add(memoryview(s))
    again = []
    for h, frame in drain(c):
        assert len(h) == 12
        flags, gso, hlen, gso_size, cstart, coff = O.HDR.unpack_from(h)
        assert len(frame) - 14 <= O.IP_MAX
        if gso == O.GSO_NONE:
            assert flags == O.F_DATA_VALID and tcp_ok(frame)
            again.append(bytes(frame))
            continue
        assert (flags, gso, hlen, gso_size, cstart, coff) == (O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, mss, 34, 16)
        assert checksum(frame[14:34]) == 0
        again += [bytes(s) for s in O.transmit_frames(h, bytearray(frame))]
    assert [s[54:] for s in again] == [s[54:] for s in segs]
    assert [s[38:42] for s in again] == [s[38:42] for s in segs]          # sequence numbers
    assert [s[47] for s in again] == [s[47] for s in segs]                 # flags
    assert all(tcp_ok(s) for s in again)
    assert len(again) == len(segs) and (c.merged > 0) == (len(segs) > 1)


def test_what_does_not_follow_is_not_merged():
    c = O.Coalescer(512, 4 << 20)
    c.set_features(True, True, 12)
    a = slirp_segments(b"a" * 2920, last_flags=ACK)
    gap = slirp_segments(b"b" * 1460, seq=5000 + 2920 + 1)                 # a byte missing
    other_ack = slirp_segments(b"c" * 1460, seq=5000 + 2920 + 1 + 1460, ack=78)
    udp_frame = eth(MAC_B, MAC_A, ETH_IP, ipv4(GATEWAY, GUEST, PROTO_UDP, udp(53, 5000, b"dns")))
    for f in a + gap + other_ack + [udp_frame]:
        c.add(f)
    out = drain(c)
    assert [O.HDR.unpack_from(h)[1] for h, _ in out] == [O.GSO_TCPV4, 0, 0, 0] and c.merged == 1
    assert out[3][1] == udp_frame


def test_push_ends_a_run_and_bounds_hold():
    c = O.Coalescer(512, 4 << 20)
    c.set_features(True, True, 12)
    for f in slirp_segments(b"x" * 2000, last_flags=ACK | PSH) + slirp_segments(b"y" * 1460, seq=7000):
        c.add(f)
    out = drain(c)
    assert len(out) == 2 and out[0][1][47] == ACK | PSH and len(out[0][1]) == 54 + 2000
    small = O.Coalescer(2, 1 << 20)
    small.set_features(True, False, 10)
    frames = slirp_segments(b"z" * 5000)
    assert [small.add(f) for f in frames] == [True, True, False, False]
    assert [len(h) for h, _ in drain(small)] == [10, 10]


def test_without_the_guest_offloads_frames_pass_as_they_are():
    for csum, tso, flags in ((False, False, 0), (False, True, 0), (True, False, O.F_DATA_VALID)):
        c = O.Coalescer(512, 4 << 20)
        c.set_features(csum, tso, 12)
        segs = slirp_segments(b"q" * 5000)
        for s in segs:
            c.add(s)
        out = drain(c)
        assert [bytes(f) for _, f in out] == segs
        assert all(O.HDR.unpack_from(h) == (flags, 0, 0, 0, 0, 0) for h, _ in out)


def test_a_feature_change_drops_what_waits():
    c = O.Coalescer(512, 4 << 20)
    c.set_features(True, True, 12)
    for s in slirp_segments(b"w" * 3000):
        c.add(s)
    c.set_features(True, True, 12)
    assert len(c) == 1
    c.set_features(False, False, 12)
    assert len(c) == 0


# ---- through libslirp and virtio-net, driven by the test driver ---------------------------------------------------


class MrgNic(TS.Nic):
    """The test's NIC, reading mergeable frames whole: ``(virtio-net header, frame)`` per frame."""

    def packets(self):
        got, out = self.rx.get_used(), []
        i = 0
        while i < len(got):
            head, n = got[i]
            raw = self.drv.alloc.read(self.bufs[head], n)
            nbuf = struct.unpack_from("<H", raw, 10)[0]
            frame = raw[self.hl:]
            for h2, n2 in got[i + 1:i + nbuf]:
                frame += self.drv.alloc.read(self.bufs[h2], n2)
            for h2, _ in got[i:i + nbuf]:
                self._post(self.bufs.pop(h2))
            out.append((raw[:self.hl], frame))
            i += nbuf
        if got:
            self.drv.notify(0)
        return out

    def send_gso(self, frame, mss):
        h = O.HDR.pack(O.F_NEEDS_CSUM, O.GSO_TCPV4, 54, mss, 34, 16) + b"\0\0"
        a = self.drv.alloc
        self.tx.add(out=[(a.put(h), len(h)), (a.put(bytes(frame)), len(frame))])
        self.drv.notify(1)
        assert len(self.tx.get_used()) == 1


def _connected(nic):
    """A hostfwd connection from the host into the guest: ``(host socket, syn frame, guest's next seq, host's
    next seq)``."""
    (_, _, hport, _, _), = nic.be.forwards
    nic.dhcp()
    host = socket.create_connection(("127.0.0.1", hport), timeout=TS.WAIT_S)
    syn = nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["flags"] & SYN)
    seq = TS._guest_answers_syn(nic, syn)
    nic.wait(lambda f: f.get("proto") == PROTO_TCP and f["flags"] & ACK and f["ack"] == seq)
    return host, syn, seq, syn["seq"] + 1


@TS.needs_libslirp
def test_a_guest_tso_segment_reaches_the_host(nic_factory):
    nic = nic_factory(hostfwd="tcp:127.0.0.1:0-:2222")
    nic.__class__ = MrgNic
    assert nic.drv.features & (1 << N.VIRTIO_NET_F_HOST_TSO4)
    host, syn, seq, hseq = _connected(nic)
    try:
        data = bytes(range(256)) * 160                      # 40 KiB in one virtqueue entry
        th = struct.pack("!HHIIBBHHH", 2222, syn["sport"], seq, hseq, 5 << 4, ACK | PSH, 65535, 0, 0)
        th = th[:16] + struct.pack("!H", ones(pseudo4(GUEST, GATEWAY, len(th) + len(data)))) + th[18:]
        nic.send_gso(eth(syn["src"], nic.mac, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_TCP, th + data, ident=5)), MSS)
        got = b""
        while len(got) < len(data):
            chunk = host.recv(65536)
            assert chunk
            got += chunk
        assert got == data and nic.be.stats["tx_dropped"] == 0
    finally:
        host.close()


@TS.needs_libslirp
def test_host_data_reaches_the_guest_in_coalesced_frames(nic_factory):
    nic = nic_factory(hostfwd="tcp:127.0.0.1:0-:2222")
    nic.__class__ = MrgNic
    host, syn, seq, hseq = _connected(nic)
    try:
        data = bytes(i * 7 & 0xFF for i in range(300_000))
        threading.Thread(target=host.sendall, args=(data,), daemon=True).start()
        got, gso_frames, deadline, data_valid = b"", 0, time.monotonic() + 20, True
        while len(got) < len(data) and time.monotonic() < deadline:
            for h, frame in nic.packets():
                flags, gso, _, gso_size, cstart, coff = O.HDR.unpack_from(h)
                f = TS.parse(bytes(frame))
                if f.get("proto") != PROTO_TCP or not f["data"] or f["seq"] != hseq:
                    continue
                data_valid = data_valid and (gso != O.GSO_NONE or flags == O.F_DATA_VALID)
                if gso == O.GSO_TCPV4:
                    gso_frames += 1
                    assert 0 < gso_size <= MSS < len(f["data"]) and (cstart, coff) == (34, 16)
                got += f["data"]
                hseq += len(f["data"])
                nic.send(eth(syn["src"], nic.mac, ETH_IP, ipv4(GUEST, GATEWAY, PROTO_TCP, tcp(
                    GUEST, GATEWAY, 2222, syn["sport"], seq, hseq, ACK))))
            time.sleep(0.002)
        assert got == data
        if isinstance(nic.be, SF.SlirpFastBackend):
            assert gso_frames == 0 and data_valid      # no coalescing in C: libslirp's frames, marked checked
        else:
            assert gso_frames > 0 and nic.be.stats["rx_merged"] > 0
    finally:
        host.close()
