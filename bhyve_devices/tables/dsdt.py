"""bhyve's DSDT (``acpitbl.c`` ``basl_fwrite_dsdt`` + ``pci_emul.c`` ``pci_write_dsdt`` + the LPC devices'
``lpc_dsdt`` hooks), encoded straight to AML with :mod:`bhyve_devices.tables.aml`.

ACPI 6.x: 6.1.5 _HID, 6.1.12 _UID, 6.1.1 _ADR, 6.5.5 _BBN, 6.2.2 _CRS, 6.2.13 _PRT (APIC mode: the source is
Zero and the source index the GSI), 7.4.2 \\_Sx (``_S5``: SLP_TYPa 5, SLP_TYPb 0), 5.8.1 \\_PIC; PCI Firmware 3.x
section 4.1.2 (the ECAM region reserved by a PNP0C02 motherboard-resources device, so Linux trusts the MCFG).

Namespace::

    Name(_S5, Package(){5, 0})
    Name(PICM, 0)  Method(_PIC, 1){ Store(Arg0, PICM) }
    Scope(\\_SB) {
      Device(PC00) { _HID PNP0A03, _ADR 0, _UID 0, Method(_BBN){Return(0)},
                     _CRS { WordBusNumber 0-0, IO 0xCF8/8, DWordIO 0-0xCF7, DWordIO 0xD00-0xFFFF,
                            DWordMemory <mem32 window>, QWordMemory <mem64 window> },
                     _PRT { {slot << 16 | 0xFFFF, pin - 1, Zero, GSI}, ... },
                     Device(ISA) { _ADR slot << 16 | func, COM1, COM2, PIC, TIMR, RTC, HPET ... } }
      Device(MCFG) { _HID PNP0C02, _UID 0x4D43, _CRS { Memory32Fixed <ECAM> } }
    }

Not supported: PIC-mode routing (_PRT link devices for PIRQ A-H; ``_PIC`` only records the mode), buses other
than 0, per-device ``pe_write_dsdt`` hooks, processor objects (Linux takes CPUs from the MADT).
"""

from bhyve_devices.tables import aml

ECAM_BUS_SIZE = 1 << 20


def _legacy_device(d):
    descs = [aml.res_io(base, base, 1, ln) for base, ln in d.io]
    descs += [aml.res_mem32_fixed(base, ln) for base, ln in d.mem]
    if d.irqs:
        descs.append(aml.res_irq(*d.irqs))
    return aml.device(d.name, aml.name("_HID", aml.integer(aml.eisaid(d.hid))), aml.name("_UID", d.uid),
                      aml.name("_CRS", aml.resource_template(*descs)))


def prt_entries(routes):
    """``[(address, pin, gsi)]`` for the _PRT, one per populated slot and pin (functions share them)."""
    seen = {}
    for r in routes:
        seen.setdefault((r.slot, r.pin), r.ioapic_pin)
    return [((slot << 16) | 0xFFFF, pin - 1, gsi) for (slot, pin), gsi in sorted(seen.items())]


def build_dsdt_body(info, isa_devices=(), lpc_adr=None):
    """The DSDT's AML term list. ``info`` is a :class:`~bhyve_devices.pci.host.PciHostInfo` (or anything with
    its fields); ``isa_devices`` objects with ``name, hid, uid, io, irqs, mem``; ``lpc_adr`` ``(slot, func)`` of
    the LPC bridge (the ISA devices go in PC00 itself when None)."""
    io_lo, io_hi = 0x0D00, 0xFFFF
    m32, m64 = info.mem32_window, info.mem64_window
    crs = aml.resource_template(
        aml.res_word_bus(info.bus_min, info.bus_max),
        aml.res_io(0xCF8, 0xCF8, 1, 8),
        aml.res_dword_io(0x0000, 0x0CF7),
        aml.res_dword_io(io_lo, io_hi),
        aml.res_dword_mem(m32[0], m32[1]),
        aml.res_qword_mem(m64[0], m64[1]),
    )
    prt = [[addr, pin, 0, gsi] for addr, pin, gsi in prt_entries(info.routes)]
    isa = [_legacy_device(d) for d in isa_devices]
    pc00 = [
        aml.name("_HID", aml.integer(aml.eisaid("PNP0A03"))),
        aml.name("_ADR", 0),
        aml.name("_UID", 0),
        aml.method("_BBN", 0, aml.return_(info.bus_min)),
        aml.name("_CRS", crs),
        aml.name("_PRT", prt),
    ]
    if lpc_adr is not None:
        pc00.append(aml.device("ISA", aml.name("_ADR", (lpc_adr[0] << 16) | lpc_adr[1]), *isa))
    else:
        pc00.extend(isa)
    ecam_len = (info.bus_max - info.bus_min + 1) * ECAM_BUS_SIZE
    mcfg = aml.device("MCFG", aml.name("_HID", aml.integer(aml.eisaid("PNP0C02"))), aml.name("_UID", 0x4D43),
                      aml.name("_CRS", aml.resource_template(
                          aml.res_mem32_fixed(info.ecam_base + info.bus_min * ECAM_BUS_SIZE, ecam_len))))
    return b"".join([
        aml.name("_S5", [5, 0]),
        aml.name("PICM", 0),
        aml.method("_PIC", 1, aml.store(aml.arg(0), "PICM")),
        aml.scope("\\_SB", aml.device("PC00", *pc00), mcfg),
    ])
