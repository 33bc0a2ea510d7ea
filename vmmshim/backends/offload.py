"""Checksum and segmentation offloads done in software, for network backends whose peer takes plain frames
(libslirp, :mod:`.slirp`): the guest's driver may then hand over one 64 KiB TCP segment per virtqueue entry, and
receive one, instead of 1.5 KiB frames, as over a tap with ``IFF_VNET_HDR``.

The virtio-net header (VIRTIO 1.1 section 5.1.6, ``struct virtio_net_hdr``: ``flags``, ``gso_type``, ``hdr_len``,
``gso_size``, ``csum_start``, ``csum_offset``, then ``num_buffers`` in the 12-byte form) is read with
:data:`HDR` (its layout follows ``bhyve_devices.virtio.net.VIRTIO_NET_HDR``; ``tests/unit/test_net_offload.py``
checks they agree).

Guest to host (:func:`transmit_frames`): ``VIRTIO_NET_HDR_F_NEEDS_CSUM`` is completed (the ones' complement sum of
RFC 1071 from ``csum_start`` to the end, stored at ``csum_start + csum_offset``); a TCP GSO frame (TCPV4 or TCPV6,
ECN or not) is cut into ``gso_size`` segments as a NIC's TSO does (IPv4 identification counting up, the IP and
TCP lengths and checksums per segment, FIN and PSH on the last segment only, CWR on the first only). A backend that
takes whole IP packets of up to 64 KiB (libslirp's ``slirp_input`` does: its TCP accepts a segment larger than
the MSS it announced) passes ``whole=True`` and gets a GSO frame as one packet, its checksum completed.

Host to guest (:class:`Coalescer`): consecutive IPv4 TCP segments of one connection, in sequence, with the same
acknowledgement, window and options and no flag but ACK (PSH ends a run), are merged into one frame handed to the
guest as ``VIRTIO_NET_HDR_GSO_TCPV4`` with ``gso_size`` the first segment's payload (the receive coalescing of a
NIC's LRO, or Linux's GRO), marked ``NEEDS_CSUM`` with the pseudo-header sum in the TCP checksum field, as a tap
hands over a segment from the host's own stack. Only when the driver accepted ``GUEST_TSO4`` and ``GUEST_CSUM``;
a frame left alone gets ``VIRTIO_NET_HDR_F_DATA_VALID`` when it accepted ``GUEST_CSUM`` (libslirp's checksums are
right), else a zero header.

Bad frames from the guest (a header that points past the frame, a GSO frame that is not TCP over IPv4 or IPv6
without extension headers, a ``gso_size`` of 0) are dropped: :func:`transmit_frames` returns ``[]``.

Not supported: UFO and USO (``VIRTIO_NET_HDR_GSO_UDP``/``UDP_L4``: not offered), IPv4 options and IPv6 extension
headers in GSO frames, coalescing IPv6 or anything but TCP.
"""

import collections
import struct
import threading

HDR = struct.Struct("<BBHHHH")          # virtio_net_hdr without num_buffers
F_NEEDS_CSUM = 1
F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

ETH_HLEN = 14
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
VLAN_HLEN = 4
IPPROTO_TCP = 6
IPV4_MIN_HLEN = 20
IPV4_MF_OFFSET = 0x3FFF             # the MF flag and the fragment offset
IPV6_HLEN = 40
TCP_MIN_HLEN = 20
TCP_CHECK = 16                      # the TCP checksum's offset in its header
TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK, TCP_URG, TCP_ECE, TCP_CWR = 1, 2, 4, 8, 16, 32, 64, 128
IP_MAX = 0xFFFF                     # an IPv4 total length / IPv6 payload length
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")


def ones_sum(data, start=0):
    """The RFC 1071 ones' complement sum of ``data`` (big-endian 16-bit words, an odd last byte padded), plus
    ``start``, folded to 16 bits; 0xFFFF stands for a sum of zero that is not all zeros. (2**16 is 1 modulo
    0xFFFF, so the sum of the words is the number the bytes spell, modulo 0xFFFF.)"""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    s = (int.from_bytes(data, "big") + start) % 0xFFFF
    return s if s or not (start or any(data)) else 0xFFFF


def fold_checksum(s):
    """The checksum field for a ones' complement sum ``s`` (0xFFFF where the complement is 0, as RFC 768 asks of
    UDP and RFC 1624 allows everywhere)."""
    return (~s & 0xFFFF) or 0xFFFF


def complete_checksum(frame, start, offset):
    """``VIRTIO_NET_HDR_F_NEEDS_CSUM``: the sum from ``start`` (the field holds the pseudo-header's sum) stored
    at ``start + offset``. False where the field lies outside the frame."""
    at = start + offset
    if at + 2 > len(frame):
        return False
    _U16.pack_into(frame, at, fold_checksum(ones_sum(memoryview(frame)[start:])))
    return True


def l3_offset(frame):
    """``(ethertype, offset of the IP header)``, through one 802.1Q tag; ``(None, 0)`` for a runt."""
    if len(frame) < ETH_HLEN:
        return None, 0
    etype, off = _U16.unpack_from(frame, 12)[0], ETH_HLEN
    if etype == ETH_P_8021Q and len(frame) >= ETH_HLEN + VLAN_HLEN:
        etype, off = _U16.unpack_from(frame, 16)[0], ETH_HLEN + VLAN_HLEN
    return etype, off


def _pseudo_sum(frame, l3, v4, l4_len):
    """The TCP pseudo-header's ones' complement sum (RFC 793 / RFC 8200 section 8.1) for ``l4_len`` bytes."""
    addrs = frame[l3 + 12:l3 + 20] if v4 else frame[l3 + 8:l3 + 40]
    return ones_sum(addrs, IPPROTO_TCP + l4_len)


def _tcp_layout(frame):
    """``(v4, l3, l4, l4 header length)`` of a TCP segment over IPv4 (no options needed) or IPv6 (no extension
    header), or None."""
    etype, l3 = l3_offset(frame)
    if etype == ETH_P_IP and len(frame) >= l3 + IPV4_MIN_HLEN:
        ihl = (frame[l3] & 0xF) * 4
        if frame[l3] >> 4 != 4 or ihl < IPV4_MIN_HLEN or frame[l3 + 9] != IPPROTO_TCP:
            return None
        v4, l4 = True, l3 + ihl
    elif etype == ETH_P_IPV6 and len(frame) >= l3 + IPV6_HLEN:
        if frame[l3] >> 4 != 6 or frame[l3 + 6] != IPPROTO_TCP:
            return None
        v4, l4 = False, l3 + IPV6_HLEN
    else:
        return None
    if len(frame) < l4 + TCP_MIN_HLEN:
        return None
    thl = (frame[l4 + 12] >> 4) * 4
    if thl < TCP_MIN_HLEN or len(frame) < l4 + thl:
        return None
    return v4, l3, l4, thl


def _set_ip_length(seg, v4, l3, l4, total_l4):
    if v4:
        _U16.pack_into(seg, l3 + 2, l4 - l3 + total_l4)
        seg[l3 + 10:l3 + 12] = b"\0\0"
        _U16.pack_into(seg, l3 + 10, fold_checksum(ones_sum(seg[l3:l4])))
    else:
        _U16.pack_into(seg, l3 + 4, total_l4)


def _whole_lengths_agree(frame, v4, l3, l4):
    """Whether the IP length field describes the whole frame (Linux writes it so for a GSO frame up to 64 KiB)."""
    if v4:
        return _U16.unpack_from(frame, l3 + 2)[0] == len(frame) - l3
    return _U16.unpack_from(frame, l3 + 4)[0] == len(frame) - l4


def segment(frame, gso_size):
    """The TCP segments a NIC's TSO would send for the GSO ``frame`` (a bytearray), checksums complete; None when
    it is not a TCP segment this can cut."""
    lay = _tcp_layout(frame)
    if lay is None or gso_size <= 0:
        return None
    v4, l3, l4, thl = lay
    head, payload = frame[:l4 + thl], memoryview(frame)[l4 + thl:]
    if not payload:
        return None
    seq = _U32.unpack_from(frame, l4 + 4)[0]
    flags = frame[l4 + 13]
    ident = _U16.unpack_from(frame, l3 + 4)[0] if v4 else 0
    n = max(1, -(-len(payload) // gso_size))
    out = []
    for i in range(n):
        chunk = payload[i * gso_size:(i + 1) * gso_size]
        seg = bytearray(head)
        seg += chunk
        if v4:
            _U16.pack_into(seg, l3 + 4, (ident + i) & 0xFFFF)
        _set_ip_length(seg, v4, l3, l4, thl + len(chunk))
        _U32.pack_into(seg, l4 + 4, (seq + i * gso_size) & 0xFFFFFFFF)
        f = flags
        if i != n - 1:
            f &= ~(TCP_FIN | TCP_PSH)
        if i:
            f &= ~TCP_CWR
        seg[l4 + 13] = f
        seg[l4 + TCP_CHECK:l4 + TCP_CHECK + 2] = b"\0\0"
        s = ones_sum(memoryview(seg)[l4:], _pseudo_sum(seg, l3, v4, thl + len(chunk)))
        _U16.pack_into(seg, l4 + TCP_CHECK, fold_checksum(s))
        out.append(seg)
    return out


def transmit_frames(hdr, frame, whole=False):
    """The plain frames to send for a guest frame with virtio-net header ``hdr`` (its first 10 bytes; ``frame``
    a bytearray, changed in place): ``[frame]`` with its checksum completed, the segments of a GSO frame, or
    ``[]`` to drop it. ``whole``: the peer takes a GSO frame as one IP packet when its length fields agree."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = HDR.unpack_from(hdr)
    gso = gso_type & ~GSO_ECN
    if gso == GSO_NONE:
        if flags & F_NEEDS_CSUM and not complete_checksum(frame, csum_start, csum_offset):
            return []
        return [frame]
    if gso not in (GSO_TCPV4, GSO_TCPV6):
        return []
    lay = _tcp_layout(frame)
    if lay is None or lay[0] != (gso == GSO_TCPV4):
        return []
    if whole and _whole_lengths_agree(frame, *lay[:3]):
        if not flags & F_NEEDS_CSUM:
            return [frame]          # the guest summed it all (it may: 5.1.6.2)
        return [frame] if complete_checksum(frame, csum_start, csum_offset) else []
    return segment(frame, gso_size) or []


class Coalescer:
    """Receive coalescing for one backend (see the module docstring): :meth:`add` a frame from the host, then
    take ``(header, frame)`` pairs with :meth:`pop` while :meth:`__len__`. ``hdr_len`` is the negotiated header
    length (10 or 12), ``set_features`` says what the driver accepted (frames waiting are dropped when that
    changes: they were built for the driver before); ``max_frames``/``max_bytes`` bound what waits (``add``
    returns False, the frame dropped, past them). Safe to use from several threads."""

    def __init__(self, max_frames, max_bytes):
        self.max_frames, self.max_bytes = max_frames, max_bytes
        self.hdr_len = 12
        self.csum = self.tso4 = False
        self._out = collections.deque()     # [header flags (-1: merged), frame, key, next seq, gso size, open]
        self._bytes = 0
        self.merged = 0             # segments merged into an earlier frame
        self._lock = threading.Lock()

    def set_features(self, guest_csum, guest_tso4, hdr_len):
        new = (bool(guest_csum), bool(guest_tso4 and guest_csum), hdr_len)
        with self._lock:
            if new != (self.csum, self.tso4, self.hdr_len):
                self._clear()
            self.csum, self.tso4, self.hdr_len = new

    def __len__(self):
        return len(self._out)

    def add(self, frame):
        with self._lock:
            return self._add(frame)

    def _add(self, frame):
        if self.tso4 and self._merge(frame):
            return True
        if len(self) >= self.max_frames or self._bytes + len(frame) > self.max_bytes:
            return False
        entry = [F_DATA_VALID if self.csum else 0, bytearray(frame), None, 0, 0, False]
        if self.tso4:
            self._open(entry)
        self._out.append(entry)
        self._bytes += len(frame)
        return True

    def pop(self):
        """The oldest ``(header bytes, frame)``; IndexError when none waits."""
        with self._lock:
            return self._pop()

    def _pop(self):
        entry = self._out.popleft()
        self._bytes -= len(entry[1])
        return self._header(entry), entry[1]

    def clear(self):
        with self._lock:
            self._clear()

    def _clear(self):
        self._out.clear()
        self._bytes = 0

    # ---- coalescing -----------------------------------------------------------------------------------------------
    @staticmethod
    def _segment_key(frame):
        """``(key, seq, payload length, flags)`` of an IPv4 TCP segment that may take part, else None. The key is
        what must be equal for two segments to merge: the Ethernet header, the IP header but for its length,
        identification and checksum, and the TCP header but for its sequence number, flags and checksum."""
        if len(frame) < ETH_HLEN + IPV4_MIN_HLEN + TCP_MIN_HLEN or frame[12:14] != b"\x08\x00":
            return None
        l3 = ETH_HLEN
        if frame[l3] != 0x45 or frame[l3 + 9] != IPPROTO_TCP or _U16.unpack_from(frame, l3 + 6)[0] & IPV4_MF_OFFSET:
            return None
        l4 = l3 + IPV4_MIN_HLEN
        thl = (frame[l4 + 12] >> 4) * 4
        total = _U16.unpack_from(frame, l3 + 2)[0]
        if thl < TCP_MIN_HLEN or total != len(frame) - l3 or l4 + thl > len(frame):
            return None
        flags = frame[l4 + 13]
        payload = len(frame) - l4 - thl
        if not payload or flags & ~(TCP_ACK | TCP_PSH) or not flags & TCP_ACK:
            return None
        key = (bytes(frame[:l3 + 2]), bytes(frame[l3 + 6:l3 + 10]), bytes(frame[l3 + 12:l4 + 4]),
               bytes(frame[l4 + 8:l4 + 13]), bytes(frame[l4 + 14:l4 + 16]), bytes(frame[l4 + 18:l4 + thl]))
        return key, _U32.unpack_from(frame, l4 + 4)[0], payload, flags

    def _open(self, entry):
        k = self._segment_key(entry[1])
        if k is not None and not k[3] & TCP_PSH:
            entry[2], entry[3], entry[4], entry[5] = k[0], (k[1] + k[2]) & 0xFFFFFFFF, k[2], True

    def _merge(self, frame):
        if not len(self):
            return False
        last = self._out[-1]
        if not last[5]:
            return False
        k = self._segment_key(frame)
        if k is None:
            last[5] = False
            return False
        key, seq, payload, flags = k
        buf = last[1]
        if (key != last[2] or seq != last[3] or payload > last[4]
                or len(buf) - ETH_HLEN + payload > IP_MAX or self._bytes + payload > self.max_bytes):
            last[5] = False
            return False
        thl = (frame[ETH_HLEN + IPV4_MIN_HLEN + 12] >> 4) * 4
        buf += memoryview(frame)[ETH_HLEN + IPV4_MIN_HLEN + thl:]
        self._bytes += payload
        self.merged += 1
        last[3] = (seq + payload) & 0xFFFFFFFF
        if flags & TCP_PSH:
            buf[ETH_HLEN + IPV4_MIN_HLEN + 13] |= TCP_PSH
        if flags & TCP_PSH or payload < last[4]:
            last[5] = False
        last[0] = -1                # merged: its header is built at pop
        return True

    def _header(self, entry):
        flags, buf = entry[0], entry[1]
        pad = b"\0\0" if self.hdr_len > HDR.size else b""
        if flags != -1:
            return HDR.pack(flags, GSO_NONE, 0, 0, 0, 0) + pad
        l3, l4 = ETH_HLEN, ETH_HLEN + IPV4_MIN_HLEN
        thl = (buf[l4 + 12] >> 4) * 4
        _set_ip_length(buf, True, l3, l4, len(buf) - l4)
        _U16.pack_into(buf, l4 + TCP_CHECK, ones_sum(buf[l3 + 12:l3 + 20], IPPROTO_TCP + len(buf) - l4))
        return HDR.pack(F_NEEDS_CSUM, GSO_TCPV4, l4 + thl, entry[4], l4, TCP_CHECK) + pad
