"""The share's walls, with openat2 and with the O_NOFOLLOW walk: ``..`` stays inside, no symlink is followed (an
absolute one, one to ``..``, one swapped in after the walk), no device node is made, a read-only share refuses
every change, the fid table and the host fds are bounded, malformed messages get Rlerror; and hypothesis throws
random and mutated messages at a server, checking that nothing outside the share (and nothing at all on a
read-only share) changes."""

import errno
import os
import stat
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.p9.server import P9Server
from tests.unit.test_p9_rig import (AT_REMOVEDIR, O_CREAT, O_RDONLY, O_RDWR, O_TRUNC, O_WRONLY, RLERROR, TREAD,
                                       TVERSION, TWALK, TWRITE, P9Client, P9Error, server_transport, session)
from vmmshim.backends.p9fs import HostShare
from vmmshim.backends.p9resolve import NOFOLLOW, OPENAT2, Resolver, check_name

RESOLVERS = [NOFOLLOW, OPENAT2]


def _errno(fn, *a, **kw):
    with pytest.raises(P9Error) as e:
        fn(*a, **kw)
    return e.value.errno


def snapshot(root):
    """{relative path: (kind, mode, size, mtime_ns, content or link)} of everything under ``root``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            s = os.lstat(p)
            body = (os.readlink(p) if stat.S_ISLNK(s.st_mode) else
                    open(p, "rb").read() if stat.S_ISREG(s.st_mode) else None)
            out[os.path.relpath(p, root)] = (stat.S_IFMT(s.st_mode), s.st_mode, s.st_size, s.st_mtime_ns, body)
    return out


def lab(tmp):
    """tmp/share (the share) beside tmp/outside (a secret), with symlinks out of the share."""
    share, outside = os.path.join(tmp, "share"), os.path.join(tmp, "outside")
    os.makedirs(os.path.join(share, "dir"))
    os.makedirs(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"SECRET")
    os.chmod(os.path.join(outside, "secret"), 0o600)
    with open(os.path.join(share, "file"), "wb") as f:
        f.write(b"inside")
    os.symlink(outside, os.path.join(share, "abs"))                       # absolute, to a directory
    os.symlink(os.path.join(outside, "secret"), os.path.join(share, "abs-secret"))
    os.symlink("..", os.path.join(share, "up"))                           # relative, to the parent
    os.symlink("../outside/secret", os.path.join(share, "dir", "rel-secret"))
    return share, outside


@pytest.fixture(params=RESOLVERS)
def walls(request, tmp_path):
    share, outside = lab(str(tmp_path))
    before = snapshot(outside)
    srv, c = session(share, resolver=request.param)
    assert srv.fs.resolver == request.param
    yield srv, c, share, outside
    assert snapshot(outside) == before, "something outside the share changed"
    assert srv.errors == []


def test_dotdot_stays_in_the_share(walls):
    srv, c, share, outside = walls
    root = c.getattr(0)["qid"]
    assert c.walk(0, 1, "..", "..", "..") == [root] * 3
    c.walk(0, 2, "dir", "..", "..", "dir")
    assert c.getattr(2)["qid"] == c.walk(0, 3, "dir")[0]
    for bad in ("../outside", "dir/..", "/", "", "a\0b", "x" * 256):
        assert _errno(c.walk, 0, 4, bad) in (errno.EINVAL, errno.ENAMETOOLONG)
    assert c.walk(0, 4, "..", "dir", "..", "outside") == [root, c.walk(0, 5, "dir")[0], root]   # stops there
    assert _errno(c.clunk, 4) == errno.EBADF


@pytest.mark.parametrize("link", ["abs", "up"])
def test_a_symlink_is_a_leaf_never_a_way_out(walls, link):
    srv, c, share, outside = walls
    (q,) = c.walk(0, 1, link)
    assert q[0] == 0x02                                    # QTSYMLINK
    assert stat.S_ISLNK(c.getattr(1)["mode"])
    assert c.walk(0, 2, link, "secret") == [q]           # stops at the symlink: no qid for "secret"
    assert _errno(c.walk, 1, 3, "secret") == errno.ENOTDIR
    assert _errno(c.lopen, 1) == errno.ELOOP
    assert _errno(c.lcreate, 1, "x") == errno.ENOTDIR
    assert _errno(c.mkdir, 1, "x") == errno.ENOTDIR


def test_symlinks_to_a_file_outside_are_not_opened(walls):
    srv, c, share, outside = walls
    c.walk(0, 1, "abs-secret")
    c.walk(0, 2, "dir", "rel-secret")
    for fid in (1, 2):
        for flags in (O_RDONLY, O_RDWR, O_WRONLY | O_TRUNC):
            assert _errno(c.lopen, fid, flags) == errno.ELOOP
        assert _errno(c.setattr, fid, 0x8, size=0) == errno.ELOOP
        assert _errno(c.setattr, fid, 0x1, mode=0o777) == errno.EOPNOTSUPP
        c.setattr(fid, 0x10 | 0x20 | 0x80 | 0x100, atime=(5, 0), mtime=(5, 0))   # the link's own times
    c.walk(0, 3)
    assert _errno(c.lcreate, 3, "abs-secret", O_RDWR | O_CREAT | O_TRUNC) == errno.ELOOP
    c.link(0, 1, "hard")                                   # links the symlink itself
    assert os.path.islink(os.path.join(share, "hard"))


def test_a_symlink_swapped_in_after_the_walk_is_not_followed(walls):
    srv, c, share, outside = walls
    c.walk(0, 1, "file")
    c.walk(0, 2, "file")
    c.walk(0, 5, "file")
    c.walk(0, 3, "dir")
    os.rename(os.path.join(share, "file"), os.path.join(share, "file.old"))
    os.symlink(os.path.join(outside, "secret"), os.path.join(share, "file"))
    os.rename(os.path.join(share, "dir"), os.path.join(share, "dir.old"))
    os.symlink(outside, os.path.join(share, "dir"))
    assert _errno(c.lopen, 1, O_RDONLY) == errno.ELOOP
    assert _errno(c.lopen, 2, O_WRONLY | O_TRUNC) == errno.ELOOP
    assert _errno(c.setattr, 5, 0x8, size=0) == errno.ELOOP
    assert _errno(c.setattr, 5, 0x1, mode=0o666) == errno.EOPNOTSUPP
    assert stat.S_ISLNK(c.getattr(5)["mode"])
    # the directory fid holds the directory itself: it went on being dir.old, inside the share
    assert _errno(c.walk, 3, 4, "secret") == errno.ENOENT
    c.lcreate(3, "made-here")
    assert os.path.exists(os.path.join(share, "dir.old", "made-here"))
    c.walk(0, 6)
    c.lopen(6)
    names = {e[3] for e in c.listdir(6)}
    assert b"secret" not in names and b"dir" in names


def test_no_device_nodes_no_setuid(walls):
    srv, c, share, outside = walls
    for mode in (stat.S_IFCHR | 0o666, stat.S_IFBLK | 0o666, stat.S_IFDIR | 0o755):
        assert _errno(c.mknod, 0, "dev", mode, 1, 3) == errno.EPERM
    assert not os.path.lexists(os.path.join(share, "dev"))
    c.walk(0, 1)
    c.lcreate(1, "suid", O_RDWR | O_CREAT, 0o6755)
    c.mkdir(0, "sgid", 0o2775)
    assert stat.S_IMODE(os.stat(os.path.join(share, "suid")).st_mode) & 0o6000 == 0
    assert stat.S_IMODE(os.stat(os.path.join(share, "sgid")).st_mode) & 0o6000 == 0
    c.symlink(0, "evil", os.path.join(outside, "secret"))   # may be made, is never followed
    c.walk(0, 2, "evil")
    assert _errno(c.lopen, 2) == errno.ELOOP


def test_names_that_are_not_one_component(walls):
    srv, c, share, outside = walls
    for name in ("..", ".", "a/b", "", "x\0"):
        assert _errno(c.mkdir, 0, name) == errno.EINVAL
        assert _errno(c.unlinkat, 0, name, AT_REMOVEDIR) == errno.EINVAL
        assert _errno(c.renameat, 0, "file", 0, name) == errno.EINVAL
    assert _errno(c.symlink, 0, "z", "") == errno.EINVAL
    assert _errno(c.remove, 0) == errno.EBUSY          # not the root (and the fid is clunked)
    assert 0 not in srv.fids


@pytest.mark.parametrize("resolver", RESOLVERS)
def test_a_readonly_share_refuses_every_change(tmp_path, resolver):
    share, outside = lab(str(tmp_path))
    before = snapshot(str(tmp_path))
    srv, c = session(share, readonly=True, resolver=resolver)
    c.walk(0, 1, "file")
    c.walk(0, 2, "dir")
    c.walk(0, 3)
    attempts = [
        (c.lopen, 1, O_WRONLY), (c.lopen, 1, O_RDWR), (c.lopen, 1, O_RDONLY | O_TRUNC),
        (c.lcreate, 3, "new"), (c.mkdir, 0, "d"), (c.symlink, 0, "s", "file"),
        (c.mknod, 0, "f", stat.S_IFIFO | 0o644), (c.link, 0, 1, "h"), (c.renameat, 0, "file", 0, "moved"),
        (c.rename, 1, 0, "moved"), (c.unlinkat, 0, "file"), (c.unlinkat, 0, "dir", AT_REMOVEDIR),
        (c.setattr, 1, 0x1, 0o777), (c.setattr, 1, 0x8, 0, 0, 0, 0), (c.setattr, 1, 0x10 | 0x20),
        (c.remove, 2),
    ]
    for fn, *args in attempts:
        assert _errno(fn, *args) == errno.EROFS, fn.__name__
    c.lopen(1)
    assert c.read(1, 0, 100) == b"inside"
    assert _errno(c.write, 1, 0, b"x") == errno.EROFS
    assert snapshot(str(tmp_path)) == before
    assert srv.errors == []


def test_the_fid_table_is_bounded(tmp_path):
    share, _ = lab(str(tmp_path))
    srv, c = session(share, max_fids=4)
    for fid in (1, 2, 3):
        c.walk(0, fid, "dir")
    assert _errno(c.walk, 0, 4, "dir") == errno.ENFILE
    assert _errno(c.rpc, 30, struct.pack("<II", 0, 4) + b"\0\0") == errno.ENFILE    # xattrwalk
    c.clunk(3)
    c.walk(0, 4, "file")


def test_host_fds_are_bounded(tmp_path):
    share, _ = lab(str(tmp_path))
    for i in range(12):
        os.mkdir(os.path.join(share, f"d{i}"))
    srv = P9Server(HostShare(share, max_fds=6))
    c = P9Client(server_transport(srv))
    c.version()
    c.attach(0)
    codes = []
    for i in range(12):
        try:
            c.walk(0, 10 + i, f"d{i}")
        except P9Error as e:
            codes.append(e.errno)
    assert codes and set(codes) == {errno.EMFILE} and srv.fs._fds <= 6
    for fid in list(srv.fids):
        if fid:
            c.clunk(fid)
    assert srv.fs._fds == 1


def _lerror(c, req, room=4096):
    reply = c.transport(req, room)
    size, rtype, tag = struct.unpack_from("<IBH", reply)
    assert size == len(reply) == 11 and rtype == RLERROR, reply
    return tag, struct.unpack_from("<I", reply, 7)[0]


def test_malformed_messages_get_rlerror(tmp_path):
    share, _ = lab(str(tmp_path))
    srv, c = session(share)
    hdr = struct.Struct("<IBH")
    cases = [
        (hdr.pack(1000, TWALK, 5) + bytes(10), 5, errno.EPROTO),             # size past the message
        (hdr.pack(3, TWALK, 5), 5, errno.EPROTO),                            # size below the header
        (hdr.pack(11, TWALK, 5) + bytes(4), 5, errno.EPROTO),                # body too short
        (hdr.pack(21, TWALK, 5) + struct.pack("<IIHH", 0, 1, 1, 50), 5, errno.EPROTO),   # string too long
        (hdr.pack(19, TWALK, 5) + struct.pack("<IIHH", 0, 1, 60000, 0), 5, errno.EPROTO),
        (hdr.pack(9 + 8 + 17 * 3, TWALK, 5) + struct.pack("<IIH", 0, 1, 17) + b"\1\0a" * 17, 5, errno.EINVAL),
        (hdr.pack(23, TWRITE, 6) + struct.pack("<IQI", 0, 0, 100), 6, errno.EPROTO),   # count past the data
        (hdr.pack(15, TWRITE, 6) + bytes(8), 6, errno.EPROTO),
        (hdr.pack(7, TREAD, 7), 7, errno.EPROTO),
        (b"\1\2", 0xFFFF, errno.EPROTO),                                     # no header at all
        (hdr.pack(1 << 20, TVERSION, 8) + bytes(1 << 20), 8, errno.EMSGSIZE),
    ]
    for req, tag, code in cases:
        assert _lerror(c, req) == (tag, code), req[:12]
    assert srv.serve([], [memoryview(bytearray(64))]) == 11
    assert srv.serve([memoryview(bytearray(64))], [memoryview(bytearray(10))]) == 0   # no room to answer
    assert srv.errors == [] and c.getattr(0)["qid"][0] == 0x80


def test_check_name_and_resolvers(tmp_path):
    for bad in (b"", b"a/b", b"..", b".", b"\0", "str"):
        with pytest.raises(OSError):
            check_name(bad)
    check_name(b"..", dots=True)
    share, outside = lab(str(tmp_path))
    fd = os.open(share, os.O_PATH | os.O_DIRECTORY)
    try:
        for how in RESOLVERS:
            r = Resolver(how)
            for name, flags in ((b"abs", os.O_RDONLY), (b"up", os.O_RDONLY | os.O_DIRECTORY),
                                (b"abs-secret", os.O_RDONLY)):
                with pytest.raises(OSError) as e:
                    os.close(r.open(fd, name, flags))
                assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
            lfd = r.open(fd, b"abs", os.O_PATH)
            assert stat.S_ISLNK(os.stat(lfd).st_mode)
            os.close(lfd)
            with pytest.raises(OSError):
                r.open(fd, b"..", os.O_PATH)
            with pytest.raises(OSError):
                r.open(fd, b"dir/../..", os.O_PATH)
        if Resolver().probe(fd) == OPENAT2:     # the kernel's second lock: more than one component, still beneath
            r = Resolver(OPENAT2)
            with pytest.raises(OSError) as e:
                r._openat2(fd, b"dir/../../outside", os.O_PATH, 0)
            assert e.value.errno == errno.EXDEV
            with pytest.raises(OSError) as e:
                r._openat2(fd, b"abs/secret", os.O_RDONLY, 0)
            assert e.value.errno == errno.ELOOP
    finally:
        os.close(fd)


# ---- hypothesis: random and mutated messages -------------------------------------------------------------------------
def _script(c):
    """A valid session that touches everything: the messages a hostile guest starts from."""
    body = struct.Struct
    s = lambda b: struct.pack("<H", len(b)) + b   # noqa: E731
    return [
        (TWALK, body("<IIH").pack(0, 1, 1) + s(b"dir")),
        (14, body("<I").pack(1) + s(b"f") + body("<III").pack(O_RDWR | O_CREAT, 0o644, 0)),   # lcreate
        (TWRITE, body("<IQI").pack(1, 0, 5) + b"hello"),
        (TWALK, body("<IIH").pack(0, 2, 1) + s(b"abs")),
        (12, body("<II").pack(2, O_RDWR)),                                                   # lopen
        (TWALK, body("<IIH").pack(0, 3, 2) + s(b"up") + s(b"outside")),
        (72, body("<I").pack(0) + s(b"d") + body("<II").pack(0o755, 0)),                      # mkdir
        (74, body("<I").pack(0) + s(b"file") + body("<I").pack(0) + s(b"file2")),             # renameat
        (26, body("<IIIIIQQQQQ").pack(0, 0x1F, 0o777, 0, 0, 0, 0, 0, 0, 0)),                  # setattr
        (16, body("<I").pack(0) + s(b"ln") + s(b"/etc/passwd") + body("<I").pack(0)),         # symlink
        (76, body("<I").pack(0) + s(b"file2") + body("<I").pack(0)),                          # unlinkat
        (40, body("<IQI").pack(1, 0, 4096)),                                                  # readdir
        (TREAD, body("<IQI").pack(1, 0, 4096)),
        (120, body("<I").pack(1)),                                                            # clunk
    ]


def _mutate(req, data):
    kind = data.draw(st.sampled_from(["flip", "truncate", "size", "extend", "keep"]))
    b = bytearray(req)
    if kind == "flip" and len(b) > 7:
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        b = b[:data.draw(st.integers(0, len(b)))]
    elif kind == "size" and len(b) >= 4:
        struct.pack_into("<I", b, 0, data.draw(st.integers(0, (1 << 32) - 1)))
    elif kind == "extend":
        b += data.draw(st.binary(max_size=32))
    return bytes(b)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), readonly=st.booleans(), resolver=st.sampled_from(RESOLVERS),
       noise=st.lists(st.tuples(st.sampled_from([6, 8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70,
                                                  72, 74, 76, 100, 104, 108, 110, 116, 118, 120, 122, 255]),
                                st.binary(max_size=40)), max_size=6))
def test_hostile_messages_change_nothing_they_should_not(data, readonly, resolver, noise):
    with tempfile.TemporaryDirectory() as tmp:
        share, outside = lab(tmp)
        before_out, before_share = snapshot(outside), snapshot(share)
        srv = P9Server(HostShare(share, readonly=readonly, resolver=resolver), max_fids=64)
        c = P9Client(server_transport(srv))
        c.version(8192)
        c.attach(0)
        msgs = [(t, b) for t, b in _script(c)] + noise
        for i, (t, body) in enumerate(msgs):
            req = _mutate(struct.pack("<IBH", 7 + len(body), t, i) + body, data)
            room = data.draw(st.sampled_from([11, 64, 8192]))
            out = bytearray(room)
            n = srv.serve([memoryview(bytearray(req))], [memoryview(out)])
            assert 7 <= n <= room
            size, rtype, _ = struct.unpack_from("<IBH", out)
            assert size == n and (rtype == RLERROR or (len(req) >= 5 and rtype == req[4] + 1))
            if rtype == RLERROR:
                assert n == 11 and struct.unpack_from("<I", out, 7)[0] > 0
        assert srv.errors == []
        srv.reset()
        assert srv.fs._fds == 1
        srv.fs.close()
        assert snapshot(outside) == before_out
        if readonly:
            assert snapshot(share) == before_share
