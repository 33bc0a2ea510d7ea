"""bhyve's MP table (``mptbl.c``): the MP floating pointer and the MP configuration table at 0xF0000.

Intel MultiProcessor Specification 1.4: 4.1 the MP Floating Pointer Structure (16 bytes, "_MP_", 16-byte
aligned in the BIOS ROM area 0xF0000-0xFFFFF), 4.2 the configuration table header ("PCMP", base table length,
checksum), 4.3 the base table entries: 4.3.1 Processor (20 bytes; CPU flags EN bit 0, BP bit 1), 4.3.2 Bus
("PCI   ", "ISA   "), 4.3.3 I/O APIC, 4.3.4 I/O Interrupt Assignment, 4.3.5 Local Interrupt Assignment;
appendix D.3 the PCI source bus IRQ encoding (device << 2 | INTx pin, pin 0 = INTA#).

Entries, as bhyve writes them: one processor per vCPU (APIC ID = vCPU index, vCPU 0 the BSP, the local APIC
version the vlapic's version register reports, ``vlapic_regs.VERSION``), bus 0 PCI and
bus 1 ISA, one I/O APIC (enabled, at 0xFEC00000), I/O interrupts for the 16 ISA IRQs (pin 0 ExtINT, ISA IRQ0 on
pin 2, no IRQ2 (cascade) entry, IRQ n on pin n otherwise, the SCI (IRQ 9) level-triggered) and one per PCI
function INTx pin on IOAPIC pins 16-23 (level, active low), and the local interrupts ExtINT on LINT0 and NMI on
LINT1 of every local APIC. The floating pointer sits at 0xF0000 and the configuration table right after it.

Differences from bhyve: the SCI entry says active high, as the MADT's interrupt source override does (the
device models carry logical levels, so the polarity only needs to agree with the ACPI view); the I/O APIC ID is
a parameter (default ``ncpu``, distinct from every local APIC ID as section 3.6.6 asks).

Not supported: the extended configuration table (system address space mapping, bus hierarchy), default
configurations (feature byte 1 is always 0: the table is present), the IMCR (feature byte 2 is 0: virtual
wire mode).
"""

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Struct

from bhyve_devices.vioapic import VIOAPIC_BASE
from bhyve_devices.vlapic_regs import DEFAULT_APIC_BASE, VERSION as LAPIC_VERSION

BASE = 0xF0000
LIMIT = 0xF2400              # where the ACPI RSDP starts
IOAPIC_VERSION = 0x20
SCI_IRQ = 9
CPU_SIGNATURE = (6 << 8) | (26 << 4) | 5       # family 6 model 26 stepping 5, as bhyve
CPU_FEATURES = 0xBFEBFBFF
BUS_PCI, BUS_ISA = 0, 1
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
FLAGS_CONFORM = 0x0
POL_HIGH, POL_LOW = 0x1, 0x3
TRIG_EDGE, TRIG_LEVEL = 0x1 << 2, 0x3 << 2

FLOATING_POINTER = Struct(
    "signature" / Const(b"_MP_"), "config_table" / Int32ul, "length" / Int8ul, "spec_rev" / Int8ul,
    "checksum" / Int8ul, "feature1" / Int8ul, "feature2" / Int8ul, "feature3_5" / Bytes(3),
)
CONFIG_HEADER = Struct(
    "signature" / Const(b"PCMP"), "base_length" / Int16ul, "spec_rev" / Int8ul, "checksum" / Int8ul,
    "oem_id" / Bytes(8), "product_id" / Bytes(12), "oem_table" / Int32ul, "oem_table_size" / Int16ul,
    "entry_count" / Int16ul, "lapic_address" / Int32ul, "ext_length" / Int16ul, "ext_checksum" / Int8ul,
    "reserved" / Int8ul,
)
PROCESSOR = Struct(
    "type" / Const(0, Int8ul), "apic_id" / Int8ul, "apic_version" / Int8ul, "cpu_flags" / Int8ul,
    "signature" / Int32ul, "features" / Int32ul, "reserved" / Bytes(8),
)
BUS = Struct("type" / Const(1, Int8ul), "bus_id" / Int8ul, "bus_type" / Bytes(6))
IOAPIC = Struct("type" / Const(2, Int8ul), "apic_id" / Int8ul, "version" / Int8ul, "flags" / Int8ul,
                "address" / Int32ul)
IO_INT = Struct("type" / Const(3, Int8ul), "int_type" / Int8ul, "flags" / Int16ul, "src_bus" / Int8ul,
                "src_irq" / Int8ul, "dst_apic" / Int8ul, "dst_pin" / Int8ul)
LOCAL_INT = Struct("type" / Const(4, Int8ul), "int_type" / Int8ul, "flags" / Int16ul, "src_bus" / Int8ul,
                   "src_irq" / Int8ul, "dst_apic" / Int8ul, "dst_lint" / Int8ul)
ENTRY_SIZES = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}


def _csum(data):
    return (-sum(data)) & 0xFF


def _isa_entries(ioapic_id):
    out = []
    for pin in range(16):
        int_type, flags, irq = INT_TYPE_INT, FLAGS_CONFORM, pin
        if pin == 0:
            int_type = INT_TYPE_EXTINT
        elif pin == 2:
            irq = 0                                   # the PIT's IRQ0 is wired to pin 2
        elif pin == SCI_IRQ:
            flags = POL_HIGH | TRIG_LEVEL
        out.append(IO_INT.build(dict(int_type=int_type, flags=flags, src_bus=BUS_ISA, src_irq=irq,
                                     dst_apic=ioapic_id, dst_pin=pin)))
    return out


def build_mptable(ncpu, pci_routes, base=BASE, ioapic_id=None):
    """``[(gpa, bytes)]``: the floating pointer at ``base`` and the configuration table at ``base + 16``.

    ``pci_routes``: the host's routes (objects with ``slot``, ``pin`` 1-4 and ``ioapic_pin``, e.g.
    :meth:`PciHost.all_routes`); one I/O interrupt entry per distinct (slot, pin)."""
    if not 1 <= ncpu <= 254:
        raise ValueError("1..254 vCPUs")
    ioapic_id = ncpu if ioapic_id is None else ioapic_id
    entries = []
    for i in range(ncpu):
        entries.append(PROCESSOR.build(dict(apic_id=i, apic_version=LAPIC_VERSION,
                                            cpu_flags=0x1 | (0x2 if i == 0 else 0),
                                            signature=CPU_SIGNATURE, features=CPU_FEATURES,
                                            reserved=bytes(8))))
    entries.append(BUS.build(dict(bus_id=BUS_PCI, bus_type=b"PCI   ")))
    entries.append(BUS.build(dict(bus_id=BUS_ISA, bus_type=b"ISA   ")))
    entries.append(IOAPIC.build(dict(apic_id=ioapic_id, version=IOAPIC_VERSION, flags=1, address=VIOAPIC_BASE)))
    entries += _isa_entries(ioapic_id)
    seen = set()
    for r in sorted(pci_routes, key=lambda r: (r.slot, r.pin)):
        if (r.slot, r.pin) in seen:
            continue
        seen.add((r.slot, r.pin))
        entries.append(IO_INT.build(dict(int_type=INT_TYPE_INT, flags=POL_LOW | TRIG_LEVEL, src_bus=BUS_PCI,
                                         src_irq=(r.slot << 2) | (r.pin - 1), dst_apic=ioapic_id,
                                         dst_pin=r.ioapic_pin)))
    for lint, int_type in ((0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)):
        entries.append(LOCAL_INT.build(dict(int_type=int_type, flags=FLAGS_CONFORM, src_bus=0, src_irq=0,
                                            dst_apic=0xFF, dst_lint=lint)))
    body = b"".join(entries)
    cfg_addr = base + FLOATING_POINTER.sizeof()
    length = CONFIG_HEADER.sizeof() + len(body)
    if cfg_addr + length > max(LIMIT, base + 0x2400):
        raise ValueError(f"MP table ({length} bytes) would overlap the ACPI tables")
    hdr = bytearray(CONFIG_HEADER.build(dict(
        base_length=length, spec_rev=4, checksum=0, oem_id=b"BHyVe   ", product_id=b"vmmshim     ",
        oem_table=0, oem_table_size=0, entry_count=len(entries), lapic_address=DEFAULT_APIC_BASE, ext_length=0,
        ext_checksum=0, reserved=0)))
    table = hdr + body
    table[7] = _csum(table)
    fp = bytearray(FLOATING_POINTER.build(dict(config_table=cfg_addr, length=1, spec_rev=4, checksum=0,
                                               feature1=0, feature2=0, feature3_5=bytes(3))))
    fp[10] = _csum(fp)
    return [(base, bytes(fp)), (cfg_addr, bytes(table))]


def parse_mptable(fp, table):
    """Parses what :func:`build_mptable` wrote: ``(floating pointer, header, [(type, parsed entry)])``."""
    f = FLOATING_POINTER.parse(fp)
    h = CONFIG_HEADER.parse(table)
    i, out = CONFIG_HEADER.sizeof(), []
    structs = {0: PROCESSOR, 1: BUS, 2: IOAPIC, 3: IO_INT, 4: LOCAL_INT}
    for _ in range(h.entry_count):
        t = table[i]
        out.append((t, structs[t].parse(table[i:i + ENTRY_SIZES[t]])))
        i += ENTRY_SIZES[t]
    if i != h.base_length:
        raise ValueError(f"entries end at {i}, base table length {h.base_length}")
    return f, h, out
