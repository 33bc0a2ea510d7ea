"""The 9P2000.L client the p9 tests drive the server and the device with: every message packed with ``struct``
here, from the layouts of Linux's ``net/9p/client.c``, not with the server's codecs (so a codec bug cannot hide
behind itself); and a check that what it packs is what the construct declarations describe."""

import os
import struct

from bhyve_devices.p9 import messages as M
from bhyve_devices.p9.server import P9Server
from vmmshim.backends.p9fs import HostShare

NOFID = 0xFFFFFFFF
(TLERROR, RLERROR, TSTATFS, TLOPEN, TLCREATE, TSYMLINK, TMKNOD, TRENAME, TREADLINK, TGETATTR, TSETATTR,
 TXATTRWALK, TXATTRCREATE, TREADDIR, TFSYNC, TLOCK, TGETLOCK, TLINK, TMKDIR, TRENAMEAT, TUNLINKAT, TVERSION,
 TAUTH, TATTACH, TFLUSH, TWALK, TREAD, TWRITE, TCLUNK, TREMOVE) = (
    6, 7, 8, 12, 14, 16, 18, 20, 22, 24, 26, 30, 32, 40, 50, 52, 54, 70, 72, 74, 76, 100, 102, 104, 108, 110, 116,
    118, 120, 122)
O_RDONLY, O_WRONLY, O_RDWR, O_CREAT, O_EXCL, O_TRUNC, O_APPEND, O_DIRECTORY = (0, 1, 2, 0o100, 0o200, 0o1000,
                                                                              0o2000, 0o200000)
AT_REMOVEDIR = 0x200


def s(b):
    """A 9P string."""
    b = b if isinstance(b, bytes) else b.encode()
    return struct.pack("<H", len(b)) + b


class P9Error(Exception):
    def __init__(self, code):
        super().__init__(code, os.strerror(code))
        self.errno = code


class P9Client:
    """A 9P2000.L client; ``transport(request bytes, room) -> reply bytes``."""

    def __init__(self, transport, msize=65536):
        self.transport = transport
        self.tag = 0
        self.msize = msize

    def raw(self, mtype, body, room=None, tag=None):
        tag = self.tag if tag is None else tag
        self.tag = (self.tag + 1) & 0x7FFF
        req = struct.pack("<IBH", 7 + len(body), mtype, tag) + body
        reply = self.transport(req, room or self.msize)
        size, rtype, rtag = struct.unpack_from("<IBH", reply)
        assert size == len(reply) and rtag == tag, (size, len(reply), rtag, tag)
        assert rtype in (mtype + 1, RLERROR), (mtype, rtype)
        return rtype, reply[7:]

    def rpc(self, mtype, body=b"", room=None):
        rtype, rbody = self.raw(mtype, body, room)
        if rtype == RLERROR:
            assert len(rbody) == 4
            raise P9Error(struct.unpack("<I", rbody)[0])
        return rbody

    def version(self, msize=65536, version=b"9P2000.L"):
        body = self.rpc(TVERSION, struct.pack("<I", msize) + s(version))
        self.msize = struct.unpack_from("<I", body)[0]
        return self.msize, body[6:]

    def attach(self, fid=0):
        return self.rpc(TATTACH, struct.pack("<II", fid, NOFID) + s("root") + s("") + struct.pack("<I", 0))

    def walk(self, fid, newfid, *names):
        body = self.rpc(TWALK, struct.pack("<IIH", fid, newfid, len(names)) + b"".join(s(n) for n in names))
        n = struct.unpack_from("<H", body)[0]
        return [body[2 + 13 * i:15 + 13 * i] for i in range(n)]

    def lopen(self, fid, flags=O_RDONLY):
        return self.rpc(TLOPEN, struct.pack("<II", fid, flags))

    def lcreate(self, fid, name, flags=O_RDWR, mode=0o644):
        return self.rpc(TLCREATE, struct.pack("<I", fid) + s(name) + struct.pack("<III", flags, mode, 0))

    def read(self, fid, offset, count, room=None):
        body = self.rpc(TREAD, struct.pack("<IQI", fid, offset, count), room)
        n = struct.unpack_from("<I", body)[0]
        assert len(body) == 4 + n
        return body[4:]

    def write(self, fid, offset, data):
        return struct.unpack("<I", self.rpc(TWRITE, struct.pack("<IQI", fid, offset, len(data)) + data))[0]

    def clunk(self, fid):
        return self.rpc(TCLUNK, struct.pack("<I", fid))

    def getattr(self, fid):
        f = struct.unpack("<Q13sIIIQQQQQQQQQQQQQQQ", self.rpc(TGETATTR, struct.pack("<IQ", fid, 0x7FF)))
        keys = ("valid qid mode uid gid nlink rdev size blksize blocks atime_sec atime_nsec mtime_sec mtime_nsec "
                "ctime_sec ctime_nsec btime_sec btime_nsec gen data_version").split()
        return dict(zip(keys, f))

    def setattr(self, fid, valid, mode=0, uid=0, gid=0, size=0, atime=(0, 0), mtime=(0, 0)):
        return self.rpc(TSETATTR, struct.pack("<IIIIIQQQQQ", fid, valid, mode, uid, gid, size, *atime, *mtime))

    def mkdir(self, dfid, name, mode=0o755):
        return self.rpc(TMKDIR, struct.pack("<I", dfid) + s(name) + struct.pack("<II", mode, 0))

    def symlink(self, dfid, name, target):
        return self.rpc(TSYMLINK, struct.pack("<I", dfid) + s(name) + s(target) + struct.pack("<I", 0))

    def mknod(self, dfid, name, mode, major=0, minor=0):
        return self.rpc(TMKNOD, struct.pack("<I", dfid) + s(name) + struct.pack("<IIII", mode, major, minor, 0))

    def readlink(self, fid):
        body = self.rpc(TREADLINK, struct.pack("<I", fid))
        return body[2:2 + struct.unpack_from("<H", body)[0]]

    def link(self, dfid, fid, name):
        return self.rpc(TLINK, struct.pack("<II", dfid, fid) + s(name))

    def renameat(self, olddir, oldname, newdir, newname):
        return self.rpc(TRENAMEAT, struct.pack("<I", olddir) + s(oldname) + struct.pack("<I", newdir) + s(newname))

    def rename(self, fid, dfid, name):
        return self.rpc(TRENAME, struct.pack("<II", fid, dfid) + s(name))

    def unlinkat(self, dfid, name, flags=0):
        return self.rpc(TUNLINKAT, struct.pack("<I", dfid) + s(name) + struct.pack("<I", flags))

    def remove(self, fid):
        return self.rpc(TREMOVE, struct.pack("<I", fid))

    def readdir(self, fid, offset=0, count=8192):
        """[(qid, next offset, type, name)]"""
        body = self.rpc(TREADDIR, struct.pack("<IQI", fid, offset, count))
        n = struct.unpack_from("<I", body)[0]
        assert len(body) == 4 + n <= 4 + count
        out, off = [], 4
        while off < len(body):
            qid, nxt, dtype, ln = struct.unpack_from("<13sQBH", body, off)
            off += 24
            out.append((qid, nxt, dtype, body[off:off + ln]))
            off += ln
        return out

    def listdir(self, fid, count=8192):
        out, off = [], 0
        while True:
            ents = self.readdir(fid, off, count)
            if not ents:
                return out
            out += ents
            off = ents[-1][1]

    def statfs(self, fid):
        return struct.unpack("<IIQQQQQQI", self.rpc(TSTATFS, struct.pack("<I", fid)))

    def fsync(self, fid, datasync=0):
        return self.rpc(TFSYNC, struct.pack("<II", fid, datasync))


def server_transport(srv):
    def transport(req, room):
        out = bytearray(room)
        n = srv.serve([memoryview(bytearray(req))], [memoryview(out)])
        return bytes(out[:n])
    return transport


def session(path, readonly=False, resolver="auto", **kw):
    srv = P9Server(HostShare(str(path), readonly=readonly, resolver=resolver), **kw)
    c = P9Client(server_transport(srv))
    c.version()
    c.attach(0)
    return srv, c


def qtype(qid):
    return qid[0]


def test_the_client_packs_what_the_declarations_describe():
    sent = []

    def transport(req, room):
        sent.append(req)
        return struct.pack("<IBH", 7, req[4] + 1, struct.unpack_from("<H", req, 5)[0])
    c = P9Client(transport)
    c.rpc(TLCREATE, struct.pack("<I", 1) + s("f") + struct.pack("<III", O_RDWR | O_CREAT, 0o644, 0))
    c.rpc(TWALK, struct.pack("<IIH", 0, 1, 2) + s("a") + s("b"))
    c.rpc(TSETATTR, struct.pack("<IIIIIQQQQQ", 1, 0x1F, 0o644, 1, 2, 3, 4, 5, 6, 7))
    assert M.decode(sent[0]) == (TLCREATE, 0, [1, b"f", O_RDWR | O_CREAT, 0o644, 0])
    assert M.decode(sent[1]) == (TWALK, 1, [0, 1, (b"a", b"b")])
    assert M.decode(sent[2]) == (TSETATTR, 2, (1, 0x1F, 0o644, 1, 2, 3, 4, 5, 6, 7))
