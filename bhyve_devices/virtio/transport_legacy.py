"""The legacy register file of the transitional virtio PCI transport: virtio 0.9.5's I/O BAR (bhyve's
``virtio.h`` names), as VIRTIO 1.1 section 4.1.4.8 "Legacy Interfaces: A Note on PCI Device Layout" describes it.

BAR 0 holds HOSTCAP 0, GUESTCAP 4, PFN 8, QNUM 12, QSEL 14, QNOTIFY 16, STATUS 18, ISR 19 and, with MSI-X enabled,
CFGVEC 20 and QVEC 22; the device configuration follows at 20 (MSI-X off) or 24 (MSI-X on)
(:func:`legacy_config_offset`). A queue's rings sit at ``PFN * 4096`` with ``vring_init``'s 4096-byte alignment.
Features are the low 32 bits, and the GUESTCAP write applies them at once (as bhyve). :class:`LegacyRegisters`
is the part of :class:`bhyve_devices.virtio.transport.VirtioPciDevice` that reads and writes this BAR; every name
here stays importable from :mod:`bhyve_devices.virtio.transport`.

Not supported: legacy registers accessed with another width than their own (reads return all-ones, writes are
dropped), a QUEUE_NUM write (the legacy queue size is the device's), big-endian legacy guests.
"""

from construct import Int8ul, Int16ul, Int32ul, Struct

LEGACY_BAR = 0
NO_VECTOR = 0xFFFF          # VIRTIO_MSI_NO_VECTOR: no interrupt for this queue or for configuration changes


def mask(size):
    """All-ones of ``size`` bytes."""
    return (1 << (8 * size)) - 1


# ---- legacy I/O BAR registers (virtio 0.9.5 / bhyve virtio.h) --------------------------------------------------------
VIRTIO_PCI_HOST_FEATURES = 0
VIRTIO_PCI_GUEST_FEATURES = 4
VIRTIO_PCI_QUEUE_PFN = 8
VIRTIO_PCI_QUEUE_NUM = 12
VIRTIO_PCI_QUEUE_SEL = 14
VIRTIO_PCI_QUEUE_NOTIFY = 16
VIRTIO_PCI_STATUS = 18
VIRTIO_PCI_ISR = 19
VIRTIO_MSI_CONFIG_VECTOR = 20
VIRTIO_MSI_QUEUE_VECTOR = 22
VIRTIO_PCI_QUEUE_ADDR_SHIFT = 12


def legacy_config_offset(msix_enabled):
    return 24 if msix_enabled else 20


LEGACY_HEADER = Struct("host_features" / Int32ul, "guest_features" / Int32ul, "queue_pfn" / Int32ul,
                       "queue_num" / Int16ul, "queue_sel" / Int16ul, "queue_notify" / Int16ul,
                       "status" / Int8ul, "isr" / Int8ul, "config_vector" / Int16ul, "queue_vector" / Int16ul)
LEGACY_REGS = {VIRTIO_PCI_HOST_FEATURES: 4, VIRTIO_PCI_GUEST_FEATURES: 4, VIRTIO_PCI_QUEUE_PFN: 4,
                VIRTIO_PCI_QUEUE_NUM: 2, VIRTIO_PCI_QUEUE_SEL: 2, VIRTIO_PCI_QUEUE_NOTIFY: 2,
                VIRTIO_PCI_STATUS: 1, VIRTIO_PCI_ISR: 1, VIRTIO_MSI_CONFIG_VECTOR: 2, VIRTIO_MSI_QUEUE_VECTOR: 2}

VIRTIO_PCI_ISR_INTR = 1
VIRTIO_PCI_ISR_CONFIG = 2


class LegacyRegisters:
    """Reads and writes of the legacy I/O BAR. Needs the transport's queues, selection, status, features and
    interrupt state (:class:`bhyve_devices.virtio.transport.VirtioPciDevice`)."""

    def _legacy_read(self, off, size):
        cfg = legacy_config_offset(self.msix_enabled)
        if off >= cfg:
            return self.vdev.config_read(off - cfg, size)
        if LEGACY_REGS.get(off) != size:
            return mask(size)
        q = self._selected()
        if off == VIRTIO_PCI_HOST_FEATURES:
            return self.offered_features(False)
        if off == VIRTIO_PCI_GUEST_FEATURES:
            return self.negotiated & 0xFFFFFFFF
        if off == VIRTIO_PCI_QUEUE_PFN:
            return (q.desc_addr >> VIRTIO_PCI_QUEUE_ADDR_SHIFT) if q is not None and q.ready else 0
        if off == VIRTIO_PCI_QUEUE_NUM:
            return q.max_size if q is not None else 0
        if off == VIRTIO_PCI_QUEUE_SEL:
            return self.queue_sel
        if off == VIRTIO_PCI_QUEUE_NOTIFY:
            return 0
        if off == VIRTIO_PCI_STATUS:
            return self.status
        if off == VIRTIO_PCI_ISR:
            return self._read_isr()
        if off == VIRTIO_MSI_CONFIG_VECTOR:
            return self.config_vector
        if off == VIRTIO_MSI_QUEUE_VECTOR:
            return q.msix_vector if q is not None else NO_VECTOR
        return mask(size)

    def _legacy_write(self, off, size, value):
        cfg = legacy_config_offset(self.msix_enabled)
        if off >= cfg:
            self.vdev.config_write(off - cfg, size, value)
            return
        if LEGACY_REGS.get(off) != size:
            return
        q = self._selected()
        if off == VIRTIO_PCI_GUEST_FEATURES:
            with self._vlock:
                self._apply_features(value & self.offered_features(False))
        elif off == VIRTIO_PCI_QUEUE_PFN:
            if q is None:
                return
            if value == 0:
                q.reset()
            else:
                q.set_features(self.negotiated)
                q.enable_legacy(value)
        elif off == VIRTIO_PCI_QUEUE_SEL:
            self.queue_sel = value
        elif off == VIRTIO_PCI_QUEUE_NOTIFY:
            self._rang(LEGACY_BAR, value)
        elif off == VIRTIO_PCI_STATUS:
            self._write_status(value, modern=False)
        elif off == VIRTIO_MSI_CONFIG_VECTOR:
            self.config_vector = self._vector(value)
        elif off == VIRTIO_MSI_QUEUE_VECTOR:
            if q is not None:
                q.msix_vector = self._vector(value)
