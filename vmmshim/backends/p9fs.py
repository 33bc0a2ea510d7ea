"""virtio-9p's host side: a directory shared with the guest, a
:class:`~bhyve_devices.backends.P9Filesystem` (bhyve's is lib9p's ``backend/fs.c`` over the share's directory fd,
limited with Capsicum rights; Linux has no Capsicum, so the limits are in how every name is reached).

``-s N,virtio-9p,NAME=/path[,ro]`` -> :func:`open_options`: the share opened as a :class:`HostShare`, the
options in bhyve's keys (``sharename``, ``path``, ``ro``; :func:`bhyve_devices.virtio.p9.share_config`).

How nothing outside the share is reached:

- The share is an ``O_PATH`` directory fd; every directory node keeps an ``O_PATH`` fd of its own (one per
  directory, shared by every fid on it) and every other node is (its directory's node, one name). No host path is
  ever built: each access is a ``*at`` call relative to such an fd with one name.
- Names are one component (:func:`.p9resolve.check_name`); ``..`` is never looked up on the host: a node knows
  its parent node, and the root is its own parent.
- A symlink is never followed: names are opened through :class:`.p9resolve.Resolver` (openat2 with
  ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``, or ``O_NOFOLLOW``), stat'ed, chowned and timed with
  ``AT_SYMLINK_NOFOLLOW``, chmod'ed through the ``O_PATH`` fd of the node itself (``/proc/self/fd``, a symlink
  refused), linked without ``AT_SYMLINK_FOLLOW``. A symlink swapped in after a walk fails the open (ELOOP).
- Only regular files and directories are opened (checked before and after the open, which is ``O_NONBLOCK``, so
  a FIFO never blocks the device); ``mknod`` makes FIFOs, sockets and regular files only, never a device node;
  modes never carry setuid or setgid (:data:`MODE_BITS`).
- ``readonly``: every change is refused with EROFS here too (the server refuses it first).
- At most ``max_fds`` host fds at a time (directory nodes and open files; EMFILE past it), by default half of
  what ``RLIMIT_NOFILE`` leaves (:func:`open_options` raises the soft limit to the hard one first).

Renames the guest makes are followed: nodes under the old name move to the new one (fids stay valid); a directory
node follows its directory wherever it goes, as its fd does. The changes (setattr, new names, removal, renames)
are in :mod:`.p9changes`.

With ``accel`` (:mod:`.p9fast`) the server's Tread and Twrite on an open regular file may be served in C: the
server binds a fid when it opens a file for it (:meth:`HostShare.bind_fid`), :meth:`HostShare.close_file` unbinds
it before the fd is closed, and only an open for writing on a writable share is bound for writes.

Not supported: hosts without ``O_PATH`` (NetBSD), per-request credentials (everything is done as the VMM's user;
``gid`` of a create is ignored), xattrs, ACLs, device nodes, ``O_DIRECT``/``O_NOATIME`` opens, qid paths unique
across more than 65535 file systems, changes the host makes under a node (a name renamed on the host goes stale).
"""

import errno
import os
import resource
import stat as st_mod

from .p9changes import MODE_BITS, NOW, ShareChanges, _err  # noqa: F401 (NOW re-exported)
from .p9resolve import AUTO, Resolver, check_name

FD_RESERVE = 256            # fds left to the rest of the VMM
MAX_FDS_DEFAULT = 65536
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10
#: The open flags a guest's open may carry (the server translates 9P's); O_EXCL only with a create.
OPEN_FLAGS = os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_SYNC | os.O_DSYNC
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND


def default_max_fds():
    """Half of what the soft ``RLIMIT_NOFILE`` leaves after :data:`FD_RESERVE`, at most :data:`MAX_FDS_DEFAULT`."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = MAX_FDS_DEFAULT * 2
    return max(16, min(MAX_FDS_DEFAULT, (soft - FD_RESERVE) // 2))


def raise_fd_limit():
    """Raises the soft ``RLIMIT_NOFILE`` to the hard limit (bounded), as QEMU does for its 9P fids."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * MAX_FDS_DEFAULT + FD_RESERVE if hard == resource.RLIM_INFINITY else min(hard, 2 * MAX_FDS_DEFAULT
                                                                                         + FD_RESERVE)
    if soft != resource.RLIM_INFINITY and soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError):
            pass


class _Node:
    """A file of the share: ``fd`` (an O_PATH fd) for a directory, None for anything else, reached as ``name``
    in ``parent`` (None for the root). ``refs``: fids and child nodes holding it."""

    __slots__ = ("parent", "name", "fd", "refs", "key")

    def __init__(self, parent, name, fd, key):
        self.parent, self.name, self.fd, self.key, self.refs = parent, name, fd, key, 1


class _File:
    """An open file or directory: its fd, whether it may be written, a directory's listing and ``..``, its access
    mode (``O_ACCMODE`` bits) and the fid the compiled path serves it for (None: none)."""

    __slots__ = ("fd", "isdir", "writable", "listing", "dotdot", "accmode", "fid")

    def __init__(self, fd, isdir, writable, dotdot=0, accmode=os.O_RDONLY):
        self.fd, self.isdir, self.writable, self.dotdot, self.listing = fd, isdir, writable, dotdot, None
        self.accmode, self.fid = accmode, None


class HostShare(ShareChanges):
    """The directory ``path`` as a :class:`~bhyve_devices.backends.P9Filesystem` (see the module docstring).
    ``resolver``: ``"auto"``, ``"openat2"`` or ``"nofollow"`` (:class:`.p9resolve.Resolver`); ``accel``: the
    compiled Tread/Twrite (``p9fast.accelerator()``)."""

    def __init__(self, path, readonly=False, resolver=AUTO, max_fds=None, accel=None):
        if not hasattr(os, "O_PATH"):
            raise _err(errno.EOPNOTSUPP, "virtio-9p shares need O_PATH (Linux)")
        self.path = path
        self.readonly = bool(readonly)
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)     # follows: the operator named it
        try:
            s = os.stat(fd)
            self._resolver = Resolver(resolver)
            self.resolver = self._resolver.probe(fd)
        except BaseException:
            os.close(fd)
            raise
        self._root = _Node(None, b"", fd, (s.st_dev, s.st_ino))
        self._dirs = {self._root.key: self._root}       # (st_dev, st_ino) -> the directory's one node
        self._entries = {}                              # (parent node, name) -> node
        self._files = set()
        self._fds = 1
        self.max_fds = max_fds or default_max_fds()
        self.accel = accel
        self.compiled = accel is not None

    # ---- nodes ----------------------------------------------------------------------------------------------------
    def _open(self, dirfd, name, flags, mode=0):
        return self._resolver.open(dirfd, name, flags, mode)

    def _budget(self):
        if self._fds >= self.max_fds:
            raise _err(errno.EMFILE, "the share's host fds are all in use")

    def _new(self, parent, name, fd, key):
        n = _Node(parent, name, fd, key)
        parent.refs += 1
        if fd is not None:
            self._dirs[key] = n
            self._fds += 1
        self._entries[(parent, name)] = n
        return n

    def root(self):
        self._root.refs += 1
        return self._root, os.stat(self._root.fd)

    def dup(self, node):
        node.refs += 1
        return node

    def release(self, node):
        while node is not None:
            node.refs -= 1
            if node.refs > 0 or node is self._root:
                return
            parent = node.parent
            if self._entries.get((parent, node.name)) is node:
                del self._entries[(parent, node.name)]
            if node.fd is not None:
                if self._dirs.get(node.key) is node:
                    del self._dirs[node.key]
                os.close(node.fd)
                self._fds -= 1
            node.fd = node.parent = None
            node = parent

    @staticmethod
    def _dir(node):
        if node.fd is None:
            raise _err(errno.ENOTDIR)
        return node.fd

    def walk(self, node, name):
        dirfd = self._dir(node)
        if name == b".":
            return self.dup(node), os.stat(dirfd)
        if name == b"..":
            up = node.parent if node.parent is not None else node
            return self.dup(up), os.stat(up.fd)
        check_name(name)
        self._budget()
        fd = self._open(dirfd, name, os.O_PATH)
        try:
            s = os.stat(fd)
        except BaseException:
            os.close(fd)
            raise
        if st_mod.S_ISDIR(s.st_mode):
            key = (s.st_dev, s.st_ino)
            known = self._dirs.get(key)
            if known is not None:
                os.close(fd)
                return self.dup(known), s
            return self._new(node, name, fd, key), s
        os.close(fd)
        known = self._entries.get((node, name))
        if known is not None and known.fd is None:
            return self.dup(known), s
        return self._new(node, name, None, None), s

    @staticmethod
    def _at(node):
        """(dirfd, name) reaching ``node`` itself: a directory through its own fd."""
        return (node.fd, b".") if node.fd is not None else (node.parent.fd, node.name)

    def getattr(self, node):
        if node.fd is not None:
            return os.stat(node.fd)
        return os.stat(node.name, dir_fd=node.parent.fd, follow_symlinks=False)

    # ---- open files -----------------------------------------------------------------------------------------------
    def _track(self, fd, isdir, flags, dotdot=0):
        f = _File(fd, isdir, bool(flags & WRITE_FLAGS), dotdot, flags & os.O_ACCMODE)
        self._files.add(f)
        self._fds += 1
        return f

    def _open_regular(self, dirfd, name, flags, mode=0):
        fd = self._open(dirfd, name, flags | os.O_NONBLOCK | os.O_NOCTTY, mode)
        try:
            s = os.stat(fd)
            if not st_mod.S_ISREG(s.st_mode):
                raise _err(errno.EISDIR if st_mod.S_ISDIR(s.st_mode) else errno.EOPNOTSUPP)
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, s

    def open(self, node, flags):
        flags &= OPEN_FLAGS
        if self.readonly and flags & WRITE_FLAGS:
            raise _err(errno.EROFS)
        self._budget()
        if node.fd is not None:
            if flags & WRITE_FLAGS:
                raise _err(errno.EISDIR)
            fd = self._open(node.fd, b".", os.O_RDONLY | os.O_DIRECTORY)
            up = node.parent if node.parent is not None else node
            return self._track(fd, True, 0, os.stat(up.fd).st_ino), os.stat(fd)
        pre = os.stat(node.name, dir_fd=node.parent.fd, follow_symlinks=False)
        if st_mod.S_ISLNK(pre.st_mode):
            raise _err(errno.ELOOP)
        if not st_mod.S_ISREG(pre.st_mode):
            raise _err(errno.EISDIR if st_mod.S_ISDIR(pre.st_mode) else errno.EOPNOTSUPP)
        fd, s = self._open_regular(node.parent.fd, node.name, flags)
        return self._track(fd, False, flags), s

    def create(self, node, name, flags, mode):
        self._writable()
        dirfd = self._dir(node)
        check_name(name)
        self._budget()
        flags = (flags & (OPEN_FLAGS | os.O_EXCL)) | os.O_CREAT
        fd, s = self._open_regular(dirfd, name, flags, mode & MODE_BITS)
        f = self._track(fd, False, flags)
        known = self._entries.get((node, name))
        child = self.dup(known) if known is not None and known.fd is None else self._new(node, name, None, None)
        return child, f, s

    def close_file(self, handle):
        if handle in self._files:
            if handle.fid is not None:          # no fid is served from an fd once it is closed
                self.accel.unbind(handle.fid, handle.fd)
                handle.fid = None
            self._files.discard(handle)
            os.close(handle.fd)
            self._fds -= 1

    def fstat(self, handle):
        return os.stat(handle.fd)

    # ---- the compiled Tread/Twrite (p9fast.py) ---------------------------------------------------------------
    def bind_fid(self, fid, handle):
        """The server opened ``handle`` (a regular file) for ``fid``: the compiled path may read it (an
        ``O_RDONLY``/``O_RDWR`` open) and write it (``O_WRONLY``/``O_RDWR``, never on a read-only share) until
        :meth:`close_file` unbinds it."""
        if self.accel is None or handle not in self._files or handle.isdir:
            return
        acc = handle.accmode
        readable = acc in (os.O_RDONLY, os.O_RDWR)
        writable = acc in (os.O_WRONLY, os.O_RDWR) and not self.readonly
        if readable or writable:
            self.accel.bind(fid, handle.fd, readable, writable)
            handle.fid = fid

    def serve_compiled(self, ram, table, tsize, msize):
        """One Tread/Twrite whose chain is the indirect table at ``table`` (``tsize`` entries) in ``ram``: the
        used length, or None with nothing read or written (see ``p9fast.py``)."""
        if self.accel is None:
            return None
        return self.accel.serve(ram, table, tsize, msize)

    def serve_queue(self, ram, ring, msize, max_n):
        """The queue pass over the virtqueue ``ring``: ``(served, last_avail, used_idx)``, or None (see
        ``p9fast.py``)."""
        if self.accel is None:
            return None
        return self.accel.serve_queue(ram, ring, msize, max_n)

    def read(self, handle, segs, offset):
        return os.preadv(handle.fd, segs, offset) if segs else 0

    def write(self, handle, segs, offset):
        self._writable()
        return os.pwritev(handle.fd, segs, offset) if segs else 0

    def fsync(self, handle, datasync):
        (os.fdatasync if datasync else os.fsync)(handle.fd)

    def readdir(self, handle, offset):
        if not handle.isdir:
            raise _err(errno.ENOTDIR)
        if offset == 0 or handle.listing is None:
            handle.listing = self._list(handle)
        listing = handle.listing
        return ((i + 1, *listing[i]) for i in range(min(offset, len(listing)), len(listing)))

    @staticmethod
    def _list(handle):
        out = [(b".", os.stat(handle.fd).st_ino, DT_DIR), (b"..", handle.dotdot, DT_DIR)]
        with os.scandir(handle.fd) as it:
            for e in it:
                if e.is_dir(follow_symlinks=False):
                    dtype = DT_DIR
                elif e.is_symlink():
                    dtype = DT_LNK
                elif e.is_file(follow_symlinks=False):
                    dtype = DT_REG
                else:
                    try:
                        dtype = st_mod.S_IFMT(e.stat(follow_symlinks=False).st_mode) >> 12
                    except OSError:
                        dtype = DT_UNKNOWN
                out.append((os.fsencode(e.name), e.inode(), dtype))
        return out

    def readlink(self, node):
        if node.fd is not None:
            raise _err(errno.EINVAL)
        return os.readlink(node.name, dir_fd=node.parent.fd)

    def statfs(self, node):
        return os.fstatvfs(node.fd if node.fd is not None else node.parent.fd)

    def close(self):
        for f in list(self._files):
            self.close_file(f)
        for n in list(self._dirs.values()):
            if n.fd is not None:
                os.close(n.fd)
                n.fd = None
        self._dirs.clear()
        self._entries.clear()
        self._fds = 0


def open_options(o):
    """The opener of ``vmmshim.backends.open_device_backends`` for ``virtio-9p``: ``o`` (config keys or the
    legacy option string) with the share opened as ``backend`` and bhyve's ``sharename``/``path``/``ro`` keys; with
    ``p9_compiled`` true (the VM's ``vmmshim.p9_compiled``) the share carries the compiled Tread/Twrite where the
    library builds (``p9fast.py``)."""
    from bhyve_devices.virtio import p9 as _dev
    from bhyve_devices.virtio.pci import as_options, is_true

    from . import BACKEND_OPT, p9fast
    o = as_options(o, _dev.parse_options)
    tag, path, ro = _dev.share_config(o)
    raise_fd_limit()
    o.update(sharename=tag, path=path, ro=ro)
    accel = p9fast.accelerator() if is_true(o.get("p9_compiled", False)) else None
    o[BACKEND_OPT] = HostShare(path, readonly=ro, accel=accel)
    return o
