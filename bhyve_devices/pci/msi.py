"""MSI and MSI-X for :class:`bhyve_devices.pci.device.PciDevice` (bhyve's ``pci_emul_add_msicap``,
``pci_emul_add_msixcap``, ``pci_generate_msi`` and ``pci_generate_msix``).

PCI Local Bus Specification 3.0, section 6.8: 6.8.1 the MSI capability (here always 64-bit address capable,
1-32 vectors, per-vector masking optional: Mask Bits and Pending Bits registers), 6.8.2 MSI-X (table of
16-byte entries and Pending Bit Array in a memory BAR, per-vector Mask bit, Function Mask, Enable).

Behaviour: :meth:`MsiMixin.msi_notify` ``(vector)`` sends ``msi(addr, data)`` through MSI-X when it is enabled,
else through MSI when it is enabled (vector numbers beyond the enabled count are dropped; the low bits of the
data carry the vector as 6.8.3.4 says), else asserts INTx (the device deasserts when the guest acknowledges,
e.g. by reading virtio's ISR). A masked MSI-X vector (entry mask or function mask) sets its PBA bit; a masked
MSI vector sets its Pending bit; unmasking delivers the pending message and clears the bit. As bhyve, the
MSI-X table sits at offset 0 of its BAR and the PBA at the next 4 KiB boundary; the BAR is MEM32.

Not supported: 32-bit-only MSI, MSI-X table or PBA sharing a BAR with other registers, MSI-X entries' reserved
Vector Control bits (read 0), writes to the PBA (dropped).
"""

from bhyve_devices.pci import config as C
from bhyve_devices.pci.bar import MEM32


class MsiMixin:
    def __init__(self):
        self._msi_off = None
        self._msi_nvec = 0
        self._msi_pvm = False
        self._msix_off = None
        self._msix_nvec = 0
        self._msix_bar = None
        self._msix_table = bytearray()
        self._msix_pba = bytearray()
        self._msix_pba_off = 0

    # -- capabilities -------------------------------------------------------------------------------------
    def add_msi_cap(self, nvec, per_vector_mask=False):
        """Adds a 64-bit MSI capability for ``nvec`` vectors (rounded up to a power of two, at most 32)."""
        if not 1 <= nvec <= 32 or self._msi_off is not None:
            raise ValueError("MSI: 1..32 vectors, one capability")
        mmc = (nvec - 1).bit_length()
        ctrl = (mmc << C.MSI_CTRL_MMC_SHIFT) | C.MSI_CTRL_64BIT | (C.MSI_CTRL_PVM if per_vector_mask else 0)
        length = C.MSI_CAP_LEN_PVM if per_vector_mask else C.MSI_CAP_LEN
        cap = bytearray(length)
        cap[0] = C.CAP_ID_MSI
        cap[2:4] = ctrl.to_bytes(2, "little")
        off = self.add_capability(cap)
        with self._lock:
            self._msi_off, self._msi_nvec, self._msi_pvm = off, 1 << mmc, per_vector_mask
            self.set_writable(off + C.MSI_CTRL, 2, C.MSI_CTRL_ENABLE | (7 << C.MSI_CTRL_MME_SHIFT))
            self.set_writable(off + C.MSI_ADDR_LO, 4, 0xFFFFFFFC)
            self.set_writable(off + C.MSI_ADDR_HI, 4, 0xFFFFFFFF)
            self.set_writable(off + C.MSI_DATA, 2, 0xFFFF)
            if per_vector_mask:
                self.set_writable(off + C.MSI_MASK, 4, (1 << self._msi_nvec) - 1)
        return off

    def add_msix_cap(self, nvec, bar):
        """Adds an MSI-X capability with ``nvec`` (1-2048) vectors, allocating BAR ``bar`` (MEM32) for the table
        (offset 0, all vectors masked at reset) and the PBA (next 4 KiB boundary)."""
        if not 1 <= nvec <= C.MSIX_MAX_VECTORS or self._msix_off is not None:
            raise ValueError("MSI-X: 1..2048 vectors, one capability")
        tab = (nvec * C.MSIX_ENTRY_SIZE + 0xFFF) & ~0xFFF
        pba = ((nvec + 63) // 64) * 8
        self._msix_table = bytearray(nvec * C.MSIX_ENTRY_SIZE)
        for v in range(nvec):
            self._msix_table[v * 16 + C.MSIX_ENTRY_CTRL] = C.MSIX_VECTOR_MASKED
        self._msix_pba = bytearray(pba)
        self._msix_pba_off, self._msix_nvec, self._msix_bar = tab, nvec, bar
        cap = bytearray(C.MSIX_CAP_LEN)
        cap[0] = C.CAP_ID_MSIX
        cap[2:4] = (nvec - 1).to_bytes(2, "little")
        cap[4:8] = bar.to_bytes(4, "little")
        cap[8:12] = (tab | bar).to_bytes(4, "little")
        self.alloc_bar(bar, MEM32, tab + pba)
        off = self.add_capability(cap)
        with self._lock:
            self._msix_off = off
            self.set_writable(off + C.MSIX_CTRL, 2, C.MSIX_CTRL_ENABLE | C.MSIX_CTRL_FUNC_MASK)
        return off

    @property
    def msi_enabled(self):
        return self._msi_off is not None and bool(self.cfg[self._msi_off + C.MSI_CTRL] & C.MSI_CTRL_ENABLE)

    @property
    def msix_enabled(self):
        off = self._msix_off         # the control word's high byte holds the enable bit (15)
        return off is not None and bool(self.cfg[off + C.MSIX_CTRL + 1] & (C.MSIX_CTRL_ENABLE >> 8))

    def _msix_ctrl(self):
        return self._get(self._msix_off + C.MSIX_CTRL, 2)

    def msi_vectors(self):
        """Vectors the guest enabled through MSI (1 << MME), 0 when MSI is off."""
        if not self.msi_enabled:
            return 0
        return 1 << ((self.cfg[self._msi_off + C.MSI_CTRL] >> C.MSI_CTRL_MME_SHIFT) & 7)

    # -- delivery -----------------------------------------------------------------------------------------
    def msi_notify(self, vector=0):
        """Signals interrupt ``vector``: MSI-X, else MSI, else INTx (see the module docstring)."""
        msgs = []
        with self._lock:
            if self.msix_enabled:
                if 0 <= vector < self._msix_nvec:
                    self._msix_fire(vector, msgs)
            elif self.msi_enabled:
                if 0 <= vector < self.msi_vectors():
                    self._msi_fire(vector, msgs)
            else:
                msgs = None
        if msgs is None:
            self.lintr_assert()
        else:
            self._deliver(msgs)

    def _deliver(self, msgs):
        if self.msi is not None:
            for addr, data in msgs:
                self.msi(addr, data)

    def _msi_fire(self, vector, msgs):
        o = self._msi_off
        if self._msi_pvm and (self._get(o + C.MSI_MASK, 4) >> vector) & 1:
            self._put(o + C.MSI_PENDING, 4, self._get(o + C.MSI_PENDING, 4) | (1 << vector))
            return
        addr = self._get(o + C.MSI_ADDR_LO, 4) | (self._get(o + C.MSI_ADDR_HI, 4) << 32)
        data = self._get(o + C.MSI_DATA, 2)
        n = self.msi_vectors()
        msgs.append((addr, (data & ~(n - 1) & 0xFFFF) | vector))

    def _msix_masked(self, vector):
        return bool(self._msix_ctrl() & C.MSIX_CTRL_FUNC_MASK or
                    self._msix_table[vector * 16 + C.MSIX_ENTRY_CTRL] & C.MSIX_VECTOR_MASKED)

    def _msix_fire(self, vector, msgs):
        if self._msix_masked(vector):
            self._msix_pba[vector >> 3] |= 1 << (vector & 7)
            return
        e = self._msix_table[vector * 16:vector * 16 + 16]
        addr = int.from_bytes(e[0:8], "little")
        msgs.append((addr, int.from_bytes(e[8:12], "little")))

    def msix_pending(self, vector):
        with self._lock:
            return bool((self._msix_pba[vector >> 3] >> (vector & 7)) & 1)

    def msi_pending(self, vector):
        with self._lock:
            return bool(self._msi_pvm and (self._get(self._msi_off + C.MSI_PENDING, 4) >> vector) & 1)

    def _flush_pending(self, msgs):
        """Delivers the pending messages that are now unmasked (caller holds the lock)."""
        if self.msix_enabled and not self._msix_ctrl() & C.MSIX_CTRL_FUNC_MASK:
            for v in range(self._msix_nvec):
                if (self._msix_pba[v >> 3] >> (v & 7)) & 1 and not self._msix_masked(v):
                    self._msix_pba[v >> 3] &= ~(1 << (v & 7)) & 0xFF
                    self._msix_fire(v, msgs)
        elif self.msi_enabled and self._msi_pvm:
            o = self._msi_off
            pend = self._get(o + C.MSI_PENDING, 4) & ~self._get(o + C.MSI_MASK, 4)
            if pend:
                self._put(o + C.MSI_PENDING, 4, self._get(o + C.MSI_PENDING, 4) & ~pend)
                for v in range(32):
                    if (pend >> v) & 1 and v < self.msi_vectors():
                        self._msi_fire(v, msgs)

    # -- hooks used by PciDevice.cfgwrite ------------------------------------------------------------------
    def _msi_snapshot(self):
        msi = (self._get(self._msi_off + C.MSI_CTRL, 2), self._get(self._msi_off + C.MSI_MASK, 4)) \
            if self._msi_off is not None and self._msi_pvm else None
        msix = self._msix_ctrl() if self._msix_off is not None else None
        return msi, msix

    def _msi_after_write(self, before, msgs):
        if self._msi_off is not None:
            o = self._msi_off + C.MSI_CTRL
            ctrl = self._get(o, 2)
            mmc = (ctrl >> C.MSI_CTRL_MMC_SHIFT) & 7
            if (ctrl >> C.MSI_CTRL_MME_SHIFT) & 7 > mmc:      # software may not enable more than it can have
                self._put(o, 2, (ctrl & ~(7 << C.MSI_CTRL_MME_SHIFT)) | (mmc << C.MSI_CTRL_MME_SHIFT))
        if before != self._msi_snapshot():
            self._flush_pending(msgs)

    # -- the MSI-X BAR ------------------------------------------------------------------------------------
    def _msix_bar_read(self, idx, off, size):
        if self._msix_off is None or idx != self._msix_bar:
            return None
        mask = (1 << (8 * size)) - 1
        with self._lock:
            if 0 <= off and off + size <= len(self._msix_table):
                return int.from_bytes(self._msix_table[off:off + size], "little")
            p = off - self._msix_pba_off
            if 0 <= p and p + size <= len(self._msix_pba):
                return int.from_bytes(self._msix_pba[p:p + size], "little")
        return mask

    def _msix_bar_write(self, idx, off, size, value):
        if self._msix_off is None or idx != self._msix_bar:
            return False
        msgs = []
        with self._lock:
            if 0 <= off and off + size <= len(self._msix_table) and size in (1, 2, 4, 8):
                self._msix_table[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
                for v in range(off // 16, (off + size - 1) // 16 + 1):
                    c = v * 16 + C.MSIX_ENTRY_CTRL
                    self._msix_table[c:c + 4] = bytes([self._msix_table[c] & C.MSIX_VECTOR_MASKED, 0, 0, 0])
                self._flush_pending(msgs)
        self._deliver(msgs)
        return True
