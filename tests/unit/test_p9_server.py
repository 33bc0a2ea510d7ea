"""The 9P2000.L server over a share in a temporary directory, driven by the tests' client (``test_p9_rig.py``: its
messages packed with ``struct``, not with the server's codecs): every operation Linux's v9fs uses, checked against
the host, and the zero-copy layouts Linux's virtio transport sends (the Rread header and the data in separate
buffers)."""

import errno
import os
import stat
import struct

import pytest

from tests.unit.test_p9_rig import (AT_REMOVEDIR, O_APPEND, O_CREAT, O_DIRECTORY, O_EXCL, O_RDONLY, O_RDWR,
                                    O_TRUNC, O_WRONLY, TAUTH, TFLUSH, TGETLOCK, TLOCK, TREAD, TWRITE, TXATTRCREATE,
                                    TXATTRWALK, P9Error, qtype, s, session)


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "hello.txt").write_bytes(b"hello, 9p\n")
    (root / "sub").mkdir()
    (root / "sub" / "inner.bin").write_bytes(bytes(range(256)) * 64)
    return root


def test_version_negotiates_msize_and_clunks(share):
    srv, c = session(share)
    assert c.version(1 << 30) == (128 * 4096, b"9P2000.L")
    assert c.version(8192) == (8192, b"9P2000.L")
    c.attach(0)
    c.walk(0, 1)
    assert c.version(8192, b"9P2000.u") == (8192, b"unknown")
    assert srv.fids == {}
    with pytest.raises(P9Error) as e:
        c.version(512)
    assert e.value.errno == errno.EINVAL


def test_attach_walk_getattr(share):
    srv, c = session(share)
    qids = c.walk(0, 1, "sub", "inner.bin")
    assert [qtype(q) for q in qids] == [0x80, 0]
    st = os.lstat(share / "sub" / "inner.bin")
    a = c.getattr(1)
    assert a["qid"] == qids[-1] and struct.unpack("<BIQ", a["qid"])[2] & (1 << 48) - 1 == st.st_ino
    assert (a["mode"], a["size"], a["nlink"], a["uid"]) == (st.st_mode, st.st_size, st.st_nlink, st.st_uid)
    assert a["mtime_sec"] * 10**9 + a["mtime_nsec"] == st.st_mtime_ns and a["valid"] == 0x7FF
    c.walk(0, 2)                                          # nwname 0 clones
    assert c.getattr(2)["qid"][0] == 0x80
    assert c.walk(0, 3, "sub", "nope", "x") == [qids[0]]  # partial: qids so far, newfid unused
    with pytest.raises(P9Error) as e:
        c.clunk(3)
    assert e.value.errno == errno.EBADF
    with pytest.raises(P9Error) as e:
        c.walk(0, 3, "nope")
    assert e.value.errno == errno.ENOENT
    c.walk(2, 2, "sub")                                   # in place
    assert c.getattr(2)["qid"] == qids[0]
    with pytest.raises(P9Error) as e:
        c.walk(0, 1, "sub")                               # newfid in use
    assert e.value.errno == errno.EINVAL
    assert srv.errors == []


def test_create_write_read_and_host_sees_it(share):
    srv, c = session(share)
    c.walk(0, 1)
    c.lcreate(1, "new.txt", O_RDWR | O_CREAT | O_EXCL, 0o640)
    assert c.write(1, 0, b"abcdef") == 6
    assert c.write(1, 3, b"XYZW") == 4
    assert (share / "new.txt").read_bytes() == b"abcXYZW"
    assert stat.S_IMODE(os.stat(share / "new.txt").st_mode) == 0o640
    assert c.read(1, 1, 100) == b"bcXYZW" and c.read(1, 100, 10) == b""
    c.fsync(1)
    c.fsync(1, 1)
    c.clunk(1)
    c.walk(0, 1)
    with pytest.raises(P9Error) as e:
        c.lcreate(1, "new.txt", O_RDWR | O_CREAT | O_EXCL)
    assert e.value.errno == errno.EEXIST
    c.walk(0, 2, "new.txt")
    c.lopen(2, O_WRONLY | O_APPEND)
    c.write(2, 0, b"!")
    assert (share / "new.txt").read_bytes() == b"abcXYZW!"
    c.walk(0, 3, "new.txt")
    c.lopen(3, O_WRONLY | O_TRUNC)
    assert (share / "new.txt").read_bytes() == b""
    with pytest.raises(P9Error) as e:
        c.read(3, 0, 1)                                  # opened write-only
    assert e.value.errno == errno.EBADF
    with pytest.raises(P9Error) as e:
        c.lopen(3)                                       # already open
    assert e.value.errno == errno.EINVAL
    assert srv.errors == []


def test_read_and_write_in_place_in_split_buffers(share):
    """Linux's zero-copy layouts: the Rread header in an 11-byte buffer and the data in page buffers; Twrite's
    header in one buffer and its data in others."""
    srv, c = session(share)
    c.walk(0, 1, "sub", "inner.bin")
    c.lopen(1)
    hdr, p1, p2 = bytearray(11), bytearray(4096), bytearray(4096)
    req = struct.pack("<IBHIQI", 23, TREAD, 7, 1, 100, 6000)
    n = srv.serve([memoryview(req)], [memoryview(hdr), memoryview(p1), memoryview(p2)])
    assert n == 11 + 6000 and struct.unpack("<IBHI", hdr) == (n, TREAD + 1, 7, 6000)
    data = (share / "sub" / "inner.bin").read_bytes()
    assert bytes(p1) + bytes(p2[:1904]) == data[100:6100] and p2[1904:] == bytes(2192)
    c.walk(0, 2)
    c.lcreate(2, "w.bin")
    payload = os.urandom(9000)
    head = struct.pack("<IBHIQI", 23 + len(payload), TWRITE, 8, 2, 0, len(payload))
    out = bytearray(64)
    n = srv.serve([memoryview(head), memoryview(payload[:5000]), memoryview(payload[5000:])], [memoryview(out)])
    assert struct.unpack_from("<IBHI", out) == (11, TWRITE + 1, 8, 9000) and n == 11
    assert (share / "w.bin").read_bytes() == payload


def test_read_count_is_bounded_by_msize_and_room(share):
    srv, c = session(share)
    c.version(4096)
    c.attach(0)
    c.walk(0, 1, "sub", "inner.bin")
    c.lopen(1)
    assert len(c.read(1, 0, 100000, room=100000)) == 4096 - 11
    assert len(c.read(1, 0, 100000, room=111)) == 100


def test_directories_listing_and_paging(share):
    srv, c = session(share)
    names = [f"f{i:03d}" for i in range(40)]
    for n in names:
        (share / "sub" / n).write_bytes(b"")
    os.symlink("inner.bin", share / "sub" / "lnk")
    c.walk(0, 1, "sub")
    c.lopen(1, O_RDONLY | O_DIRECTORY)
    whole = c.readdir(1)
    got = {n: t for _, _, t, n in whole}
    assert set(got) == {b".", b"..", b"inner.bin", b"lnk", *(n.encode() for n in names)}
    assert got[b"."] == 4 and got[b"lnk"] == 10 and got[b"inner.bin"] == 8
    assert [q[0] for q, _, _, n in whole if n == b"lnk"] == [0x02]
    paged = c.listdir(1, count=100)                     # a few entries per call, by offset
    assert [e[3] for e in paged] == [e[3] for e in whole]
    c.mkdir(1, "d", 0o700)
    assert stat.S_ISDIR(os.stat(share / "sub" / "d").st_mode)
    c.walk(0, 2)
    with pytest.raises(P9Error) as e:
        c.lopen(2, O_WRONLY)
    assert e.value.errno == errno.EISDIR
    c.walk(0, 3, "hello.txt")
    with pytest.raises(P9Error) as e:
        c.lopen(3, O_DIRECTORY)
    assert e.value.errno == errno.ENOTDIR
    assert srv.errors == []


def test_symlink_readlink_link_rename_unlink(share):
    srv, c = session(share)
    c.walk(0, 1, "sub")
    assert qtype(c.symlink(1, "to-inner", "inner.bin")) == 0x02
    assert os.readlink(share / "sub" / "to-inner") == "inner.bin"
    c.walk(1, 2, "to-inner")
    assert c.readlink(2) == b"inner.bin"
    c.walk(1, 3, "inner.bin")
    c.link(0, 3, "hard")
    assert os.stat(share / "hard").st_ino == os.stat(share / "sub" / "inner.bin").st_ino
    c.renameat(1, "inner.bin", 0, "moved.bin")          # fid 3 follows the file
    assert not (share / "sub" / "inner.bin").exists()
    c.lopen(3)
    assert c.read(3, 0, 4) == bytes(range(4))
    c.walk(0, 4, "hello.txt")
    c.rename(4, 1, "hi.txt")
    assert (share / "sub" / "hi.txt").read_bytes() == b"hello, 9p\n"
    assert c.getattr(4)["size"] == 10
    c.mkdir(0, "gone")
    c.unlinkat(0, "gone", AT_REMOVEDIR)
    c.unlinkat(0, "hard")
    assert not (share / "gone").exists() and not (share / "hard").exists()
    with pytest.raises(P9Error) as e:
        c.unlinkat(0, "sub")
    assert e.value.errno in (errno.EISDIR, errno.EPERM)
    with pytest.raises(P9Error) as e:
        c.unlinkat(0, "x", 0x100)
    assert e.value.errno == errno.EINVAL
    c.walk(1, 5, "hi.txt")
    c.remove(5)
    assert not (share / "sub" / "hi.txt").exists() and 5 not in srv.fids
    assert srv.errors == []


def test_renamed_directory_keeps_its_fids(share):
    srv, c = session(share)
    c.walk(0, 1, "sub")
    c.walk(0, 2, "sub", "inner.bin")
    c.mkdir(0, "other")
    c.walk(0, 3, "other")
    c.renameat(0, "sub", 3, "sub2")
    assert c.getattr(2)["size"] == 256 * 64
    c.lopen(2)
    assert c.read(2, 0, 2) == b"\0\1"
    c.lcreate(1, "after.txt")
    assert (share / "other" / "sub2" / "after.txt").exists()
    c.walk(0, 4, "other", "sub2", "..", "..")
    assert c.getattr(4)["qid"] == c.getattr(0)["qid"]


def test_setattr_mode_size_times(share):
    srv, c = session(share)
    c.walk(0, 1, "hello.txt")
    c.setattr(1, 0x1, mode=0o600)
    assert stat.S_IMODE(os.stat(share / "hello.txt").st_mode) == 0o600
    c.setattr(1, 0x8, size=5)
    assert (share / "hello.txt").read_bytes() == b"hello"
    c.setattr(1, 0x10 | 0x20 | 0x80 | 0x100, atime=(1000, 5), mtime=(2000, 7))
    st = os.stat(share / "hello.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1000 * 10**9 + 5, 2000 * 10**9 + 7)
    c.setattr(1, 0x20)                                   # mtime now, atime kept
    st2 = os.stat(share / "hello.txt")
    assert st2.st_atime_ns == st.st_atime_ns and st2.st_mtime_ns > st.st_mtime_ns
    c.setattr(1, 0x1, mode=0o4755)                       # setuid is never set
    assert stat.S_IMODE(os.stat(share / "hello.txt").st_mode) == 0o755
    c.walk(0, 2, "sub")
    c.setattr(2, 0x1, mode=0o711)
    assert stat.S_IMODE(os.stat(share / "sub").st_mode) == 0o711
    with pytest.raises(P9Error) as e:
        c.setattr(1, 0x10 | 0x80, atime=(1, 10**9))
    assert e.value.errno == errno.EINVAL
    assert srv.errors == []


def test_statfs_locks_xattrs_and_the_rest(share):
    srv, c = session(share)
    v = os.statvfs(share)
    f = c.statfs(0)
    assert f[0] == 0x01021997 and f[1] == v.f_frsize and f[2] == v.f_blocks and f[8] == v.f_namemax
    c.walk(0, 1, "hello.txt")
    c.lopen(1, O_RDWR)
    lock = struct.pack("<IBIQQI", 1, 1, 0, 0, 0, 42) + s("client")
    assert c.rpc(TLOCK, lock) == b"\0"
    r = c.rpc(TGETLOCK, struct.pack("<IBQQI", 1, 0, 5, 10, 42) + s("client"))
    assert r == struct.pack("<BQQI", 2, 5, 10, 42) + s("client")
    assert c.rpc(TXATTRWALK, struct.pack("<II", 1, 9) + s("")) == struct.pack("<Q", 0)
    assert c.read(9, 0, 100) == b""
    c.clunk(9)
    with pytest.raises(P9Error) as e:
        c.rpc(TXATTRWALK, struct.pack("<II", 1, 9) + s("security.capability"))
    assert e.value.errno == errno.ENODATA
    with pytest.raises(P9Error) as e:
        c.rpc(TXATTRCREATE, struct.pack("<I", 1) + s("user.x") + struct.pack("<QI", 1, 0))
    assert e.value.errno == errno.EOPNOTSUPP
    assert c.rpc(TFLUSH, struct.pack("<H", 3)) == b""
    for t in (TAUTH, 112, 114, 124, 126, 101, 250):
        with pytest.raises(P9Error) as e:
            c.rpc(t, b"\0" * 20)
        assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(P9Error) as e:
        c.clunk(77)
    assert e.value.errno == errno.EBADF
    c.mknod(0, "fifo", stat.S_IFIFO | 0o644)
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    c.walk(0, 2, "fifo")
    with pytest.raises(P9Error) as e:
        c.lopen(2)                                     # never opened (it would block the queue)
    assert e.value.errno == errno.EOPNOTSUPP
    assert srv.errors == []


def test_reset_and_clunk_give_every_host_fd_back(share):
    srv, c = session(share)
    fs = srv.fs
    c.walk(0, 1, "sub")
    c.walk(0, 2, "sub", "inner.bin")
    c.lopen(2)
    c.walk(1, 3)
    c.lopen(3)
    assert fs._fds == 4                                # root, sub (one node for both fids), two open files
    c.clunk(2)
    c.clunk(3)
    c.clunk(1)
    assert fs._fds == 1 and len(fs._entries) == 0
    c.walk(0, 1, "sub")
    srv.reset()
    assert srv.fids == {} and fs._fds == 1
    fs.close()
    assert fs._fds == 0
