"""The NVM command set's I/O commands (NVM Express Base Specification 1.4, chapter 6; bhyve ``pci_nvme.c``'s
``pci_nvme_handle_io_cmd``) over a :class:`~bhyve_devices.backends.BlockBackend`, a mixin of
:class:`~bhyve_devices.nvme.controller.NvmeController`.

- Read / Write (6.9, 6.15): ``backend.preadv_full``/``pwritev_full`` straight into or out of the guest's buffers
  (PRPs or an SGL, :mod:`bhyve_devices.nvme.prp`); FUA writes are flushed before they complete.
- Flush (6.8): ``backend.flush()``; NSID FFFFFFFFh is every namespace (Identify's VWC says so).
- Write Zeroes (6.16): ``backend.write_zeroes`` (DEAC: may deallocate) where the backend can, else zeros written.
- Dataset Management (6.7): the ranges are read once and checked; with the Deallocate attribute each range is
  ``backend.discard``-ed where the namespace deallocates (else the hint is taken and ignored, as 6.7 allows).

Checks, each before any byte moves: namespace 1 (Invalid Namespace or Format), no fused operations and no
protection information (Invalid Field), PSDT PRP or SGL with a contiguous metadata pointer (Invalid Field), the
LBA range inside the namespace (LBA Out of Range), a transfer within MDTS (Invalid Field), a read-only image
(Namespace is Write Protected). A host I/O error is a media error the host may retry: Unrecovered Read Error for a
read, Write Fault otherwise.

Where the backend has a compiled queue pass (``backend.nvme_compiled``, ``backend.serve_nvme``: the host's
``vmmshim/backends/nvmefast.py``), each I/O queue's new entries go to it first (:meth:`NvmCommands._drain_compiled`):
it serves the leading run of plain reads and writes in C and stops at the first entry it does not take, which the
code here then serves; the answers are the same either way (``tests/unit/test_nvme_compiled.py``).

Not supported (Invalid Command Opcode): Compare, Write Uncorrectable, Verify, reservations, and Dataset Management
when ``dsm=disable`` (or ``dsm=auto`` on an image that cannot deallocate); metadata, end-to-end protection.
"""

import struct

from . import regs as R
from .identify import MAX_TRANSFER, NSID
from .layouts import DSM_RANGE_FMT, DSM_RANGE_SIZE
from .prp import copy_in, data_buffers

ZERO_CHUNK = 1 << 20                # zeros written per call where the backend cannot write zeroes itself
_ZEROS = bytes(ZERO_CHUNK)
_DSM_RANGE = struct.Struct(DSM_RANGE_FMT)
WRITE_PROTECTED = R.status(R.SC_NS_WRITE_PROTECTED)
READ_ERROR = R.status(R.SC_UNRECOVERED_READ, R.SCT_MEDIA, dnr=False)
WRITE_FAULT = R.status(R.SC_WRITE_FAULT, R.SCT_MEDIA, dnr=False)
NLB_MASK = 0xFFFF


class NvmCommands:
    def _init_io(self):
        self._compiled = bool(getattr(self.backend, "nvme_compiled", False))
        self.compiled_served = 0        # commands the compiled pass served (not in ``stats``: checkpoints keep those)
        self._io_handlers = {R.NVM_READ: self._read, R.NVM_WRITE: self._write, R.NVM_FLUSH: self._flush,
                             R.NVM_WRITE_ZEROES: self._write_zeroes}
        if self.dsm:
            self._io_handlers[R.NVM_DSM] = self._dsm

    def _drain_compiled(self, sq, cq, tail, limit):
        """The leading reads and writes of ``sq`` (up to ``tail``, at most ``limit``) served by the backend's
        compiled queue pass, where it has one (``backend.serve_nvme``); returns how many. It stops at the first
        entry it does not serve, or when ``cq`` is full, and the Python path goes on from there."""
        ram = getattr(self.mem, "ram", None)
        if ram is None:
            return 0
        got = self.backend.serve_nvme(ram, (sq.base, sq.size, sq.head, tail, sq.qid),
                                      (cq.base, cq.size, cq.head, cq.tail, cq.phase), limit, self.nsze,
                                      self.lba_shift, MAX_TRANSFER)
        if not got or not got[0]:
            return 0
        n, sq.head, cq.tail, cq.phase, reads, writes, nread, nwritten = got
        cq.posted = True
        st = self.stats
        st["reads"] += reads
        st["writes"] += writes
        st["bytes_read"] += nread
        st["bytes_written"] += nwritten
        self.compiled_served += n
        return n

    def _io(self, e):
        flags, nsid = e[R.E_FLAGS], e[R.E_NSID]
        handler = self._io_handlers.get(e[R.E_OPCODE])
        if handler is None:
            return R.INVALID_OPCODE, 0
        psdt = flags >> R.FLAGS_PSDT_SHIFT
        if flags & R.FLAGS_FUSE_MASK or psdt > R.PSDT_SGL:
            return R.INVALID_FIELD, 0
        if nsid != NSID and not (nsid == R.NSID_ALL and e[R.E_OPCODE] == R.NVM_FLUSH):
            return R.INVALID_NAMESPACE, 0
        return handler(e, psdt == R.PSDT_SGL)

    def _range(self, e):
        """``(byte offset, byte length, CDW12)`` of the command's LBA range, checked against the namespace."""
        c12 = e[R.E_CDW12]
        slba, nlb = (e[R.E_CDW11] << 32) | e[R.E_CDW10], (c12 & NLB_MASK) + 1
        if (c12 >> R.RW_PRINFO_SHIFT) & R.RW_PRINFO_MASK:
            raise R.NvmeError(R.INVALID_FIELD)
        if slba + nlb > self.nsze:
            raise R.NvmeError(R.LBA_OUT_OF_RANGE)
        return slba << self.lba_shift, nlb << self.lba_shift, c12

    def _read(self, e, sgl):
        off, length, _ = self._range(e)
        if length > MAX_TRANSFER:
            return R.INVALID_FIELD, 0
        bufs = data_buffers(self.mem, sgl, e[R.E_PRP1], e[R.E_PRP2], length)
        try:
            self.backend.preadv_full(bufs, off, length)
        except OSError:
            self.stats["media_errors"] += 1
            return READ_ERROR, 0
        self.stats["reads"] += 1
        self.stats["bytes_read"] += length
        return R.SUCCESS, 0

    def _write(self, e, sgl):
        off, length, c12 = self._range(e)
        if length > MAX_TRANSFER:
            return R.INVALID_FIELD, 0
        if self.readonly:
            return WRITE_PROTECTED, 0
        bufs = data_buffers(self.mem, sgl, e[R.E_PRP1], e[R.E_PRP2], length)
        try:
            self.backend.pwritev_full(bufs, off, length)
            if c12 & R.RW_FUA:
                self.backend.flush()
        except OSError:
            self.stats["media_errors"] += 1
            return WRITE_FAULT, 0
        self.stats["writes"] += 1
        self.stats["bytes_written"] += length
        return R.SUCCESS, 0

    def _flush(self, e, sgl):
        if not self.readonly:
            try:
                self.backend.flush()
            except OSError:
                return WRITE_FAULT, 0
        return R.SUCCESS, 0

    def _write_zeroes(self, e, sgl):
        off, length, c12 = self._range(e)
        if self.readonly:
            return WRITE_PROTECTED, 0
        try:
            if self.deallocates:
                self.backend.write_zeroes(off, length, bool(c12 & R.WZ_DEAC))
            else:
                while length:
                    n = min(length, ZERO_CHUNK)
                    self.backend.pwritev_full([memoryview(_ZEROS)[:n]], off, n)
                    off, length = off + n, length - n
            if c12 & R.RW_FUA:
                self.backend.flush()
        except OSError:
            self.stats["media_errors"] += 1
            return WRITE_FAULT, 0
        return R.SUCCESS, 0

    def _dsm(self, e, sgl):
        count = (e[R.E_CDW10] & 0xFF) + 1
        raw = copy_in(data_buffers(self.mem, sgl, e[R.E_PRP1], e[R.E_PRP2], count * DSM_RANGE_SIZE))
        ranges = [(slba, nlb) for _, nlb, slba in _DSM_RANGE.iter_unpack(raw)]
        if any(nlb and slba + nlb > self.nsze for slba, nlb in ranges):
            return R.LBA_OUT_OF_RANGE, 0
        if not e[R.E_CDW11] & R.DSM_DEALLOCATE:
            return R.SUCCESS, 0
        if self.readonly:
            return WRITE_PROTECTED, 0
        if self.deallocates:
            try:
                for slba, nlb in ranges:
                    if nlb:
                        self.backend.discard(slba << self.lba_shift, nlb << self.lba_shift)
            except OSError:
                self.stats["media_errors"] += 1
                return WRITE_FAULT, 0
        return R.SUCCESS, 0
