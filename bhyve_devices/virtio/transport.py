"""Virtio over PCI, a transitional device (VIRTIO 1.1 section 4.1; bhyve ``virtio.c``).

:class:`VirtioPciDevice` is a :class:`bhyve_devices.pci.device.PciDevice` that carries one
:class:`~bhyve_devices.virtio.device.VirtioDevice` and offers both interfaces a guest may use:

- **legacy** (virtio 0.9.5, what bhyve's models implement): an I/O BAR 0 with HOSTCAP 0, GUESTCAP 4, PFN 8,
  QNUM 12, QSEL 14, QNOTIFY 16, STATUS 18, ISR 19; with MSI-X enabled CFGVEC 20 and QVEC 22; the device
  configuration at 20 (MSI-X off) or 24 (MSI-X on). Rings at ``PFN * 4096`` with the 4096-byte alignment of
  ``vring_init``. Features are the low 32 bits; the GUESTCAP write applies them at once (as bhyve).
- **modern** (virtio 1.x): vendor capabilities (ID 0x09, :data:`VIRTIO_PCI_CAP`) pointing into memory BAR 4:
  common configuration at 0x0000 (:data:`COMMON_CFG`), ISR at 0x1000, device configuration at 0x2000, notify at
  0x3000 (``notify_off_multiplier`` 4, queue ``i`` notifies at ``0x3000 + 4*i``), plus the
  VIRTIO_PCI_CAP_PCI_CFG window capability (4.1.4.7). VIRTIO_F_VERSION_1 is offered only here; FEATURES_OK is
  refused (the bit does not stick) when the driver accepts a feature not offered or does not accept VERSION_1.

Identity: vendor 0x1AF4, transitional device ID (0x1000 net, 0x1001 blk, 0x1003 console, 0x1005 rnd), revision
0, subsystem vendor 0x1AF4 and subsystem ID = virtio device type.

Interrupts, as bhyve's ``vi_intr_init``/``vq_interrupt``: an MSI-X capability in BAR 1 with one vector per queue
plus one for configuration changes (unless ``single_vector=True``, xhyve's ``-W``), a 1-vector MSI capability and
INTx pin A. With MSI-X enabled, queue ``i`` interrupts through its ``queue_msix_vector`` (NO_VECTOR 0xFFFF: no
interrupt; a vector beyond the table reads back as NO_VECTOR, 4.1.5.1.2). Otherwise the ISR register gets bit 0
(queue) or bit 1 (configuration) and the interrupt goes out through MSI vector 0 if MSI is enabled, else INTx,
which stays asserted until the driver reads ISR (the read clears it).

Status and reset (2.1, 4.1.4.3): writing 0 to the status resets the device (the device's :meth:`reset` first,
which stops its workers, then every queue, the features, the vectors, ISR). A driver error found in a queue or
reported by the device sets DEVICE_NEEDS_RESET (0x40) and, after DRIVER_OK, raises a configuration interrupt.

The two register files live in :mod:`bhyve_devices.virtio.transport_legacy` (:class:`LegacyRegisters`) and
:mod:`bhyve_devices.virtio.transport_modern` (:class:`ModernRegisters`, the capabilities and the PCI_CFG window),
which :class:`VirtioPciDevice` inherits; their names stay importable from here. Snapshot and restore
(:mod:`bhyve_devices.snapshot`) are :mod:`bhyve_devices.virtio.snap`'s.

Not supported: the packed ring (VIRTIO_F_RING_PACKED), VIRTIO_F_NOTIFICATION_DATA, queue_reset (1.2), per-queue
notify data, VIRTIO_F_ACCESS_PLATFORM/IOMMU, 64-bit BAR placement of the modern BAR (it is a MEM32 BAR).
"""

import functools
import threading

from bhyve_devices.pci.device import IO, MEM32, PciDevice

from .device import (STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_ANY_LAYOUT,
                     VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                     VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VIRTIO_ID_CONSOLE, VIRTIO_ID_NET, VIRTIO_ID_RNG,
                     VirtioDevice, bit)
from .transport_legacy import (LEGACY_BAR, LEGACY_HEADER, NO_VECTOR, VIRTIO_MSI_CONFIG_VECTOR,  # noqa: F401
                               VIRTIO_MSI_QUEUE_VECTOR, VIRTIO_PCI_GUEST_FEATURES, VIRTIO_PCI_HOST_FEATURES,
                               VIRTIO_PCI_ISR, VIRTIO_PCI_ISR_CONFIG, VIRTIO_PCI_ISR_INTR, VIRTIO_PCI_QUEUE_ADDR_SHIFT,
                               VIRTIO_PCI_QUEUE_NOTIFY, VIRTIO_PCI_QUEUE_NUM, VIRTIO_PCI_QUEUE_PFN,
                               VIRTIO_PCI_QUEUE_SEL, VIRTIO_PCI_STATUS, LegacyRegisters, legacy_config_offset)
from .transport_legacy import LEGACY_REGS as _LEGACY_REGS, mask as _mask  # noqa: F401
from .transport_modern import (COMMON_CFG, COMMON_CFG_SIZE, COMMON_OFF, DEVICE_OFF, ISR_OFF,  # noqa: F401
                               MODERN_BAR, MODERN_BAR_SIZE, NOTIFY_MULTIPLIER, NOTIFY_OFF, PCI_CAP_ID_VNDR,
                               VIRTIO_PCI_CAP, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG,
                               VIRTIO_PCI_CAP_ISR_CFG, VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG,
                               VIRTIO_PCI_CFG_CAP, VIRTIO_PCI_NOTIFY_CAP, ModernRegisters)
from .transport_modern import COMMON_FIELDS as _COMMON_FIELDS  # noqa: F401
from .snap import VirtioSnapshotMixin
from .virtqueue import Virtqueue

VIRTIO_VENDOR = 0x1AF4
TRANSITIONAL_DEVICE_ID = {VIRTIO_ID_NET: 0x1000, VIRTIO_ID_BLOCK: 0x1001, VIRTIO_ID_CONSOLE: 0x1003,
                          VIRTIO_ID_RNG: 0x1005}
PCI_CLASS = {VIRTIO_ID_NET: (0x02, 0x00), VIRTIO_ID_BLOCK: (0x01, 0x00), VIRTIO_ID_CONSOLE: (0x07, 0x80),
             VIRTIO_ID_RNG: (0xFF, 0x00)}

MSIX_BAR = 1
#: a modern driver's queue notifications through the I/O BAR: a NOTIFY_CFG capability, first in the list, on the
#: legacy QUEUE_NOTIFY register with ``notify_off_multiplier`` 0 (the queue's index written there, 4.1.4.4), as
#: QEMU's ``modern-pio-notify``. A port write exits (or signals its doorbell) without the instruction's decoding
#: an MMIO write costs the hypervisor. The default of the ``pio_notify`` argument (the VMM sets it: vmmshim's
#: ``VMMSHIM_VIRTIO_PIO_NOTIFY=0`` leaves only the memory BAR's notify area).
PIO_NOTIFY = True


class VirtioPciDevice(VirtioSnapshotMixin, LegacyRegisters, ModernRegisters, PciDevice):
    """A transitional virtio PCI function around ``device`` with guest memory ``mem``."""

    def __init__(self, device: VirtioDevice, mem, single_vector=False, name=None, pio_notify=None):
        dtype = device.device_type
        cls, sub = getattr(device, "pci_class", PCI_CLASS.get(dtype, (0xFF, 0x00)))
        super().__init__(name or device.name, VIRTIO_VENDOR, TRANSITIONAL_DEVICE_ID.get(dtype, 0x1040 + dtype),
                         cls, sub, revision=0, subsys_vendor=VIRTIO_VENDOR, subsys_id=dtype)
        self.vdev = device
        self.mem = mem
        self.single_vector = single_vector
        self._vlock = threading.RLock()     # transport registers (never held while calling into the device)
        self.queues = [Virtqueue(mem, i, device.queue_size, on_error=self._queue_error)
                       for i in range(device.num_queues)]
        self.errors = []
        self.status = 0
        self.isr = 0
        self.negotiated = 0
        self.modern = False
        self.queue_sel = 0
        self.config_vector = NO_VECTOR
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_generation = 0
        self.interrupts = 0
        self._ring = None                   # the VMM's doorbell ring (ring_with), or None: notify at once

        legacy_size = legacy_config_offset(True) + max(device.config_size, 0)
        self.alloc_bar(LEGACY_BAR, IO, legacy_size)
        self._nvec = 0
        if not single_vector:
            self._nvec = device.num_queues + 1
            self.add_msix_cap(self._nvec, MSIX_BAR)
        self.add_msi_cap(1)
        self.lintr_request(1)
        self.alloc_bar(MODERN_BAR, MEM32, MODERN_BAR_SIZE)
        self._add_vcap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, COMMON_CFG_SIZE)
        self._add_vcap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 4)
        if device.config_size:
            self._add_vcap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, device.config_size)
        if PIO_NOTIFY if pio_notify is None else pio_notify:     # first: a driver uses the first it can (4.1.4.1)
            self._add_vcap(VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_QUEUE_NOTIFY, 2, extra=bytes(4), bar=LEGACY_BAR)
        self._add_vcap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, NOTIFY_MULTIPLIER * max(device.num_queues, 1),
                       extra=NOTIFY_MULTIPLIER.to_bytes(4, "little"))
        self._pcicfg_off = self._add_vcap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, extra=bytes(4))
        self.set_writable(self._pcicfg_off + 4, 1, 0xFF)       # bar
        self.set_writable(self._pcicfg_off + 8, 4, 0xFFFFFFFF)  # offset
        self.set_writable(self._pcicfg_off + 12, 4, 0xFFFFFFFF)  # length

        device.attach(self.queues, self._queue_interrupt, self._device_error, self._device_config_changed)

    def set_memory(self, mem):
        """Gives the device its guest memory (when the registry built it without one)."""
        self.mem = mem
        for q in self.queues:
            q.mem = mem

    # ---- features -------------------------------------------------------------------------------------------------
    def offered_features(self, modern):
        f = (self.vdev.features | bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_RING_EVENT_IDX))
        if modern:
            f |= bit(VIRTIO_F_VERSION_1)
        else:
            f = (f | bit(VIRTIO_F_NOTIFY_ON_EMPTY) | bit(VIRTIO_F_ANY_LAYOUT)) & 0xFFFFFFFF
        return f & ~self.vdev.unsupported

    def _apply_features(self, features):
        self.negotiated = features
        for q in self.queues:
            q.set_features(features)
        self.vdev.apply_features(features)

    # ---- interrupts -----------------------------------------------------------------------------------------------
    def _queue_interrupt(self, qidx):
        self.interrupts += 1
        if self.msix_enabled:
            v = self.queues[qidx].msix_vector if 0 <= qidx < len(self.queues) else NO_VECTOR
            if v != NO_VECTOR:
                self.msi_notify(v)
            return
        with self._vlock:
            self.isr |= VIRTIO_PCI_ISR_INTR
        self.msi_notify(0)

    def _config_interrupt(self):
        if self.msix_enabled:
            if self.config_vector != NO_VECTOR:
                self.msi_notify(self.config_vector)
            return
        with self._vlock:
            self.isr |= VIRTIO_PCI_ISR_CONFIG
        self.msi_notify(0)

    def _read_isr(self):
        with self._vlock:
            v, self.isr = self.isr, 0
        if v:
            self.lintr_deassert()
        return v

    def _queue_error(self, msg):
        self._device_error(msg)

    def _device_error(self, msg):
        with self._vlock:
            self.errors.append(msg)
            already = self.status & STATUS_DEVICE_NEEDS_RESET
            self.status |= STATUS_DEVICE_NEEDS_RESET
            ok = self.status & STATUS_DRIVER_OK
        if ok and not already:
            self._config_interrupt()

    def _device_config_changed(self):
        with self._vlock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            ok = self.status & STATUS_DRIVER_OK
        if ok:
            self._config_interrupt()

    @property
    def needs_reset(self):
        return bool(self.status & STATUS_DEVICE_NEEDS_RESET)

    # ---- status and reset -----------------------------------------------------------------------------------------
    def reset_device(self):
        """The driver wrote 0 to the status (or the VM resets): device, queues, features, vectors, ISR."""
        try:
            self.vdev.reset()
        except Exception as exc:  # a device bug must not take the vCPU down
            self.errors.append(f"reset: {exc!r}")
        with self._vlock:
            for q in self.queues:
                q.reset()
            self.status = 0
            self.isr = 0
            self.negotiated = 0
            self.modern = False
            self.queue_sel = 0
            self.config_vector = NO_VECTOR
            self.device_feature_select = self.driver_feature_select = 0
            self.driver_features = 0
        self.lintr_deassert()

    def _write_status(self, value, modern):
        value &= 0xFF
        if value == 0:
            self.reset_device()
            return
        notify_ok = False
        with self._vlock:
            old = self.status
            if modern and value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
                offered = self.offered_features(True)
                drv = self.driver_features
                if drv & ~offered or not drv & bit(VIRTIO_F_VERSION_1):
                    value &= ~STATUS_FEATURES_OK
                else:
                    self.modern = True
                    self._apply_features(drv)
            self.status = (value & ~STATUS_DEVICE_NEEDS_RESET) | (old & STATUS_DEVICE_NEEDS_RESET)
            notify_ok = bool(value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK)
        if notify_ok:
            self.vdev.driver_ok()

    def _selected(self):
        qs = self.queue_sel
        return self.queues[qs] if 0 <= qs < len(self.queues) else None

    def _notify(self, qidx):
        """The driver kicked queue ``qidx``: the device's ``queue_notify``, on whichever thread delivers it."""
        if not 0 <= qidx < len(self.queues):
            return
        q = self.queues[qidx]
        if not q.ready:
            return
        try:
            self.vdev.queue_notify(qidx, q)
        except Exception as exc:  # never out of a guest access
            self._device_error(f"queue {qidx} notify: {exc!r}")

    def _rang(self, bar, qidx):
        """A queue-notify write that came through the bus: the VMM's ``ring`` (``ring_with``) if it takes the
        doorbells of this BAR, else the notification at once."""
        ring = self._ring
        if ring is not None and 0 <= qidx < len(self.queues):
            ring(bar, qidx)
        else:
            self._notify(qidx)

    def doorbells(self, idx):
        """The queue-notify registers of BAR ``idx`` as doorbells (:data:`bhyve_devices.base.Doorbell`; the VMM
        may have them signal a thread instead of exiting, ``vmmshim/fastpaths.py``): each queue's modern notify
        address, a write of any size (the address names the queue), and the legacy QUEUE_NOTIFY once per queue,
        a 16-bit write of the queue's index. Doorbell ``i`` is queue ``i``'s; its function is the notification."""
        n = len(self.queues)
        if idx == MODERN_BAR:
            return [(NOTIFY_OFF + NOTIFY_MULTIPLIER * i, 0, None, functools.partial(self._notify, i))
                    for i in range(n)]
        if idx == LEGACY_BAR:
            return [(VIRTIO_PCI_QUEUE_NOTIFY, 2, i, functools.partial(self._notify, i)) for i in range(n)]
        return []

    def ring_with(self, ring):
        """See :class:`bhyve_devices.base.Doorbells`: a notify write through the bus calls ``ring(bar, qidx)``."""
        self._ring = ring

    def _vector(self, value):
        return value if value == NO_VECTOR or value < self._nvec else NO_VECTOR

    # ---- BARs -------------------------------------------------------------------------------------------------------
    def barread(self, idx, off, size):
        try:
            if idx == LEGACY_BAR:
                return self._legacy_read(off, size) & _mask(size)
            if idx == MODERN_BAR:
                return self._modern_read(off, size) & _mask(size)
        except Exception as exc:
            self.errors.append(f"barread {idx}:{off:#x}: {exc!r}")
        return _mask(size)

    def barwrite(self, idx, off, size, value):
        value &= _mask(size)
        try:
            if idx == LEGACY_BAR:
                self._legacy_write(off, size, value)
            elif idx == MODERN_BAR:
                self._modern_write(off, size, value)
        except Exception as exc:
            self.errors.append(f"barwrite {idx}:{off:#x}: {exc!r}")

    def close(self):
        self.vdev.close()
