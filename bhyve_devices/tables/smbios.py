"""bhyve's SMBIOS tables (``smbiostbl.c``): the 32-bit entry point at 0xF1000 and the structure table after it.

DMTF DSP0134, the SMBIOS Reference Specification, version 2.8.0: 5.2.1 the SMBIOS 2.1 (32-bit) entry point
("_SM_", 31 bytes, a checksum over all of it; its intermediate part from offset 0x10, "_DMI_", with a checksum of
its own; found by a scan of 0xF0000-0xFFFFF on 16-byte boundaries), 6.1.2 the structure header (type, length of
the formatted part, handle), 6.1.3 the strings after the formatted part (numbered from 1, each ending in a NUL,
the set ended by one more NUL; a structure without strings ends in two NULs), 7.2.1 the system UUID (its first
three fields little-endian from version 2.6, as Linux and dmidecode read it).

The structures, in bhyve's order, handles from 1: type 0 BIOS (vendor "BHYVE", version "14.0", date
"10/17/2021", segment 0xF000; ISA, PCI, shadowing, CD boot, EDD, ACPI, BBS, virtual machine), type 1 system
("FreeBSD", "BHYVE", "1.0", serial "None", wake-up by power switch, SKU "None", family "Virtual Machine", the
UUID), type 2 baseboard, type 3 chassis, type 4 processor one per vCPU ("CPU #n", one core, one thread: bhyve
writes one per socket and its default topology is a socket per vCPU), type 16 the physical memory array (all
of RAM), type 17 a memory device and type 19 a mapped address range for each RAM area (lowmem from 0, highmem
from 4 GiB), type 32 boot information (no errors), type 127 the end of the table. The strings are bhyve's, so a
guest that recognises bhyve (FreeBSD's ``smbios.bios.vendor``, systemd-detect-virt) recognises this VM.

The UUID: ``-U`` (the ``uuid`` key) as Python's :class:`uuid.UUID` parses it; without it, as bhyve, the MD5 of
the VM name followed by the host name NUL-padded to 256 bytes (FreeBSD's MAXHOSTNAMELEN), with the version (3)
and variant bits set: the same VM name on the same host gets the same UUID every time.

Differences from bhyve: the entry point says 2.8, the version whose layouts bhyve's structures have (bhyve says 2.6
but writes the 2.7 type 19 and the 2.8 type 17); types 17 and 19 point at the type 16 handle and the baseboard at
the chassis handle (bhyve's point at the structure written before type 16, and at handle 3); one type 17 per RAM
area, as type 16's device count says (bhyve writes one for all of RAM but counts two with highmem); type 19 gives
ranges below 4 TiB in its KiB fields and ends them at their last KiB or byte, as 7.20 asks (bhyve: always the byte
fields, ending one past the range); the derived UUID is stored in the 2.6 byte order like a given one, so the guest
reads a well-formed version 3 UUID (bhyve stores the digest as it is); the entry point's largest structure size is
filled in (bhyve leaves it unset).

Not supported: the 64-bit SMBIOS 3.0 entry point ("_SM3_"), other strings than bhyve's defaults, a CPU topology
(sockets, cores, threads), caches (type 7), OEM strings (type 11), memory device mapped addresses (type 20).
"""

import hashlib
import uuid

from construct import Bytes, Const, Int8ul, Int16ul, Int32ul, Int64ul, Struct

BASE = 0xF1000
LIMIT = 0xF2400                      # where bhyve's ACPI tables start
SPEC_MAJOR, SPEC_MINOR = 2, 8
FIRST_HANDLE = 1
HOSTNAME_PAD = 256                   # FreeBSD's MAXHOSTNAMELEN: bhyve hashes the whole host name buffer
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
HIGHMEM_BASE = 4 * GiB

TYPE_BIOS, TYPE_SYSTEM, TYPE_BASEBOARD, TYPE_CHASSIS, TYPE_PROCESSOR = 0, 1, 2, 3, 4
TYPE_MEMORY_ARRAY, TYPE_MEMORY_DEVICE, TYPE_ARRAY_MAPPED_ADDRESS, TYPE_BOOT, TYPE_END = 16, 17, 19, 32, 127

BIOS_SEGMENT = 0xF000
BIOS_ROM_64K = 0                     # the ROM is 64 KiB * (n + 1)
BIOS_ISA, BIOS_PCI, BIOS_SHADOWING, BIOS_CD_BOOT, BIOS_EDD = 1 << 4, 1 << 7, 1 << 12, 1 << 15, 1 << 19
BIOS_EXT1_ACPI = 1 << 0
BIOS_EXT2_BBS, BIOS_EXT2_VM = 1 << 0, 1 << 4
EC_RELEASE_NONE = 0xFF
WAKEUP_POWER_SWITCH = 0x06
BOARD_HOSTING, BOARD_MOTHERBOARD = 0x01, 0x0A
CHASSIS_UNKNOWN, CHASSIS_STATE_SAFE, CHASSIS_SECURITY_NONE = 0x02, 0x03, 0x03
CPU_CENTRAL, CPU_FAMILY_OTHER, CPU_UPGRADE_NONE = 0x03, 0x01, 0x06
CPU_POPULATED, CPU_ENABLED = 0x40, 0x01
CPU_64BIT = 0x04
CPU_CORES, CPU_THREADS = 1, 1         # per socket; enabled cores 0: unknown, as bhyve
HANDLE_NONE = 0xFFFF                 # no cache structure; "no error" for the memory error handles
ARRAY_ON_BOARD, ARRAY_SYSTEM_MEMORY, ARRAY_NO_ECC = 0x03, 0x03, 0x03
ARRAY_CAPACITY_EXTENDED = 0x80000000
DEVICE_WIDTH = 64
DEVICE_FORM_UNKNOWN, DEVICE_TYPE_UNKNOWN, DEVICE_DETAIL_UNKNOWN = 0x02, 0x02, 0x0004
DEVICE_SIZE_KB = 1 << 15             # bit 15 of type 17's size: the unit is KiB, else MiB
DEVICE_SIZE_EXTENDED = 0x7FFF        # the size is in the extended size field (MiB)
DEVICE_EXTENDED_MAX = 0x7FFFFFFF
PARTITION_WIDTH = 1                  # one device per row
ADDRESS_EXTENDED = 0xFFFFFFFF        # type 19: the range is in the 64-bit byte fields (from 4 TiB)
BOOT_NO_ERRORS = 0


def _layout(type_, *fields):
    """A structure's formatted part: the 6.1.2 header (type, length, handle), then ``fields``."""
    return Struct("type" / Const(type_, Int8ul), "length" / Int8ul, "handle" / Int16ul, *fields)


ENTRY_POINT = Struct(
    "anchor" / Const(b"_SM_"), "checksum" / Int8ul, "length" / Int8ul, "major" / Int8ul, "minor" / Int8ul,
    "max_structure_size" / Int16ul, "revision" / Int8ul, "formatted_area" / Bytes(5),
    "intermediate_anchor" / Const(b"_DMI_"), "intermediate_checksum" / Int8ul, "table_length" / Int16ul,
    "table_address" / Int32ul, "structure_count" / Int16ul, "bcd_revision" / Int8ul,
)
"""The SMBIOS 2.1 (32-bit) entry point (DSP0134 5.2.1), 31 bytes."""
EP_CHECKSUM, EP_INTERMEDIATE, EP_INTERMEDIATE_CHECKSUM = 0x04, 0x10, 0x15

BIOS_INFO = _layout(
    TYPE_BIOS, "vendor" / Int8ul, "version" / Int8ul, "segment" / Int16ul, "release_date" / Int8ul,
    "rom_size" / Int8ul, "characteristics" / Int64ul, "ext1" / Int8ul, "ext2" / Int8ul,
    "bios_major" / Int8ul, "bios_minor" / Int8ul, "ec_major" / Int8ul, "ec_minor" / Int8ul,
)
"""BIOS Information, type 0 (DSP0134 7.1; the characteristics 7.1.1, the extension bytes 7.1.2), 24 bytes."""

SYSTEM_INFO = _layout(
    TYPE_SYSTEM, "manufacturer" / Int8ul, "product" / Int8ul, "version" / Int8ul, "serial" / Int8ul,
    "uuid" / Bytes(16), "wakeup" / Int8ul, "sku" / Int8ul, "family" / Int8ul,
)
"""System Information, type 1 (DSP0134 7.2; the UUID 7.2.1, the wake-up type 7.2.2), 27 bytes."""

BASEBOARD = _layout(
    TYPE_BASEBOARD, "manufacturer" / Int8ul, "product" / Int8ul, "version" / Int8ul, "serial" / Int8ul,
    "asset" / Int8ul, "features" / Int8ul, "location" / Int8ul, "chassis" / Int16ul, "board_type" / Int8ul,
    "object_count" / Int8ul,
)
"""Baseboard Information, type 2 (DSP0134 7.3; feature flags 7.3.1, board type 7.3.2), 15 bytes, no objects."""

CHASSIS = _layout(
    TYPE_CHASSIS, "manufacturer" / Int8ul, "chassis_type" / Int8ul, "version" / Int8ul, "serial" / Int8ul,
    "asset" / Int8ul, "boot_state" / Int8ul, "power_state" / Int8ul, "thermal_state" / Int8ul,
    "security" / Int8ul, "oem" / Int32ul, "height" / Int8ul, "power_cords" / Int8ul, "element_count" / Int8ul,
    "element_length" / Int8ul, "sku" / Int8ul,
)
"""System Enclosure or Chassis, type 3 (DSP0134 7.4; type 7.4.1, states 7.4.2, security 7.4.3), 22 bytes with
no contained elements (the SKU string follows the empty element list)."""

PROCESSOR = _layout(
    TYPE_PROCESSOR, "socket" / Int8ul, "processor_type" / Int8ul, "family" / Int8ul, "manufacturer" / Int8ul,
    "processor_id" / Int64ul, "version" / Int8ul, "voltage" / Int8ul, "external_clock" / Int16ul,
    "max_speed" / Int16ul, "current_speed" / Int16ul, "status" / Int8ul, "upgrade" / Int8ul,
    "l1_cache" / Int16ul, "l2_cache" / Int16ul, "l3_cache" / Int16ul, "serial" / Int8ul, "asset" / Int8ul,
    "part" / Int8ul, "cores" / Int8ul, "enabled_cores" / Int8ul, "threads" / Int8ul,
    "characteristics" / Int16ul, "family2" / Int16ul,
)
"""Processor Information, type 4 (DSP0134 7.5; type 7.5.1, family 7.5.2, upgrade 7.5.5, characteristics 7.5.9),
the 2.6 layout, 42 bytes."""

MEMORY_ARRAY = _layout(
    TYPE_MEMORY_ARRAY, "location" / Int8ul, "use" / Int8ul, "error_correction" / Int8ul,
    "max_capacity_kb" / Int32ul, "error_handle" / Int16ul, "device_count" / Int16ul,
    "extended_max_capacity" / Int64ul,
)
"""Physical Memory Array, type 16 (DSP0134 7.17), the 2.7 layout with the extended capacity in bytes, 23 bytes."""

MEMORY_DEVICE = _layout(
    TYPE_MEMORY_DEVICE, "array_handle" / Int16ul, "error_handle" / Int16ul, "total_width" / Int16ul,
    "data_width" / Int16ul, "size" / Int16ul, "form_factor" / Int8ul, "device_set" / Int8ul,
    "device_locator" / Int8ul, "bank_locator" / Int8ul, "memory_type" / Int8ul, "type_detail" / Int16ul,
    "speed" / Int16ul, "manufacturer" / Int8ul, "serial" / Int8ul, "asset" / Int8ul, "part" / Int8ul,
    "attributes" / Int8ul, "extended_size" / Int32ul, "configured_speed" / Int16ul, "min_voltage" / Int16ul,
    "max_voltage" / Int16ul, "configured_voltage" / Int16ul,
)
"""Memory Device, type 17 (DSP0134 7.18; size 7.18.5 with the extended size in MiB), the 2.8 layout, 40 bytes."""

ARRAY_MAPPED_ADDRESS = _layout(
    TYPE_ARRAY_MAPPED_ADDRESS, "start_kb" / Int32ul, "end_kb" / Int32ul, "array_handle" / Int16ul,
    "partition_width" / Int8ul, "extended_start" / Int64ul, "extended_end" / Int64ul,
)
"""Memory Array Mapped Address, type 19 (DSP0134 7.20), the 2.7 layout with byte addresses, 31 bytes."""

BOOT_INFO = _layout(TYPE_BOOT, "reserved" / Bytes(6), "status" / Int8ul)
"""System Boot Information, type 32 (DSP0134 7.33; status 7.33.2), 11 bytes."""

END_OF_TABLE = _layout(TYPE_END)
"""End-of-Table, type 127 (DSP0134 7.45), the header alone."""

LAYOUTS = {TYPE_BIOS: BIOS_INFO, TYPE_SYSTEM: SYSTEM_INFO, TYPE_BASEBOARD: BASEBOARD, TYPE_CHASSIS: CHASSIS,
           TYPE_PROCESSOR: PROCESSOR, TYPE_MEMORY_ARRAY: MEMORY_ARRAY, TYPE_MEMORY_DEVICE: MEMORY_DEVICE,
           TYPE_ARRAY_MAPPED_ADDRESS: ARRAY_MAPPED_ADDRESS, TYPE_BOOT: BOOT_INFO, TYPE_END: END_OF_TABLE}

BIOS_STRINGS = ("BHYVE", "14.0", "10/17/2021")
SYSTEM_STRINGS = ("FreeBSD", "BHYVE", "1.0", "None", "None", "Virtual Machine")
BASEBOARD_STRINGS = ("FreeBSD", "BHYVE", "1.0", "None", "None", "None")
CHASSIS_STRINGS = ("FreeBSD", "1.0", "None", "None", "None")
PROCESSOR_STRINGS = (" ", " ", "None", "None", "None")             # after the socket name: maker, version, ...
MEMORY_STRINGS = (" ", " ", " ", "None", "None", "None")


def _checksum(data):
    return (-sum(data)) & 0xFF


def _strings(strings):
    """The string set of 6.1.3: each string and its NUL, then a NUL; two NULs for none."""
    if not strings:
        return b"\0\0"
    return b"".join(s.encode("ascii") + b"\0" for s in strings) + b"\0"


def parse_uuid(text):
    """``-U``'s value as a :class:`uuid.UUID`; ValueError naming ``-U`` for a malformed one."""
    try:
        return uuid.UUID(text)
    except ValueError:
        raise ValueError(f"-U {text}: not a UUID (expected the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)") from None


def derived_uuid(vmname, hostname):
    """bhyve's UUID without ``-U``: MD5 of the VM name and the NUL-padded host name, version 3, RFC 4122 variant."""
    digest = hashlib.md5(vmname.encode() + hostname.encode()[:HOSTNAME_PAD].ljust(HOSTNAME_PAD, b"\0")).digest()
    return uuid.UUID(bytes=digest, version=3)


def uuid_field(value):
    """A UUID's 16 bytes as type 1 holds them from SMBIOS 2.6 (7.2.1): time_low, time_mid and
    time_hi_and_version little-endian, the rest as written."""
    return value.bytes_le


def memory_device_size(size):
    """Type 17's ``(size, extended_size)`` for ``size`` bytes (7.18.5): KiB up to 32767 KiB, MiB below 32767
    MiB, else 0x7FFF and the MiB in the extended field."""
    kb, mb = size // KiB, size // MiB
    if kb <= DEVICE_SIZE_EXTENDED:
        return kb | DEVICE_SIZE_KB, 0
    if mb < DEVICE_SIZE_EXTENDED:
        return mb, 0
    return DEVICE_SIZE_EXTENDED, min(mb, DEVICE_EXTENDED_MAX)


def mapped_range(start, size):
    """Type 19's address fields for ``size`` bytes from ``start`` (7.20): in KiB, the last KiB's address the end,
    where that fits 32 bits; else 0xFFFFFFFF there and the first and last byte's address in the 64-bit fields."""
    start_kb, end_kb = start // KiB, (start + size) // KiB - 1
    if end_kb < ADDRESS_EXTENDED:
        return dict(start_kb=start_kb, end_kb=end_kb, extended_start=0, extended_end=0)
    return dict(start_kb=ADDRESS_EXTENDED, end_kb=ADDRESS_EXTENDED, extended_start=start,
                extended_end=start + size - 1)


class _Table:
    """The structure table being built: each structure gets the next handle."""

    def __init__(self):
        self.parts = []

    def add(self, layout, strings=(), **fields):
        handle = FIRST_HANDLE + len(self.parts)
        self.parts.append(layout.build(dict(fields, length=layout.sizeof(), handle=handle)) + _strings(strings))
        return handle


def _ram_areas(lowmem, highmem):
    return [(0, lowmem)] + ([(HIGHMEM_BASE, highmem)] if highmem else [])


def build_smbios(ncpu, lowmem, highmem, system_uuid, base=BASE, limit=LIMIT):
    """``[(gpa, bytes)]``: the entry point at ``base`` and the structure table right after it.

    ``lowmem``/``highmem``: the RAM from 0 and from 4 GiB, in bytes; ``system_uuid`` a :class:`uuid.UUID`
    (:func:`parse_uuid`, :func:`derived_uuid`). ValueError if the tables would reach ``limit``."""
    if ncpu < 1:
        raise ValueError("at least one vCPU")
    t = _Table()
    t.add(BIOS_INFO, BIOS_STRINGS, vendor=1, version=2, segment=BIOS_SEGMENT, release_date=3,
          rom_size=BIOS_ROM_64K, characteristics=BIOS_ISA | BIOS_PCI | BIOS_SHADOWING | BIOS_CD_BOOT | BIOS_EDD,
          ext1=BIOS_EXT1_ACPI, ext2=BIOS_EXT2_BBS | BIOS_EXT2_VM, bios_major=0, bios_minor=0,
          ec_major=EC_RELEASE_NONE, ec_minor=EC_RELEASE_NONE)
    t.add(SYSTEM_INFO, SYSTEM_STRINGS, manufacturer=1, product=2, version=3, serial=4,
          uuid=uuid_field(system_uuid), wakeup=WAKEUP_POWER_SWITCH, sku=5, family=6)
    chassis_handle = FIRST_HANDLE + len(t.parts) + 1            # the chassis comes right after the baseboard
    t.add(BASEBOARD, BASEBOARD_STRINGS, manufacturer=1, product=2, version=3, serial=4, asset=5,
          features=BOARD_HOSTING, location=6, chassis=chassis_handle, board_type=BOARD_MOTHERBOARD,
          object_count=0)
    t.add(CHASSIS, CHASSIS_STRINGS, manufacturer=1, chassis_type=CHASSIS_UNKNOWN, version=2, serial=3, asset=4,
          boot_state=CHASSIS_STATE_SAFE, power_state=CHASSIS_STATE_SAFE, thermal_state=CHASSIS_STATE_SAFE,
          security=CHASSIS_SECURITY_NONE, oem=0, height=0, power_cords=0, element_count=0, element_length=0, sku=5)
    for i in range(ncpu):
        t.add(PROCESSOR, (f"CPU #{i}",) + PROCESSOR_STRINGS, socket=1, processor_type=CPU_CENTRAL,
              family=CPU_FAMILY_OTHER, manufacturer=2, processor_id=0, version=3, voltage=0, external_clock=0,
              max_speed=0, current_speed=0, status=CPU_POPULATED | CPU_ENABLED, upgrade=CPU_UPGRADE_NONE,
              l1_cache=HANDLE_NONE, l2_cache=HANDLE_NONE, l3_cache=HANDLE_NONE, serial=4, asset=5, part=6,
              cores=CPU_CORES, enabled_cores=0, threads=CPU_THREADS, characteristics=CPU_64BIT,
              family2=CPU_FAMILY_OTHER)
    areas = _ram_areas(lowmem, highmem)
    array = t.add(MEMORY_ARRAY, location=ARRAY_ON_BOARD, use=ARRAY_SYSTEM_MEMORY, error_correction=ARRAY_NO_ECC,
                  max_capacity_kb=ARRAY_CAPACITY_EXTENDED, error_handle=HANDLE_NONE, device_count=len(areas),
                  extended_max_capacity=lowmem + highmem)
    for _, size in areas:
        size_field, extended = memory_device_size(size)
        t.add(MEMORY_DEVICE, MEMORY_STRINGS, array_handle=array, error_handle=HANDLE_NONE,
              total_width=DEVICE_WIDTH, data_width=DEVICE_WIDTH, size=size_field, form_factor=DEVICE_FORM_UNKNOWN,
              device_set=0, device_locator=1, bank_locator=2, memory_type=DEVICE_TYPE_UNKNOWN,
              type_detail=DEVICE_DETAIL_UNKNOWN, speed=0, manufacturer=3, serial=4, asset=5, part=6, attributes=0,
              extended_size=extended, configured_speed=0, min_voltage=0, max_voltage=0, configured_voltage=0)
    for start, size in areas:
        t.add(ARRAY_MAPPED_ADDRESS, array_handle=array, partition_width=PARTITION_WIDTH,
              **mapped_range(start, size))
    t.add(BOOT_INFO, reserved=bytes(6), status=BOOT_NO_ERRORS)
    t.add(END_OF_TABLE)
    table = b"".join(t.parts)
    table_addr = base + ENTRY_POINT.sizeof()
    if table_addr + len(table) > limit:
        raise ValueError(f"SMBIOS tables ({ENTRY_POINT.sizeof() + len(table)} bytes with {ncpu} vCPUs) "
                         f"would pass {limit:#x}")
    ep = bytearray(ENTRY_POINT.build(dict(
        checksum=0, length=ENTRY_POINT.sizeof(), major=SPEC_MAJOR, minor=SPEC_MINOR,
        max_structure_size=max(len(p) for p in t.parts), revision=0, formatted_area=bytes(5),
        intermediate_checksum=0, table_length=len(table), table_address=table_addr, structure_count=len(t.parts),
        bcd_revision=(SPEC_MAJOR << 4) | SPEC_MINOR)))
    fix_checksums(ep)
    return [(base, bytes(ep)), (table_addr, table)]


def fix_checksums(ep):
    """Sets the entry point's two checksums (5.2.1) in the bytearray ``ep``: the intermediate one first."""
    ep[EP_INTERMEDIATE_CHECKSUM] = 0
    ep[EP_INTERMEDIATE_CHECKSUM] = _checksum(ep[EP_INTERMEDIATE:])
    ep[EP_CHECKSUM] = 0
    ep[EP_CHECKSUM] = _checksum(ep)


def walk(table):
    """The structures of a table: ``[(type, formatted bytes, [strings])]``; ValueError where a structure's
    length or its string set runs past the table."""
    out, i = [], 0
    while i < len(table):
        if i + 4 > len(table) or table[i + 1] < 4 or i + table[i + 1] > len(table):
            raise ValueError(f"structure at offset {i} runs past the table")
        end = table.find(b"\0\0", i + table[i + 1])
        if end < 0:
            raise ValueError(f"structure at offset {i}: its strings do not end in a double NUL")
        strings = table[i + table[i + 1]:end].split(b"\0")
        out.append((table[i], table[i:i + table[i + 1]], [s.decode("ascii") for s in strings if s]))
        i = end + 2
    return out
