"""virtio-9p: a host directory shared with the guest over 9P2000.L (bhyve ``pci_virtio_9p.c``). VIRTIO 1.1
section 5 lists device ID 9, "9P transport", without a chapter of its own; the layout is Linux's
``include/uapi/linux/virtio_9p.h`` and the request framing ``net/9p/trans_virtio.c``'s.

``-s N,virtio-9p,NAME=/path[,ro]`` as bhyve parses it (``pci_vt9p_legacy_config``): the ``NAME=PATH`` option
names the share (the mount tag, at most :data:`MAX_TAG` bytes) and its directory, ``ro`` refuses every change
(EROFS); bhyve's config keys ``sharename``, ``path`` and ``ro`` are read as well (:func:`share_config`). A second
``NAME=PATH``, a missing one, or an option bhyve does not know is an error. The VM opens the directory
(``vmmshim/backends/p9fs.py``) and builds :class:`Virtio9p` over it; the guest mounts it with ``mount -t 9p -o
trans=virtio,version=9p2000.L NAME /mnt``.

Device: ID 9 (PCI device 0x1009, class mass storage, as bhyve), one request queue of :data:`QUEUE_SIZE`, feature
VIRTIO_9P_MOUNT_TAG (bit 0), configuration ``tag_len`` u16 + ``tag`` (:data:`P9_CONFIG`, bhyve's 2 + 256 bytes).
Each request is one chain: the T-message in its device-readable part, room for the R-message in its
device-writable part (Linux puts a read's data straight into the reader's pages after the 11 bytes of the Rread
header, and a write's data after the 23 bytes of the Twrite header: :class:`bhyve_devices.p9.server.P9Server`
copies neither). Requests are served in order on the thread that delivers the notification (the device's doorbell
thread), under the device's lock, as virtio-blk does: a slow host operation holds up only this queue.

When the share has a compiled Tread/Twrite (``server.compiled``: ``vmmshim/backends/p9fast.py``), the queue goes
to its queue pass first (``server.serve_queue``, ``Virtqueue.ring_state``/``advance``): in one call it serves
Linux's zero-copy reads and writes on open files, chain after chain, with the used ring, and stops at the first
chain it does not take, which the Python path serves before the pass is offered the rest; where the rings are
not in the first RAM area, each chain that is one indirect table is offered to ``server.serve_compiled``
(``Virtqueue.take_indirect``, ``unget``). The device answers the same either way (``tests/unit/test_p9_compiled.py`` compares the two).

Snapshot: refused while the guest holds any fid (each stands for a host file or directory that does not
survive: the guest has the share mounted); with none, the device state is the session's msize.

Not supported: more than one queue or session, the 9P2000 and 9P2000.u dialects, bhyve's Capsicum limits (the
backend's own checks stand for them).
"""

import struct
import threading

from construct import Bytes, Int16ul, Struct

from bhyve_devices.p9 import server as p9server     # a module: bhyve_devices.p9 imports .chain from here
from bhyve_devices.p9.ops import MIN_MSIZE
from bhyve_devices.pci import config as PC
from bhyve_devices.pci.registry import register

from bhyve_devices.snapshot import SnapshotError

from .device import VirtioDevice, bit
from .pci import as_options, is_true
from .transport import VirtioPciDevice

VIRTIO_ID_9P = 9
VIRTIO_9P_MOUNT_TAG = 0
PCI_DEVICE_9P = 0x1009          # bhyve's VIRTIO_DEV_9P (the transitional ID)
PCI_CLASS_STORAGE = (0x01, 0x00)
MAX_TAG = 256                   # bhyve's VT9P_MAXTAGSZ
QUEUE_SIZE = 256                # bhyve's VT9P_RINGSZ
NOTIFY_EVERY = 64               # interrupt at least this often while a long batch is served
P9_CONFIG = Struct("tag_len" / Int16ul, "tag" / Bytes(MAX_TAG))
_TAG_LEN = struct.Struct("<H")

#: Keys that are never a ``NAME=PATH`` share: bhyve's own and the ones the VM adds.
DEVICE_KEYS = frozenset(("device", "backend", "sharename", "path", "ro", "guest_memory", "virtio_msix",
                         "single_vector", "vmname", "slot", "func", "p9_compiled"))


def parse_options(text):
    """bhyve's legacy ``NAME=PATH[,ro]`` string -> config keys (``sharename``, ``path``, flags as ``"true"``)."""
    out = {}
    for token in (text or "").split(","):
        if not token:
            continue
        name, eq, path = token.partition("=")
        if eq:
            if "sharename" in out:
                raise ValueError("more than one share name given")
            out.update(sharename=name, path=path)
        else:
            out[token] = "true"
    return out


def share_config(o):
    """``(tag, path, readonly)`` from an emulation's keys: ``sharename`` and ``path`` (bhyve's config), or the
    one ``NAME=PATH`` the command line stored as key NAME. ValueError naming what is wrong (the VM prefixes the
    slot and emulation)."""
    extra = {k: v for k, v in o.items() if k not in DEVICE_KEYS}
    flags = sorted(k for k, v in extra.items() if v is True or v == "true")
    if flags:
        raise ValueError(f"unknown option {flags[0]!r} (NAME=/path, ro)")
    tag, path = o.get("sharename"), o.get("path")
    if extra or (tag is not None and path is None):
        shares = dict(extra)
        if tag is not None and path is None:
            shares["sharename"] = tag         # -s N,virtio-9p,sharename=/path: bhyve's legacy form
        if len(shares) > 1:
            raise ValueError("more than one share name given")
        (tag, path), = shares.items()
        if o.get("path") is not None and path != o["path"]:
            raise ValueError("more than one path given")
    if not tag:
        raise ValueError("share name required (NAME=/path)")
    if not path or not isinstance(path, str):
        raise ValueError("path required")
    if len(tag.encode()) > MAX_TAG:
        raise ValueError(f"share name too long (at most {MAX_TAG} bytes)")
    return tag, path, is_true(o.get("ro", False))


class Virtio9p(VirtioDevice):
    name = "virtio-9p"
    device_type = VIRTIO_ID_9P
    pci_class = PCI_CLASS_STORAGE
    num_queues = 1
    queue_size = QUEUE_SIZE
    features = bit(VIRTIO_9P_MOUNT_TAG)
    config_size = P9_CONFIG.sizeof()

    def __init__(self, fs, tag, **server_kw):
        super().__init__()
        tag = tag.encode() if isinstance(tag, str) else bytes(tag)
        if not 0 < len(tag) <= MAX_TAG:
            raise ValueError(f"virtio-9p: the mount tag must be 1 to {MAX_TAG} bytes")
        self.tag = tag
        self.fs = fs
        self.server = p9server.P9Server(fs, **server_kw)
        self._config = (_TAG_LEN.pack(len(tag)) + tag).ljust(self.config_size, b"\0")
        self._lock = threading.Lock()       # held while a thread serves the queue or the device resets

    def config_bytes(self):
        return self._config

    def queue_notify(self, qidx, queue):
        with self._lock:
            served = 0
            server = self.server
            serve = server.serve
            compiled = server.compiled
            while True:
                if compiled:            # the queue pass first, else (its rings outside RAM) a chain at a time
                    room = NOTIFY_EVERY - served % NOTIFY_EVERY
                    n = server.serve_queue(queue, room)
                    if n:
                        served += n
                        if n == room:   # it stopped at its limit: interrupt, then more
                            self.notify_used(queue)
                            continue
                        # else at an empty ring or a chain it does not take: Python's turn
                if not (compiled and n is None and self._serve_compiled(queue)):
                    chain = queue.get_chain()
                    if chain is None:
                        break
                    queue.put_used(chain.head, serve(chain.readable, chain.writable))
                served += 1
                if served % NOTIFY_EVERY == 0:
                    self.notify_used(queue)
            if served:
                self.notify_used(queue, used_all_avail=True)

    def _serve_compiled(self, queue):
        """The next request through the server's compiled Tread/Twrite if it is one that serves; False (the chain
        given back) if not."""
        got = self.offer_indirect(queue, self.server.serve_compiled)
        if got is None:
            return False
        queue.put_used(*got)
        return True

    def snapshot_state(self):
        n = len(self.server.fids)
        if n:
            raise SnapshotError(f"virtio-9p: {n} fid{'s' if n > 1 else ''} open on share {self.tag.decode()!r} "
                                "(host files do not survive a snapshot: unmount it first)")
        return dict(super().snapshot_state(), msize=self.server.msize)

    def restore_state(self, state):
        msize = state.get("msize") if isinstance(state, dict) else None
        if not isinstance(msize, int) or not MIN_MSIZE <= msize <= self.server.max_msize:
            raise SnapshotError(f"virtio-9p: msize {msize!r:.40} (at most {self.server.max_msize})")
        with self._lock:
            super().restore_state(state)
            self.server.msize = msize

    def reset(self):
        with self._lock:
            super().reset()
            self.server.reset()

    def close(self):
        with self._lock:
            self.server.reset()
            self.fs.close()


@register("virtio-9p")
class Virtio9pPci(VirtioPciDevice):
    def __init__(self, opts=None):
        o = as_options(opts, parse_options)
        fs = o.get("backend")
        if fs is None or isinstance(fs, str):
            raise ValueError("virtio-9p: the share is not open (the VM opens it: "
                             "vmmshim.backends.open_device_backends)")
        tag, _, _ = share_config(o)
        msix = o.get("virtio_msix", True)
        single = bool(o.get("single_vector")) or msix is False or (isinstance(msix, str) and not is_true(msix))
        super().__init__(Virtio9p(fs, tag), o.get("guest_memory"), single_vector=single)
        self.set_cfg(PC.DEVICE, 2, PCI_DEVICE_9P)
