"""virtio-9p's compiled Tread and Twrite (``vmmshim/backends/p9fast.py``, ``p9fast.c``, carried by the share)
against the server's Python path, through the PCI transport and the test driver. Requests are laid out as Linux's
``net/9p/trans_virtio.c`` sends them with zero-copy pages (the T-message readable, split where it crosses a page,
then Twrite's data pages; the R-message's room writable, then Tread's pages, the first from an offset in its
page), in one indirect table each. Every case runs on two guests, one whose share has the compiled path and one
whose share has none, and compares all a guest or the host could see: the used ring, all of guest memory (and the
guard bytes after RAM), the files, the device's error state and the server's counters. The compiled guest's
counter says whether C served. Hostile cases: buffers and tables past RAM, bad size fields, counts past the
buffers, unknown, clunked and reused fids, a fid open read-only getting Twrite, a read-only share."""

import errno
import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.pci import registry
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.virtqueue import DESC_SIZE, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from tests.unit.test_p9_rig import O_RDONLY, O_RDWR, RLERROR, TREAD, TWRITE, P9Error
from vmmshim.backends import close_device_backends, open_device_backends, p9fast
from tests.conftest import require_compiled
from tests.unit.p9_compiled_rig import (DIR, FIDS, FILE_A, FILE_B, MSIZE, PAGE, RAM, RHDR, RO, RW, UNKNOWN, WALKED,
                                        WO, GuardedMemory, Pair, chain, files, linux_read, linux_write,
                                        make_share, pieces)

@pytest.fixture(autouse=True)
def compiled():
    require_compiled(p9fast, "compiled Tread/Twrite")


@pytest.fixture
def pair(tmp_path):
    p = Pair(tmp_path)
    yield p
    p.close()


def test_a_512_kib_read_of_scattered_pages_goes_through_it(pair):
    used, served, descs = pair.both(lambda g: linux_read(g, RO, 1000, MSIZE - RHDR, hdr_at=PAGE - 9,
                                                         rhdr_at=PAGE - 5, in_page=100))
    (_, n), = used
    want = FILE_A[1000:1000 + MSIZE - RHDR]
    assert served == 1 and n == RHDR + len(want)
    assert pair.reply(descs) == (n, TREAD + 1, 7, len(want))
    pages = [pair.c.a.read(a, k) for a, k, f, _ in descs if f & VIRTQ_DESC_F_WRITE]
    assert b"".join(pages)[RHDR:] == want and len(descs) > 128
    assert pair.c.accel.bytes_read == len(want)


@pytest.mark.parametrize("fid,offset,count,buf", [
    (RW, 0, 8192, None), (RO, len(FILE_A) - 100, 4096, None), (RO, len(FILE_A) + 5, 4096, None),
    (RO, 7, 0, 16), (RO, 0, MSIZE, MSIZE + 8192), (RO, 3, 2**32 - 1, 5000), (RO, 0, 5000, 100)])
def test_reads_served_in_c_as_python_answers_them(pair, fid, offset, count, buf):
    """Short reads at the end of the file, zero counts, counts past the buffers and past msize (clamped)."""
    used, served, descs = pair.both(lambda g: linux_read(g, fid, offset, count, buf, in_page=33))
    n = used[0][1] - RHDR
    assert served == 1 and pair.reply(descs) == (RHDR + n, TREAD + 1, 7, n)


def test_a_batch_in_one_notification_goes_through_the_queue_pass(pair):
    """Five chains published before one notification: the queue pass serves the reads and writes in one call,
    stops at the one it does not take (an unknown fid: Python answers Rlerror), then takes the rest."""
    data = os.urandom(2 * PAGE + 5)
    builds = [lambda g: linux_read(g, RO, 0, 3 * PAGE), lambda g: linux_write(g, WO, 10, data),
              lambda g: linux_read(g, UNKNOWN, 0, PAGE), lambda g: linux_read(g, RW, 5, 100, in_page=7),
              lambda g: linux_read(g, RO, len(FILE_A) - 3, PAGE)]
    before = pair.c.accel.served
    for g in pair.guests:
        for build in builds:
            descs = build(g)
            table = g.a.alloc(DESC_SIZE * len(descs), PAGE)
            for k, (addr, n, flags, nxt) in enumerate(descs):
                g.q.write_desc(table, k, addr, n, flags, nxt)
            head = g.q.free.pop(0)
            g.q.write_desc(g.q.desc, head, table, DESC_SIZE * len(descs), VIRTQ_DESC_F_INDIRECT, 0)
            g.q.pending[head] = [head]
            g.q.publish(head)
        g.drv.notify(0)
    used = pair.check()
    assert len(used) == 5 and pair.c.accel.served - before == 4
    assert [n for _, n in used] == [RHDR + 3 * PAGE, RHDR, used[2][1], RHDR + 100, RHDR + 3]
    assert files(pair.c.share)["b.bin"][10:10 + len(data)] == data


def test_writes_reach_the_file_and_the_reply_is_rwrite(pair):
    data = os.urandom(3 * PAGE + 77)
    for offset in (0, 5000, len(FILE_A) + 10):
        used, served, descs = pair.both(lambda g: linux_write(g, RW, offset, data, hdr_at=PAGE - 20, in_page=9))
        assert served == 1 and used[0][1] == RHDR and pair.reply(descs) == (RHDR, TWRITE + 1, 8, len(data))
    path = os.path.join(pair.c.share, "a.bin")
    assert open(path, "rb").read()[5000:5000 + len(data)] == data
    used, served, descs = pair.both(lambda g: linux_write(g, WO, 1, data[:100], rc_at=PAGE - 3))
    assert served == 1 and open(os.path.join(pair.c.share, "b.bin"), "rb").read()[1:101] == data[:100]
    assert pair.c.accel.bytes_written == 3 * len(data) + 100


HOSTILE = {      # case: (build, bend, errno of the Rlerror; None: the queue is broken, 0: no room for an answer)
    "past-ram": (lambda g: linux_read(g, RO, 0, 8192), lambda d: d[:-1] + [(RAM - 100, 4096, *d[-1][2:])], None),
    "table-past-ram": (lambda g: linux_read(g, RO, 0, 100), None, None),
    "size-big": (lambda g: linux_read(g, RO, 0, 100, size=24), None, errno.EPROTO),
    "size-small": (lambda g: linux_write(g, RW, 0, b"x" * 100, size=22), None, errno.EPROTO),
    "size-over-msize": (lambda g: linux_write(g, RW, 0, FILE_A[:MSIZE]), None, errno.EMSGSIZE),
    "count-past-message": (lambda g: linux_write(g, RW, 0, b"x" * 100, count=101), None, errno.EPROTO),
    "unknown-fid": (lambda g: linux_read(g, UNKNOWN, 0, 100), None, errno.EBADF),
    "walked-fid": (lambda g: linux_read(g, WALKED, 0, 100), None, errno.EBADF),
    "dir-fid": (lambda g: linux_read(g, DIR, 0, 100), None, errno.EISDIR),
    "ro-fid-write": (lambda g: linux_write(g, RO, 0, b"x" * 100), None, errno.EBADF),
    "wo-fid-read": (lambda g: linux_read(g, WO, 0, 100), None, errno.EBADF),
    "offset-2^63": (lambda g: linux_read(g, RO, 2**63, 100), None, errno.EINVAL),
    "r-message": (lambda g: linux_read(g, RO, 0, 100, mtype=TREAD + 1), None, errno.EOPNOTSUPP),
    "layout": (lambda g: linux_read(g, RO, 0, 100), lambda d: [d[0][:3] + (5,)] + d[1:], None),
    "room": (lambda g: chain(pieces(g, 23, 0, struct.pack("<IBHIQI", 23, TREAD, 7, RO, 0, 9)),
                             pieces(g, 4)), None, 0),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_requests_fall_back_and_get_the_same_answer(pair, case):
    build, bend, code = HOSTILE[case]
    table = RAM - DESC_SIZE if case == "table-past-ram" else None
    used, served, descs = pair.both(build, bend, table)
    assert served == 0, f"{case} was served in C"
    broken = pair.c.drv.status() & STATUS_DEVICE_NEEDS_RESET
    if code is None:
        assert broken and used == []
    elif code == 0:
        assert not broken and used[0][1] == 0
    else:
        size, rtype, _, ecode = pair.reply(descs)
        assert not broken and used[0][1] == size == RHDR and (rtype, ecode) == (RLERROR, code)


@pytest.mark.parametrize("nseg,served", [(1024, 1), (1025, 0), (1100, 0)])
def test_more_data_segments_than_iov_max_fall_back(pair, nseg, served):
    """Python's one preadv of more than IOV_MAX segments is EINVAL: C leaves it to Python."""
    def build(g):
        base = g.a.alloc(nseg)
        msg = struct.pack("<IBHIQI", 23, TREAD, 7, RO, 0, nseg)
        return chain(pieces(g, 23, 0, msg), pieces(g, RHDR) + [(base + i, 1) for i in range(nseg)])
    used, n, descs = pair.both(build)
    assert n == served and pair.reply(descs)[1] == (TREAD + 1 if served else RLERROR)


def test_the_c_side_refuses_tables_and_sizes_past_ram_itself(pair):
    """What take_indirect already filters, refused again by the C code (called directly)."""
    g = pair.c
    ram = g.mem.ram
    assert g.accel.serve(ram, RAM - DESC_SIZE, 2, MSIZE) is None
    assert g.accel.serve(ram, 2**64 - DESC_SIZE, 2, MSIZE) is None
    assert g.accel.serve(ram, 0, 0, MSIZE) is None and g.accel.serve(ram, 0, 2**31, MSIZE) is None
    descs = linux_read(g, RO, 0, 100)
    table = g.a.alloc(DESC_SIZE * len(descs))
    for k, (addr, n, flags, nxt) in enumerate(descs):
        g.q.write_desc(table, k, addr, n, flags, nxt)
    assert g.accel.serve(ram, table, len(descs), 22) is None           # msize below the header
    assert g.accel.serve(ram, table, len(descs), MSIZE) == RHDR + 100
    for k, addr, n in ((1, RAM - 10, 11), (2, 2**64 - 8, 16), (2, RAM, 1), (0, RAM - 22, 23)):
        g.q.write_desc(table, k, addr, n, descs[k][2], descs[k][3])
        assert g.accel.serve(ram, table, len(descs), MSIZE) is None
        g.q.write_desc(table, k, *descs[k])
    assert g.mem.guard_intact()


def test_no_stale_fd_after_clunk_remove_version_or_reset(pair):
    read = lambda fid: (lambda g: linux_read(g, fid, 0, 64))              # noqa: E731
    acc = pair.c.accel
    fd = acc.bound(RO)[0]
    pair.each(lambda c: (c.clunk(RO), c.walk(0, 20, "b.bin"), c.lopen(20, O_RDONLY)))   # RO's fd number
    assert acc.bound(RO) is None and acc.bound(20) == (fd, True, False) and acc.bound(RW)[1:] == (True, True)
    used, served, descs = pair.both(read(RO))
    assert served == 0 and pair.reply(descs) == (RHDR, RLERROR, 7, errno.EBADF)
    used, served, descs = pair.both(read(20))
    assert served == 1 and pair.c.a.read(descs[-1][0], 64) == FILE_B[:64]
    pair.each(lambda c: (c.walk(0, RO, "b.bin"), c.lopen(RO, O_RDWR)))      # the fid number again, another file
    used, served, descs = pair.both(read(RO))
    assert served == 1 and acc.bound(RO)[1:] == (True, True) and pair.c.a.read(descs[-1][0], 64) == FILE_B[:64]
    pair.each(lambda c: (c.walk(0, 21), c.lcreate(21, "c.bin", O_RDWR)))     # a new file, written, removed
    assert pair.both(lambda g: linux_write(g, 21, 0, b"new"))[1] == 1 and acc.bound(21)[1:] == (True, True)
    pair.each(lambda c: c.remove(21))
    assert acc.bound(21) is None
    assert pair.both(read(21))[1] == 0
    pair.each(lambda c: c.version(MSIZE))
    assert all(acc.bound(f) is None for f in FIDS + (20,))
    for g in pair.guests:
        g.session()
    assert acc.bound(RW) is not None
    pair.c.drv.set_status(0)                        # a device reset
    assert all(acc.bound(f) is None for f in FIDS + (20,))


def test_fids_sharing_a_slot(pair):
    other = RW + p9fast.FID_SLOTS
    pair.each(lambda c: (c.walk(0, other, "b.bin"), c.lopen(other, O_RDONLY)))
    acc = pair.c.accel
    assert acc.bound(RW) is None and acc.bound(other) is not None
    assert pair.both(lambda g: linux_read(g, RW, 0, 100))[1] == 0, "RW lost its slot: Python serves it"
    assert pair.both(lambda g: linux_read(g, other, 0, 100))[1] == 1
    pair.each(lambda c: c.clunk(RW))
    assert acc.bound(other) is not None


def test_read_only_share(tmp_path):
    p = Pair(tmp_path, readonly=True)
    try:
        assert p.c.accel.bound(RW)[1:] == (True, False)      # opened O_RDONLY on a read-only share
        used, served, descs = p.both(lambda g: linux_write(g, RW, 0, b"y" * 100))
        assert served == 0 and p.reply(descs) == (RHDR, RLERROR, 8, errno.EROFS)
        assert open(os.path.join(p.c.share, "a.bin"), "rb").read() == FILE_A
        assert p.both(lambda g: linux_read(g, RW, 0, 100))[1] == 1
    finally:
        p.close()


def test_the_vm_attaches_it_with_p9_compiled(tmp_path):
    share = make_share(tmp_path / "s")
    mem = GuardedMemory(1 << 20)
    for flag, want in ((True, True), ("false", False), (None, False)):
        keys = {"hostdir": share, "guest_memory": mem}
        if flag is not None:
            keys["p9_compiled"] = flag
        o = open_device_backends("virtio-9p", keys)
        assert (o["backend"].accel is not None) == want
        d = registry.create("virtio-9p", o)
        assert d.vdev.server.compiled == want and d.vdev.tag == b"hostdir"
        d.close()
    o = open_device_backends("virtio-9p", {"s": share, "p9_compiled": True})
    close_device_backends(o)
    assert o["backend"]._fds == 0


# ---- differential: the same bent requests to both paths -----------------------------------------------------------
_ADDR = st.sampled_from([0, RAM - 1, RAM, RAM - 16, 2**63, 2**64 - 8, RAM + 4096])
_BEND = st.tuples(st.integers(0, 200), st.sampled_from(["addr", "len", "flags", "next"]), _ADDR,
                  st.integers(0, 2**32 - 1))
_REQ = st.tuples(       # mostly what the compiled path serves, so that bent requests are near ones it serves
    st.sampled_from(["read"] * 3 + ["write"] * 2),
    st.sampled_from(FIDS + (RW, RO) * 4),
    st.one_of(st.integers(0, len(FILE_A) + 100), st.sampled_from([2**63 - 1, 2**63, 2**64 - 1])),
    st.one_of(st.integers(0, 40000), st.sampled_from([MSIZE, 2**32 - 1])),
    st.integers(0, 40000),                                          # buffer bytes (read) or data bytes (write)
    st.tuples(st.integers(0, PAGE - 1), st.integers(0, PAGE - 1), st.integers(0, PAGE - 1)),
    st.one_of(st.none(), st.none(), st.none(), st.integers(0, 2**32 - 1)),     # a size field of its own
    st.one_of(st.just([]), st.just([]), st.just([]), st.lists(_BEND, min_size=1, max_size=2)),
    st.sampled_from([None] * 8 + ["clunk", "reopen"]))


def _quiet(call, *args):
    try:
        call(*args)
    except P9Error:
        pass


def _bend(descs, bends):
    descs = [list(x) for x in descs]
    for at, what, addr, value in bends:
        k = at % len(descs)
        if what == "addr":
            descs[k][0] = addr
        elif what == "len":
            descs[k][1] = value % (RAM + 0x2000)
        elif what == "flags":
            descs[k][2] = value & (VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE | (0x100 if value & 8 else 0))
        else:
            descs[k][3] = value % (len(descs) + 2)
    return [tuple(x) for x in descs]


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(reqs=st.lists(_REQ, min_size=1, max_size=4))
def test_same_answers_with_and_without_it(tmp_path_factory, reqs):
    base = tmp_path_factory.mktemp("diff")
    p = Pair(base)
    gone = set()
    try:
        for op, fid, offset, count, nbytes, (h, r, u), size, bends, fids in reqs:
            if p.c.drv.status() & STATUS_DEVICE_NEEDS_RESET:
                break                               # a broken queue serves nothing more, either way
            if fids:
                p.each(lambda c: _quiet(c.clunk, fid))
                if fids == "reopen":
                    p.each(lambda c: (c.walk(0, fid, "b.bin"), c.lopen(fid, O_RDWR)))
                (gone.add if fids == "clunk" else gone.discard)(fid)
            if op == "read":
                build = lambda g: linux_read(g, fid, offset, count, nbytes, h, r, u,     # noqa: E731
                                             size=23 if size is None else size)
            else:
                data = bytes([nbytes & 0xFF]) * nbytes
                build = lambda g: linux_write(g, fid, offset, data, min(count, nbytes) if size is None  # noqa: E731
                                              else count, h, r, u, size=size)
            served = p.both(build, (lambda d: _bend(d, bends)) if bends else None)[1]
            if fid == RW and fid not in gone and offset < 2**62 and size is None and not bends:
                assert served == 1, "a plain read or write on an open fid was not served in C"
            if p.c.a.next > RAM - (1 << 20):
                break
    finally:
        p.close()
        shutil.rmtree(str(base), ignore_errors=True)
