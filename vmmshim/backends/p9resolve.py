"""Opening one name beneath a directory fd without following a symlink, for the virtio-9p share
(:mod:`.p9fs`): Linux's ``openat2(2)`` (5.6) with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
RESOLVE_NO_MAGICLINKS`` where the kernel has it, else ``openat(2)`` with ``O_NOFOLLOW``. The share is walked one
component at a time (a 9P walk names one component per step), so both refuse the same things: a name with ``/``
or NUL, ``..``, and a symlink as the name opened (ELOOP; with ``O_PATH`` the symlink itself is opened, never its
target). openat2 is the second lock on the same door: should a caller ever hand it more than one component, the
kernel still keeps the result beneath the directory and follows no symlink on the way.

``struct open_how`` (``include/uapi/linux/openat2.h``: flags, mode, resolve, each u64) is :class:`OpenHow`; the
call goes through libc's ``syscall(SYS_openat2, ...)`` (437 on every Linux architecture).

Not supported: ``RESOLVE_NO_XDEV`` (a share may hold mount points: they are crossed), ``RESOLVE_CACHED``.
"""

import ctypes
import errno
import os

SYS_OPENAT2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
#: What every open of the share asks of openat2.
RESOLVE_SHARE = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS
#: Added to every open: no symlink followed, no fd leaked to a child process.
ALWAYS = os.O_NOFOLLOW | os.O_CLOEXEC
NAME_MAX = 255

OPENAT2, NOFOLLOW, AUTO = "openat2", "nofollow", "auto"


class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def check_name(name, dots=False):
    """EINVAL unless ``name`` is one path component (bytes, not empty, no ``/`` or NUL; ``.`` and ``..`` only
    with ``dots``); ENAMETOOLONG past NAME_MAX."""
    if not isinstance(name, bytes) or not name or b"/" in name or b"\0" in name:
        raise OSError(errno.EINVAL, "not a file name")
    if not dots and name in (b".", b".."):
        raise OSError(errno.EINVAL, "not a file name")
    if len(name) > NAME_MAX:
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))


def _libc():
    try:
        lib = ctypes.CDLL(None, use_errno=True)
        fn = lib.syscall
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_long
    return fn


class Resolver:
    """Opens a name beneath a directory fd: ``how`` is :data:`OPENAT2`, :data:`NOFOLLOW` (the ``openat`` walk) or
    :data:`AUTO` (openat2 if the kernel answers it, found on the first call). :attr:`how` says which is in use."""

    def __init__(self, how=AUTO):
        if how not in (OPENAT2, NOFOLLOW, AUTO):
            raise ValueError(f"unknown resolver {how!r}")
        self.how = how
        self._syscall = _libc() if how != NOFOLLOW else None
        if how == OPENAT2 and self._syscall is None:
            raise OSError(errno.ENOSYS, "openat2 cannot be called here")

    def probe(self, dirfd):
        """Settles :data:`AUTO` with a harmless openat2 of ``.`` beneath ``dirfd``; returns :attr:`how`."""
        if self.how != AUTO:
            return self.how
        if self._syscall is None:
            self.how = NOFOLLOW
            return self.how
        try:
            os.close(self._openat2(dirfd, b".", os.O_PATH | ALWAYS, 0))
            self.how = OPENAT2
        except OSError:             # ENOSYS (before 5.6), EPERM (a seccomp filter), ...
            self.how = NOFOLLOW
        return self.how

    def _openat2(self, dirfd, name, flags, mode):
        how = OpenHow(flags, mode if flags & os.O_CREAT else 0, RESOLVE_SHARE)
        fd = self._syscall(ctypes.c_long(SYS_OPENAT2), ctypes.c_int(dirfd), ctypes.c_char_p(name),
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return fd

    def open(self, dirfd, name, flags, mode=0):
        """An fd of ``name`` (one component, or ``.``) beneath ``dirfd``, opened with ``flags`` plus
        :data:`ALWAYS`; OSError as the kernel says (ELOOP for a symlink unless ``O_PATH``)."""
        check_name(name, dots=True)
        if name == b"..":
            raise OSError(errno.EINVAL, "'..' is never looked up on the host")
        flags |= ALWAYS
        if self.how == AUTO:
            self.probe(dirfd)
        if self.how == OPENAT2:
            return self._openat2(dirfd, name, flags, mode)
        return os.open(name, flags, mode, dir_fd=dirfd)
