"""The 9P2000.L operations, one method per T-message (``op_<name>``), as Linux's v9fs uses them with
``cache=none`` and ``cache=loose`` (``fs/9p/vfs_*.c`` over ``net/9p/client.c``; the semantics of each message as
diod's ``protocol.md`` gives them, the flag and attribute values of :mod:`.messages`).

A method gets the decoded fields of its message and returns the R-message body (bytes), or ``(body, n)`` when it
has already put ``n`` bytes of data after the body in the writable segments (Rread, Rreaddir); it raises OSError
for Rlerror. The server (:class:`.server.P9Server`) provides ``fs``, ``fids``, ``readonly``, ``msize``, the fid
and qid helpers and ``opened`` (a file just opened for a fid: a backend with a compiled Tread/Twrite is told). On a
read-only share every change is refused here with EROFS before the backend is asked (and the backend refuses it
again).

- walk: at most :data:`~.messages.MAXWELEM` names; the first name that fails fails the walk, a later one gives
  the qids so far and leaves ``newfid`` unused (intro(5)); ``newfid == fid`` walks in place (not an open fid).
- lopen/lcreate: 9P's flags mapped to the host's (access mode, TRUNC, APPEND, SYNC/DSYNC, EXCL on create);
  the rest (NOCTTY, NONBLOCK, DIRECT, NOATIME, CLOEXEC...) is the client's business. ``iounit`` 0: the client uses
  msize - 24. lcreate's ``gid`` and the ``gid`` of mkdir/symlink/mknod are not applied.
- setattr: the ``P9_ATTR_*`` bits; a time without its ``*_SET`` bit is now.
- xattrwalk: the list of names (``name`` empty) is empty; any named attribute is ENODATA; xattrcreate EOPNOTSUPP.
- lock/getlock: as QEMU, locks are granted (Linux's client keeps the lock state of its own, and this is the only
  client), getlock says unlocked.
- statfs: the host's figures with v9fs's magic as the type.

Not supported: Tauth, Tmknod of device nodes (EPERM), real byte-range locks on the host.
"""

import errno
import os
import stat
import struct

from bhyve_devices.virtio.chain import scatter

from . import messages as M

MIN_MSIZE = 4096                # the smallest msize a client may get (QEMU's P9_MIN_MSIZE)
V9FS_MAGIC = 0x01021997
TIME_NOW = -1
NSEC = 10 ** 9
_U64 = (1 << 64) - 1
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_QIDTYPE = {4: M.QTDIR, 10: M.QTSYMLINK}        # DT_DIR, DT_LNK

_C = M.CODECS
_RVERSION, _RQID, _ROPEN, _RGETATTR = _C[M.RVERSION], _C[M.RATTACH], _C[M.RLOPEN], _C[M.RGETATTR]
_RWALK, _RSTATFS, _RREADLINK, _RLOCK, _RGETLOCK = (_C[M.RWALK], _C[M.RSTATFS], _C[M.RREADLINK], _C[M.RLOCK],
                                                   _C[M.RGETLOCK])
_RXATTRWALK = _C[M.RXATTRWALK]


class Fid:
    """A fid: the backend node it names, its open file once opened, or ``xattr`` bytes for an xattr fid."""

    __slots__ = ("node", "handle", "xattr")

    def __init__(self, node, handle=None, xattr=None):
        self.node, self.handle, self.xattr = node, handle, xattr


def _sec_nsec(ns):
    return (ns // NSEC) & _U64, ns % NSEC


class Operations:
    """Mixin of :class:`.server.P9Server`: the handlers (see the module docstring)."""

    def handlers(self):
        """``{T-message type: handler}``."""
        return {t: getattr(self, "op_" + n) for t, n in (
            (M.TVERSION, "version"), (M.TAUTH, "auth"), (M.TATTACH, "attach"), (M.TFLUSH, "flush"),
            (M.TWALK, "walk"), (M.TREAD, "read"), (M.TWRITE, "write"), (M.TCLUNK, "clunk"),
            (M.TREMOVE, "remove"), (M.TSTATFS, "statfs"), (M.TLOPEN, "lopen"), (M.TLCREATE, "lcreate"),
            (M.TSYMLINK, "symlink"), (M.TMKNOD, "mknod"), (M.TRENAME, "rename"), (M.TREADLINK, "readlink"),
            (M.TGETATTR, "getattr"), (M.TSETATTR, "setattr"), (M.TXATTRWALK, "xattrwalk"),
            (M.TXATTRCREATE, "xattrcreate"), (M.TREADDIR, "readdir"), (M.TFSYNC, "fsync"), (M.TLOCK, "lock"),
            (M.TGETLOCK, "getlock"), (M.TLINK, "link"), (M.TMKDIR, "mkdir"), (M.TRENAMEAT, "renameat"),
            (M.TUNLINKAT, "unlinkat"))}

    def _rw(self):
        if self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    # ---- session ------------------------------------------------------------------------------------------------
    def op_version(self, msize, version):
        self.reset()
        if msize < MIN_MSIZE:
            raise OSError(errno.EINVAL, f"msize {msize} below {MIN_MSIZE}")
        self.msize = min(msize, self.max_msize)
        return _RVERSION.encode(self.msize, version if version == M.VERSION_9P2000_L else M.VERSION_UNKNOWN)

    def op_auth(self, afid, uname, aname, n_uname):
        raise OSError(errno.EOPNOTSUPP, "no authentication")

    def op_attach(self, fid, afid, uname, aname, n_uname):
        if afid != M.NOFID:
            raise OSError(errno.EINVAL, "no authentication: afid must be NOFID")
        self.check_new(fid)
        node, st = self.fs.root()
        self.fids[fid] = Fid(node)
        return self.qid(st)

    def op_flush(self, oldtag):
        return b""

    def op_clunk(self, fid):
        self.clunk(fid)
        return b""

    # ---- names ----------------------------------------------------------------------------------------------------
    def op_walk(self, fid, newfid, wnames):
        f = self.fid(fid)
        if len(wnames) > M.MAXWELEM or f.xattr is not None:
            raise OSError(errno.EINVAL, "bad walk")
        if newfid != fid:
            self.check_new(newfid)
        elif f.handle is not None:
            raise OSError(errno.EINVAL, "an open fid cannot walk in place")
        fs = self.fs
        node = fs.dup(f.node)
        qids = []
        try:
            for name in wnames:
                child, st = fs.walk(node, name)
                fs.release(node)
                node = child
                qids.append(self.qid(st))
        except OSError:
            fs.release(node)
            if not qids:
                raise
            return _RWALK.encode(tuple(qids))
        if newfid == fid:
            fs.release(f.node)
            f.node = node
        else:
            self.fids[newfid] = Fid(node)
        return _RWALK.encode(tuple(qids))

    def op_getattr(self, fid, request_mask):
        f = self.fid(fid)
        st = self.fs.fstat(f.handle) if f.handle is not None else self.fs.getattr(f.node)
        return _RGETATTR.encode(
            M.P9_STATS_BASIC, self.qid(st), st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_rdev,
            st.st_size, st.st_blksize, st.st_blocks, *_sec_nsec(st.st_atime_ns), *_sec_nsec(st.st_mtime_ns),
            *_sec_nsec(st.st_ctime_ns), 0, 0, 0, 0)

    def op_setattr(self, fid, valid, mode, uid, gid, size, atime_sec, atime_nsec, mtime_sec, mtime_nsec):
        f = self.fid(fid)
        self._rw()
        kw = {}
        if valid & M.ATTR_MODE:
            kw["mode"] = mode
        if valid & M.ATTR_UID:
            kw["uid"] = uid
        if valid & M.ATTR_GID:
            kw["gid"] = gid
        if valid & M.ATTR_SIZE:
            kw["size"] = size
        for bit, setbit, key, sec, nsec in ((M.ATTR_ATIME, M.ATTR_ATIME_SET, "atime_ns", atime_sec, atime_nsec),
                                            (M.ATTR_MTIME, M.ATTR_MTIME_SET, "mtime_ns", mtime_sec, mtime_nsec)):
            if valid & bit:
                if valid & setbit and nsec >= NSEC:
                    raise OSError(errno.EINVAL, "nanoseconds past a second")
                kw[key] = sec * NSEC + nsec if valid & setbit else TIME_NOW
        if kw:
            self.fs.setattr(f.node, f.handle, **kw)
        return b""

    def op_readlink(self, fid):
        return _RREADLINK.encode(self.fs.readlink(self.fid(fid).node))

    def op_statfs(self, fid):
        v = self.fs.statfs(self.fid(fid).node)
        return _RSTATFS.encode(V9FS_MAGIC, v.f_frsize or v.f_bsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
                               v.f_ffree, getattr(v, "f_fsid", 0) & _U64, v.f_namemax)

    # ---- changes --------------------------------------------------------------------------------------------------
    def op_mkdir(self, dfid, name, mode, gid):
        d = self.fid(dfid)
        self._rw()
        return self.qid(self.fs.mkdir(d.node, name, mode))

    def op_symlink(self, fid, name, symtgt, gid):
        d = self.fid(fid)
        self._rw()
        return self.qid(self.fs.symlink(d.node, name, symtgt))

    def op_mknod(self, dfid, name, mode, major, minor, gid):
        d = self.fid(dfid)
        self._rw()
        return self.qid(self.fs.mknod(d.node, name, mode))

    def op_link(self, dfid, fid, name):
        d, f = self.fid(dfid), self.fid(fid)
        self._rw()
        self.fs.link(d.node, f.node, name)
        return b""

    def op_rename(self, fid, dfid, name):
        f, d = self.fid(fid), self.fid(dfid)
        self._rw()
        self.fs.rename_node(f.node, d.node, name)
        return b""

    def op_renameat(self, olddirfid, oldname, newdirfid, newname):
        old, new = self.fid(olddirfid), self.fid(newdirfid)
        self._rw()
        self.fs.rename(old.node, oldname, new.node, newname)
        return b""

    def op_unlinkat(self, dirfd, name, flags):
        d = self.fid(dirfd)
        self._rw()
        if flags & ~M.DOTL_AT_REMOVEDIR:
            raise OSError(errno.EINVAL, f"unlinkat flags {flags:#x}")
        self.fs.unlink(d.node, name, bool(flags & M.DOTL_AT_REMOVEDIR))
        return b""

    def op_remove(self, fid):
        f = self.fid(fid)
        try:
            self._rw()
            self.fs.remove(f.node)
        finally:
            self.clunk(fid)
        return b""

    # ---- open files ------------------------------------------------------------------------------------------------
    def _host_flags(self, flags):
        acc = flags & M.DOTL_ACCMODE
        if acc == M.DOTL_ACCMODE:
            raise OSError(errno.EINVAL, "bad access mode")
        host = (os.O_RDONLY, os.O_WRONLY, os.O_RDWR)[acc]
        if flags & M.DOTL_TRUNC:
            host |= os.O_TRUNC
        if flags & M.DOTL_APPEND:
            host |= os.O_APPEND
        if flags & M.DOTL_SYNC:
            host |= os.O_SYNC
        elif flags & M.DOTL_DSYNC:
            host |= os.O_DSYNC
        if self.readonly and (acc or flags & (M.DOTL_TRUNC | M.DOTL_APPEND)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return host

    def op_lopen(self, fid, flags):
        f = self.fid(fid)
        if f.handle is not None or f.xattr is not None:
            raise OSError(errno.EINVAL, "fid already open")
        handle, st = self.fs.open(f.node, self._host_flags(flags))
        if flags & M.DOTL_DIRECTORY and not stat.S_ISDIR(st.st_mode):
            self.fs.close_file(handle)
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        f.handle = handle
        self.opened(fid, handle)
        return _ROPEN.encode(self.qid(st), 0)

    def op_lcreate(self, fid, name, flags, mode, gid):
        f = self.fid(fid)
        self._rw()
        if f.handle is not None or f.xattr is not None:
            raise OSError(errno.EINVAL, "fid already open")
        host = self._host_flags(flags) | (os.O_EXCL if flags & M.DOTL_EXCL else 0)
        node, handle, st = self.fs.create(f.node, name, host, mode)
        self.fs.release(f.node)
        f.node, f.handle = node, handle
        self.opened(fid, handle)
        return _ROPEN.encode(self.qid(st), 0)

    def _open_fid(self, fid):
        f = self.fid(fid)
        if f.handle is None:
            raise OSError(errno.EBADF, "fid not open")
        return f

    def op_read(self, fid, offset, count):
        f = self.fid(fid)
        segs, count = self.data_segments(count)
        if f.xattr is not None:
            n = scatter(segs, f.xattr[offset:offset + count]) if offset < len(f.xattr) else 0
            return _U32.pack(n), n
        if f.handle is None:
            raise OSError(errno.EBADF, "fid not open")
        n = self.fs.read(f.handle, segs, offset) if count else 0
        return _U32.pack(n), n

    def op_write(self, fid, offset, count, data):
        f = self._open_fid(fid)
        self._rw()
        return _U32.pack(self.fs.write(f.handle, data, offset) if count else 0)

    def op_readdir(self, fid, offset, count):
        f = self._open_fid(fid)
        segs, count = self.data_segments(count)
        dev = self.fs.fstat(f.handle).st_dev
        parts, used = [], 0
        head, qpath, qid = M.DIRENT_HEAD, self.qpath, M.QID_STRUCT.pack
        for nxt, name, ino, dtype in self.fs.readdir(f.handle, offset):
            ent = head.pack(qid(_QIDTYPE.get(dtype, M.QTFILE), 0, qpath(dev, ino)), nxt, dtype) + \
                _U16.pack(len(name)) + name
            if used + len(ent) > count:
                break
            parts.append(ent)
            used += len(ent)
        scatter(segs, b"".join(parts))
        return _U32.pack(used), used

    def op_fsync(self, fid, datasync):
        self.fs.fsync(self._open_fid(fid).handle, bool(datasync))
        return b""

    def op_lock(self, fid, type, flags, start, length, proc_id, client_id):
        self._open_fid(fid)
        if type > M.LOCK_TYPE_UNLCK:
            raise OSError(errno.EINVAL, f"lock type {type}")
        return _RLOCK.encode(M.LOCK_SUCCESS)

    def op_getlock(self, fid, type, start, length, proc_id, client_id):
        self._open_fid(fid)
        if type > M.LOCK_TYPE_UNLCK:
            raise OSError(errno.EINVAL, f"lock type {type}")
        return _RGETLOCK.encode(M.LOCK_TYPE_UNLCK, start, length, proc_id, client_id)

    # ---- extended attributes ---------------------------------------------------------------------------------------
    def op_xattrwalk(self, fid, newfid, name):
        f = self.fid(fid)
        self.check_new(newfid)
        if name:
            raise OSError(errno.ENODATA, "no extended attributes")
        self.fids[newfid] = Fid(self.fs.dup(f.node), xattr=b"")
        return _RXATTRWALK.encode(0)

    def op_xattrcreate(self, fid, name, attr_size, flags):
        self.fid(fid)
        self._rw()
        raise OSError(errno.EOPNOTSUPP, "no extended attributes")
