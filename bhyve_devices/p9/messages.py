"""9P2000.L messages: constants, the layout of every message declared with ``construct``, and the codecs the server
uses, compiled from those declarations once at import.

The protocol: Plan 9's intro(5) (section 5 of the Plan 9 manual) for the 9P2000 framing and the messages 9P2000.L
keeps (version, attach, flush, walk, read, write, clunk, remove); the 9P2000.L additions as Linux's
``include/net/9p/9p.h`` numbers them and ``net/9p/client.c`` encodes them (diod's ``protocol.md`` describes them).
Every message is ``size[4] type[1] tag[2]`` (:data:`HEADER`, little-endian; ``size`` counts the whole message)
followed by its body (:data:`BODIES`). Field codes as the Linux client writes them: ``d`` u32, ``q`` u64, ``w``
u16, ``b`` u8, ``s`` a string (``len[2]`` + bytes, :data:`STR`; names are bytes, not necessarily UTF-8), ``Q`` a
qid (:data:`QID`, 13 bytes), ``T`` a counted list of strings (:data:`WNAMES`), ``R`` a counted list of qids
(:data:`QIDS`), ``D`` ``count[4]`` + that many bytes (:data:`DATA`).

The hot path never runs ``construct``: :func:`compile_body` turns each declaration into a :class:`Codec` of
precompiled ``struct`` formats (runs of fixed fields merged into one ``struct.Struct``; a qid is one 13-byte
field, kept packed). ``tests/unit/test_p9_messages.py`` round-trips every message through both.

Not supported: the 9P2000 and 9P2000.u forms of stat, open, create and error (Tstat, Twstat, Topen, Tcreate,
Rerror: the server answers them with Rlerror EOPNOTSUPP), Tauth's afid.
"""

import struct

from construct import (Bytes, FormatField, GreedyBytes, Int8ul, Int16ul, Int32ul, Int64ul, Prefixed, PrefixedArray,
                       Struct, this)

VERSION_9P2000_L = b"9P2000.L"
VERSION_UNKNOWN = b"unknown"
NOTAG = 0xFFFF
NOFID = 0xFFFFFFFF
MAXWELEM = 16               # names per Twalk (intro(5))
HEADER_SIZE = 7             # size[4] type[1] tag[2]
IOHDRSZ = 11                # Rread/Rreaddir: header + count[4], before the data
TWRITE_HDRSZ = 23           # header + fid[4] offset[8] count[4], before the data

# Message types (9p.h enum p9_msg_t); an R-message is its T-message + 1
TLERROR, RLERROR = 6, 7
TSTATFS, RSTATFS = 8, 9
TLOPEN, RLOPEN = 12, 13
TLCREATE, RLCREATE = 14, 15
TSYMLINK, RSYMLINK = 16, 17
TMKNOD, RMKNOD = 18, 19
TRENAME, RRENAME = 20, 21
TREADLINK, RREADLINK = 22, 23
TGETATTR, RGETATTR = 24, 25
TSETATTR, RSETATTR = 26, 27
TXATTRWALK, RXATTRWALK = 30, 31
TXATTRCREATE, RXATTRCREATE = 32, 33
TREADDIR, RREADDIR = 40, 41
TFSYNC, RFSYNC = 50, 51
TLOCK, RLOCK = 52, 53
TGETLOCK, RGETLOCK = 54, 55
TLINK, RLINK = 70, 71
TMKDIR, RMKDIR = 72, 73
TRENAMEAT, RRENAMEAT = 74, 75
TUNLINKAT, RUNLINKAT = 76, 77
TVERSION, RVERSION = 100, 101
TAUTH, RAUTH = 102, 103
TATTACH, RATTACH = 104, 105
TFLUSH, RFLUSH = 108, 109
TWALK, RWALK = 110, 111
TREAD, RREAD = 116, 117
TWRITE, RWRITE = 118, 119
TCLUNK, RCLUNK = 120, 121
TREMOVE, RREMOVE = 122, 123

# qid.type (intro(5))
QTDIR = 0x80
QTSYMLINK = 0x02
QTFILE = 0x00

# Tgetattr request_mask / Rgetattr valid (9p.h P9_STATS_*): mode..blocks, the basic set
P9_STATS_BASIC = 0x000007FF

# Tsetattr valid (9p.h P9_ATTR_*)
ATTR_MODE = 1 << 0
ATTR_UID = 1 << 1
ATTR_GID = 1 << 2
ATTR_SIZE = 1 << 3
ATTR_ATIME = 1 << 4
ATTR_MTIME = 1 << 5
ATTR_CTIME = 1 << 6
ATTR_ATIME_SET = 1 << 7
ATTR_MTIME_SET = 1 << 8

# Tlopen/Tlcreate flags (9p.h P9_DOTL_*: Linux's x86 open(2) values)
DOTL_ACCMODE = 0o3
DOTL_WRONLY = 0o1
DOTL_RDWR = 0o2
DOTL_CREATE = 0o100
DOTL_EXCL = 0o200
DOTL_TRUNC = 0o1000
DOTL_APPEND = 0o2000
DOTL_DSYNC = 0o10000
DOTL_DIRECTORY = 0o200000
DOTL_SYNC = 0o4000000

DOTL_AT_REMOVEDIR = 0x200   # Tunlinkat flags

# Tlock/Tgetlock (9p.h P9_LOCK_*)
LOCK_TYPE_RDLCK, LOCK_TYPE_WRLCK, LOCK_TYPE_UNLCK = 0, 1, 2
LOCK_SUCCESS, LOCK_BLOCKED, LOCK_ERROR, LOCK_GRACE = 0, 1, 2, 3

# ---- layouts --------------------------------------------------------------------------------------------------------
HEADER = Struct("size" / Int32ul, "type" / Int8ul, "tag" / Int16ul)
STR = Prefixed(Int16ul, GreedyBytes)
QID = Struct("type" / Int8ul, "version" / Int32ul, "path" / Int64ul)
WNAMES = PrefixedArray(Int16ul, STR)
QIDS = PrefixedArray(Int16ul, QID)
DATA = Bytes(this.count)
#: One Rreaddir entry (Linux ``p9dirent``, read as "Qqbs")
DIRENT = Struct("qid" / QID, "offset" / Int64ul, "type" / Int8ul, "name" / STR)

_FID = "fid" / Int32ul
_QIDF = "qid" / QID
_EMPTY = Struct()
_LOCK_FIELDS = ("start" / Int64ul, "length" / Int64ul, "proc_id" / Int32ul, "client_id" / STR)

#: The body (after :data:`HEADER`) of every message the server reads or writes, by type.
BODIES = {
    TVERSION: Struct("msize" / Int32ul, "version" / STR),
    RVERSION: Struct("msize" / Int32ul, "version" / STR),
    TAUTH: Struct("afid" / Int32ul, "uname" / STR, "aname" / STR, "n_uname" / Int32ul),
    RAUTH: Struct("aqid" / QID),
    TATTACH: Struct(_FID, "afid" / Int32ul, "uname" / STR, "aname" / STR, "n_uname" / Int32ul),
    RATTACH: Struct(_QIDF),
    RLERROR: Struct("ecode" / Int32ul),
    TFLUSH: Struct("oldtag" / Int16ul),
    RFLUSH: _EMPTY,
    TWALK: Struct(_FID, "newfid" / Int32ul, "wnames" / WNAMES),
    RWALK: Struct("qids" / QIDS),
    TREAD: Struct(_FID, "offset" / Int64ul, "count" / Int32ul),
    RREAD: Struct("count" / Int32ul, "data" / DATA),
    TWRITE: Struct(_FID, "offset" / Int64ul, "count" / Int32ul, "data" / DATA),
    RWRITE: Struct("count" / Int32ul),
    TCLUNK: Struct(_FID),
    RCLUNK: _EMPTY,
    TREMOVE: Struct(_FID),
    RREMOVE: _EMPTY,
    TSTATFS: Struct(_FID),
    RSTATFS: Struct("type" / Int32ul, "bsize" / Int32ul, "blocks" / Int64ul, "bfree" / Int64ul,
                    "bavail" / Int64ul, "files" / Int64ul, "ffree" / Int64ul, "fsid" / Int64ul,
                    "namelen" / Int32ul),
    TLOPEN: Struct(_FID, "flags" / Int32ul),
    RLOPEN: Struct(_QIDF, "iounit" / Int32ul),
    TLCREATE: Struct(_FID, "name" / STR, "flags" / Int32ul, "mode" / Int32ul, "gid" / Int32ul),
    RLCREATE: Struct(_QIDF, "iounit" / Int32ul),
    TSYMLINK: Struct(_FID, "name" / STR, "symtgt" / STR, "gid" / Int32ul),
    RSYMLINK: Struct(_QIDF),
    TMKNOD: Struct("dfid" / Int32ul, "name" / STR, "mode" / Int32ul, "major" / Int32ul, "minor" / Int32ul,
                   "gid" / Int32ul),
    RMKNOD: Struct(_QIDF),
    TRENAME: Struct(_FID, "dfid" / Int32ul, "name" / STR),
    RRENAME: _EMPTY,
    TREADLINK: Struct(_FID),
    RREADLINK: Struct("target" / STR),
    TGETATTR: Struct(_FID, "request_mask" / Int64ul),
    RGETATTR: Struct("valid" / Int64ul, _QIDF, "mode" / Int32ul, "uid" / Int32ul, "gid" / Int32ul,
                     "nlink" / Int64ul, "rdev" / Int64ul, "size" / Int64ul, "blksize" / Int64ul,
                     "blocks" / Int64ul, "atime_sec" / Int64ul, "atime_nsec" / Int64ul, "mtime_sec" / Int64ul,
                     "mtime_nsec" / Int64ul, "ctime_sec" / Int64ul, "ctime_nsec" / Int64ul, "btime_sec" / Int64ul,
                     "btime_nsec" / Int64ul, "gen" / Int64ul, "data_version" / Int64ul),
    TSETATTR: Struct(_FID, "valid" / Int32ul, "mode" / Int32ul, "uid" / Int32ul, "gid" / Int32ul,
                     "size" / Int64ul, "atime_sec" / Int64ul, "atime_nsec" / Int64ul, "mtime_sec" / Int64ul,
                     "mtime_nsec" / Int64ul),
    RSETATTR: _EMPTY,
    TXATTRWALK: Struct(_FID, "newfid" / Int32ul, "name" / STR),
    RXATTRWALK: Struct("size" / Int64ul),
    TXATTRCREATE: Struct(_FID, "name" / STR, "attr_size" / Int64ul, "flags" / Int32ul),
    RXATTRCREATE: _EMPTY,
    TREADDIR: Struct(_FID, "offset" / Int64ul, "count" / Int32ul),
    RREADDIR: Struct("count" / Int32ul, "data" / DATA),
    TFSYNC: Struct(_FID, "datasync" / Int32ul),
    RFSYNC: _EMPTY,
    TLOCK: Struct(_FID, "type" / Int8ul, "flags" / Int32ul, *_LOCK_FIELDS),
    RLOCK: Struct("status" / Int8ul),
    TGETLOCK: Struct(_FID, "type" / Int8ul, *_LOCK_FIELDS),
    RGETLOCK: Struct("type" / Int8ul, *_LOCK_FIELDS),
    TLINK: Struct("dfid" / Int32ul, _FID, "name" / STR),
    RLINK: _EMPTY,
    TMKDIR: Struct("dfid" / Int32ul, "name" / STR, "mode" / Int32ul, "gid" / Int32ul),
    RMKDIR: Struct(_QIDF),
    TRENAMEAT: Struct("olddirfid" / Int32ul, "oldname" / STR, "newdirfid" / Int32ul, "newname" / STR),
    RRENAMEAT: _EMPTY,
    TUNLINKAT: Struct("dirfd" / Int32ul, "name" / STR, "flags" / Int32ul),
    RUNLINKAT: _EMPTY,
}


class ProtocolError(ValueError):
    """A message that does not parse: too short for its fields, a string or list running past its end."""


# ---- the compiled codecs -------------------------------------------------------------------------------------------
_FIXED, _STR, _STRS, _QIDS, _DATA = range(5)
_U16 = struct.Struct("<H")
_QID_FMT = "13s"
QID_STRUCT = struct.Struct("<BIQ")
HDR = struct.Struct("<IBH")


class Codec:
    """One body as ``struct`` steps: :meth:`decode` gives the fields in order (a qid as its 13 packed bytes, a
    string as bytes, a list as a tuple, ``data`` as bytes), :meth:`encode` takes them back. ``head`` is the
    ``struct.Struct`` of the fixed fields before the first variable one (None if there are none)."""

    __slots__ = ("steps", "names", "whole", "head")

    def __init__(self, steps, names):
        self.steps = steps
        self.names = names
        self.whole = steps[0][1] if len(steps) == 1 and steps[0][0] == _FIXED else None
        self.head = steps[0][1] if steps and steps[0][0] == _FIXED else None

    def __repr__(self):
        return f"Codec({', '.join(self.names)})"

    def decode(self, buf, off, end):
        """The fields of a body in ``buf[off:end]`` (a list or tuple); ProtocolError if it is too short."""
        whole = self.whole
        if whole is not None:
            if off + whole.size > end:
                raise ProtocolError("message too short")
            return whole.unpack_from(buf, off)
        if not self.steps:
            return ()
        out = []
        for kind, st, _ in self.steps:
            if kind == _FIXED:
                if off + st.size > end:
                    raise ProtocolError("message too short")
                out.extend(st.unpack_from(buf, off))
                off += st.size
            elif kind == _STR:
                s, off = _string(buf, off, end)
                out.append(s)
            elif kind == _DATA:
                n = out[-1]
                if off + n > end:
                    raise ProtocolError("data runs past the message")
                out.append(bytes(buf[off:off + n]))
                off += n
            else:
                if off + 2 > end:
                    raise ProtocolError("message too short")
                (n,), off = _U16.unpack_from(buf, off), off + 2
                items = []
                for _ in range(n):
                    if kind == _STRS:
                        s, off = _string(buf, off, end)
                    else:
                        if off + 13 > end:
                            raise ProtocolError("qid list runs past the message")
                        s, off = bytes(buf[off:off + 13]), off + 13
                    items.append(s)
                out.append(tuple(items))
        return out

    def encode(self, *values):
        whole = self.whole
        if whole is not None:
            return whole.pack(*values)
        parts = []
        i = 0
        for kind, st, n in self.steps:
            if kind == _FIXED:
                parts.append(st.pack(*values[i:i + n]))
                i += n
                continue
            v = values[i]
            i += 1
            if kind == _STR:
                parts.append(_U16.pack(len(v)) + v)
            elif kind == _DATA:
                parts.append(bytes(v))
            elif kind == _STRS:
                parts.append(_U16.pack(len(v)) + b"".join(_U16.pack(len(s)) + s for s in v))
            else:
                parts.append(_U16.pack(len(v)) + b"".join(v))
        return b"".join(parts)


def _string(buf, off, end):
    if off + 2 > end:
        raise ProtocolError("message too short")
    (n,) = _U16.unpack_from(buf, off)
    off += 2
    if off + n > end:
        raise ProtocolError("string runs past the message")
    return bytes(buf[off:off + n]), off + n


def compile_body(body):
    """A :class:`Codec` for a ``construct`` Struct built from the pieces above (fixed-size integers, :data:`QID`,
    :data:`STR`, :data:`WNAMES`, :data:`QIDS`, :data:`DATA`); TypeError for anything else."""
    steps, names, fmt = [], [], []
    kinds = {id(STR): _STR, id(WNAMES): _STRS, id(QIDS): _QIDS, id(DATA): _DATA}
    for sc in body.subcons:
        names.append(sc.name)
        sub = sc.subcon
        if isinstance(sub, FormatField):
            fmt.append(sub.fmtstr.lstrip("<"))
            continue
        if sub is QID:
            fmt.append(_QID_FMT)
            continue
        if fmt:
            steps.append((_FIXED, struct.Struct("<" + "".join(fmt)), len(fmt)))
            fmt = []
        if id(sub) not in kinds:
            raise TypeError(f"field {sc.name!r}: no codec for {sub!r}")
        steps.append((kinds[id(sub)], None, 1))
    if fmt:
        steps.append((_FIXED, struct.Struct("<" + "".join(fmt)), len(fmt)))
    return Codec(steps, names)


#: The compiled codec of each body in :data:`BODIES`.
CODECS = {t: compile_body(b) for t, b in BODIES.items()}
DIRENT_HEAD = compile_body(DIRENT).head      # qid, offset, type before the name


def pack_qid(qtype, version, path):
    return QID_STRUCT.pack(qtype, version, path)


def message(mtype, tag, body=b""):
    """A whole message: the header with ``size`` counted, then ``body``."""
    return HDR.pack(HEADER_SIZE + len(body), mtype, tag) + body


def encode(mtype, tag, *values):
    """A whole message of type ``mtype`` from its fields (as :meth:`Codec.decode` gives them)."""
    return message(mtype, tag, CODECS[mtype].encode(*values))


def decode(buf):
    """``(type, tag, fields)`` of a whole message; ProtocolError if its header, size or body is wrong."""
    if len(buf) < HEADER_SIZE:
        raise ProtocolError("no header")
    size, mtype, tag = HDR.unpack_from(buf, 0)
    if not HEADER_SIZE <= size <= len(buf):
        raise ProtocolError(f"size {size} and {len(buf)} bytes")
    codec = CODECS.get(mtype)
    if codec is None:
        raise ProtocolError(f"unknown message type {mtype}")
    return mtype, tag, codec.decode(buf, HEADER_SIZE, size)
