"""The ``nvme`` PCI function (bhyve ``pci_nvme.c``'s ``pci_de_nvme``; NVM Express Base Specification 1.4, 2
(PCI header and capabilities), 3.1 (registers in BAR 0), 7.5 (interrupts)).

``-s N,nvme,PATH[,maxq=N][,qsz=N][,ioslots=N][,sectsz=512|4096|8192][,ser=ID][,eui64=N][,dsm=auto|enable|disable]
[,ro][,nodelete]``: the VM opens PATH as a :class:`~bhyve_devices.backends.BlockBackend`
(``vmmshim.backends.open_device_backends``) and passes it as ``backend``; :func:`device_options` checks the rest
(a bad value is a ValueError naming it). Defaults are bhyve's: 16 I/O queue pairs, 2048 entries a queue, 512-byte
sectors, serial ``NVME-<slot>-<func>``; ``ioslots`` is accepted and checked only (commands run one at a time).

The function: vendor FB5Dh device 0A0Ah (bhyve's), class 01h/08h/02h (NVM Express); BAR 0 a 64-bit memory BAR of
16 KiB with the registers and the doorbells; MSI-X in BAR 4 with one vector per queue pair (``maxq`` + 1, vector 0
for the admin queue), a one-vector MSI capability and INTx pin A. Interrupts go out through MSI-X when it is on,
else MSI (INTMS/INTMC mask and hold them), else INTx, asserted while a completion queue holds entries the host has
not consumed and INTMS bit 0 is clear.

Doorbells (:class:`bhyve_devices.base.Doorbells`): each submission queue tail doorbell is doorbell ``y`` of BAR 0,
its function the controller's serving. Until the host gives a shadow doorbell page every doorbell write must carry
its value to the device, so they are offered with a ``datamatch`` no valid write has (:data:`NEVER`): a write exits
and the VM rings the device's thread (``ring_with``), where the queue is served. Once the page is given (Doorbell
Buffer Config) the I/O queues' doorbells are offered for any value: KVM's ioeventfd then takes them without an
exit and the device reads the tails from the page. The controller asks for the change (``rebind``) and the
function reports BAR 0 decoded again at its address through the host's ``bar_changed``, so the VM registers the new
set; a controller reset goes back the same way.

The re-registration maps BAR 0 off and on again on the VM's MMIO bus: a register write in that moment is lost.
It happens while Doorbell Buffer Config is in flight (Linux's queues are frozen then) and at a controller reset.

Not supported: bhyve's ``ram=`` namespaces, ``eui64=`` of 0 (it means "derive one"), the PCI Express and power
management capabilities, INTMS/INTMC with MSI-X (ignored there, as 7.5.1 says).

Snapshots (issue 23): :meth:`NvmePci.snapshot` saves the PCI function (configuration space, BARs, MSI, MSI-X
table and PBA, INTx), the controller (:mod:`bhyve_devices.nvme.snap`: registers, every queue, features, the
outstanding Asynchronous Event Requests and pending events, the logs) and the MSI messages INTMS holds back.
"""

import functools
import threading

from bhyve_devices import snapshot as S
from bhyve_devices.snapshot import SnapshotError
from bhyve_devices.pci.device import MEM64, PciDevice
from bhyve_devices.pci.options import is_true, legacy_options
from bhyve_devices.pci.registry import register

from .controller import NvmeController
from .identify import DEVICE_ID, VENDOR_ID
from .regs import BAR0_MIN_SIZE, DOORBELL_BASE, DOORBELL_STRIDE
from .snap import ControllerState, controller_state

BAR_REGS, BAR_MSIX = 0, 4
PCI_CLASS_STORAGE, PCI_SUBCLASS_NVM, PROGIF_NVME = 0x01, 0x08, 0x02
NEVER = 0xFFFFFFFF                  # a doorbell value no queue takes: KVM matches no real write
MAX_QUEUES = 64
MAX_QUEUE_ENTRIES = 65536
SECTOR_SIZES = (512, 4096, 8192)
DSM_MODES = ("auto", "enable", "disable")
DEFAULTS = dict(maxq=16, qsz=2048, ioslots=8, sectsz=512)
SERIAL_LEN = 20
#: Keys the VM adds to every emulation's options, and bhyve's block options taken without effect.
VM_KEYS = frozenset(("device", "backend", "path", "guest_memory", "virtio_msix", "vmname", "slot", "func",
                     "blk_compiled"))
FLAG_KEYS = frozenset(("ro", "nodelete", "nocache", "direct", "sync"))
VALUE_KEYS = frozenset(("maxq", "qsz", "ioslots", "sectsz", "ser", "eui64", "dsm"))


def parse_options(text):
    """bhyve's legacy ``PATH[,KEY=VALUE|,FLAG]...`` -> the keys ``-s`` would store (the path as ``path``)."""
    return legacy_options(text, "path")


def _number(o, key, lo, hi):
    text = o.get(key, DEFAULTS.get(key, lo))
    try:
        n = int(str(text), 0)
    except ValueError:
        raise ValueError(f"{key}={text} is not a number") from None
    if not lo <= n <= hi:
        raise ValueError(f"{key}={text} must be {lo}-{hi}")
    return n


def device_options(o):
    """The controller's keyword arguments from the emulation's options (ValueError naming a bad one)."""
    unknown = sorted(k for k in o if k not in VM_KEYS | FLAG_KEYS | VALUE_KEYS)
    if "ram" in unknown:
        raise ValueError("ram= (a RAM namespace) is not supported: give an image")
    if unknown:
        raise ValueError(f"unknown option {unknown[0]!r}")
    kw = dict(maxq=_number(o, "maxq", 1, MAX_QUEUES), qsz=_number(o, "qsz", 2, MAX_QUEUE_ENTRIES),
              sectsz=_number(o, "sectsz", SECTOR_SIZES[0], SECTOR_SIZES[-1]),
              eui64=_number(o, "eui64", 0, (1 << 64) - 1), nodelete=is_true(o.get("nodelete", False)))
    _number(o, "ioslots", 1, 1 << 16)
    if kw["sectsz"] not in SECTOR_SIZES:
        raise ValueError(f"sectsz={o['sectsz']} must be 512, 4096 or 8192")
    dsm = str(o.get("dsm", "auto"))
    if dsm not in DSM_MODES:
        raise ValueError(f"dsm={dsm} must be auto, enable or disable")
    kw["dsm"] = dsm
    ser = o.get("ser")
    if ser is not None:
        ser = str(ser)
        if len(ser) > SERIAL_LEN or not all(" " <= c <= "~" for c in ser):
            raise ValueError(f"ser={ser} must be at most {SERIAL_LEN} printable ASCII characters")
    kw["serial"] = ser
    return kw


@register("nvme")
class NvmePci(PciDevice):
    """An NVMe controller as a PCI function (see the module docstring); ``opts`` as the registry gives them."""

    def __init__(self, opts=None):
        o = parse_options(opts) if isinstance(opts, str) else dict(opts or {})
        backend = o.get("backend")
        if backend is None or isinstance(backend, str):
            raise ValueError("nvme: no opened backend (the VM opens the image: "
                             "vmmshim.backends.open_device_backends)")
        kw = device_options(o)
        slot, func = o.get("slot", 0), o.get("func", 0)
        kw["serial"] = kw["serial"] if kw["serial"] is not None else f"NVME-{slot}-{func}"
        super().__init__("nvme", VENDOR_ID, DEVICE_ID, PCI_CLASS_STORAGE, PCI_SUBCLASS_NVM, prog_if=PROGIF_NVME)
        self.ctrl = c = NvmeController(backend, o.get("guest_memory"), vmname=str(o.get("vmname") or "vm"),
                                       slot=slot, func=func, **kw)
        self.errors = []
        self._ring = None
        self._irq_lock = threading.Lock()
        self._msi_pending = 0
        self.alloc_bar(BAR_REGS, MEM64, max(BAR0_MIN_SIZE, DOORBELL_BASE + 2 * DOORBELL_STRIDE * (c.maxq + 1)))
        self.add_msix_cap(c.maxq + 1, BAR_MSIX)
        self.add_msi_cap(1)
        self.lintr_request(1)
        c.irq, c.irq_update, c.rebind = self._irq, self._irq_update, self._rebind
        c.level_triggered = lambda: not self.msix_enabled and not self.msi_enabled
        c.kick = lambda: self._rang(BAR_REGS, 0)

    def set_memory(self, mem):
        """Gives the controller its guest memory (when the registry built it without one)."""
        self.ctrl.mem = mem

    # -- BAR 0 ------------------------------------------------------------------------------------------------
    def barread(self, idx, off, size):
        if idx != BAR_REGS:
            return (1 << (8 * size)) - 1
        return self.ctrl.read_register(off, size)

    def barwrite(self, idx, off, size, value):
        if idx != BAR_REGS:
            return
        try:
            if off >= DOORBELL_BASE:
                y = self.ctrl.doorbell_write(off, size, value)
                if y is not None:
                    self._rang(BAR_REGS, y)
            else:
                self.ctrl.write_register(off, size, value)
        except Exception as exc:    # a device bug must not take the vCPU down
            self.errors.append(f"barwrite {off:#x}: {exc!r}")

    # -- doorbells (bhyve_devices.base.Doorbells) ---------------------------------------------------------------
    def doorbells(self, idx):
        """Submission queue ``y``'s tail doorbell is doorbell ``y`` of BAR 0 (see the module docstring)."""
        if idx != BAR_REGS:
            return []
        shadowed = self.ctrl.shadow is not None
        return [(DOORBELL_BASE + 2 * y * DOORBELL_STRIDE, 4, None if y and shadowed else NEVER,
                 functools.partial(self.ctrl.rang, y)) for y in range(self.ctrl.maxq + 1)]

    def ring_with(self, ring):
        self._ring = ring

    def _rang(self, bar, y):
        ring = self._ring
        if ring is not None:
            ring(bar, y)
        else:
            self.ctrl.rang(y)

    def _rebind(self):
        """The doorbells KVM may take changed: BAR 0 is reported decoded again at its address, so the VM drops
        its doorbells there and registers :meth:`doorbells` anew."""
        with self._lock:
            bar = self.bars[BAR_REGS]
            live = bar.placed and self._decoding(bar.kind)
            kind, addr, size = bar.kind, bar.addr, bar.size
        cb = self.bar_changed
        if cb is not None and live:
            cb(self, BAR_REGS, kind, addr, addr, size, True)

    # -- interrupts (7.5) -------------------------------------------------------------------------------------
    def _irq(self, vector):
        if self.msix_enabled:
            self.msi_notify(vector)
        elif self.msi_enabled:
            v = vector & (self.msi_vectors() - 1)
            with self._irq_lock:
                if self.ctrl.intms >> v & 1:
                    self._msi_pending |= 1 << v
                    return
            self.msi_notify(v)
        else:
            self._intx()

    def _irq_update(self):
        if self.msix_enabled:
            return
        if self.msi_enabled:
            with self._irq_lock:
                due = self._msi_pending & ~self.ctrl.intms
                self._msi_pending &= ~due
            for v in range(32):
                if due >> v & 1:
                    self.msi_notify(v)
            return
        self._intx()

    def _intx(self):
        with self._irq_lock:
            if not self.ctrl.intms & 1 and self.ctrl.intx_pending():
                self.lintr_assert()
            else:
                self.lintr_deassert()

    # -- snapshots (issue 23, bhyve_devices.nvme.snap) -------------------------------------------------------
    snapshot_keys = PciDevice.snapshot_keys + ("nvme", "msi_pending")

    def snapshot(self):
        """The PCI function's state, the controller's (``"nvme"``, :mod:`bhyve_devices.nvme.snap`) and the MSI
        messages INTMS holds back (``"msi_pending"``)."""
        with self.ctrl._lock:
            nvme = controller_state(self.ctrl)
            with self._irq_lock:
                pending = self._msi_pending
            state = super().snapshot()
        state["nvme"] = nvme
        state["msi_pending"] = pending
        return state

    def restore(self, state, shift_ns):
        """Into a fresh function of the same configuration: everything is checked (and the queues mapped) before
        anything changes; the queues then go on from where they were. With shadow doorbells the function's
        doorbells are registered anew (``rebind``), as Doorbell Buffer Config did."""
        S.check(self, state, self.snapshot_keys)
        saved = ControllerState(self.ctrl, state["nvme"])
        pending = state["msi_pending"]
        if not S.int_in(pending, 0, 0xFFFFFFFF):
            raise SnapshotError(f"nvme: msi_pending = {pending!r:.40}")
        super().restore(state, shift_ns)
        saved.apply()
        with self._irq_lock:
            self._msi_pending = pending
        if self.ctrl.shadow is not None:
            self.ctrl.rebind()

    def close(self):
        self.ctrl.backend.close()
