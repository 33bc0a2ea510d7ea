"""The PCI function base class: bhyve's ``struct pci_devemu`` plus the generic ``pci_emul.c`` config-space code.

PCI Local Bus Specification 3.0, chapter 6: the type-0 header (:mod:`bhyve_devices.pci.config`), Base Address
Registers sized by writing all-ones (6.2.5.1), the Command register's I/O Space and Memory Space enables
(6.2.2), INTx (Interrupt Pin/Line, Status bit 3, Command bit 10), MSI and MSI-X (6.8, in
:mod:`bhyve_devices.pci.msi`). The configuration space is 4 KiB as PCI Express ECAM exposes it.

Mapping from bhyve (``usr.sbin/bhyve/pci_emul.h``) to this class:

====================================  =======================================================================
bhyve                                  here
====================================  =======================================================================
``pe_emu``                             the name given to :func:`bhyve_devices.pci.registry.register`
``pe_init(pi, opts)``                  ``__init__`` of the subclass
``pe_cfgread`` / ``pe_cfgwrite``       :meth:`PciDevice.cfgread_hook` / :meth:`PciDevice.cfgwrite_hook`
                                       (return None / False for "not handled": the generic code runs)
``pe_barread`` / ``pe_barwrite``       :meth:`PciDevice.barread` / :meth:`PciDevice.barwrite`
``pe_baraddr(pi, idx, en, addr)``      :meth:`PciDevice.baraddr`
``pci_emul_alloc_bar``                 :meth:`PciDevice.alloc_bar` (the address is placed by the host)
``pci_emul_add_msicap`` / ``msixcap``  :meth:`PciDevice.add_msi_cap` / :meth:`PciDevice.add_msix_cap`
``pci_generate_msi`` / ``msix``        :meth:`PciDevice.msi_notify` (either, else INTx)
``pci_lintr_request/assert/deassert``  :meth:`lintr_request` / :meth:`lintr_assert` / :meth:`lintr_deassert`
``pci_set_cfgdata8/16/32``, ``get``    :meth:`set_cfg` / :meth:`get_cfg`
``pci_snapshot``                       :meth:`snapshot` / :meth:`restore` (:mod:`bhyve_devices.pci.devsnap`)
====================================  =======================================================================

What the host (:class:`bhyve_devices.pci.host.PciHost`) attaches, each optional:

- ``msi(addr, data)``: delivers one MSI/MSI-X message (the VM sends it to the LAPICs).
- ``intx_line``: an :class:`~bhyve_devices.base.IrqLine` for the function's INTx pin (level).
- ``bar_changed(dev, idx, kind, old_addr, new_addr, size, enabled)``: the decoding of BAR ``idx`` changed.
  ``enabled`` False: stop decoding ``old_addr`` (== ``new_addr``). ``enabled`` True and ``old == new``: start
  decoding ``new_addr``. ``enabled`` True and ``old != new``: the BAR moved while decoded: stop ``old_addr``,
  start ``new_addr``. Nothing is reported for a BAR moved while its decoding is off. The device never touches a
  bus: the VM maps :meth:`bar_device` ``(idx)`` on its port bus (IO) or MMIO bus (MEM32/MEM64).
- ``bar_allocator(dev, idx, kind, size) -> addr``: used by :meth:`alloc_bar` after the device was added.

Callbacks run without the device lock held, after the state change they report.

As bhyve, once the host places a BAR it also turns on the matching decode bit (firmware's job, there being no
firmware in front of a kexec'd kernel). Accesses: :meth:`cfgread`/:meth:`cfgwrite` take 1, 2 or 4 bytes at any
offset below 4096 (others read all-ones and are dropped); BARs are written with aligned 4-byte writes only, as
bhyve.

Not supported: expansion ROM BARs (0x30 reads 0), BIST, bus-master enforcement (DMA is not gated by Command
bit 2), parity/SERR reporting, the PCI power-management capability, a 32-bit-only MSI capability, PCIe
capabilities, and I/O BARs above 64 KiB.
"""

import threading

from bhyve_devices.pci import config as C
from bhyve_devices.pci.bar import IO, MEM32, MEM64, Bar, BarKind, BarWindow  # noqa: F401 (re-exported)
from bhyve_devices.pci.devsnap import PciSnapshotMixin
from bhyve_devices.pci.msi import MsiMixin


def _pow2(n):
    return 1 << max(0, (n - 1).bit_length())


class PciDevice(PciSnapshotMixin, MsiMixin):
    """One PCI function (type-0 header). Subclasses override the hooks; see the module docstring."""

    def __init__(self, name, vendor, device, class_code, subclass, prog_if=0, revision=0,
                 subsys_vendor=0, subsys_id=0):
        self.name = name
        self._lock = threading.RLock()
        self.cfg = bytearray(C.CFG_SIZE)
        self.wmask = bytearray(C.CFG_SIZE)     # per byte: bits the generic code lets the guest write
        self.w1cmask = bytearray(C.CFG_SIZE)   # per byte: write-1-to-clear bits
        self.bars = [Bar() for _ in range(C.NBARS)]
        self._bar_windows = {}
        self.msi = None
        self.intx_line = None
        self.bar_changed = None
        self.bar_allocator = None
        self.bus = 0
        self.slot = None
        self.func = None
        self._cap_next = C.CAP_START
        self._cap_last = None
        self._intx_asserted = False
        self._intx_level = False
        MsiMixin.__init__(self)
        self._put(C.VENDOR, 2, vendor)
        self._put(C.DEVICE, 2, device)
        self._put(C.REVISION, 1, revision)
        self._put(C.PROG_IF, 1, prog_if)
        self._put(C.SUBCLASS, 1, subclass)
        self._put(C.CLASS, 1, class_code)
        self._put(C.SUBSYS_VENDOR, 2, subsys_vendor)
        self._put(C.SUBSYS_ID, 2, subsys_id)
        self._put_mask(self.wmask, C.COMMAND, 2, C.CMD_WRITABLE)
        self._put_mask(self.w1cmask, C.STATUS, 2, C.STS_W1C)
        self._put_mask(self.wmask, C.CACHE_LINE, 2, 0xFFFF)      # cache line size, latency timer
        self._put_mask(self.wmask, C.INTR_LINE, 1, 0xFF)

    # -- raw config helpers (pci_set_cfgdata / pci_get_cfgdata) ---------------------------------------------
    def _put(self, off, size, value):
        self.cfg[off:off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def _get(self, off, size):
        return int.from_bytes(self.cfg[off:off + size], "little")

    @staticmethod
    def _put_mask(arr, off, size, value):
        arr[off:off + size] = value.to_bytes(size, "little")

    def set_cfg(self, off, size, value):
        """Sets config bytes directly (no write masks, no side effects): for device setup."""
        with self._lock:
            self._put(off, size, value)

    def get_cfg(self, off, size):
        with self._lock:
            return self._get(off, size)

    def set_writable(self, off, size, mask):
        """Lets the generic cfgwrite path store ``mask`` bits of ``size`` bytes at ``off`` (device-specific
        registers kept in config space)."""
        self._put_mask(self.wmask, off, size, mask)

    def set_multifunction(self, on=True):
        with self._lock:
            ht = self._get(C.HEADER_TYPE, 1)
            self._put(C.HEADER_TYPE, 1, (ht | C.HEADER_TYPE_MULTIFUNCTION) if on else
                      (ht & ~C.HEADER_TYPE_MULTIFUNCTION))

    def add_capability(self, data):
        """Appends a capability (``data`` starts with its ID; the next pointer is filled in) to the list and
        returns its offset (``pci_emul_add_capability``): 4-byte aligned, from 0x40, below 0x100."""
        data = bytearray(data)
        with self._lock:
            off = self._cap_next
            end = off + ((len(data) + 3) & ~3)
            if len(data) < 2 or end > C.LEGACY_CFG_SIZE:
                raise ValueError(f"{self.name}: no room for a {len(data)}-byte capability")
            data[1] = 0
            self.cfg[off:off + len(data)] = data
            if self._cap_last is None:
                self._put(C.CAP_PTR, 1, off)
                self._put(C.STATUS, 2, self._get(C.STATUS, 2) | C.STS_CAPLIST)
            else:
                self.cfg[self._cap_last + 1] = off
            self._cap_last, self._cap_next = off, end
            return off

    # -- hooks for subclasses (pe_cfgread / pe_cfgwrite / pe_barread / pe_barwrite / pe_baraddr) --------------
    def cfgread_hook(self, off, size):
        """Return an int to answer a config read yourself, None to let the generic code answer."""
        return None

    def cfgwrite_hook(self, off, size, value):
        """Return True when the write was handled, False to let the generic code run."""
        return False

    def barread(self, idx, off, size):
        return (1 << (8 * size)) - 1

    def barwrite(self, idx, off, size, value):
        pass

    def baraddr(self, idx, enabled, addr):
        """Called (after ``bar_changed``) when BAR ``idx`` starts (``enabled``) or stops decoding ``addr``."""

    # -- BARs -----------------------------------------------------------------------------------------------
    def alloc_bar(self, idx, kind, size, prefetch=False):
        """Declares BAR ``idx`` of ``kind`` (IO, MEM32, MEM64) and ``size`` bytes (rounded up to a power of two,
        at least 4 for IO and 16 for memory). A MEM64 BAR also takes ``idx + 1``. The host places it."""
        kind = BarKind(kind)
        if kind not in (BarKind.IO, BarKind.MEM32, BarKind.MEM64):
            raise ValueError(f"bad BAR kind {kind!r}")
        last = idx + 1 if kind == BarKind.MEM64 else idx
        if not 0 <= idx or last >= C.NBARS:
            raise ValueError(f"BAR index {idx} out of range for {kind.name}")
        if any(self.bars[i].kind != BarKind.NONE for i in range(idx, last + 1)):
            raise ValueError(f"{self.name}: BAR {idx} already allocated")
        size = max(_pow2(size), 4 if kind == BarKind.IO else 16)
        if kind == BarKind.IO and size > 0x10000:
            raise ValueError("I/O BARs are limited to 64 KiB")
        if kind == BarKind.MEM32 and size > 1 << 31:
            raise ValueError("MEM32 BAR too large")
        with self._lock:
            self.bars[idx] = Bar(kind, size, 0, bool(prefetch) and kind != BarKind.IO)
            if kind == BarKind.MEM64:
                self.bars[idx + 1] = Bar(BarKind.MEM64_HI, 0, 0)
            self._store_bar_regs(idx)
        if self.bar_allocator is not None:
            self.place_bar(idx, self.bar_allocator(self, idx, kind, size))
        return size

    def _store_bar_regs(self, idx):
        b = self.bars[idx]
        if b.kind == BarKind.IO:
            self._put(C.BAR0 + 4 * idx, 4, (b.addr & 0xFFFC) | C.BAR_IO_SPACE)
        elif b.kind in (BarKind.MEM32, BarKind.MEM64):
            low = (b.addr & 0xFFFFFFF0) | (C.BAR_MEM_PREFETCH if b.prefetch else 0)
            if b.kind == BarKind.MEM64:
                low |= C.BAR_MEM_TYPE_64
                self._put(C.BAR0 + 4 * idx + 4, 4, b.addr >> 32)
            self._put(C.BAR0 + 4 * idx, 4, low)

    def _decoding(self, kind):
        cmd = self._get(C.COMMAND, 2)
        return bool(cmd & (C.CMD_IO if kind == BarKind.IO else C.CMD_MEM))

    def place_bar(self, idx, addr):
        """Host side: gives BAR ``idx`` its address and turns on the decode bit for its kind (bhyve's
        ``pci_emul_alloc_bar`` does both). Reports through ``bar_changed``."""
        actions = []
        with self._lock:
            b = self.bars[idx]
            bit = C.CMD_IO if b.kind == BarKind.IO else C.CMD_MEM
            old, was, was_placed = b.addr, self._decoding(b.kind), b.placed
            b.addr, b.placed = addr, True
            self._store_bar_regs(idx)
            self._put(C.COMMAND, 2, self._get(C.COMMAND, 2) | bit)
            if not was:
                self._decode_change(b.kind, True, actions)   # covers this BAR too
            elif not was_placed:
                actions.append((idx, b.kind, addr, addr, b.size, True))
            elif old != addr:
                actions.append((idx, b.kind, old, addr, b.size, True))
        self._report(actions)

    def bar_device(self, idx):
        """The :class:`~bhyve_devices.base.Device` to map at BAR ``idx`` (routes MSI-X table/PBA accesses). The
        same object every time, so a bus can tell whether what it maps at an address is this BAR."""
        w = self._bar_windows.get(idx)
        if w is None:
            w = self._bar_windows[idx] = BarWindow(self, idx)
        return w

    def doorbells(self, idx):
        """Registers of BAR ``idx`` whose writes need no answer and may be served off the vCPU (``(offset, size,
        datamatch, fn)``; see ``vmmshim.doorbells``). None by default."""
        return ()

    def bar_access_read(self, idx, off, size):
        v = self._msix_bar_read(idx, off, size)
        return self.barread(idx, off, size) if v is None else v

    def bar_access_write(self, idx, off, size, value):
        if not self._msix_bar_write(idx, off, size, value):
            self.barwrite(idx, off, size, value)

    def _bar_write(self, idx, value, actions):
        b = self.bars[idx]
        if b.kind == BarKind.NONE:
            return
        owner = idx - 1 if b.kind == BarKind.MEM64_HI else idx
        ob = self.bars[owner]
        mask = ~(ob.size - 1)
        if b.kind == BarKind.IO:
            new = value & mask & 0xFFFC
        elif b.kind == BarKind.MEM32:
            new = value & mask & 0xFFFFFFF0
        elif b.kind == BarKind.MEM64:
            new = (ob.addr & ~0xFFFFFFFF) | (value & mask & 0xFFFFFFF0)
        else:
            new = ((value << 32) | (ob.addr & 0xFFFFFFFF)) & mask & 0xFFFFFFFFFFFFFFFF
        old, was_placed = ob.addr, ob.placed
        ob.addr, ob.placed = new, True
        self._store_bar_regs(owner)
        if self._decoding(ob.kind) and (new != old or not was_placed):
            actions.append((owner, ob.kind, new if not was_placed else old, new, ob.size, True))

    def _decode_change(self, kind_io, enabled, actions):
        for i, b in enumerate(self.bars):
            if b.kind in (BarKind.NONE, BarKind.MEM64_HI) or (b.kind == BarKind.IO) != (kind_io == BarKind.IO):
                continue
            if not b.placed:
                continue
            actions.append((i, b.kind, b.addr, b.addr, b.size, enabled))

    def _report(self, actions):
        for idx, kind, old, new, size, enabled in actions:
            cb = self.bar_changed
            if cb is not None:
                cb(self, idx, kind, old, new, size, enabled)
            if enabled and old != new:
                self.baraddr(idx, False, old)
            self.baraddr(idx, enabled, new)

    # -- configuration accesses ---------------------------------------------------------------------------
    def cfgread(self, off, size):
        """A configuration read of ``size`` (1, 2, 4) bytes at ``off``; all-ones if out of range."""
        mask = (1 << (8 * size)) - 1 if size in (1, 2, 4) else 0xFFFFFFFF
        if size not in (1, 2, 4) or off < 0 or off + size > C.CFG_SIZE:
            return mask
        v = self.cfgread_hook(off, size)
        if v is not None:
            return v & mask
        with self._lock:
            return self._get(off, size)

    def cfgwrite(self, off, size, value):
        """A configuration write; read-only bits kept, W1C bits cleared by ones, side effects reported."""
        if size not in (1, 2, 4) or off < 0 or off + size > C.CFG_SIZE:
            return
        value &= (1 << (8 * size)) - 1
        if self.cfgwrite_hook(off, size, value):
            return
        actions, msgs = [], []
        with self._lock:
            if C.BAR0 <= off < C.BAR0 + 4 * C.NBARS:
                if size == 4 and not off & 3:
                    self._bar_write((off - C.BAR0) >> 2, value, actions)
            else:
                old_cmd = self._get(C.COMMAND, 2)
                before = self._msi_snapshot()
                for i in range(size):
                    o, vb = off + i, (value >> (8 * i)) & 0xFF
                    wm, w1c = self.wmask[o], self.w1cmask[o]
                    self.cfg[o] = ((self.cfg[o] & ~wm) | (vb & wm)) & ~(vb & w1c) & 0xFF
                cmd = self._get(C.COMMAND, 2)
                for bit, kind in ((C.CMD_IO, BarKind.IO), (C.CMD_MEM, BarKind.MEM32)):
                    if (old_cmd ^ cmd) & bit:
                        self._decode_change(kind, bool(cmd & bit), actions)
                self._msi_after_write(before, msgs)
            level = self._intx_update()
        self._report(actions)
        self._deliver(msgs)
        self._intx_drive(level)

    # -- INTx ---------------------------------------------------------------------------------------------
    def lintr_request(self, pin=1):
        """Declares the INTx pin (1 = INTA# .. 4 = INTD#) in the Interrupt Pin register."""
        if not 1 <= pin <= 4:
            raise ValueError("INTx pin must be 1..4")
        self.set_cfg(C.INTR_PIN, 1, pin)

    def _intx_update(self):
        """Recomputes the line level (caller holds the lock); returns it, or None when unchanged."""
        sts = self._get(C.STATUS, 2)
        self._put(C.STATUS, 2, (sts | C.STS_INTX) if self._intx_asserted else (sts & ~C.STS_INTX))
        level = (self._intx_asserted and not self._get(C.COMMAND, 2) & C.CMD_INTX_DISABLE
                 and not self.msi_enabled and not self.msix_enabled)
        if level == self._intx_level:
            return None
        self._intx_level = level
        return level

    def _intx_drive(self, level):
        if level is not None and self.intx_line is not None:
            self.intx_line.set_level(level)

    def lintr_assert(self):
        with self._lock:
            self._intx_asserted = True
            level = self._intx_update()
        self._intx_drive(level)

    def lintr_deassert(self):
        with self._lock:
            self._intx_asserted = False
            level = self._intx_update()
        self._intx_drive(level)

    def header(self):
        """The parsed type-0 header (:data:`~bhyve_devices.pci.config.TYPE0_HEADER`)."""
        with self._lock:
            return C.TYPE0_HEADER.parse(bytes(self.cfg[:C.HEADER_SIZE]))
