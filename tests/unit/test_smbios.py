"""SMBIOS tables (bhyve_devices/tables/smbios.py): each layout parsed back, the entry point's checksums, the UUID's
bytes, the structure walk, and the tables read by the host's ``dmidecode --from-dump``. Then the firmware tables a
VM gets (vmmshim.machine._write_tables): the MP table beside ACPI unless -Y, SMBIOS always, each in its area."""

import hashlib
import shutil
import subprocess
import uuid
from types import SimpleNamespace

import pytest

from bhyve_devices.pci import registry
from bhyve_devices.pci.device import PciDevice
from bhyve_devices.pci.host import PciHost
from bhyve_devices.tables import smbios as S
from vmmshim.config import Config, ConfigError
from vmmshim.machine import TABLE_AREAS, _check_area, _write_tables

MiB, GiB = S.MiB, S.GiB
GIVEN = "12345678-1234-5678-9abc-def012345678"
GIVEN_FIELD = bytes.fromhex("78563412 3412 7856 9abc def012345678")     # 2.6 order: first three fields swapped
DUMP_TABLE_OFFSET = 0x20         # dmidecode's dump format: entry point at 0, table at 0x20
LPC_SLOT = (31, 0)


def build(ncpu=2, lowmem=256 * MiB, highmem=0, value=GIVEN):
    return S.build_smbios(ncpu, lowmem, highmem, uuid.UUID(value))


def structures(tables):
    (_, _), (_, table) = tables
    return S.walk(table)


def of_type(tables, type_):
    return [S.LAYOUTS[t].parse(fmt) for t, fmt, _ in structures(tables) if t == type_]


# -- the layouts and the entry point ---------------------------------------------------------------------------

@pytest.mark.parametrize("type_", sorted(S.LAYOUTS))
def test_each_layout_round_trips(type_):
    found = [(fmt, strings) for t, fmt, strings in structures(build(highmem=GiB)) if t == type_]
    assert found
    for fmt, _ in found:
        layout = S.LAYOUTS[type_]
        parsed = layout.parse(fmt)
        assert len(fmt) == layout.sizeof() == parsed.length and parsed.type == type_
        assert layout.build(parsed) == fmt


def test_layout_sizes_are_the_specs():
    sizes = {t: layout.sizeof() for t, layout in S.LAYOUTS.items()}
    assert sizes == {0: 0x18, 1: 0x1B, 2: 0x0F, 3: 0x16, 4: 0x2A, 16: 0x17, 17: 0x28, 19: 0x1F, 32: 0x0B, 127: 4}
    assert S.ENTRY_POINT.sizeof() == 0x1F


def test_entry_point_checksums_and_fields():
    tables = build(ncpu=4)
    (ea, ep), (ta, table) = tables
    assert ea == 0xF1000 and ea % 16 == 0 and ta == ea + len(ep)
    assert sum(ep) % 256 == 0                                   # the whole entry point
    assert sum(ep[S.EP_INTERMEDIATE:]) % 256 == 0               # the "_DMI_" part
    e = S.ENTRY_POINT.parse(ep)
    assert S.ENTRY_POINT.build(e) == ep
    walked = structures(tables)
    assert (e.length, e.major, e.minor, e.bcd_revision) == (0x1F, 2, 8, 0x28)
    assert (e.table_address, e.table_length, e.structure_count) == (ta, len(table), len(walked))
    assert e.max_structure_size == max(len(fmt) + sum(len(s) + 1 for s in st) + 1 for _, fmt, st in walked)
    assert ta + len(table) <= S.LIMIT


# -- the UUID --------------------------------------------------------------------------------------------------

def test_given_uuid_bytes_in_smbios_2_6_order():
    (system,) = of_type(build(), S.TYPE_SYSTEM)
    assert system.uuid == GIVEN_FIELD
    assert S.uuid_field(S.parse_uuid(GIVEN.upper())) == GIVEN_FIELD


@pytest.mark.parametrize("bad", ["nope", "1234", GIVEN[:-1], GIVEN + "0", "g" * 32, ""])
def test_malformed_uuid_is_one_clear_error(bad):
    with pytest.raises(ValueError) as info:
        S.parse_uuid(bad)
    msg = str(info.value)
    assert msg.startswith(f"-U {bad}:") and "\n" not in msg


def test_derived_uuid_is_bhyves_md5_of_the_names():
    digest = bytearray(hashlib.md5(b"myvm" + b"host.example" + bytes(256 - len("host.example"))).digest())
    digest[6] = (digest[6] & 0x0F) | 0x30                      # version 3
    digest[8] = (digest[8] & 0x3F) | 0x80                      # the RFC 4122 variant
    got = S.derived_uuid("myvm", "host.example")
    assert got.bytes == bytes(digest) and got.version == 3 and got.variant == uuid.RFC_4122
    assert got == S.derived_uuid("myvm", "host.example")
    assert got != S.derived_uuid("othervm", "host.example") != S.derived_uuid("myvm", "otherhost")


# -- the structure table ---------------------------------------------------------------------------------------

STRING_FIELDS = {0: ("vendor", "version", "release_date"), 1: ("manufacturer", "product", "version", "serial",
                 "sku", "family"), 2: ("manufacturer", "product", "version", "serial", "asset", "location"),
                 3: ("manufacturer", "version", "serial", "asset", "sku"),
                 4: ("socket", "manufacturer", "version", "serial", "asset", "part"),
                 17: ("device_locator", "bank_locator", "manufacturer", "serial", "asset", "part")}


def test_structure_walk_lengths_strings_and_handles():
    tables = build(ncpu=3, lowmem=3 * GiB, highmem=2 * GiB)
    (_, _), (_, table) = tables
    walked, i = S.walk(table), 0
    for type_, fmt, strings in walked:
        assert table[i] == type_ and table[i + 1] == len(fmt) == S.LAYOUTS[type_].sizeof()
        i += len(fmt)
        set_len = sum(len(s) + 1 for s in strings) + 1 if strings else 2
        assert table[i + set_len - 2:i + set_len] == b"\0\0"          # each string set ends in a double NUL
        i += set_len
    assert i == len(table)
    assert [t for t, _, _ in walked] == [0, 1, 2, 3, 4, 4, 4, 16, 17, 17, 19, 19, 32, 127]
    handles = [S.LAYOUTS[t].parse(fmt).handle for t, fmt, _ in walked]
    assert handles == list(range(1, len(walked) + 1))
    for t, fmt, strings in walked:                                       # every string index names a string
        parsed = S.LAYOUTS[t].parse(fmt)
        refs = [v for k, v in parsed.items() if k in STRING_FIELDS.get(t, ())]
        assert all(1 <= r <= len(strings) for r in refs), (t, refs, strings)


def test_cross_references_and_processors():
    tables = build(ncpu=3, lowmem=3 * GiB, highmem=2 * GiB)
    handles = {t: S.LAYOUTS[t].parse(fmt).handle for t, fmt, _ in structures(tables)}
    (board,) = of_type(tables, S.TYPE_BASEBOARD)
    assert board.chassis == handles[S.TYPE_CHASSIS]
    (array,) = of_type(tables, S.TYPE_MEMORY_ARRAY)
    assert array.device_count == 2 and array.extended_max_capacity == 5 * GiB
    assert [d.array_handle for d in of_type(tables, S.TYPE_MEMORY_DEVICE)] == [handles[16]] * 2
    assert [m.array_handle for m in of_type(tables, S.TYPE_ARRAY_MAPPED_ADDRESS)] == [handles[16]] * 2
    names = [st[0] for t, _, st in structures(tables) if t == S.TYPE_PROCESSOR]
    assert names == ["CPU #0", "CPU #1", "CPU #2"]
    assert all(p.status == S.CPU_POPULATED | S.CPU_ENABLED for p in of_type(tables, S.TYPE_PROCESSOR))


def test_memory_areas():
    tables = build(lowmem=3 * GiB, highmem=2 * GiB)
    assert [(d.size, d.extended_size) for d in of_type(tables, S.TYPE_MEMORY_DEVICE)] == [(3072, 0), (2048, 0)]
    ranges = [(m.start_kb, m.end_kb) for m in of_type(tables, S.TYPE_ARRAY_MAPPED_ADDRESS)]
    assert ranges == [(0, 3 * GiB // 1024 - 1), (4 * GiB // 1024, 6 * GiB // 1024 - 1)]
    assert S.mapped_range(8 << 40, GiB) == dict(start_kb=S.ADDRESS_EXTENDED, end_kb=S.ADDRESS_EXTENDED,
                                                extended_start=8 << 40, extended_end=(8 << 40) + GiB - 1)
    assert S.memory_device_size(16 * MiB) == (16384 | S.DEVICE_SIZE_KB, 0)
    assert S.memory_device_size(256 * MiB) == (256, 0)
    assert S.memory_device_size(64 * GiB) == (S.DEVICE_SIZE_EXTENDED, 65536)


def test_too_many_vcpus_for_the_area_is_an_error():
    assert build(ncpu=64, lowmem=3 * GiB, highmem=64 * GiB)[1][0] + 1 < S.LIMIT
    with pytest.raises(ValueError, match="would pass 0xf2400"):
        build(ncpu=100)


# -- read back by the real client: dmidecode -------------------------------------------------------------------

def dmidecode_path():
    path = shutil.which("dmidecode") or shutil.which("dmidecode", path="/usr/sbin:/sbin")
    if path is None:
        pytest.skip("dmidecode is not installed (scripts/install-deps.sh installs it)")
    return path


def dmidecode(tables, tmp_path):
    """dmidecode's reading of ``tables`` from a dump file as ``--dump-bin`` writes it (dmidecode(8), "BINARY DUMP
    FILE FORMAT"): the entry point at offset 0 with its table address rewritten to 0x20, the table at 0x20."""
    (_, ep), (_, table) = tables
    e = S.ENTRY_POINT.parse(ep)
    e.table_address = DUMP_TABLE_OFFSET
    moved = bytearray(S.ENTRY_POINT.build(e))
    S.fix_checksums(moved)
    dump = tmp_path / "smbios.bin"
    dump.write_bytes(bytes(moved).ljust(DUMP_TABLE_OFFSET, b"\0") + table)
    run = subprocess.run([dmidecode_path(), "--from-dump", str(dump)], capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    out = run.stdout + run.stderr
    for word in ("checksum", "invalid", "wrong", "unknown type", "truncated", "unreachable"):
        assert word not in out.lower(), out
    return run.stdout


def test_dmidecode_reads_uuid_processors_and_memory(tmp_path):
    out = dmidecode(build(ncpu=2, lowmem=256 * MiB), tmp_path)
    assert "SMBIOS 2.8 present." in out
    assert f"UUID: {GIVEN}" in out
    assert out.count("Processor Information") == 2 and "Socket Designation: CPU #1" in out
    assert "\tSize: 256 MB" in out and "Maximum Capacity: 256 MB" in out and "Range Size: 256 MB" in out
    assert "Vendor: BHYVE" in out and "System is a virtual machine" in out


def test_dmidecode_with_highmem_and_64_vcpus(tmp_path):
    out = dmidecode(build(ncpu=64, lowmem=3 * GiB, highmem=5 * GiB, value=str(S.derived_uuid("vm", "h"))),
                    tmp_path)
    assert f"UUID: {S.derived_uuid('vm', 'h')}" in out
    assert out.count("Processor Information") == 64
    assert "\tSize: 3 GB" in out and "\tSize: 5 GB" in out and "Maximum Capacity: 8 GB" in out
    assert "Starting Address: 0x00100000000" in out and "Ending Address: 0x0023FFFFFFF" in out


# -- the tables a VM gets --------------------------------------------------------------------------------------

class FakeVm:
    """What _write_tables reads of a VM, and a record of what it writes into guest memory."""

    def __init__(self, ncpus, lowmem=256 * MiB, highmem=0):
        self.config = SimpleNamespace(ncpus=ncpus)
        self.lowmem, self.highmem, self.writes = lowmem, highmem, []

    def load(self, gpa, data):
        self.writes.append((gpa, bytes(data)))

    def at(self, gpa):
        return next((d for a, d in self.writes if a == gpa), b"")


class IntxDev(PciDevice):
    def __init__(self, pin):
        super().__init__("intx", 0x1AF4, 0x1001, 1, 0)
        self.lintr_request(pin)


def host(slots=4):
    h = PciHost()
    h.add(0, 0, registry.create("hostbridge"))
    h.add(*LPC_SLOT, registry.create("lpc"))
    for slot in range(1, 1 + slots):
        for func in range(4):
            h.add(slot, func, IntxDev(func + 1))
    return h


def config(acpi=True, mptable=True, **keys):
    cfg = Config()
    cfg.set("acpi_tables", str(acpi).lower())
    cfg.set("x86.mptable", str(mptable).lower())
    for k, v in keys.items():
        cfg.set(k, v)
    return cfg


def test_mp_table_beside_acpi_and_smbios():
    vm = FakeVm(2)
    _write_tables(vm, config(uuid=GIVEN), host(), LPC_SLOT)
    assert vm.at(0xF0000).startswith(b"_MP_") and vm.at(0xF1000).startswith(b"_SM_")
    assert vm.at(0xF2400).startswith(b"RSD PTR ")
    (_, table) = [w for w in vm.writes if w[0] == 0xF1000 + S.ENTRY_POINT.sizeof()][0]
    assert GIVEN_FIELD in table


@pytest.mark.parametrize("acpi,mptable,signatures", [
    (False, True, {b"_MP_", b"_SM_"}), (True, False, {b"_SM_", b"RSD PTR "}), (False, False, {b"_SM_"})])
def test_flags_choose_the_tables(acpi, mptable, signatures):
    vm = FakeVm(1)
    _write_tables(vm, config(acpi, mptable), host(), LPC_SLOT)
    found = {sig for sig in (b"_MP_", b"_SM_", b"RSD PTR ") for _, d in vm.writes if d.startswith(sig)}
    assert found == signatures


def test_without_uuid_the_name_decides(monkeypatch):
    monkeypatch.setattr("vmmshim.machine.socket.gethostname", lambda: "host.example")
    vm = FakeVm(1)
    _write_tables(vm, config(name="myvm"), host(), LPC_SLOT)
    assert S.uuid_field(S.derived_uuid("myvm", "host.example")) in vm.at(0xF1000 + S.ENTRY_POINT.sizeof())


def test_bad_uuid_is_a_config_error():
    with pytest.raises(ConfigError, match="^-U not-a-uuid: not a UUID"):
        _write_tables(FakeVm(1), config(uuid="not-a-uuid"), host(), LPC_SLOT)


def assert_in_areas_without_overlap(writes):
    spans = sorted((gpa, gpa + len(data)) for gpa, data in writes)
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert end <= start, [(hex(a), hex(b)) for a, b in spans]
    for gpa, end in spans:
        assert any(lo <= gpa and end <= hi for lo, hi in TABLE_AREAS.values()), hex(gpa)


@pytest.mark.parametrize("ncpu", [1, 2, 21, 22, 64])
def test_all_three_fit_their_areas(ncpu):
    vm = FakeVm(ncpu, lowmem=3 * GiB, highmem=61 * GiB)
    _write_tables(vm, config(uuid=GIVEN), host(slots=30), LPC_SLOT)
    assert len({gpa for gpa, _ in vm.writes}) == len(vm.writes)
    assert_in_areas_without_overlap(vm.writes)


def test_mp_table_and_smbios_fit_with_64_vcpus():
    vm = FakeVm(64, lowmem=3 * GiB, highmem=61 * GiB)
    _write_tables(vm, config(acpi=False, uuid=GIVEN), host(slots=30), LPC_SLOT)
    assert vm.at(0xF0000).startswith(b"_MP_") and vm.at(0xF1000).startswith(b"_SM_")
    assert_in_areas_without_overlap(vm.writes)


def test_a_table_past_its_area_is_refused():
    _check_area("SMBIOS", [(0xF1000, bytes(0x1400))], 64)
    with pytest.raises(ValueError, match=r"MP table \(4097 bytes at 0xf0000, 64 vCPUs\) outgrows its area "
                                         r"0xf0000-0xf1000"):
        _check_area("MP table", [(0xF0000, bytes(0x1001))], 64)
