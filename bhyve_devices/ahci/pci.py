"""The AHCI PCI function by bhyve name, registered with :mod:`bhyve_devices.pci.registry`: ``ahci``, ``ahci-hd``,
``ahci-cd`` (bhyve ``pci_ahci.c``'s ``pci_ahci_init`` and its three ``pci_devemu``).

Identity as bhyve: Intel ICH8 AHCI (8086:2821), class 01h (mass storage) subclass 06h (SATA) prog-if 01h (AHCI
1.0); the ABAR is BAR 5 (MEM32, the registers of 32 ports: 0x1100 bytes, rounded to 8 KiB), an MSI capability
of 16 vectors, INTx pin A.

``opts`` (what the registry's ``cls(opts)`` gets): ``backend``, the opened ports (an
:class:`~bhyve_devices.ahci.options.AhciPorts`: the VM opens them, ``vmmshim.backends.open_device_backends``; a
device never opens a host file), ``guest_memory`` (the GuestMemory), and ``threaded`` (default true: each port's
commands on a thread of its own; false: on the thread that writes the register, for tests), ``inline_kib``
(default 0; the VM passes ``-o vmmshim.ahci_inline_kib``: a compiled transfer of at most that many KiB is served on
the vCPU that issued it, see :mod:`bhyve_devices.ahci.port`). Each attached port
becomes an :class:`~bhyve_devices.ahci.ata.AtaDisk` (``hd``) or :class:`~bhyve_devices.ahci.atapi.AtapiCd`
(``cd``) with its IDENTIFY strings (serial from ``ser=`` or the path's MD5, model ``BHYVE SATA DISK`` / ``BHYVE
SATA DVD ROM``, firmware ``001``), sector sizes, ``nodelete`` and ``nmrr`` options.

Snapshots (issue 23): the PCI function's state and the HBA's (:mod:`bhyve_devices.ahci.snap`: the registers,
every port's registers and engine state, each device's settings and sense data); the function is
:class:`~bhyve_devices.snapshot.Quiescent` (the ports' threads hold still), and a command being served refuses.

Not supported: an ABAR above 4 GiB (MEM64), the legacy IDE BARs 0-4, MSI-X, PCI power management.
"""

import errno

from bhyve_devices import snapshot as S
from bhyve_devices.pci.device import MEM32, PciDevice
from bhyve_devices.pci.registry import register

from . import snap
from .ata import AtaDisk
from .atapi import AtapiCd
from .hba import Hba
from .layouts import MAX_PORTS
from .options import AhciPorts, is_true

INTEL, ICH8_AHCI = 0x8086, 0x2821
CLASS_STORAGE, SUBCLASS_SATA, PROGIF_AHCI = 0x01, 0x06, 0x01
ABAR = 5
MSI_VECTORS = 16
MAX_INLINE_KIB = 32768      #: the longest ATA transfer (65536 sectors of 512 bytes)


def build_device(attached):
    """The ATA or ATAPI device of one :class:`~bhyve_devices.ahci.options.AttachedPort`."""
    spec, backend = attached.spec, attached.backend
    o = spec.options
    strings = dict(serial=spec.serial())
    if o.get("model") is not None:
        strings["model"] = str(o["model"])
    if o.get("rev") is not None:
        strings["firmware"] = str(o["rev"])
    if spec.atapi:
        return AtapiCd(backend, **strings)
    logical, physical = spec.sector_sizes()
    nmrr = o.get("nmrr", 0)
    try:
        rotation = int(nmrr, 0) if isinstance(nmrr, str) else int(nmrr)
    except ValueError:
        raise ValueError(f"port {spec.port}: nmrr={nmrr} is not a number") from None
    return AtaDisk(backend, sectorsize=logical, physical=physical, nodelete=is_true(o.get("nodelete", False)),
                   rotation=rotation, **strings)


class _Irq:
    """What the HBA interrupts through: the function's MSI vectors, else its INTx pin."""

    def __init__(self, pci):
        self.pci = pci

    def msi_vectors(self):
        return self.pci.msi_vectors()

    def msi(self, vector):
        self.pci.msi_notify(vector)

    def intx(self, level):
        (self.pci.lintr_assert if level else self.pci.lintr_deassert)()


@register("ahci")
class AhciPci(PciDevice):
    """An AHCI controller with the ports in ``opts['backend']`` (see the module docstring)."""

    def __init__(self, opts=None):
        o = dict(opts) if isinstance(opts, dict) else {}
        ports = o.get("backend")
        if not isinstance(ports, AhciPorts):
            raise ValueError(f"{type(self).emul_name}: the ports are not open "
                             "(the VM opens them: vmmshim.backends.open_device_backends)")
        inline_kib = o.get("inline_kib") or 0
        if isinstance(inline_kib, str) and inline_kib.isdigit():
            inline_kib = int(inline_kib)
        if type(inline_kib) is not int:
            inline_kib = -1
        if not 0 <= inline_kib <= MAX_INLINE_KIB:       # the caller closes the ports
            raise ValueError(f"{type(self).emul_name}: inline_kib must be 0 to {MAX_INLINE_KIB}")
        super().__init__(type(self).emul_name, INTEL, ICH8_AHCI, CLASS_STORAGE, SUBCLASS_SATA, PROGIF_AHCI)
        devices = {}
        try:
            for attached in ports.ports:
                devices[attached.spec.port] = build_device(attached)
        except BaseException:
            ports.close()
            raise
        self.ahci_ports = ports
        mem = o.get("guest_memory")
        self.hba = Hba(devices, _NoMemory() if mem is None else mem, _Irq(self), MAX_PORTS,
                       threaded=is_true(o.get("threaded", True)), inline_max=inline_kib << 10)
        self.add_msi_cap(MSI_VECTORS)
        self.alloc_bar(ABAR, MEM32, self.hba.size)
        self.lintr_request(1)

    def set_memory(self, mem):
        """The GuestMemory, where it was not in ``opts`` (before the guest runs)."""
        self.hba.mem = mem

    def barread(self, idx, off, size):
        if idx != ABAR:
            return super().barread(idx, off, size)
        return self.hba.read(off, size)

    def barwrite(self, idx, off, size, value):
        if idx == ABAR:
            self.hba.write(off, size, value)

    def publish_mmio_reads(self, idx, fn):
        """The ABAR's interrupt status and issued-slot registers (:class:`bhyve_devices.base.PublishedMmioReads`,
        ``Hba.publish_reads``)."""
        if idx == ABAR:
            self.hba.publish_reads(fn)

    # -- snapshots (issue 23, bhyve_devices.ahci.snap) -------------------------------------------------------
    snapshot_keys = PciDevice.snapshot_keys + ("ahci",)

    def quiesced(self):
        """The ports' threads take no new slot; the command being served ends first
        (:class:`bhyve_devices.snapshot.Quiescent`)."""
        return snap.quiesced(self.hba)

    def snapshot(self):
        """The PCI function's state and the HBA's (``"ahci"``, :mod:`bhyve_devices.ahci.snap`); SnapshotError
        while a command is being served."""
        with self.hba.lock:
            ahci = snap.hba_state(self.hba)
            state = super().snapshot()
        state["ahci"] = ahci
        return state

    def restore(self, state, shift_ns):
        """Into a fresh function of the same configuration (everything is checked before anything changes); the
        issued slots the engine had not taken are then served."""
        S.check(self, state, self.snapshot_keys)
        parsed = snap.parse(self.hba, state["ahci"])
        super().restore(state, shift_ns)
        hba = self.hba
        with hba.lock:
            snap.apply(hba, parsed)
            snap.wake(hba)
            todo, hba.inline = hba.inline, []
        for port in dict.fromkeys(todo):
            port.serve_here()

    def close(self):
        self.hba.close()


class _NoMemory:
    """Guest memory before ``set_memory``: every address is outside it."""

    ram = None

    def view(self, gpa, size):
        raise OSError(errno.EFAULT, "no guest memory yet")


@register("ahci-hd")
class AhciHdPci(AhciPci):
    pass


@register("ahci-cd")
class AhciCdPci(AhciPci):
    pass
