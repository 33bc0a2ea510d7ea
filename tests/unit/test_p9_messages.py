"""9P2000.L layouts: every message body declared with construct round-trips through the precompiled codecs the
server uses (built by construct, decoded by the codec; encoded by the codec, parsed by construct), the sizes the
protocol fixes, and a truncated or garbage body is a ProtocolError, never another exception."""

import struct

import pytest
from construct import FormatField, Struct
from hypothesis import given, settings, strategies as st

from bhyve_devices.p9 import messages as M

_INT_RANGE = {"B": 8, "H": 16, "L": 32, "I": 32, "Q": 64}


def _field_strategy(sub):
    """(strategy of the construct value, function turning it into the codec's value)."""
    if isinstance(sub, FormatField):
        bits = _INT_RANGE[sub.fmtstr[-1]]
        return st.integers(0, (1 << bits) - 1), lambda v: v
    if sub is M.QID:
        qid = st.fixed_dictionaries(dict(type=st.integers(0, 255), version=st.integers(0, (1 << 32) - 1),
                                         path=st.integers(0, (1 << 64) - 1)))
        return qid, lambda d: M.pack_qid(d["type"], d["version"], d["path"])
    if sub is M.STR:
        return st.binary(max_size=40), lambda v: v
    if sub is M.WNAMES:
        return st.lists(st.binary(max_size=12), max_size=16), tuple
    if sub is M.QIDS:
        q, conv = _field_strategy(M.QID)
        return st.lists(q, max_size=16), lambda v: tuple(conv(x) for x in v)
    if sub is M.DATA:
        return st.binary(max_size=64), lambda v: v
    raise AssertionError(sub)


@st.composite
def body_values(draw, body):
    """(dict for construct, flat list for the codec)."""
    built, flat = {}, []
    for sc in body.subcons:
        strat, conv = _field_strategy(sc.subcon)
        v = draw(strat)
        if sc.subcon is M.DATA:
            built["count"] = flat[-1] = len(v)
        built[sc.name] = v
        flat.append(conv(v))
    return built, flat


@pytest.mark.parametrize("mtype", sorted(M.BODIES))
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_every_body_round_trips(mtype, data):
    body = M.BODIES[mtype]
    built, flat = data.draw(body_values(body))
    raw = body.build(built)
    codec = M.CODECS[mtype]
    assert list(codec.decode(raw, 0, len(raw))) == flat
    assert codec.encode(*flat) == raw
    parsed = body.parse(codec.encode(*flat))
    for k, v in built.items():
        got = parsed[k]
        assert (list(got) if isinstance(v, list) else got) == v or [dict(x) for x in got] == v
    whole = M.encode(mtype, 0x1234, *flat)
    assert M.HEADER.parse(whole) == dict(size=len(whole), type=mtype, tag=0x1234)
    assert M.decode(whole) == (mtype, 0x1234, codec.decode(raw, 0, len(raw)))


@pytest.mark.parametrize("mtype", sorted(M.BODIES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_cut_or_random_body_is_a_protocol_error(mtype, data):
    codec = M.CODECS[mtype]
    built, flat = data.draw(body_values(M.BODIES[mtype]))
    raw = codec.encode(*flat)
    cut = data.draw(st.integers(0, max(len(raw) - 1, 0)))
    if len(raw):
        with pytest.raises(M.ProtocolError):
            codec.decode(raw, 0, cut)
    junk = data.draw(st.binary(max_size=64))
    try:
        codec.decode(junk, 0, len(junk))
    except M.ProtocolError:
        pass


def test_fixed_sizes():
    assert M.HEADER.sizeof() == M.HEADER_SIZE == M.HDR.size == 7
    assert M.QID.sizeof() == M.QID_STRUCT.size == 13
    assert M.CODECS[M.RGETATTR].whole.size == 153                     # 8 + 13 + 3*4 + 15*8
    assert M.CODECS[M.TSETATTR].whole.size == 4 + 4 * 4 + 5 * 8
    assert M.CODECS[M.TWRITE].head.size + M.HEADER_SIZE == M.TWRITE_HDRSZ == 23
    assert M.CODECS[M.RREAD].head.size + M.HEADER_SIZE == M.IOHDRSZ == 11
    assert M.DIRENT_HEAD.size == 13 + 8 + 1
    assert M.CODECS[M.TLOCK].head.format == "<LBLQQL"
    for t in M.BODIES:
        assert (t - 1 if t % 2 else t + 1) in M.BODIES or t in (M.RLERROR, M.TAUTH, M.RAUTH), t


def test_linux_client_formats():
    """The same bytes as net/9p/client.c's format strings give."""
    tlock = M.encode(M.TLOCK, 1, 7, 1, 0, 10, 20, 99, b"host")
    assert tlock[7:] == struct.pack("<IBIQQIH", 7, 1, 0, 10, 20, 99, 4) + b"host"
    walk = M.encode(M.TWALK, 2, 1, 2, (b"a", b"bc"))
    assert walk == struct.pack("<IBHIIHH", len(walk), M.TWALK, 2, 1, 2, 2, 1) + b"a" + b"\2\0bc"
    d = M.DIRENT.build(dict(qid=dict(type=0x80, version=0, path=5), offset=9, type=4, name=b"x"))
    assert d == M.DIRENT_HEAD.pack(M.pack_qid(0x80, 0, 5), 9, 4) + b"\1\0x"


def test_unknown_construct_is_refused():
    with pytest.raises(TypeError):
        M.compile_body(Struct("x" / M.STR, "y" / M.HEADER))
    with pytest.raises(M.ProtocolError):
        M.decode(b"\1\0\0\0\0\0\0")
    with pytest.raises(M.ProtocolError):
        M.decode(struct.pack("<IBH", 7, 250, 0))
