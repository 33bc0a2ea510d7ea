"""The device side of virtio, separate from the transport (xhyve's ``virtio.h`` ``struct virtio_consts``).

A :class:`VirtioDevice` knows nothing about PCI. It declares

- ``device_type`` (VIRTIO 1.1 section 5: 1 net, 2 blk, 3 console, 4 entropy), ``name``;
- ``num_queues`` and ``queue_size`` (the maximum; a modern driver may choose smaller);
- ``features``: the device-specific feature bits it offers (the transport adds INDIRECT_DESC, EVENT_IDX,
  VERSION_1 and NOTIFY_ON_EMPTY itself; a device that cannot cope with one lists it in ``unsupported``);
- ``config_size`` and :meth:`config_read` / :meth:`config_write` for the device-specific configuration space;

and implements :meth:`queue_notify` (the driver kicked queue ``qidx``; the device does the work right there, on
whichever thread calls it: the VMM chooses the thread, a doorbell thread of the device's own where it has one),
:meth:`reset` (the driver wrote 0 to the
status register: drop everything in flight), :meth:`apply_features` (the negotiated set; called when the legacy
driver writes GUESTCAP or the modern driver sets FEATURES_OK) and optionally :meth:`driver_ok`.

The transport calls :meth:`attach` once with the list of :class:`~bhyve_devices.virtio.virtqueue.Virtqueue` objects
(alive for the life of the device), ``interrupt(qidx)`` (raise the used-buffer interrupt of a queue) and
``fail(message)`` (set DEVICE_NEEDS_RESET). Tests attach the device
without a transport by passing their own callables. After a batch of ``put_used`` a device calls
:meth:`VirtioDevice.notify_used`, which asks the queue whether the driver wants an interrupt (``needs_notify``:
NO_INTERRUPT / ``used_event``) and raises it if so.

bhyve's ``struct virtio_consts`` maps as: ``vc_name`` -> ``name``, ``vc_nvq`` -> ``num_queues``, ``vc_cfgsize``
-> ``config_size``, ``vc_reset`` -> :meth:`reset`, ``vc_qnotify`` -> :meth:`queue_notify`, ``vc_cfgread`` /
``vc_cfgwrite`` -> :meth:`config_read` / :meth:`config_write`, ``vc_apply_features`` -> :meth:`apply_features`,
``vc_hv_caps`` -> ``features``.

Snapshot (:mod:`bhyve_devices.snapshot`; the transport saves the queues): :meth:`VirtioDevice.snapshot_state`
gives the device side's state as JSON values (here the device's name and ``negotiated``; a device type adds its
own, or raises SnapshotError when it cannot be saved now), :meth:`VirtioDevice.restore_state` takes it back into
a fresh device after the transport restored the queues: the base applies the negotiated features through
:meth:`apply_features`, which rebuilds what follows from them (and tells a backend what it must know).
"""

import contextlib
from bhyve_devices.snapshot import SnapshotError, int_in

VIRTIO_ID_NET = 1
VIRTIO_ID_BLOCK = 2
VIRTIO_ID_CONSOLE = 3
VIRTIO_ID_RNG = 4

# Device status (2.1)
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

# Transport/ring feature bits (6)
VIRTIO_F_NOTIFY_ON_EMPTY = 24
VIRTIO_F_ANY_LAYOUT = 27
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32


def bit(n):
    return 1 << n


def read_le(buf, off, size):
    """Reads ``size`` bytes of ``buf`` at ``off`` as a little-endian int; bytes past the end read as 0xFF
    (nothing is there), a negative offset reads all-ones."""
    if off < 0:
        return (1 << (8 * size)) - 1
    chunk = bytes(buf[off:off + size])
    chunk += b"\xff" * (size - len(chunk))
    return int.from_bytes(chunk, "little")


class VirtioDevice:
    """Base class with the defaults of an uninteresting device; see the module docstring."""

    name = "virtio"
    device_type = 0
    num_queues = 1
    queue_size = 256
    features = 0
    unsupported = 0
    config_size = 0

    def __init__(self):
        self.queues = []
        self.negotiated = 0
        self._interrupt = lambda qidx: None
        self._fail = lambda msg: None
        self._config_changed = lambda: None

    # ---- wiring ------------------------------------------------------------------------------------------------------
    def attach(self, queues, interrupt, fail, config_changed=None):
        self.queues = queues
        self._interrupt = interrupt
        self._fail = fail
        if config_changed is not None:
            self._config_changed = config_changed

    def interrupt(self, qidx):
        """Raises the used-buffer notification of queue ``qidx`` unconditionally."""
        self._interrupt(qidx)

    @staticmethod
    def offer_indirect(queue, serve):
        """The next chain to a compiled request if it is one INDIRECT table in the first RAM area
        (``Virtqueue.take_indirect``): ``serve(ram, table, tsize)`` answers it, or returns None to give it back
        (``unget``). Returns ``(head, answer)`` for the caller to account and ``put_used``, or None."""
        got = queue.take_indirect()
        if got is None:
            return None
        head, table, tsize = got
        answer = serve(queue.mem.ram, table, tsize)
        if answer is None:
            queue.unget()
            return None
        return head, answer

    def notify_used(self, queue, used_all_avail=False):
        """After a batch of ``put_used``: interrupts if the driver wants it (bhyve ``vq_endchains``)."""
        if queue.needs_notify(used_all_avail):
            self._interrupt(queue.index)

    def fail(self, msg):
        """Reports a driver error the device cannot recover from (DEVICE_NEEDS_RESET)."""
        self._fail(msg)

    def config_changed(self):
        self._config_changed()

    def has_feature(self, n):
        return bool(self.negotiated >> n & 1)

    # ---- the virtio_consts callbacks ------------------------------------------------------------------------------------
    def config_bytes(self):
        """The device configuration space as bytes (the default :meth:`config_read` reads from it)."""
        return b""

    def config_read(self, off, size):
        return read_le(self.config_bytes(), off, size)

    def config_write(self, off, size, value):
        pass

    def queue_notify(self, qidx, queue):
        pass

    def quiesced(self):
        """A context inside which the device's own threads touch nothing (none here; virtio-net's receive
        thread)."""
        return contextlib.nullcontext()

    def reset(self):
        self.negotiated = 0

    def apply_features(self, features):
        self.negotiated = features

    def driver_ok(self):
        pass

    def close(self):
        """Releases host resources (threads, files)."""

    # ---- snapshot ------------------------------------------------------------------------------------------------
    def snapshot_state(self):
        return dict(name=self.name, negotiated=self.negotiated)

    def restore_state(self, state):
        if not isinstance(state, dict) or state.get("name") != self.name:
            raise SnapshotError(f"{self.name}: the device state is not a {self.name}'s")
        neg = state.get("negotiated")
        if not int_in(neg, 0, (1 << 64) - 1):
            raise SnapshotError(f"{self.name}: negotiated = {neg!r:.40}")
        self.apply_features(neg)
