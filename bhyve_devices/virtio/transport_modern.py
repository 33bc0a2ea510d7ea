"""The modern register file of the transitional virtio PCI transport: the virtio structure capabilities and the
memory BAR they point into (VIRTIO 1.1 section 4.1.4 "Virtio Structure PCI Capabilities").

Vendor capabilities (ID 0x09, :data:`VIRTIO_PCI_CAP`, 4.1.4) point into memory BAR 4: the common configuration at
0x0000 (:data:`COMMON_CFG`, 4.1.4.3), ISR at 0x1000 (4.1.4.5), the device configuration at 0x2000 (4.1.4.6) and
the notify area at 0x3000 (4.1.4.4, ``notify_off_multiplier`` 4: queue ``i`` notifies at ``0x3000 + 4*i``), plus
the VIRTIO_PCI_CAP_PCI_CFG window into the BARs through configuration space (4.1.4.7). A queue's size and
addresses are fixed while it is enabled (4.1.4.3.2). :class:`ModernRegisters` is the part of
:class:`bhyve_devices.virtio.transport.VirtioPciDevice` that reads and writes them; every name here stays
importable from :mod:`bhyve_devices.virtio.transport`.

Not supported: the shared memory capability (VIRTIO_PCI_CAP_SHARED_MEMORY_CFG), ``queue_notify_data`` and
``queue_reset`` (1.2), ``notify_off_multiplier`` 0, a 64-bit modern BAR.
"""

from construct import Int8ul, Int16ul, Int32ul, Int64ul, Padding, Struct

from .device import STATUS_FEATURES_OK
from .transport_legacy import NO_VECTOR, mask as _mask

# ---- modern capabilities (4.1.4) ------------------------------------------------------------------------------------
PCI_CAP_ID_VNDR = 0x09
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_PCI_CAP = Struct("cap_vndr" / Int8ul, "cap_next" / Int8ul, "cap_len" / Int8ul, "cfg_type" / Int8ul,
                        "bar" / Int8ul, Padding(3), "offset" / Int32ul, "length" / Int32ul)
VIRTIO_PCI_NOTIFY_CAP = Struct("cap" / VIRTIO_PCI_CAP, "notify_off_multiplier" / Int32ul)
VIRTIO_PCI_CFG_CAP = Struct("cap" / VIRTIO_PCI_CAP, "pci_cfg_data" / Int32ul)

COMMON_CFG = Struct(
    "device_feature_select" / Int32ul,   # 0
    "device_feature" / Int32ul,          # 4
    "driver_feature_select" / Int32ul,   # 8
    "driver_feature" / Int32ul,          # 12
    "msix_config" / Int16ul,             # 16
    "num_queues" / Int16ul,              # 18
    "device_status" / Int8ul,            # 20
    "config_generation" / Int8ul,        # 21
    "queue_select" / Int16ul,            # 22
    "queue_size" / Int16ul,              # 24
    "queue_msix_vector" / Int16ul,       # 26
    "queue_enable" / Int16ul,            # 28
    "queue_notify_off" / Int16ul,        # 30
    "queue_desc" / Int64ul,              # 32
    "queue_driver" / Int64ul,            # 40
    "queue_device" / Int64ul,            # 48
)
COMMON_CFG_SIZE = COMMON_CFG.sizeof()  # 56
COMMON_FIELDS = {}
_o = 0
for _sc in COMMON_CFG.subcons:
    COMMON_FIELDS[_sc.name] = (_o, _sc.sizeof())
    _o += _sc.sizeof()
del _o, _sc

MODERN_BAR = 4
COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
MODERN_BAR_SIZE = 0x4000


class ModernRegisters:
    """The modern capabilities, the common configuration, ISR, device configuration and notify areas of BAR 4, and
    the PCI_CFG window. Needs the transport's queues, selection, status, features and interrupt state
    (:class:`bhyve_devices.virtio.transport.VirtioPciDevice`)."""

    def _add_vcap(self, cfg_type, offset, length, extra=b"", bar=None):
        if bar is None:
            bar = MODERN_BAR if cfg_type != VIRTIO_PCI_CAP_PCI_CFG else 0
        cap = VIRTIO_PCI_CAP.build(dict(cap_vndr=PCI_CAP_ID_VNDR, cap_next=0, cap_len=16 + len(extra),
                                        cfg_type=cfg_type, bar=bar, offset=offset, length=length)) + extra
        return self.add_capability(cap)

    def _modern_read(self, off, size):
        if COMMON_OFF <= off < COMMON_OFF + COMMON_CFG_SIZE:
            return self._common_read(off - COMMON_OFF, size)
        if ISR_OFF <= off < ISR_OFF + 4:
            return self._read_isr() if off == ISR_OFF else 0
        if DEVICE_OFF <= off < DEVICE_OFF + 0x1000:
            return self.vdev.config_read(off - DEVICE_OFF, size)
        return 0 if NOTIFY_OFF <= off < MODERN_BAR_SIZE else _mask(size)

    def _modern_write(self, off, size, value):
        if COMMON_OFF <= off < COMMON_OFF + COMMON_CFG_SIZE:
            self._common_write(off - COMMON_OFF, size, value)
        elif DEVICE_OFF <= off < DEVICE_OFF + 0x1000:
            self.vdev.config_write(off - DEVICE_OFF, size, value)
        elif NOTIFY_OFF <= off < NOTIFY_OFF + NOTIFY_MULTIPLIER * len(self.queues):
            self._rang(MODERN_BAR, (off - NOTIFY_OFF) // NOTIFY_MULTIPLIER)

    def common_cfg(self):
        """The common configuration structure as the driver would read it now (a dict)."""
        q = self._selected()
        sel = self.device_feature_select
        offered = self.offered_features(True)
        return dict(
            device_feature_select=sel,
            device_feature=(offered >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0,
            driver_feature_select=self.driver_feature_select,
            driver_feature=((self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
                            if self.driver_feature_select < 2 else 0),
            msix_config=self.config_vector,
            num_queues=len(self.queues),
            device_status=self.status,
            config_generation=self.config_generation,
            queue_select=self.queue_sel,
            queue_size=q.size if q is not None else 0,
            queue_msix_vector=q.msix_vector if q is not None else NO_VECTOR,
            queue_enable=int(q.ready) if q is not None else 0,
            queue_notify_off=self.queue_sel if q is not None else 0,
            queue_desc=q.desc_addr if q is not None else 0,
            queue_driver=q.avail_addr if q is not None else 0,
            queue_device=q.used_addr if q is not None else 0,
        )

    def _common_read(self, off, size):
        with self._vlock:
            raw = COMMON_CFG.build(self.common_cfg())
        chunk = raw[off:off + size]
        return int.from_bytes(chunk + b"\xff" * (size - len(chunk)), "little")

    def _common_write(self, off, size, value):
        for name, (foff, fsize) in COMMON_FIELDS.items():
            if foff <= off and off + size <= foff + fsize:
                break
        else:
            return
        shift = 8 * (off - foff)
        with self._vlock:
            cur = self.common_cfg()[name]
        m = _mask(size) << shift
        new = (cur & ~m) | (value << shift)
        q = self._selected()
        if name == "device_feature_select":
            self.device_feature_select = new
        elif name == "driver_feature_select":
            self.driver_feature_select = new
        elif name == "driver_feature":
            sel = self.driver_feature_select
            if sel < 2 and not self.status & STATUS_FEATURES_OK:
                with self._vlock:
                    self.driver_features = ((self.driver_features & ~(0xFFFFFFFF << (32 * sel)))
                                            | (new << (32 * sel)))
        elif name == "msix_config":
            self.config_vector = self._vector(new)
        elif name == "device_status":
            self._write_status(new, modern=True)
        elif name == "queue_select":
            self.queue_sel = new
        elif q is None:
            return
        elif name == "queue_msix_vector":
            q.msix_vector = self._vector(new)
        elif q.ready:
            return  # size and addresses are fixed while the queue is enabled (4.1.4.3.2)
        elif name == "queue_size":
            q.size = new
        elif name == "queue_desc":
            q.desc_addr = new
        elif name == "queue_driver":
            q.avail_addr = new
        elif name == "queue_device":
            q.used_addr = new
        elif name == "queue_enable":
            if new == 1:
                q.set_features(self.negotiated)
                q.enable()

    # ---- the VIRTIO_PCI_CAP_PCI_CFG window (4.1.4.7) ------------------------------------------------------------------
    def _pcicfg_target(self):
        o = self._pcicfg_off
        return self.get_cfg(o + 4, 1), self.get_cfg(o + 8, 4), self.get_cfg(o + 12, 4)

    def cfgread_hook(self, off, size):
        o = self._pcicfg_off + 16
        if off == o and size == 4:
            bar, boff, blen = self._pcicfg_target()
            if blen in (1, 2, 4):
                return self.bar_access_read(bar, boff, blen)
            return 0
        return None

    def cfgwrite_hook(self, off, size, value):
        o = self._pcicfg_off + 16
        if off == o and size == 4:
            bar, boff, blen = self._pcicfg_target()
            if blen in (1, 2, 4):
                self.bar_access_write(bar, boff, blen, value & _mask(blen))
            return True
        return False
