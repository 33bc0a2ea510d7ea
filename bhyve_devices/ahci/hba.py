"""The AHCI HBA: the generic host control registers of the ABAR (AHCI 1.3.1 section 3.1), the ports' register
blocks behind them (:mod:`.port`), and the HBA's interrupts (section 10.6 and bhyve ``pci_ahci.c``'s
``ahci_port_intr``/``ahci_generate_intr``).

Registers: CAP (64-bit addressing, NCQ, AHCI only, command list override, Gen 3, 32 slots, NP ports), GHC (HR
resets the HBA and every port at once and reads 0 again; IE; AE reads 1), IS (write 1 to clear), PI (the ports
with a device), VS 1.3.1; CCC, enclosure management, CAP2 and BOHC read 0. Accesses: reads of 1, 2, 4 or 8 bytes
anywhere; aligned writes of 4 or 8 bytes (others are dropped); offsets past the last port read 0.

Interrupts: a port's PxIS & PxIE raises the HBA's IS bit for it, then

- INTx (no MSI): the line is high while GHC.IE and IS is not 0;
- MSI with a vector per port (the guest enabled at least as many vectors as there are ports, or the port's number
  is below the last vector): each new port event sends the port's vector;
- MSI shared (the ports from the last vector on): the last vector is sent when the port's IS bit goes from 0 to 1;
  clearing IS sends it again for ports still pending, so no event is lost.

The MSI capability offers 16 vectors for 32 ports (bhyve's choice), GHC.MRSM stays 0. All of it runs under one
lock (bhyve's ``sc->mtx``), the ports' engines included, except while a command moves data.

Published reads (:class:`bhyve_devices.base.PublishedMmioReads`): IS and each port's PxIS, PxSACT and PxCI, the
registers Linux's interrupt handler reads once per command, go to the VMM at every change (:meth:`Hba.publish_reads`),
so where the hypervisor can, those reads need no exit.

Not supported: command completion coalescing, enclosure management, BIOS/OS handoff, the staggered spin-up and
cold presence capabilities, MSI-X.
"""

import threading

from bhyve_devices.base import published

from .layouts import (AHCI_VERSION, CAP, CAP_NCS_SHIFT, CAP_S64A, CAP_SAM, CAP_SCLO, CAP_SNCQ, CAP_ISS_SHIFT, GHC,
                      GHC_AE, GHC_HR, GHC_IE, IS, MAX_PORTS, MAX_SLOTS, PI, PORT_BASE, PORT_STRIDE, SPEED_GEN3, VS)
from .port import Port

MASK32 = 0xFFFFFFFF


class Hba:
    """``devices``: ``{port: device}``; ``mem``: the GuestMemory; ``irq``: the PCI side (``msi_vectors()``,
    ``msi(vector)``, ``intx(level)``); ``threaded``: serve commands on port threads, and ``inline_max``: those
    that are compiled transfers of at most that many bytes on the thread that issued them (see :mod:`.port`)."""

    publish = None
    is_ = published("is_", IS)

    def __init__(self, devices, mem, irq, nports=MAX_PORTS, threaded=True, inline_max=0):
        if not 1 <= nports <= MAX_PORTS or any(not 0 <= p < nports for p in devices):
            raise ValueError(f"AHCI: ports 0-{nports - 1}")
        self.lock = threading.RLock()
        self.mem, self.irq, self.threaded, self.nports = mem, irq, threaded, nports
        self.errors = []            # unexpected exceptions turned into aborted commands (tests assert it is empty)
        self.inline = []            # ports to serve after a register write (threaded=False, or inline_max)
        self.inline_max = inline_max
        self.cap = (CAP_S64A | CAP_SNCQ | CAP_SAM | CAP_SCLO | SPEED_GEN3 << CAP_ISS_SHIFT
                    | (MAX_SLOTS - 1) << CAP_NCS_SHIFT | (nports - 1))
        self.pi = sum(1 << p for p in devices)
        self.ghc, self.is_ = GHC_AE, 0
        self._intx = False
        self.held = 0               # quiesced (a checkpoint): no port takes a new slot
        self.idle = threading.Condition(self.lock)      # notified when a held port's command ends
        self.ports = [Port(self, i, devices.get(i)) for i in range(nports)]

    @property
    def size(self):
        """The ABAR's registers in bytes."""
        return PORT_BASE + self.nports * PORT_STRIDE

    def publish_reads(self, fn):
        """From now on ``fn(offset, value)`` gets every change of IS and of each port's PxIS, PxSACT and PxCI,
        after their present values (``fn`` None: no longer). Every change is made under the lock, so what is
        published is what a read through :meth:`read` returns once the lock is free."""
        with self.lock:
            self.publish = fn
            if fn is not None:
                fn(IS, self.is_)
            for port in self.ports:
                if fn is None:
                    port.publish = None
                    continue
                base = PORT_BASE + port.index * PORT_STRIDE
                port.publish = lambda reg, value, base=base: fn(base + reg, value)
                for reg in port.PUBLISHED:
                    fn(base + reg, port.read(reg))

    # -- register accesses -----------------------------------------------------------------------------------------
    def _read32(self, off):
        if off >= PORT_BASE:
            p, reg = divmod(off - PORT_BASE, PORT_STRIDE)
            return self.ports[p].read(reg) if p < self.nports else 0
        if off == CAP:
            return self.cap
        if off == GHC:
            return self.ghc
        if off == IS:
            return self.is_
        if off == PI:
            return self.pi
        if off == VS:
            return AHCI_VERSION
        return 0

    def read(self, off, size):
        base = off & ~3
        with self.lock:
            v = self._read32(base)
            if off + size > base + 4:
                v |= self._read32(base + 4) << 32
        return (v >> (8 * (off - base))) & ((1 << (8 * size)) - 1)

    def write(self, off, size, value):
        if off & 3 or size not in (4, 8):
            return
        with self.lock:
            self._write32(off, value & MASK32)
            if size == 8:
                self._write32(off + 4, (value >> 32) & MASK32)
            todo, self.inline = self.inline, []
        for port in dict.fromkeys(todo):
            port.serve_here()

    def _write32(self, off, value):
        if off >= PORT_BASE:
            p, reg = divmod(off - PORT_BASE, PORT_STRIDE)
            if p < self.nports:
                self.ports[p].write(reg, value)
        elif off == GHC:
            if value & GHC_HR:
                self.reset()
            else:
                self.ghc = GHC_AE | (value & GHC_IE)
                self.generate(MASK32)
        elif off == IS:
            self.is_ &= ~value
            self.generate(value)

    def reset(self):
        """GHC.HR: the HBA and every port to their defaults (the lock is held)."""
        self.ghc, self.is_ = GHC_AE, 0
        self._set_intx(False)
        for port in self.ports:
            port.hba_reset()

    # -- interrupts (the lock is held) ------------------------------------------------------------------------------
    def _own_vector(self, index, nvec):
        return self.nports <= nvec or index < nvec - 1

    def _set_intx(self, level):
        if level != self._intx:
            self._intx = level
            self.irq.intx(level)

    def port_interrupt(self, port):
        """``port``'s PxIS or PxIE changed: interrupt if an enabled event is pending (bhyve's
        ``ahci_port_intr``)."""
        if not port.is_ & port.ie:
            return
        nvec = self.irq.msi_vectors()
        if nvec and self._own_vector(port.index, nvec):
            self.is_ |= port.bit
            if self.ghc & GHC_IE:
                self.irq.msi(port.index)
            return
        if self.is_ & port.bit:
            return
        self.is_ |= port.bit
        if not self.ghc & GHC_IE:
            return
        if nvec:
            self.irq.msi(nvec - 1)
        else:
            self._set_intx(True)

    def generate(self, mask):
        """After a GHC or IS write: IS from the ports, then INTx's level, or MSI for the ports in ``mask`` still
        pending (bhyve's ``ahci_generate_intr``)."""
        for port in self.ports:
            if port.is_ & port.ie:
                self.is_ |= port.bit
        if not self.is_ or not self.ghc & GHC_IE:
            self._set_intx(False)
            return
        nvec = self.irq.msi_vectors()
        if not nvec:
            self._set_intx(True)
            return
        self._set_intx(False)
        for v in range(nvec):
            vmask = (1 << v) if self._own_vector(v, nvec) else (MASK32 << v) & MASK32
            if self.is_ & mask & vmask:
                self.irq.msi(v)

    def close(self):
        for port in self.ports:
            port.close()
