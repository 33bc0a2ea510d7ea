"""bhyve's ACPI tables (``acpitbl.c``), built with construct instead of iasl.

ACPI 6.x chapter 5 "ACPI Software Programming Model": 5.2.5.3 RSDP (revision 2, 36 bytes, checksum over the
first 20 bytes and extended checksum over all), 5.2.6 the system description table header, 5.2.7 RSDT,
5.2.8 XSDT, 5.2.9 FADT (here revision 5, 268 bytes, as bhyve), 5.2.10 FACS, 5.2.11.1 DSDT, 5.2.12 MADT
(Processor Local APIC, I/O APIC, Interrupt Source Override, Local APIC NMI), 5.2.3.2 the Generic Address
Structure. Also the IA-PC HPET specification 1.0a section 3.2.4 (HPET table) and PCI Firmware 3.x section
4.1.2 (MCFG).

Layout as bhyve, at ``base`` (0xF2400): RSDP, RSDT +0x40, XSDT +0x80, MADT +0x100, FADT +0x200, HPET +0x340,
MCFG +0x380, FACS +0x3C0, DSDT +0x400. The FADT describes bhyve's ``pm.c`` (PM1a event 0x400, PM1a control
0x404, PM timer 0x408 with 32-bit TMR_VAL_EXT, SCI IRQ 9, SMI_CMD 0xB2 with ACPI_ENABLE 0xA0 / ACPI_DISABLE
0xA1, RESET_REG 0xCF9 value 6), not hardware-reduced. :func:`build_acpi` returns ``[(gpa, bytes)]`` for the
loader to copy into guest memory.

bhyve's fixed offsets leave the MADT 0x100 bytes, room for 21 vCPUs; with more it moves after the DSDT (16-byte
aligned, the RSDT and XSDT point there), as newer bhyve's ``basl`` lays its tables out one after another. The
caller checks that the whole set fits its area (``vmmshim/machine.py``).

Not supported: SRAT/SLIT/NUMA, x2APIC MADT entries (APIC IDs above 254), SSDTs, GPE blocks, PM1b/PM2
blocks, the FACS's waking vector and global lock (zero), sleep states other than S5.
"""

from construct import Array, Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from bhyve_devices.tables.dsdt import build_dsdt_body
from bhyve_devices.vhpet import HPET
from bhyve_devices.vioapic import VIOAPIC_BASE
from bhyve_devices.vlapic_regs import DEFAULT_APIC_BASE

BASE = 0xF2400
OFF_RSDT, OFF_XSDT, OFF_MADT, OFF_FADT = 0x40, 0x80, 0x100, 0x200
OFF_HPET, OFF_MCFG, OFF_FACS, OFF_DSDT = 0x340, 0x380, 0x3C0, 0x400
MOVED_ALIGN = 16                # a MADT too big for its slot goes after the DSDT at this alignment
OEM_ID = b"BHYVE "
CREATOR_ID = b"VMMS"
HPET_BASE = 0xFED00000
SCI_IRQ = 9

HEADER = Struct(
    "signature" / Bytes(4), "length" / Int32ul, "revision" / Int8ul, "checksum" / Int8ul,
    "oem_id" / Bytes(6), "oem_table_id" / Bytes(8), "oem_revision" / Int32ul,
    "creator_id" / Bytes(4), "creator_revision" / Int32ul,
)
"""The 36-byte system description table header (5.2.6)."""

RSDP = Struct(
    "signature" / Const(b"RSD PTR "), "checksum" / Int8ul, "oem_id" / Bytes(6), "revision" / Int8ul,
    "rsdt_address" / Int32ul, "length" / Int32ul, "xsdt_address" / Int64ul, "extended_checksum" / Int8ul,
    "reserved" / Bytes(3),
)

GAS = Struct("space_id" / Int8ul, "bit_width" / Int8ul, "bit_offset" / Int8ul, "access_size" / Int8ul,
             "address" / Int64ul)
"""Generic Address Structure (5.2.3.2): space 0 memory, 1 system I/O."""

MADT = Struct("header" / HEADER, "lapic_address" / Int32ul, "flags" / Int32ul)
MADT_LAPIC = Struct("type" / Const(0, Int8ul), "length" / Const(8, Int8ul), "processor_uid" / Int8ul,
                    "apic_id" / Int8ul, "flags" / Int32ul)
MADT_IOAPIC = Struct("type" / Const(1, Int8ul), "length" / Const(12, Int8ul), "ioapic_id" / Int8ul,
                     "reserved" / Int8ul, "address" / Int32ul, "gsi_base" / Int32ul)
MADT_ISO = Struct("type" / Const(2, Int8ul), "length" / Const(10, Int8ul), "bus" / Int8ul, "source" / Int8ul,
                  "gsi" / Int32ul, "flags" / Int16ul)
MADT_LAPIC_NMI = Struct("type" / Const(4, Int8ul), "length" / Const(6, Int8ul), "processor_uid" / Int8ul,
                        "flags" / Int16ul, "lint" / Int8ul)

FADT = Struct(
    "header" / HEADER,
    "firmware_ctrl" / Int32ul, "dsdt" / Int32ul, "reserved0" / Int8ul, "preferred_pm_profile" / Int8ul,
    "sci_int" / Int16ul, "smi_cmd" / Int32ul, "acpi_enable" / Int8ul, "acpi_disable" / Int8ul,
    "s4bios_req" / Int8ul, "pstate_cnt" / Int8ul,
    "pm1a_evt_blk" / Int32ul, "pm1b_evt_blk" / Int32ul, "pm1a_cnt_blk" / Int32ul, "pm1b_cnt_blk" / Int32ul,
    "pm2_cnt_blk" / Int32ul, "pm_tmr_blk" / Int32ul, "gpe0_blk" / Int32ul, "gpe1_blk" / Int32ul,
    "pm1_evt_len" / Int8ul, "pm1_cnt_len" / Int8ul, "pm2_cnt_len" / Int8ul, "pm_tmr_len" / Int8ul,
    "gpe0_blk_len" / Int8ul, "gpe1_blk_len" / Int8ul, "gpe1_base" / Int8ul, "cst_cnt" / Int8ul,
    "p_lvl2_lat" / Int16ul, "p_lvl3_lat" / Int16ul, "flush_size" / Int16ul, "flush_stride" / Int16ul,
    "duty_offset" / Int8ul, "duty_width" / Int8ul, "day_alrm" / Int8ul, "mon_alrm" / Int8ul,
    "century" / Int8ul, "iapc_boot_arch" / Int16ul, "reserved1" / Int8ul, "flags" / Int32ul,
    "reset_reg" / GAS, "reset_value" / Int8ul, "arm_boot_arch" / Int16ul, "minor_version" / Int8ul,
    "x_firmware_ctrl" / Int64ul, "x_dsdt" / Int64ul,
    "x_pm1a_evt_blk" / GAS, "x_pm1b_evt_blk" / GAS, "x_pm1a_cnt_blk" / GAS, "x_pm1b_cnt_blk" / GAS,
    "x_pm2_cnt_blk" / GAS, "x_pm_tmr_blk" / GAS, "x_gpe0_blk" / GAS, "x_gpe1_blk" / GAS,
    "sleep_control_reg" / GAS, "sleep_status_reg" / GAS,
)
"""The FADT, revision 5 (ACPI 5.0 layout, 268 bytes)."""

FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
FADT_FLAGS = FADT_WBINVD | FADT_PROC_C1 | FADT_SLP_BUTTON | FADT_TMR_VAL_EXT | FADT_RESET_REG_SUP

FACS = Struct("signature" / Const(b"FACS"), "length" / Int32ul, "hardware_signature" / Int32ul,
              "firmware_waking_vector" / Int32ul, "global_lock" / Int32ul, "flags" / Int32ul,
              "x_firmware_waking_vector" / Int64ul, "version" / Int8ul, "reserved" / Bytes(3),
              "ospm_flags" / Int32ul, "reserved2" / Bytes(24))

HPET_TABLE = Struct("header" / HEADER, "event_timer_block_id" / Int32ul, "base_address" / GAS,
                    "hpet_number" / Int8ul, "min_clock_tick" / Int16ul, "page_protection" / Int8ul)

MCFG = Struct("header" / HEADER, "reserved" / Bytes(8),
              "allocations" / Array(1, Struct("base" / Int64ul, "segment" / Int16ul, "start_bus" / Int8ul,
                                              "end_bus" / Int8ul, "reserved" / Int32ul)))

ISO_IRQ0 = 0x0005       # active high, edge
ISO_SCI = 0x000D        # active high, level


def checksum_fix(data, at):
    """Sets ``data[at]`` so that the bytes of ``data`` sum to 0 mod 256."""
    data = bytearray(data)
    data[at] = 0
    data[at] = (-sum(data)) & 0xFF
    return bytes(data)


def _header(sig, length, revision, table_id):
    return dict(signature=sig, length=length, revision=revision, checksum=0, oem_id=OEM_ID,
                oem_table_id=table_id.ljust(8), oem_revision=1, creator_id=CREATOR_ID, creator_revision=1)


def _table(sig, revision, table_id, body):
    """A complete table: header + ``body`` bytes, length and checksum filled in."""
    length = HEADER.sizeof() + len(body)
    return checksum_fix(HEADER.build(_header(sig, length, revision, table_id)) + body, 9)


def _gas(space, width, addr, access=0):
    return dict(space_id=space, bit_width=width, bit_offset=0, access_size=access, address=addr)


def build_madt(ncpu, ioapic_id=0):
    if not 1 <= ncpu <= 255:
        raise ValueError("1..255 vCPUs (xAPIC MADT entries)")
    body = Int32ul.build(DEFAULT_APIC_BASE) + Int32ul.build(1)    # PCAT_COMPAT: dual 8259s present
    for i in range(ncpu):
        body += MADT_LAPIC.build(dict(processor_uid=i, apic_id=i, flags=1))
    body += MADT_IOAPIC.build(dict(ioapic_id=ioapic_id, reserved=0, address=VIOAPIC_BASE, gsi_base=0))
    body += MADT_ISO.build(dict(bus=0, source=0, gsi=2, flags=ISO_IRQ0))
    body += MADT_ISO.build(dict(bus=0, source=SCI_IRQ, gsi=SCI_IRQ, flags=ISO_SCI))
    body += MADT_LAPIC_NMI.build(dict(processor_uid=0xFF, flags=0x0005, lint=1))
    return _table(b"APIC", 1, b"BVMADT", body)


def build_fadt(facs_addr, dsdt_addr, iapc_boot_arch=0):
    v = dict(
        header=_header(b"FACP", FADT.sizeof(), 5, b"BVFACP"),
        firmware_ctrl=facs_addr, dsdt=dsdt_addr, reserved0=0, preferred_pm_profile=0, sci_int=SCI_IRQ,
        smi_cmd=0xB2, acpi_enable=0xA0, acpi_disable=0xA1, s4bios_req=0, pstate_cnt=0,
        pm1a_evt_blk=0x400, pm1b_evt_blk=0, pm1a_cnt_blk=0x404, pm1b_cnt_blk=0, pm2_cnt_blk=0, pm_tmr_blk=0x408,
        gpe0_blk=0, gpe1_blk=0, pm1_evt_len=4, pm1_cnt_len=2, pm2_cnt_len=0, pm_tmr_len=4, gpe0_blk_len=0,
        gpe1_blk_len=0, gpe1_base=0, cst_cnt=0, p_lvl2_lat=101, p_lvl3_lat=1001, flush_size=0, flush_stride=0,
        duty_offset=0, duty_width=0, day_alrm=0, mon_alrm=0, century=0x32, iapc_boot_arch=iapc_boot_arch,
        reserved1=0, flags=FADT_FLAGS, reset_reg=_gas(1, 8, 0xCF9, 1), reset_value=0x06, arm_boot_arch=0,
        minor_version=0, x_firmware_ctrl=facs_addr, x_dsdt=dsdt_addr,
        x_pm1a_evt_blk=_gas(1, 32, 0x400), x_pm1b_evt_blk=_gas(0, 0, 0), x_pm1a_cnt_blk=_gas(1, 16, 0x404),
        x_pm1b_cnt_blk=_gas(0, 0, 0), x_pm2_cnt_blk=_gas(0, 0, 0), x_pm_tmr_blk=_gas(1, 32, 0x408),
        x_gpe0_blk=_gas(0, 0, 0), x_gpe1_blk=_gas(0, 0, 0), sleep_control_reg=_gas(0, 0, 0),
        sleep_status_reg=_gas(0, 0, 0))
    return checksum_fix(FADT.build(v), 9)


def build_hpet(capabilities=None):
    cap = HPET.capabilities() if capabilities is None else capabilities
    v = dict(header=_header(b"HPET", HPET_TABLE.sizeof(), 1, b"BVHPET"), event_timer_block_id=cap & 0xFFFFFFFF,
             base_address=_gas(0, 0, HPET_BASE), hpet_number=0, min_clock_tick=0, page_protection=0)
    return checksum_fix(HPET_TABLE.build(v), 9)


def build_mcfg(ecam_base, bus_min=0, bus_max=0):
    v = dict(header=_header(b"MCFG", MCFG.sizeof(), 1, b"BVMCFG"), reserved=bytes(8),
             allocations=[dict(base=ecam_base, segment=0, start_bus=bus_min, end_bus=bus_max, reserved=0)])
    return checksum_fix(MCFG.build(v), 9)


def build_facs():
    return FACS.build(dict(length=FACS.sizeof(), hardware_signature=0, firmware_waking_vector=0, global_lock=0,
                           flags=0, x_firmware_waking_vector=0, version=2, reserved=bytes(3), ospm_flags=0,
                           reserved2=bytes(24)))


def _align(x, n):
    return (x + n - 1) // n * n


def build_acpi(ncpu, pci_host_info, isa_devices=(), lpc_adr=None, base=BASE, ioapic_id=0, iapc_boot_arch=0,
               hpet=True, hpet_capabilities=None):
    """All tables as ``[(gpa, bytes)]``. ``pci_host_info`` is :meth:`PciHost.info` (windows, ECAM, INTx
    routes); ``isa_devices`` and ``lpc_adr`` come from the LPC bridge (:meth:`Lpc.legacy_devices`, its slot)."""
    a = {k: base + off for k, off in (("rsdt", OFF_RSDT), ("xsdt", OFF_XSDT), ("madt", OFF_MADT),
                                      ("fadt", OFF_FADT), ("hpet", OFF_HPET), ("mcfg", OFF_MCFG),
                                      ("facs", OFF_FACS), ("dsdt", OFF_DSDT))}
    if a["dsdt"] >= 1 << 32:
        raise ValueError("ACPI tables must lie below 4 GiB")
    pointed = ["madt", "fadt"] + (["hpet"] if hpet else []) + ["mcfg"]
    tables = {
        "madt": build_madt(ncpu, ioapic_id),
        "fadt": build_fadt(a["facs"], a["dsdt"], iapc_boot_arch),
        "mcfg": build_mcfg(pci_host_info.ecam_base, pci_host_info.bus_min, pci_host_info.bus_max),
        "facs": build_facs(),
        "dsdt": _table(b"DSDT", 2, b"BVDSDT", build_dsdt_body(pci_host_info, isa_devices, lpc_adr)),
    }
    if hpet:
        tables["hpet"] = build_hpet(hpet_capabilities)
    tables["rsdt"] = _table(b"RSDT", 1, b"BVRSDT", b"".join(Int32ul.build(a[t]) for t in pointed))
    tables["xsdt"] = _table(b"XSDT", 1, b"BVXSDT", b"".join(Int64ul.build(a[t]) for t in pointed))
    if len(tables["madt"]) > OFF_FADT - OFF_MADT:     # more vCPUs than bhyve's slot holds: after the DSDT
        a["madt"] = _align(a["dsdt"] + len(tables["dsdt"]), MOVED_ALIGN)
        tables["rsdt"] = _table(b"RSDT", 1, b"BVRSDT", b"".join(Int32ul.build(a[t]) for t in pointed))
        tables["xsdt"] = _table(b"XSDT", 1, b"BVXSDT", b"".join(Int64ul.build(a[t]) for t in pointed))
    nxt = {"rsdt": "xsdt", "xsdt": "madt", "madt": "fadt", "fadt": "hpet", "hpet": "mcfg", "mcfg": "facs",
           "facs": "dsdt"}
    if a["madt"] > a["dsdt"]:
        nxt.pop("madt")
        nxt["xsdt"] = "fadt"
    for k, n in nxt.items():
        if k in tables and a[k] + len(tables[k]) > a[n]:
            raise ValueError(f"ACPI {k} ({len(tables[k])} bytes) overlaps {n}")
    rsdp = bytearray(RSDP.build(dict(checksum=0, oem_id=OEM_ID, revision=2, rsdt_address=a["rsdt"], length=36,
                                     xsdt_address=a["xsdt"], extended_checksum=0, reserved=bytes(3))))
    rsdp[8] = (-sum(rsdp[:20])) & 0xFF
    rsdp[32] = (-sum(rsdp)) & 0xFF
    out = [(base, bytes(rsdp))]
    out += [(a[k], tables[k]) for k in ("rsdt", "xsdt", "madt", "fadt", "hpet", "mcfg", "facs", "dsdt")
            if k in tables]
    return out
