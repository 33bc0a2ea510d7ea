"""Snapshot and restore of a :class:`~bhyve_devices.pci.device.PciDevice`'s generic state (issue 23, the protocol of
:mod:`bhyve_devices.snapshot`; bhyve's ``pci_snapshot`` in ``pci_emul.c``).

Saved under ``"pci"``: the whole 4 KiB configuration space (header, Command/Status, BAR registers, Interrupt
Line/Pin, the MSI capability's control, address, data, mask and pending registers, the MSI-X capability's enable
and function-mask bits, device registers kept in config space), each BAR's kind, size, address, prefetch flag and
whether it was placed, the MSI-X table and Pending Bit Array, the INTx pin state (asserted by the device, the level
driven) and the function's bus address. Write masks, the capability-list cursor and the MSI/MSI-X layout follow
from the device's configuration and are rebuilt by its constructor.

Restore goes into a device built from the same configuration, normally already added to its host (which placed
the BARs at the host's own addresses and reported them through ``bar_changed``). Once the state is in, every BAR
whose decoding differs from what the fresh device decoded is reported through ``bar_changed`` (then ``baraddr``)
as a guest configuration write would report it: a decoded BAR at another address moves (``enabled`` True,
``old != new``), one no longer decoded stops (``enabled`` False), one decoded now and not before starts. So the VM
maps each BAR at the address the guest programmed. The INTx line is then driven to the saved level (the
interrupt controllers restore their own pin state; a level they already hold is no new edge), which also brings
the host's PIRQ counts back. Subclasses extend the dict (call the base method) and list their own required keys
in ``snapshot_keys``.
"""

from bhyve_devices import snapshot as S
from bhyve_devices.pci import config as C
from bhyve_devices.pci.bar import BarKind

PCI_KEYS = ("cfg", "bars", "msix_table", "msix_pba", "intx_asserted", "intx_level", "slot", "func")


class PciSnapshotMixin:
    snapshot_version = 1
    snapshot_keys = ("pci",)

    def snapshot(self):
        with self._lock:
            pci = dict(cfg=S.b2s(self.cfg),
                       bars=[[int(b.kind), b.size, b.addr, b.prefetch, b.placed] for b in self.bars],
                       msix_table=S.b2s(self._msix_table), msix_pba=S.b2s(self._msix_pba),
                       intx_asserted=self._intx_asserted, intx_level=self._intx_level,
                       slot=self.slot, func=self.func)
        state = S.header(self)
        state["pci"] = pci
        return state

    def _pci_parse(self, state):
        """The saved generic state, checked against this device's configuration (SnapshotError otherwise)."""
        S.check(self, state, self.snapshot_keys)
        p = state["pci"]
        name = self.name
        if not isinstance(p, dict) or any(k not in p for k in PCI_KEYS):
            raise S.SnapshotError(f"{name}: the PCI state lacks {[k for k in PCI_KEYS if k not in (p or {})]}")
        for k in ("slot", "func"):
            mine, saved = getattr(self, k), p[k]
            if mine is not None and saved is not None and mine != saved:
                raise S.SnapshotError(f"{name}: saved at 0:{p['slot']}.{p['func']}, restored at "
                                      f"0:{self.slot}.{self.func}")
        cfg = S.s2b(p["cfg"], C.CFG_SIZE)
        table = S.s2b(p["msix_table"], len(self._msix_table))
        pba = S.s2b(p["msix_pba"], len(self._msix_pba))
        bars = p["bars"]
        if not isinstance(bars, list) or len(bars) != C.NBARS:
            raise S.SnapshotError(f"{name}: {C.NBARS} BARs expected")
        out = []
        for i, (b, saved) in enumerate(zip(self.bars, bars)):
            if not (isinstance(saved, list) and len(saved) == 5 and all(isinstance(x, int) for x in saved)):
                raise S.SnapshotError(f"{name}: BAR {i}: {saved!r:.60} is not a saved BAR")
            kind, size, addr, prefetch, placed = saved
            if kind != int(b.kind) or size != b.size:
                raise S.SnapshotError(f"{name}: BAR {i} was kind {kind} of {size:#x} bytes, this device has "
                                      f"{b.kind.name} of {b.size:#x}")
            if not 0 <= addr < 1 << 64 or (size and addr & (size - 1)):
                raise S.SnapshotError(f"{name}: BAR {i} address {addr:#x} out of range or misaligned")
            out.append((addr, bool(prefetch), bool(placed)))
        for k in ("intx_asserted", "intx_level"):
            if not isinstance(p[k], bool):
                raise S.SnapshotError(f"{name}: {k} is not a bool")
        return cfg, out, table, pba, p["intx_asserted"]

    def _decoded(self):
        """``{idx: (kind, addr, size)}`` of the BARs decoded now (caller holds the lock)."""
        return {i: (b.kind, b.addr, b.size) for i, b in enumerate(self.bars)
                if b.kind in (BarKind.IO, BarKind.MEM32, BarKind.MEM64) and b.placed and self._decoding(b.kind)}

    def restore(self, state, shift_ns):
        cfg, bars, table, pba, asserted = self._pci_parse(state)
        actions = []
        with self._lock:
            before = self._decoded()
            self.cfg[:] = cfg
            for b, (addr, prefetch, placed) in zip(self.bars, bars):
                b.addr, b.prefetch, b.placed = addr, prefetch, placed
            self._msix_table[:] = table
            self._msix_pba[:] = pba
            self._intx_asserted = asserted
            self._intx_level = False        # the fresh line is low: drive it to the saved level below
            after = self._decoded()
            for i in sorted(set(before) | set(after)):
                old, new = before.get(i), after.get(i)
                if new is None:
                    actions.append((i, old[0], old[1], old[1], old[2], False))
                elif old is None:
                    actions.append((i, new[0], new[1], new[1], new[2], True))
                elif old[1] != new[1]:
                    actions.append((i, new[0], old[1], new[1], new[2], True))
            level = self._intx_update()
        self._report(actions)
        self._intx_drive(level)
