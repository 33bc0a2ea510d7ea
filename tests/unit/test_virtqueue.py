"""Split virtqueues: well-formed chains (direct and indirect), event-index suppression, the fences of the
suppression handshakes and the segment helpers. Broken and hostile rings: ``test_virtqueue_errors.py``."""

import struct

from hypothesis import given, strategies as st

from bhyve_devices.virtio.virtqueue import (DESC_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC, VIRTQ_DESC_F_INDIRECT,
                                            VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_ELEM, avail_ring,
                                            avail_size, gather, legacy_layout, need_event, scatter, split_segments,
                                            split_tail, used_ring, used_size)
from tests.unit.virtqueue_rig import BASE, F_EVENT_IDX, RAM, RamMemory, make


def test_layouts_match_struct_formats():
    assert VIRTQ_DESC.sizeof() == DESC_SIZE == 16 and VIRTQ_USED_ELEM.sizeof() == 8
    raw = struct.pack("<QIHH", 0x1122334455667788, 0x99AABBCC, 3, 7)
    assert VIRTQ_DESC.parse(raw) == dict(addr=0x1122334455667788, len=0x99AABBCC, flags=3, next=7)
    assert VIRTQ_DESC.build(VIRTQ_DESC.parse(raw)) == raw
    for n in (1, 8, 256):
        assert avail_ring(n).sizeof() == avail_size(n) and used_ring(n).sizeof() == used_size(n)
        blob = bytes(range(256)) * (used_size(n) // 256 + 1)
        assert used_ring(n).build(used_ring(n).parse(blob[:used_size(n)])) == blob[:used_size(n)]
    assert legacy_layout(1, 256) == (0x1000, 0x2000, 0x3000)
    assert legacy_layout(2, 8) == (0x2000, 0x2080, 0x3000)


def test_direct_chain_read_write_and_used_ring():
    mem, q, ring, errors = make()
    ring.d(0, BASE + 0x4000, 4, VIRTQ_DESC_F_NEXT, 5)
    ring.d(5, BASE + 0x4010, 3, VIRTQ_DESC_F_NEXT, 2)
    ring.d(2, BASE + 0x5000, 8, VIRTQ_DESC_F_WRITE)
    mem.buf[0x4000:0x4004] = b"abcd"
    mem.buf[0x4010:0x4013] = b"efg"
    ring.post(0)
    c = q.get_chain()
    assert c.head == 0 and c.read_bytes() == b"abcdefg" and c.writable_len == 8
    assert c.write_bytes(b"0123456789") == 8
    q.put_used(0, 8)
    assert mem.buf[0x5000:0x5008] == b"01234567"
    assert ring.used_idx() == 1 and ring.used_elem(0) == (0, 8)
    assert q.get_chain() is None and not errors
    assert q.needs_notify()
    ring.w(ring.avail, "<H", VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.post(0)
    q.put_used(q.get_chain().head, 0)
    assert not q.needs_notify()


def test_views_are_zero_copy():
    mem, q, ring, errors = make()
    ring.d(0, BASE + 0x6000, 16, VIRTQ_DESC_F_WRITE)
    ring.post(0)
    c = q.get_chain()
    c.writable[0][:4] = b"WXYZ"
    assert mem.buf[0x6000:0x6004] == b"WXYZ"


def test_indirect_chain():
    mem, q, ring, errors = make()
    table = BASE + 0x7000
    ring.d(0, BASE + 0x4000, 2, VIRTQ_DESC_F_NEXT, 1, table=table)
    ring.d(1, BASE + 0x4100, 4, VIRTQ_DESC_F_WRITE, 0, table=table)
    ring.d(3, table, 32, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_WRITE)   # WRITE on it is ignored
    ring.post(3)
    c = q.get_chain()
    assert c.head == 3 and [len(m) for m in c.readable] == [2] and [len(m) for m in c.writable] == [4]
    assert not errors


TABLE = BASE + 0x7000
DATA = BASE + 0x8000


def indirect_table(ring, entries):
    """Writes ``(addr, len, flags, next)`` entries at TABLE and posts one INDIRECT descriptor to them."""
    for i, e in enumerate(entries):
        ring.d(i, *e, table=TABLE)
    ring.d(0, TABLE, 16 * len(entries), VIRTQ_DESC_F_INDIRECT)
    ring.post(0)


def in_order(n_read, n_write, size=64, first=DATA):
    n = n_read + n_write
    return [(first + 0x100 * i, size, (VIRTQ_DESC_F_WRITE if i >= n_read else 0) |
             (VIRTQ_DESC_F_NEXT if i < n - 1 else 0), i + 1 if i < n - 1 else 0) for i in range(n)]


def test_in_order_indirect_tables_take_the_whole_list_path(monkeypatch):
    """Linux's tables (entry i chains to i + 1, readable then writable) are sliced in one go; the result is
    what the entry-by-entry walk gives."""
    import bhyve_devices.virtio.virtqueue as vq
    calls = []
    real = vq._indirect_in_order
    monkeypatch.setattr(vq, "_indirect_in_order", lambda *a: calls.append(real(*a)) or calls[-1])
    for n_read, n_write in ((1, 5), (3, 0), (0, 4), (1, 1)):
        mem, q, ring, errors = make(mem=RamMemory())
        indirect_table(ring, in_order(n_read, n_write))
        c = q.get_chain()
        assert calls[-1] is not None, (n_read, n_write)
        assert [len(m) for m in c.readable] == [64] * n_read and [len(m) for m in c.writable] == [64] * n_write
        if n_write:
            c.writable[-1][:2] = b"ok"
            assert bytes(mem.buf[DATA + 0x100 * (n_read + n_write - 1):][:2]) == b"ok"
        assert not errors


def test_take_indirect_pops_only_a_lone_indirect_head_in_ram():
    """What virtio-blk's compiled request is offered: ``(head, table, entries)`` of a lone INDIRECT head whose
    table is in RAM; anything else pops nothing, and a chain given back is walked by get_chain as before."""
    mem, q, ring, errors = make(mem=RamMemory())
    assert q.take_indirect() is None                                 # empty ring
    indirect_table(ring, in_order(1, 2))
    assert q.take_indirect() == (0, TABLE, 3)
    assert q.take_indirect() is None
    q.unget()
    c = q.get_chain()
    assert c.head == 0 and len(c.readable) == 1 and len(c.writable) == 2
    ring.d(1, DATA, 64, VIRTQ_DESC_F_WRITE)                         # a direct chain
    ring.post(1)
    assert q.take_indirect() is None and q.get_chain().head == 1
    ring.d(2, TABLE, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 3)  # INDIRECT with NEXT: get_chain's error
    ring.post(2)
    assert q.take_indirect() is None and q.get_chain() is None and errors
    for table, length in ((BASE + RAM - 16, 32), (2**64 - 16, 16), (TABLE, 24)):   # outside RAM, odd length
        mem, q, ring, _ = make(mem=RamMemory())
        ring.d(0, table, length, VIRTQ_DESC_F_INDIRECT)
        ring.post(0)
        assert q.take_indirect() is None and q.last_avail == 0
    mem, q, ring, _ = make(mem=RamMemory(), features=0)             # INDIRECT not negotiated
    indirect_table(ring, in_order(1, 1))
    assert q.take_indirect() is None
    mem, q, ring, _ = make()                                         # no RAM view (base is not 0)
    indirect_table(ring, in_order(1, 1))
    assert q.take_indirect() is None


def test_other_indirect_tables_are_walked_entry_by_entry():
    """A table out of order is still a valid chain; one with a buffer past RAM, a readable entry after a
    writable one, or a loop is refused exactly as by the general walk."""
    mem, q, ring, errors = make(mem=RamMemory())
    indirect_table(ring, [(DATA, 8, VIRTQ_DESC_F_NEXT, 2), (DATA + 0x100, 8, VIRTQ_DESC_F_WRITE, 0),
                          (DATA + 0x200, 8, VIRTQ_DESC_F_NEXT, 1)])
    c = q.get_chain()
    assert [len(m) for m in c.readable] == [8, 8] and [len(m) for m in c.writable] == [8] and not errors
    for entries, fragment in (
            (in_order(1, 2)[:2] + [(BASE + RAM - 4, 64, VIRTQ_DESC_F_WRITE, 0)], "guest memory"),
            ([(DATA, 8, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, 1), (DATA + 0x100, 8, 0, 0)], "readable"),
            ([(DATA, 8, VIRTQ_DESC_F_NEXT, 1), (DATA + 0x100, 8, VIRTQ_DESC_F_NEXT, 0)], "loop")):
        mem, q, ring, errors = make(mem=RamMemory())
        indirect_table(ring, entries)
        assert q.get_chain() is None and q.broken and fragment in errors[0], (entries, errors)


def test_zero_length_descriptor_is_a_valid_empty_buffer():
    mem, q, ring, errors = make()
    ring.d(0, BASE + RAM, 0)           # zero bytes at the very end of RAM
    ring.post(0)
    c = q.get_chain()
    assert c is not None and c.readable_len == 0 and not errors


def test_max_length_chain_is_accepted():
    mem, q, ring, errors = make(size=8)
    for i in range(8):
        ring.d(i, BASE + 0x4000 + i, 1, VIRTQ_DESC_F_NEXT if i < 7 else 0, i + 1)
    ring.post(0)
    assert len(q.get_chain().readable) == 8 and not errors


def test_event_idx_used_event_and_avail_event():
    mem, q, ring, errors = make(features=F_EVENT_IDX)
    ring.d(0, BASE + 0x4000, 1)
    used_event = ring.avail + 4 + 2 * 8
    avail_event = ring.used + 4 + 8 * 8
    assert q.get_chain() is None
    assert ring.r(avail_event, "<H")[0] == 0
    for k in range(4):
        ring.post(0)
    for k in range(4):
        q.put_used(q.get_chain().head, 0)
    assert ring.r(avail_event, "<H")[0] == 4
    ring.w(used_event, "<H", 1)        # interrupt when used idx passes 1: 0 -> 4 crosses it
    assert q.needs_notify()
    ring.post(0)
    q.put_used(q.get_chain().head, 0)  # used 4 -> 5, used_event still 1: no interrupt
    assert not q.needs_notify()
    ring.w(used_event, "<H", 5)
    ring.post(0)
    q.put_used(q.get_chain().head, 0)  # 5 -> 6 crosses 5
    assert q.needs_notify()
    assert not q.needs_notify()        # nothing new


def test_event_idx_rechecks_after_publishing():
    mem, q, ring, errors = make(features=F_EVENT_IDX)
    ring.d(0, BASE + 0x4000, 1)
    assert q.get_chain() is None
    ring.post(0)
    assert q.has_chain()
    assert q.get_chain() is not None


def test_fences_sit_between_the_device_store_and_its_load(monkeypatch):
    """The suppression handshakes are store-then-load on both sides (Dekker): the device's store must be in
    guest memory when the fence runs, and what the driver stored before the fence must be seen after it. The
    fence hook plays the driver, whose stores become visible exactly at the fence."""
    from bhyve_devices.virtio import virtqueue as V
    mem, q, ring, errors = make(features=F_EVENT_IDX)
    ring.d(0, BASE + 0x4000, 1)
    used_event, avail_event = ring.avail + 4 + 2 * 8, ring.used + 4 + 8 * 8
    seen = []

    def driver_adds_a_request():
        seen.append(("avail_event", ring.r(avail_event, "<H")[0]))
        ring.post(0)
    monkeypatch.setattr(V, "full_fence", driver_adds_a_request)
    chain = q.get_chain()                   # empty at first look, published avail_event 0, fenced, looked again
    assert chain is not None and seen == [("avail_event", 0)]

    def driver_asks_for_an_interrupt():
        seen.append(("used_idx", ring.used_idx()))
        ring.w(used_event, "<H", 0)         # virtqueue_enable_cb_delayed: interrupt at the next used entry
    ring.w(used_event, "<H", 0x8000)        # the driver had suppressed interrupts
    monkeypatch.setattr(V, "full_fence", driver_asks_for_an_interrupt)
    q.put_used(chain.head, 0)
    assert q.needs_notify() and seen[-1] == ("used_idx", 1)


def test_need_event_wraps():
    assert need_event(0xFFFF, 0, 0xFFFE)
    assert not need_event(5, 3, 1)
    assert need_event(2, 3, 1)


def test_unget_returns_chain_again():
    mem, q, ring, errors = make()
    ring.d(0, BASE + 0x4000, 1)
    ring.post(0)
    assert q.get_chain().head == 0
    q.unget()
    assert q.get_chain().head == 0 and q.get_chain() is None


def test_index_wraparound():
    mem, q, ring, errors = make(size=4)
    ring.d(0, BASE + 0x4000, 1)
    ring.w(ring.avail + 2, "<H", 0xFFFE)
    q.last_avail = 0xFFFE
    q.used_idx = q.signalled_used = 0xFFFE
    ring.post(0, 0, 0)
    assert [q.get_chain().head for _ in range(3)] == [0, 0, 0]
    for _ in range(3):
        q.put_used(0, 0)
    assert ring.used_idx() == 1 and q.needs_notify()


def test_segment_helpers():
    buf = bytearray(b"0123456789")
    segs = [memoryview(buf)[0:3], memoryview(buf)[3:4], memoryview(buf)[4:10]]
    a, b = split_segments(segs, 5)
    assert gather(a) == b"01234" and gather(b) == b"56789"
    a, b = split_tail(segs, 1)
    assert gather(b) == b"9" and gather(a) == b"012345678"
    assert split_segments(segs, 100)[1] == [] and gather(segs, 4) == b"0123"
    assert scatter(split_segments(segs, 5)[1], b"abcdefgh") == 5 and buf == bytearray(b"01234abcde")


def _split_step_by_step(segs, n):
    """split_segments as the definition reads: segment by segment."""
    first, rest = [], []
    for m in segs:
        if n <= 0:
            rest.append(m)
        elif len(m) <= n:
            first.append(m)
            n -= len(m)
        else:
            first.append(m[:n])
            rest.append(m[n:])
            n = 0
    return first, rest


@given(st.lists(st.integers(0, 9), max_size=12), st.integers(-2, 80))
def test_split_segments_agrees_with_a_step_by_step_split(lengths, n):
    buf = bytearray(range(sum(lengths)))
    segs, at = [], 0
    for k in lengths:
        segs.append(memoryview(buf)[at:at + k])
        at += k
    got = split_segments(tuple(segs), n)
    want = _split_step_by_step(segs, n)
    assert [[bytes(m) for m in part] for part in got] == [[bytes(m) for m in part] for part in want]
