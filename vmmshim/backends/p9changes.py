"""The changes a virtio-9p share allows, a mixin of :class:`.p9fs.HostShare` (whose module docstring has the
design): attributes (``setattr``: mode, owner, size, times), new names (``mkdir``, ``symlink``, ``mknod``,
``link``), removal and renames, each refused with EROFS on a read-only share. Every one is a ``*at`` call with one
name relative to a directory node's fd and never follows a symlink: owner and times with ``AT_SYMLINK_NOFOLLOW``,
the mode through the ``O_PATH`` fd of the node itself (``/proc/self/fd/N``: the inode the fd holds, a symlink
refused: Linux's ``fchmodat`` cannot refuse to follow one), a truncate through an ``O_NOFOLLOW`` open of a regular
file. A rename the guest makes moves the node of the old name to the new one, so its fids stay valid.

Not supported: device nodes (``mknod`` makes FIFOs, sockets and regular files), setuid and setgid bits
(:data:`MODE_BITS`), ``chmod`` without ``/proc`` (EOPNOTSUPP), a symlink's own mode.
"""

import errno
import os
import stat as st_mod
import time

from .p9resolve import check_name

MODE_BITS = 0o1777          # permissions and sticky; never setuid/setgid
NOW = -1                    # a time in setattr: the current time
SYMLINK_MAX = 4095
_PROC_FD = "/proc/self/fd/"


def _err(code, what=None):
    return OSError(code, what or os.strerror(code))


class ShareChanges:
    """What :class:`.p9fs.HostShare` does to the share (see the module docstring)."""

    def _writable(self):
        if self.readonly:
            raise _err(errno.EROFS)

    def setattr(self, node, handle, mode=None, uid=None, gid=None, size=None, atime_ns=None, mtime_ns=None):
        self._writable()
        dirfd, name = self._at(node)
        if mode is not None:
            self._chmod(node, mode & MODE_BITS)
        if uid is not None or gid is not None:
            os.chown(name, -1 if uid is None else uid, -1 if gid is None else gid, dir_fd=dirfd,
                     follow_symlinks=False)
        if size is not None:
            self._truncate(node, handle, size)
        if atime_ns is not None or mtime_ns is not None:
            old = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
            now = time.time_ns()
            pick = lambda v, cur: cur if v is None else now if v == NOW else v  # noqa: E731
            os.utime(name, ns=(pick(atime_ns, old.st_atime_ns), pick(mtime_ns, old.st_mtime_ns)), dir_fd=dirfd,
                     follow_symlinks=False)

    def _pin(self, node):
        """An O_PATH fd of the node itself and whether the caller closes it."""
        if node.fd is not None:
            return node.fd, False
        return self._open(node.parent.fd, node.name, os.O_PATH), True

    def _chmod(self, node, mode):
        fd, mine = self._pin(node)
        try:
            if st_mod.S_ISLNK(os.stat(fd).st_mode):
                raise _err(errno.EOPNOTSUPP, "a symlink has no mode")
            try:
                os.chmod(_PROC_FD + str(fd), mode)      # the inode the fd holds, not a name looked up again
            except FileNotFoundError:
                raise _err(errno.EOPNOTSUPP, "chmod needs /proc") from None
        finally:
            if mine:
                os.close(fd)

    def _truncate(self, node, handle, size):
        if handle is not None and handle.writable:
            os.ftruncate(handle.fd, size)
            return
        if node.fd is not None:
            raise _err(errno.EISDIR)
        fd = self._open(node.parent.fd, node.name, os.O_WRONLY | os.O_NONBLOCK | os.O_NOCTTY)
        try:
            if not st_mod.S_ISREG(os.stat(fd).st_mode):
                raise _err(errno.EINVAL)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    # ---- names ------------------------------------------------------------------------------------------------
    def _named(self, node, name):
        self._writable()
        dirfd = self._dir(node)
        check_name(name)
        return dirfd

    def mkdir(self, node, name, mode):
        dirfd = self._named(node, name)
        os.mkdir(name, mode & MODE_BITS, dir_fd=dirfd)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def symlink(self, node, name, target):
        dirfd = self._named(node, name)
        if not target or b"\0" in target:
            raise _err(errno.EINVAL)
        if len(target) > SYMLINK_MAX:
            raise _err(errno.ENAMETOOLONG)
        os.symlink(target, name, dir_fd=dirfd)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def mknod(self, node, name, mode):
        dirfd = self._named(node, name)
        kind = st_mod.S_IFMT(mode) or st_mod.S_IFREG
        if kind not in (st_mod.S_IFIFO, st_mod.S_IFSOCK, st_mod.S_IFREG):
            raise _err(errno.EPERM, "no device nodes in a share")
        os.mknod(name, kind | (mode & MODE_BITS), 0, dir_fd=dirfd)
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)

    def link(self, node, target, name):
        dirfd = self._named(node, name)
        if target.fd is not None:
            raise _err(errno.EPERM)
        os.link(target.name, name, src_dir_fd=target.parent.fd, dst_dir_fd=dirfd, follow_symlinks=False)

    def unlink(self, node, name, rmdir):
        dirfd = self._named(node, name)
        (os.rmdir if rmdir else os.unlink)(name, dir_fd=dirfd)

    def remove(self, node):
        self._writable()
        if node.parent is None:
            raise _err(errno.EBUSY)
        (os.rmdir if node.fd is not None else os.unlink)(node.name, dir_fd=node.parent.fd)

    def rename(self, olddir, oldname, newdir, newname):
        src = self._named(olddir, oldname)
        dst = self._named(newdir, newname)
        os.rename(oldname, newname, src_dir_fd=src, dst_dir_fd=dst)
        moved = self._entries.pop((olddir, oldname), None)
        if moved is not None:
            newdir.refs += 1
            moved.parent, moved.name = newdir, newname
            self._entries[(newdir, newname)] = moved
            self.release(olddir)

    def rename_node(self, node, newdir, newname):
        if node.parent is None:
            raise _err(errno.EBUSY)
        self.rename(node.parent, node.name, newdir, newname)
