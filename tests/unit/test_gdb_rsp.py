"""gdb's remote protocol framing (``vmmshim/gdb/rsp.py``) and the stub's target description
(``vmmshim/gdb/target.py``)."""

import xml.etree.ElementTree as ET

from vmmshim.gdb import rsp
from vmmshim.gdb.target import REGISTERS, target_xml


def test_frame_and_checksum():
    assert rsp.frame(b"OK") == b"$OK#9a"
    assert rsp.frame(b"") == b"$#00"


def test_escape_round_trip():
    raw = bytes(range(256))
    esc = rsp.escape(raw)
    assert not set(esc) & {ord("$"), ord("#"), ord("*")}
    assert rsp.unescape(esc) == raw


def test_reader_splits_packets_acks_interrupts_and_bad_checksums():
    r = rsp.Reader()
    events = r.feed(b"+$g#67\x03$m0,4#00junk$qC#b")
    assert events == [("ack", b"+"), ("packet", b"g"), ("interrupt", None), ("bad", "checksum b'00' does not match")]
    assert r.feed(b"4") == [("packet", b"qC")]


def test_target_description_numbers_every_register_once():
    root = ET.fromstring(target_xml())
    assert root.find("architecture").text == "i386:x86-64"
    regs = root.iter("reg")
    assert [r.get("name") for r in sorted(regs, key=lambda r: int(r.get("regnum")))] == [r[0] for r in REGISTERS]
    features = {f.get("name") for f in root.iter("feature")}
    assert {"org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments"} <= features
