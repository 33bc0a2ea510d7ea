"""PCI configuration-space layouts: the type-0 header, the MSI and MSI-X capabilities, capability-list helpers.

PCI Local Bus Specification 3.0, chapter 6 "Configuration Space": 6.1 the 64-byte predefined header (type 0),
6.2.2 the Command register, 6.2.3 the Status register, 6.2.5 Base Address Registers, 6.7 the Capabilities List
(Capabilities Pointer at 0x34, Status bit 4), 6.8.1 the MSI capability (ID 0x05) and 6.8.2 MSI-X (ID 0x11,
table entries of 16 bytes, a Pending Bit Array). PCI Express Base 3.x section 7.2.2 extends the space to 4 KiB
(reached through ECAM); the extended capabilities there start at 0x100.

The construct structs document the layouts and are round-trip tested; the per-access path in
:mod:`bhyve_devices.pci.device` works on a bytearray with the plain-int offsets below.

Not supported: type-1 (bridge) and type-2 (CardBus) headers, PCI Express capability and extended capabilities.
"""

from construct import Array, Bytes, Int8ul, Int16ul, Int32ul, Struct

CFG_SIZE = 4096          # PCIe configuration space per function (ECAM)
LEGACY_CFG_SIZE = 256    # reachable through configuration mechanism 1

# Type-0 header offsets (PCI 3.0 figure 6-1)
VENDOR = 0x00
DEVICE = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
PROG_IF = 0x09
SUBCLASS = 0x0A
CLASS = 0x0B
CACHE_LINE = 0x0C
LATENCY = 0x0D
HEADER_TYPE = 0x0E
BIST = 0x0F
BAR0 = 0x10
CARDBUS_CIS = 0x28
SUBSYS_VENDOR = 0x2C
SUBSYS_ID = 0x2E
ROM_BASE = 0x30
CAP_PTR = 0x34
INTR_LINE = 0x3C
INTR_PIN = 0x3D
MIN_GNT = 0x3E
MAX_LAT = 0x3F
HEADER_SIZE = 0x40

NBARS = 6
HEADER_TYPE_MULTIFUNCTION = 0x80

# Command register (6.2.2)
CMD_IO = 1 << 0
CMD_MEM = 1 << 1
CMD_BUSMASTER = 1 << 2
CMD_PARITY = 1 << 6
CMD_SERR = 1 << 8
CMD_INTX_DISABLE = 1 << 10
CMD_WRITABLE = CMD_IO | CMD_MEM | CMD_BUSMASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE

# Status register (6.2.3): bit 3 interrupt status and bit 4 capabilities list are read-only; bits 8 and 11-15
# are "write 1 to clear".
STS_INTX = 1 << 3
STS_CAPLIST = 1 << 4
STS_W1C = 0xF900

# BAR low bits (6.2.5.1)
BAR_IO_SPACE = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCH = 0x8

# Capability IDs (PCI 3.0 appendix H)
CAP_ID_MSI = 0x05
CAP_ID_MSIX = 0x11
CAP_START = 0x40

# MSI message control (6.8.1.3)
MSI_CTRL_ENABLE = 1 << 0
MSI_CTRL_MMC_SHIFT = 1          # multiple message capable, log2, bits 3:1
MSI_CTRL_MME_SHIFT = 4          # multiple message enable, log2, bits 6:4
MSI_CTRL_64BIT = 1 << 7
MSI_CTRL_PVM = 1 << 8           # per-vector masking capable
# offsets inside the 64-bit MSI capability
MSI_CTRL = 2
MSI_ADDR_LO = 4
MSI_ADDR_HI = 8
MSI_DATA = 12
MSI_MASK = 16
MSI_PENDING = 20
MSI_CAP_LEN = 16                # 64-bit, no per-vector masking (14 bytes used)
MSI_CAP_LEN_PVM = 24

# MSI-X message control (6.8.2.3) and capability offsets
MSIX_CTRL_TABLE_SIZE = 0x7FF
MSIX_CTRL_FUNC_MASK = 1 << 14
MSIX_CTRL_ENABLE = 1 << 15
MSIX_CTRL = 2
MSIX_TABLE = 4
MSIX_PBA = 8
MSIX_CAP_LEN = 12
MSIX_ENTRY_SIZE = 16
MSIX_ENTRY_ADDR_LO = 0
MSIX_ENTRY_ADDR_HI = 4
MSIX_ENTRY_DATA = 8
MSIX_ENTRY_CTRL = 12
MSIX_VECTOR_MASKED = 1 << 0
MSIX_MAX_VECTORS = 2048

TYPE0_HEADER = Struct(
    "vendor_id" / Int16ul,
    "device_id" / Int16ul,
    "command" / Int16ul,
    "status" / Int16ul,
    "revision" / Int8ul,
    "prog_if" / Int8ul,
    "subclass" / Int8ul,
    "class_code" / Int8ul,
    "cache_line_size" / Int8ul,
    "latency_timer" / Int8ul,
    "header_type" / Int8ul,
    "bist" / Int8ul,
    "bars" / Array(NBARS, Int32ul),
    "cardbus_cis" / Int32ul,
    "subsys_vendor" / Int16ul,
    "subsys_id" / Int16ul,
    "rom_base" / Int32ul,
    "cap_ptr" / Int8ul,
    "reserved" / Bytes(7),
    "interrupt_line" / Int8ul,
    "interrupt_pin" / Int8ul,
    "min_gnt" / Int8ul,
    "max_lat" / Int8ul,
)
"""The 64-byte type-0 configuration header (PCI 3.0 section 6.1)."""

MSI_CAP64 = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "control" / Int16ul,
    "addr_lo" / Int32ul,
    "addr_hi" / Int32ul,
    "data" / Int16ul,
    "reserved" / Int16ul,
)
"""The 64-bit MSI capability without per-vector masking (16 bytes as laid out here)."""

MSI_CAP64_PVM = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "control" / Int16ul,
    "addr_lo" / Int32ul,
    "addr_hi" / Int32ul,
    "data" / Int16ul,
    "reserved" / Int16ul,
    "mask" / Int32ul,
    "pending" / Int32ul,
)
"""The 64-bit MSI capability with per-vector masking (24 bytes)."""

MSIX_CAP = Struct(
    "cap_id" / Int8ul,
    "next" / Int8ul,
    "control" / Int16ul,
    "table" / Int32ul,      # BIR in bits 2:0, offset in 31:3
    "pba" / Int32ul,
)
"""The MSI-X capability (12 bytes)."""

MSIX_TABLE_ENTRY = Struct(
    "addr_lo" / Int32ul,
    "addr_hi" / Int32ul,
    "data" / Int32ul,
    "vector_control" / Int32ul,
)
"""One MSI-X table entry (16 bytes)."""


def walk_capabilities(read8, limit=48):
    """The capability list as ``[(cap_id, offset), ...]``, read through ``read8(offset) -> int``.

    Follows the Capabilities Pointer (0x34) only when Status bit 4 is set; stops on a null pointer, a pointer
    below 0x40, or after ``limit`` entries (a loop)."""
    if not (read8(STATUS) & STS_CAPLIST):
        return []
    out = []
    ptr = read8(CAP_PTR) & 0xFC
    while ptr >= CAP_START and len(out) < limit:
        out.append((read8(ptr), ptr))
        ptr = read8(ptr + 1) & 0xFC
    return out


def find_capability(read8, cap_id):
    """Offset of the first capability with ``cap_id``, or None."""
    for cid, off in walk_capabilities(read8):
        if cid == cap_id:
            return off
    return None


def bytes_reader(buf):
    """A ``read8`` over a bytes-like configuration image (for :func:`walk_capabilities`)."""
    return lambda off: buf[off] if 0 <= off < len(buf) else 0xFF
