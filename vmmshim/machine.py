"""PCI devices (``-s``) and the firmware tables (the MP table unless ``-Y``, SMBIOS always, ACPI with ``-A``) of a
VM, as bhyve's ``pci_emul.c``, ``mptbl.c``, ``smbiostbl.c`` and ``acpi.c`` set them up: the PCI host on
configuration mechanism 1 and ECAM, each function built by its bhyve emulation name from ``pci.0.S.F.*`` keys,
BARs (un)mapped on the port and MMIO buses as the guest programs them, INTx through the LPC PIRQs to IOAPIC pins
16-23 and the 8259, MSI to the vlapics. Guest-physical placement of the tables is bhyve's (MP table 0xF0000,
SMBIOS 0xF1000, ACPI 0xF2400 up to the end of the BIOS area at 1 MiB); each must end before the next begins.

Not supported: buses other than 0, PCI passthrough, the bootrom.
"""

import os
import socket

from bhyve_devices.pci import registry
from bhyve_devices.pci.device import BarKind
from bhyve_devices.pci.host import PciHost
from bhyve_devices.tables import acpi, mptable, smbios
from bhyve_devices.virtio import transport as virtio_transport

from .backends import close_device_backends, open_device_backends
from .bus import BusError
from .config import ConfigError
from .vm import HIGHMEM_BASE

#: The disk emulations whose reads and writes may be served in C (``vmmshim.blk_compiled``).
_AHCI = ("ahci", "ahci-hd", "ahci-cd")
_DISKS = ("virtio-blk", "nvme") + _AHCI


#: ``VMMSHIM_VIRTIO_PIO_NOTIFY=0``: virtio's modern queue notifications only through the memory BAR (an A/B switch
#: for the nested lab; ``bhyve_devices/virtio/transport.py``'s ``PIO_NOTIFY``)
ENV_PIO_NOTIFY = "VMMSHIM_VIRTIO_PIO_NOTIFY"


def build_pci_and_tables(vm, cfg, platform, tables=True):
    """Builds the PCI host and its devices, then writes the firmware tables into guest RAM (not with ``tables``
    False: a restored VM's memory has them already). Returns the host."""
    ops, vmi = vm.ops, vm.vmi
    virtio_transport.PIO_NOTIFY = os.environ.get(ENV_PIO_NOTIFY, "1") != "0"
    host = PciHost(mem32_base=max(vm.lowmem, 0xC0000000), msi=lambda a, d: ops.vm_lapic_msi(vmi, a, d),
                   bar_changed=lambda *a: _bar_changed(vm, *a),
                   ioapic_irq=lambda pin, level: (ops.vm_ioapic_assert_irq if level else
                                                  ops.vm_ioapic_deassert_irq)(vmi, pin),
                   isa_irq=lambda irq, level: ops.vm_atpic_set_irq(vmi, irq, level),
                   isa_level_trigger=lambda irq: ops.vm_isa_set_irq_trigger(vmi, irq, True))
    for port, size, dev in host.conf1_ranges():
        vm.add_port_device(port, size, dev, f"pci-conf1-{port:#x}")
    base, size, ecam = host.ecam_range()
    vm.add_mmio_device(base, size, ecam, "pci-ecam")
    lpc_slot = None
    for bus, slot, func, opts in cfg.pci_slots():
        name = opts.get("device")
        if not name:
            raise ConfigError(f"pci.{bus}.{slot}.{func} has options but no device")
        devopts = {k: v for k, v in opts.items() if k != "device"}
        devopts.update(guest_memory=_GuestMemory(vm), virtio_msix=cfg.get("virtio_msix"), vmname=cfg.get("name"),
                       slot=slot, func=func)
        if name in _DISKS:
            devopts["blk_compiled"] = cfg.get_bool("vmmshim.blk_compiled")
        if name in _AHCI:
            devopts["inline_kib"] = cfg.get_int("vmmshim.ahci_inline_kib", 0, 32768)
        if name == "virtio-9p":
            devopts["p9_compiled"] = cfg.get_bool("vmmshim.p9_compiled")
        if name in ("virtio-net", "virtio-tap"):
            devopts["net_compiled"] = cfg.get_bool("vmmshim.net_compiled")
        if name == "lpc":
            devopts["uarts"] = [u for u in ("com1", "com2") if cfg.get(f"lpc.{u}.path")] or ["com1", "com2"]
            lpc_slot = (slot, func)
        try:
            devopts = open_device_backends(name, devopts)      # the host side first (vmmshim/backends/)
            try:
                dev = registry.create(name, devopts)
            except BaseException:
                close_device_backends(devopts)
                raise
        except (KeyError, OSError, ValueError) as exc:
            raise ConfigError(f"-s {slot if func == 0 else f'{slot}:{func}'},{name}: {_why(exc)}") from None
        host.add(slot, func, dev)
        vm.closers.append(getattr(dev, "close", None))
    if tables:
        _write_tables(vm, cfg, host, lpc_slot)
    return host


def _why(exc):
    """An opening error as words: the path with its strerror, a missing option by name, else the message."""
    if isinstance(exc, KeyError):
        text = str(exc.args[0]) if exc.args else "?"
        return text if " " in text else f"the {text} option is missing"
    if isinstance(exc, OSError) and exc.strerror:
        if exc.filename and str(exc.filename) not in exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return exc.strerror
    return str(exc)


# Where bhyve puts each firmware table in the BIOS area: name -> (its address, the next table's address).
BIOS_AREA_END = 0x100000
TABLE_AREAS = {"MP table": (mptable.BASE, smbios.BASE), "SMBIOS": (smbios.BASE, acpi.BASE),
               "ACPI": (acpi.BASE, BIOS_AREA_END)}


def _write_tables(vm, cfg, host, lpc_slot):
    """The firmware tables, as bhyverun.c's ``bhyve_init_platform_late`` builds them: the MP table unless
    ``x86.mptable`` is false (``-Y``), ACPI or not; SMBIOS always, with the ``uuid`` key (``-U``) or bhyve's
    UUID from the VM and host names; ACPI with ``acpi_tables`` (``-A``). Each must fit its area
    (:data:`TABLE_AREAS`): a ValueError names the one that does not."""
    ncpu = vm.config.ncpus
    built = {}
    if cfg.get_bool("x86.mptable"):
        built["MP table"] = mptable.build_mptable(ncpu, host.all_routes(), ioapic_id=0)
    text = cfg.get("uuid")
    try:
        system_uuid = (smbios.parse_uuid(text) if text is not None else
                       smbios.derived_uuid(cfg.get("name", "vm"), socket.gethostname()))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    built["SMBIOS"] = smbios.build_smbios(ncpu, vm.lowmem, vm.highmem, system_uuid)
    if cfg.get_bool("acpi_tables"):
        lpc = host.function(*lpc_slot) if lpc_slot else None
        isa = lpc.legacy_devices() if lpc is not None else ()
        built["ACPI"] = acpi.build_acpi(ncpu, host.info(), isa_devices=isa, lpc_adr=lpc_slot)
    for name, tables in built.items():
        _check_area(name, tables, ncpu)
    for tables in built.values():
        for gpa, data in tables:
            vm.load(gpa, data)


def _check_area(name, tables, ncpu):
    """ValueError unless every ``(gpa, bytes)`` of ``tables`` lies in the area :data:`TABLE_AREAS` gives ``name``."""
    lo, hi = TABLE_AREAS[name]
    for gpa, data in tables:
        if not lo <= gpa <= gpa + len(data) <= hi:
            raise ValueError(f"{name} ({len(data)} bytes at {gpa:#x}, {ncpu} vCPUs) outgrows its area "
                             f"{lo:#x}-{hi:#x}")


def _bar_changed(vm, dev, idx, kind, old, new, size, enabled):
    """Maps or unmaps BAR ``idx`` of ``dev`` on the port or MMIO bus (see ``PciDevice.bar_changed``), with the
    device's doorbells in it (``vm.bar_mapped``/``bar_unmapped``, see ``vmmshim/fastpaths.py``).

    Only the BAR's own window is ever unmapped. The guest chooses BAR addresses: one that overlaps another device
    (a BAR sized with decoding left on, a bad allocation) is left unmapped with a warning instead of ending the
    VM; the BAR is mapped again when the guest moves it somewhere free or toggles decoding."""
    bus = vm.pio if kind == BarKind.IO else vm.mmio
    name = f"{getattr(dev, 'name', type(dev).__name__)}-bar{idx}"
    window = dev.bar_device(idx)
    hit = bus.lookup(old)
    if hit is not None and hit[0] == old and hit[1] is window:
        bus.remove(old)
        vm.bar_unmapped(window)
    if enabled:
        hit = bus.lookup(new)
        if hit is not None and hit[0] == new and hit[1] is window:
            return      # already decoded there
        try:
            bus.insert(new, size, window, name)
        except BusError as exc:
            vm.log(f"vmmshim: PCI {name} not mapped: {exc}")
            return
        vm.bar_mapped(window, dev, idx, new, kind == BarKind.IO, getattr(dev, "name", None))


class _GuestMemory:
    """The GuestMemory a device gets: bounds-checked views of the VM's RAM.

    Virtqueues ask for a view per descriptor (256 for a 1 MiB block request), so the RAM areas (lowmem from 0,
    highmem from 4 GiB) are viewed whole once and sliced here; anything else goes to ``vm.view``, which raises
    ``EFAULT`` outside guest RAM. ``ram`` is lowmem's view, which the virtqueues slice themselves."""

    def __init__(self, vm):
        self._slow = vm.view
        self._areas = []
        for start, size in ((0, getattr(vm, "lowmem", 0)), (HIGHMEM_BASE, getattr(vm, "highmem", 0))):
            if size:
                try:
                    self._areas.append((start, start + size, vm.view(start, size)))
                except OSError:
                    pass
        self.ram = self._areas[0][2] if self._areas and self._areas[0][0] == 0 else None

    def view(self, gpa, size):
        for start, end, whole in self._areas:
            if start <= gpa and 0 <= size and gpa + size <= end:
                return whole[gpa - start:gpa - start + size]
        return self._slow(gpa, size)
