"""A raw image file as a :class:`bhyve_devices.backends.BlockBackend` (bhyve ``block_if.c``).

:class:`FileBlockBackend` opens the image read-write, or read-only with ``readonly`` or when a read-write open is
refused (EACCES, EROFS, EPERM: as ``blockif_open``). Its size is the file's size.

- reads and writes: ``os.preadv``/``os.pwritev`` straight into and out of the caller's buffers (guest memory, no
  copies), in groups of at most ``IOV_MAX`` buffers and ``MAX_RW_COUNT`` bytes, retrying short transfers
  (:func:`_rw_full`); a transfer that moves nothing is EIO (the end of the image);
- flush: ``os.fsync``;
- discard: ``fallocate(PUNCH_HOLE|KEEP_SIZE)``, else ``ZERO_RANGE``, else zeros are written; write-zeroes:
  ``PUNCH_HOLE`` with the unmap flag (as discard), else ``ZERO_RANGE``, else ``PUNCH_HOLE``, else zeros are
  written. ``fallocate`` is libc's, through ctypes (ENOSYS where there is none);
- the compiled request: with ``accel`` (``vmmshim/backends/blkfast.py``), :meth:`FileBlockBackend.serve_compiled`
  hands it the image's fd, its capacity in whole sectors and the read-only flag; with ``nvme_accel``
  (``vmmshim/backends/nvmefast.py``), :meth:`FileBlockBackend.serve_nvme` hands NVMe's queue pass the fd and
  the read-only flag.

Not supported: block devices' ``BLKDISCARD`` and size ioctls (a block device's size is its ``lseek`` end),
``nocache``/``direct``/``sync`` (O_DIRECT, O_SYNC), bhyve's asynchronous request queue and its threads (every call
returns when the transfer is done), images over NFS locks or ``flock``.
"""

import ctypes
import ctypes.util
import errno
import os

from bhyve_devices.virtio.virtqueue import split_segments

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

IOV_MAX = 1024                  # Linux's UIO_MAXIOV
_RW_CHUNK = 0x7FFFF000          # Linux's MAX_RW_COUNT
SECTOR = 512                    # virtio-blk's sector: the compiled request's ranges are whole sectors
ZERO_CHUNK = 1 << 20            # zeros written per pwrite where fallocate cannot help

#: errnos that mean "this fallocate mode is not there": the next way is tried
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP)
#: errnos of a refused read-write open: the image is opened read-only instead
_RO_FALLBACK = (errno.EACCES, errno.EROFS, errno.EPERM)


def _libc_fallocate():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def fallocate(fd, mode, offset, length):
    """Linux fallocate(2) with flags; raises OSError (ENOSYS where there is none)."""
    if _fallocate is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _rw_full(fn, fd, segs, offset, total=None):
    """preadv/pwritev over all of ``segs`` (in IOV_MAX groups, retrying short transfers); returns bytes moved.
    ``total``: the bytes in ``segs`` if the caller has counted them. A request that fits one call (what a Linux
    guest sends: at most seg_max segments) makes that one call and nothing else."""
    if len(segs) <= IOV_MAX:
        want = sum(map(len, segs)) if total is None else total
        if want <= _RW_CHUNK:
            n = fn(fd, segs, offset) if want else 0
            if n == want:
                return n
            if n <= 0:
                raise OSError(errno.EIO, "short transfer at end of image")
            return n + _rw_full(fn, fd, split_segments(segs, n)[1], offset + n)
    done = 0
    segs = [m for m in segs if len(m)]
    while segs:
        group = segs[:IOV_MAX]
        want = sum(len(m) for m in group)
        if want > _RW_CHUNK:
            group, _ = split_segments(group, _RW_CHUNK)
            want = _RW_CHUNK
        n = fn(fd, group, offset + done)
        if n <= 0:
            raise OSError(errno.EIO, "short transfer at end of image")
        done += n
        segs = split_segments(segs, n)[1]
    return done


def open_image(path, readonly=False):
    """``(fd, readonly)``: ``path`` opened read-write, or read-only (asked for, or the read-write open refused)."""
    fd = -1
    if not readonly:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in _RO_FALLBACK:
                raise
    if fd < 0:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        readonly = True
    return fd, readonly


class FileBlockBackend:
    """An image file (see the module docstring); ``accel``: a compiled request (``blkfast.accelerator()``)."""

    def __init__(self, path, readonly=False, accel=None, nvme_accel=None):
        self.path = path
        self.fd, self.readonly = open_image(path, readonly)
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.candelete = not self.readonly
        self.accel = accel
        self.compiled = accel is not None
        self.nvme_accel = nvme_accel
        self.nvme_compiled = nvme_accel is not None
        self._capacity = self.size // SECTOR * SECTOR

    def preadv_full(self, segs, offset, total=None):
        return _rw_full(os.preadv, self.fd, segs, offset, total)

    def pwritev_full(self, segs, offset, total=None):
        return _rw_full(os.pwritev, self.fd, segs, offset, total)

    def flush(self):
        os.fsync(self.fd)

    def discard(self, offset, length):
        self._deallocate((FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE),
                         offset, length)

    def write_zeroes(self, offset, length, unmap):
        if unmap:
            self.discard(offset, length)
            return
        self._deallocate((FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE),
                         offset, length)

    def _deallocate(self, modes, offset, length):
        """The first of the fallocate ``modes`` the file takes, else zeros written over the range."""
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in _NOT_SUPPORTED:
                    raise
        self._write_zeros(offset, length)

    def _write_zeros(self, off, length):
        zero = bytes(min(length, ZERO_CHUNK))
        while length:
            k = min(length, len(zero))
            n = os.pwrite(self.fd, memoryview(zero)[:k], off)
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            off += n
            length -= n

    def serve_compiled(self, ram, table, tsize):
        if self.accel is None:
            return None
        return self.accel.serve(ram, table, tsize, self.fd, self._capacity, self.readonly)

    def serve_ahci(self, ram, cmdlist, slot, sectors, sector_size):
        """AHCI's compiled data command (``ahcifast.py``), where ``accel`` is one: slot ``slot`` of the command list
        at ``cmdlist`` in ``ram`` for a disk of ``sectors`` sectors of ``sector_size`` bytes, ``(nbytes, flags,
        prdtl, cfis, error, finish)`` (``Accelerator.serve_slot``); None (nothing read or written) where the
        port's Python path must serve it."""
        serve = getattr(self.accel, "serve_slot", None)
        if serve is None:
            return None
        return serve(ram, cmdlist, slot, self.fd, sectors, sector_size, self.readonly)

    def serve_nvme(self, ram, sq, cq, max_n, nsze, lba_shift, max_transfer):
        """NVMe's compiled queue pass (``nvmefast.Accelerator.drain``) over this image; None without one."""
        if self.nvme_accel is None:
            return None
        return self.nvme_accel.drain(ram, self.fd, self.readonly, sq, cq, max_n, nsze, lba_shift, max_transfer)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
