"""Packet framing of gdb's remote serial protocol (GDB manual, appendix E "GDB Remote Serial Protocol", sections
"Overview" and "Packet Acknowledgment"): ``$data#cs`` with a modulo-256 checksum, ``+``/``-`` acknowledgments,
``}``-escapes (0x7d, the byte XOR 0x20) in binary data, and the interrupt byte 0x03 between packets.

Not supported: run-length encoded input (gdb never sends it), ``QStartNoAckMode`` (acknowledgments stay on).
"""

ESCAPE = 0x7D
ESCAPE_XOR = 0x20
INTERRUPT = 0x03
START, END = ord("$"), ord("#")
ACK, NAK = b"+", b"-"
MUST_ESCAPE = frozenset(b"$#}*")
MAX_PACKET = 0x4000              # what qSupported offers as PacketSize (bytes of data gdb may send)


class ProtocolError(Exception):
    pass


def checksum(data):
    return sum(data) & 0xFF


def frame(data):
    """A packet carrying ``data`` (bytes, already escaped where binary)."""
    return b"$" + data + b"#" + b"%02x" % checksum(data)


def escape(data):
    out = bytearray()
    for b in data:
        if b in MUST_ESCAPE:
            out += bytes((ESCAPE, b ^ ESCAPE_XOR))
        else:
            out.append(b)
    return bytes(out)


def unescape(data):
    out, i = bytearray(), 0
    while i < len(data):
        b = data[i]
        if b == ESCAPE:
            if i + 1 >= len(data):
                raise ProtocolError("escape at the end of binary data")
            out.append(data[i + 1] ^ ESCAPE_XOR)
            i += 2
        else:
            out.append(b)
            i += 1
    return bytes(out)


class Reader:
    """Splits the byte stream from gdb into events: ``("packet", data)`` for a packet whose checksum is right,
    ``("bad", why)`` for one that is not (answered with ``-``), ``("interrupt", None)`` for Ctrl-C, ``("ack",
    byte)`` for gdb's acknowledgments."""

    def __init__(self):
        self.buf = bytearray()

    def feed(self, data):
        self.buf += data
        events = []
        while self.buf:
            b = self.buf[0]
            if b == START:
                end = self.buf.find(b"#")
                if end < 0:
                    if len(self.buf) > MAX_PACKET * 2 + 4:
                        del self.buf[:]
                        events.append(("bad", "packet too long"))
                    break
                if len(self.buf) < end + 3:
                    break
                data, cs = bytes(self.buf[1:end]), bytes(self.buf[end + 1:end + 3])
                del self.buf[:end + 3]
                try:
                    ok = int(cs, 16) == checksum(data)
                except ValueError:
                    ok = False
                events.append(("packet", data) if ok else ("bad", f"checksum {cs!r} does not match"))
            elif b == INTERRUPT:
                del self.buf[:1]
                events.append(("interrupt", None))
            elif b in b"+-":
                events.append(("ack", bytes(self.buf[:1])))
                del self.buf[:1]
            else:
                del self.buf[:1]            # noise between packets
        return events
