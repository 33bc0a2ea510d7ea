"""virtio-blk (VIRTIO 1.1 section 5.2; bhyve ``pci_virtio_block.c``) over a
:class:`bhyve_devices.backends.BlockBackend` (the host side, bhyve's ``block_if.c``, is ``vmmshim/backends/block.py``).

``-s N,virtio-blk,PATH[,ro][,sectorsize=LOGICAL[/PHYSICAL]][,nodelete][,ser=ID]`` -> :func:`parse_options`; the VM
opens the image as a backend (``vmmshim.backends.open_device_backends``: read-write, or read-only with ``ro`` or
when a read-write open is refused) and builds :class:`VirtioBlock` over it. Capacity is the backend's size in
512-byte sectors.

Requests (5.2.6): a 16-byte header (:data:`BLK_REQ_HDR`: type, reserved, sector) in the device-readable part, the
data, and a status byte as the last device-writable byte, in any descriptor arrangement (2.6.4.1):

- IN: ``backend.preadv_full`` straight into the guest's buffers; OUT: ``backend.pwritev_full`` straight from them;
- FLUSH: ``backend.flush()``;
- GET_ID: the 20-byte serial, ``BHYVE-XXXX-XXXX-XXX`` from the MD5 of the backend's path as FreeBSD's bhyve makes it
  (``snprintf`` into 20 bytes keeps 19 characters), or ``ser=``;
- DISCARD: ``backend.discard``; WRITE_ZEROES: ``backend.write_zeroes`` with the unmap flag (1 segment per request,
  as advertised);
- unknown types: S_UNSUPP; a range beyond the capacity, a data length that is not a multiple of 512, a host I/O
  error: S_IOERR; on a read-only image (VIRTIO_BLK_F_RO offered) OUT, DISCARD and WRITE_ZEROES get S_IOERR and
  write nothing (5.2.6.2). A chain without a device-writable status byte cannot be answered: the device reports
  DEVICE_NEEDS_RESET.

:meth:`VirtioBlock.queue_notify` serves the queue right there, under the device's lock, on whichever thread calls
it (the VMM chooses: a doorbell thread of the device's own where it has one); each batch ends with the queue's
interrupt (through the transport's callable).

When the backend has a compiled request (``backend.compiled``: ``vmmshim/backends/blkfast.py``), each chain that is
one indirect table is offered to ``backend.serve_compiled`` first (``Virtqueue.take_indirect``); it serves Linux's
reads and writes within the image and gives back every other chain untouched, for the Python path here. The
device answers the same either way (``tests/unit/test_virtio_blk_compiled.py`` compares the two).

Configuration (5.2.4, :data:`BLK_CONFIG`): capacity, seg_max, blk_size (the logical sector size), topology
(physical_block_exp, min_io_size), discard and write-zeroes limits.

seg_max is the queue size - 2 (as QEMU; a chain without indirect descriptors must fit the ring), and
:data:`SEG_MAX_INDIRECT` once the driver has accepted VIRTIO_RING_F_INDIRECT_DESC (the config space is read after
feature negotiation, 3.1.1): one indirect table then carries a whole 1 MiB request of scattered 4 KiB pages
(256 segments), which 254 would split in two, and every request costs a notification and an interrupt.

Features: SEG_MAX, BLK_SIZE, FLUSH, TOPOLOGY, and RO for read-only images, else DISCARD and WRITE_ZEROES (unless
``nodelete`` or the backend cannot delete).

Snapshot: the negotiated features (the configuration space is rebuilt from them) and, to be checked on restore,
the geometry the guest was told (capacity, sector sizes, read-only): an image that changed refuses the restore.
The queue is the transport's; no request is in flight at a snapshot (the caller's thread serves each one whole).

Not supported: multiple queues (VIRTIO_BLK_F_MQ), CONFIG_WCE (the cache is always write-back: the guest
flushes), SCSI passthrough, geometry, ``nocache``/``direct``/``sync`` (accepted, ignored), lifetime/secure erase
(1.2), a worker thread of the device's own (the caller's thread serves).
"""
import hashlib
import struct
import threading

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from bhyve_devices.snapshot import SnapshotError

from .device import VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_ID_BLOCK, VirtioDevice, bit
from .virtqueue import split_segments, split_tail

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1
VIRTIO_BLK_ID_BYTES = 20
SECTOR = 512
MAX_SECTOR_SIZE = 65536
MAX_DISCARD_SECTORS = 1 << 22   # 2 GiB per request
IOV_MAX = 1024                  # Linux's UIO_MAXIOV: the backend's transfers take this many
SEG_MAX_INDIRECT = IOV_MAX - 2      # with indirect descriptors: a request's data is one preadv/pwritev

BLK_REQ_HDR = Struct("type" / Int32ul, "reserved" / Int32ul, "sector" / Int64ul)
BLK_DISCARD_WZ = Struct("sector" / Int64ul, "num_sectors" / Int32ul, "flags" / Int32ul)
BLK_CONFIG = Struct(
    "capacity" / Int64ul,
    "size_max" / Int32ul,
    "seg_max" / Int32ul,
    "geometry" / Struct("cylinders" / Int16ul, "heads" / Int8ul, "sectors" / Int8ul),
    "blk_size" / Int32ul,
    "topology" / Struct("physical_block_exp" / Int8ul, "alignment_offset" / Int8ul, "min_io_size" / Int16ul,
                        "opt_io_size" / Int32ul),
    "writeback" / Int8ul,
    Padding(3),
    "max_discard_sectors" / Int32ul,
    "max_discard_seg" / Int32ul,
    "discard_sector_alignment" / Int32ul,
    "max_write_zeroes_sectors" / Int32ul,
    "max_write_zeroes_seg" / Int32ul,
    "write_zeroes_may_unmap" / Int8ul,
    Padding(3),
)
_HDR = struct.Struct("<IIQ")
_SEG = struct.Struct("<QII")


def bhyve_ident(path):
    """The GET_ID string bhyve makes from the image path (19 characters, see the module docstring)."""
    d = hashlib.md5(path.encode()).digest()
    s = "BHYVE-%02X%02X-%02X%02X-%02X%02X" % tuple(d[:6])
    return s[:VIRTIO_BLK_ID_BYTES - 1]


def parse_options(opts):
    """bhyve's ``PATH[,ro][,sectorsize=L[/P]][,nodelete][,ser=ID]...`` -> keyword arguments of VirtioBlock."""
    parts = [p for p in opts.split(",")] if opts else []
    if not parts or not parts[0]:
        raise ValueError("virtio-blk needs a path")
    kw = dict(path=parts[0])
    for p in parts[1:]:
        key, _, val = p.partition("=")
        if key == "ro":
            kw["readonly"] = True
        elif key == "sectorsize":
            log, _, phys = val.partition("/")
            kw["sectorsize"] = int(log, 0)
            kw["physical_sectorsize"] = int(phys, 0) if phys else int(log, 0)
        elif key == "nodelete":
            kw["nodelete"] = True
        elif key in ("ser", "serial"):
            kw["serial"] = val
        elif key in ("nocache", "direct", "sync", "path"):
            if key == "path":
                kw["path"] = val
        elif key:
            raise ValueError(f"virtio-blk: unknown option {p!r}")
    return kw


class VirtioBlock(VirtioDevice):
    name = "virtio-blk"
    device_type = VIRTIO_ID_BLOCK
    num_queues = 1
    queue_size = 256
    config_size = BLK_CONFIG.sizeof()   # 60

    def __init__(self, backend, sectorsize=512, physical_sectorsize=None, nodelete=False, serial=None,
                 queue_size=None):
        super().__init__()
        if queue_size is not None:
            self.queue_size = queue_size
        phys = physical_sectorsize or sectorsize
        for s in (sectorsize, phys):
            if s < SECTOR or s & (s - 1) or s > MAX_SECTOR_SIZE:
                raise ValueError(f"virtio-blk: bad sector size {s}")
        if phys < sectorsize:
            raise ValueError("virtio-blk: physical sector size below the logical one")
        self.backend = backend
        self.sectorsize = sectorsize
        self.physical_sectorsize = phys
        self.readonly = readonly = backend.readonly
        self.capacity = backend.size // SECTOR
        self.ident = (serial if serial is not None else bhyve_ident(backend.path)).encode()[:VIRTIO_BLK_ID_BYTES]
        self.candelete = backend.candelete and not readonly and not nodelete
        f = (bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) | bit(VIRTIO_BLK_F_FLUSH)
             | bit(VIRTIO_BLK_F_TOPOLOGY))
        if readonly:
            f |= bit(VIRTIO_BLK_F_RO)
        elif self.candelete:
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES)
        self.features = f
        self._build_config()
        self.stats = dict(requests=0, ioerr=0, unsupp=0, bytes_read=0, bytes_written=0, flushes=0)
        self._lock = threading.Lock()       # held while a thread serves the queue or the device resets

    def config_dict(self):
        align = self.sectorsize // SECTOR
        seg_max = SEG_MAX_INDIRECT if self.has_feature(VIRTIO_F_RING_INDIRECT_DESC) else max(self.queue_size - 2, 1)
        return dict(capacity=self.capacity, size_max=0, seg_max=seg_max,
                    geometry=dict(cylinders=0, heads=0, sectors=0), blk_size=self.sectorsize,
                    topology=dict(physical_block_exp=(self.physical_sectorsize // self.sectorsize).bit_length() - 1,
                                  alignment_offset=0, min_io_size=self.physical_sectorsize // self.sectorsize,
                                  opt_io_size=0),
                    writeback=1,
                    max_discard_sectors=MAX_DISCARD_SECTORS, max_discard_seg=1, discard_sector_alignment=align,
                    max_write_zeroes_sectors=MAX_DISCARD_SECTORS, max_write_zeroes_seg=1,
                    write_zeroes_may_unmap=1)

    def _build_config(self):
        """The config space as bytes, built again when what it depends on changes (the negotiated features)."""
        self._config = BLK_CONFIG.build(self.config_dict())

    def config_bytes(self):
        return self._config

    # ---- notification ------------------------------------------------------------------------------------------------
    def queue_notify(self, qidx, queue):
        """Serves the queue here, on the notifying thread (see the module docstring)."""
        with self._lock:
            self._drain(queue)

    def _drain(self, queue):
        served = 0
        compiled = self.backend.compiled
        while True:
            if not compiled or not self._serve_compiled(queue):
                chain = queue.get_chain()
                if chain is None:
                    break
                self._serve(queue, chain)
            served += 1
            if served % 64 == 0:
                self.notify_used(queue)
        if served:
            self.notify_used(queue, used_all_avail=True)

    def reset(self):
        with self._lock:
            super().reset()
            self._build_config()

    def apply_features(self, features):
        super().apply_features(features)
        self._build_config()

    def close(self):
        self.backend.close()

    _SNAP_CHECKED = ("capacity", "sectorsize", "physical_sectorsize", "readonly", "features")

    def snapshot_state(self):
        s = super().snapshot_state()
        s.update({n: getattr(self, n) for n in self._SNAP_CHECKED})
        return s

    def restore_state(self, state):
        for n in self._SNAP_CHECKED:
            if not isinstance(state, dict) or state.get(n) != getattr(self, n):
                raise SnapshotError(f"virtio-blk: {n} was {state.get(n) if isinstance(state, dict) else None!r}, "
                                    f"the image now gives {getattr(self, n)!r}")
        with self._lock:
            super().restore_state(state)

    # ---- requests ----------------------------------------------------------------------------------------------------
    def _serve(self, queue, chain):
        self.stats["requests"] += 1
        w = chain.writable
        if w and len(w[-1]) == 1:       # the status byte in a descriptor of its own, as Linux sends it
            data_w, status = w[:-1], w[-1:]
        else:
            data_w, status = split_tail(w, 1)
        if not status or len(status[0]) != 1:
            queue.put_used(chain.head, 0)
            self.fail(f"virtio-blk: request {chain.head} has no status byte")
            return
        hdr_segs, data_r = split_segments(chain.readable, _HDR.size)
        hdr = b"".join(bytes(m) for m in hdr_segs)
        written = 0
        if len(hdr) < _HDR.size:
            st = VIRTIO_BLK_S_IOERR
        else:
            rtype, _, sector = _HDR.unpack(hdr)
            try:
                st, written = self._request(rtype, sector, data_r, data_w)
            except OSError:
                st = VIRTIO_BLK_S_IOERR
        if st == VIRTIO_BLK_S_IOERR:
            self.stats["ioerr"] += 1
        elif st == VIRTIO_BLK_S_UNSUPP:
            self.stats["unsupp"] += 1
        status[0][0] = st
        queue.put_used(chain.head, written + 1)

    def _serve_compiled(self, queue):
        """The next request through the backend's compiled request if it is one it serves; False (the chain given
        back) if not."""
        got = self.offer_indirect(queue, self.backend.serve_compiled)
        if got is None:
            return False
        head, (used, rtype, status, nbytes) = got
        st = self.stats
        st["requests"] += 1
        if status != VIRTIO_BLK_S_OK:
            st["ioerr"] += 1
        elif rtype == VIRTIO_BLK_T_IN:
            st["bytes_read"] += nbytes
        else:
            st["bytes_written"] += nbytes
        queue.put_used(head, used)
        return True

    def _range_ok(self, sector, nbytes):
        return nbytes % SECTOR == 0 and sector * SECTOR + nbytes <= self.capacity * SECTOR

    def _request(self, rtype, sector, data_r, data_w):
        if rtype == VIRTIO_BLK_T_IN:
            n = sum(map(len, data_w))
            if not self._range_ok(sector, n):
                return VIRTIO_BLK_S_IOERR, 0
            got = self.backend.preadv_full(data_w, sector * SECTOR, n)
            self.stats["bytes_read"] += got
            return VIRTIO_BLK_S_OK, got
        if rtype == VIRTIO_BLK_T_OUT:
            n = sum(map(len, data_r))
            if self.readonly or not self._range_ok(sector, n):
                return VIRTIO_BLK_S_IOERR, 0
            put = self.backend.pwritev_full(data_r, sector * SECTOR, n)
            self.stats["bytes_written"] += put
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_FLUSH:
            self.backend.flush()
            self.stats["flushes"] += 1
            return VIRTIO_BLK_S_OK, 0
        if rtype == VIRTIO_BLK_T_GET_ID:
            ident = self.ident.ljust(VIRTIO_BLK_ID_BYTES, b"\0")
            n = 0
            for m in data_w:
                k = min(len(m), len(ident) - n)
                if k <= 0:
                    break
                m[:k] = ident[n:n + k]
                n += k
            return VIRTIO_BLK_S_OK, n
        if rtype in (VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES):
            return self._discard_wz(rtype, data_r), 0
        return VIRTIO_BLK_S_UNSUPP, 0

    def _discard_wz(self, rtype, data_r):
        if not self.candelete:
            return VIRTIO_BLK_S_IOERR if self.readonly else VIRTIO_BLK_S_UNSUPP
        raw = b"".join(bytes(m) for m in split_segments(data_r, _SEG.size * 2)[0])
        total = sum(len(m) for m in data_r)
        if total == 0 or total % _SEG.size or total // _SEG.size > 1:
            return VIRTIO_BLK_S_IOERR
        sector, nsec, flags = _SEG.unpack(raw[:_SEG.size])
        if rtype == VIRTIO_BLK_T_DISCARD and flags:
            return VIRTIO_BLK_S_UNSUPP
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            return VIRTIO_BLK_S_UNSUPP
        if nsec > MAX_DISCARD_SECTORS or not self._range_ok(sector, nsec * SECTOR):
            return VIRTIO_BLK_S_IOERR
        off, length = sector * SECTOR, nsec * SECTOR
        if length == 0:
            return VIRTIO_BLK_S_OK
        if rtype == VIRTIO_BLK_T_DISCARD:
            self.backend.discard(off, length)
        else:
            self.backend.write_zeroes(off, length, bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
        return VIRTIO_BLK_S_OK
