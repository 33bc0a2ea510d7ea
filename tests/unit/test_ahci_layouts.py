"""The AHCI and SATA layouts (``bhyve_devices/ahci/layouts.py``): every ``construct`` declaration round-trips any
bytes of its size, has the size the spec gives, and agrees with the ``struct`` formats the command path uses;
IDENTIFY's strings and integrity word (``identify.py``)."""

import struct

import pytest
from hypothesis import given, strategies as st

from bhyve_devices.ahci import identify
from bhyve_devices.ahci import layouts as L

SIZES = [(L.HBA_REGS, 0x2C), (L.PORT_REGS, 0x48), (L.COMMAND_HEADER, 32), (L.PRDT_ENTRY, 16),
         (L.COMMAND_TABLE, 0x80), (L.RECEIVED_FIS, 256), (L.FIS_H2D, 20), (L.FIS_D2H, 20), (L.FIS_SDB, 8),
         (L.FIS_PIO_SETUP, 20)]


@pytest.mark.parametrize("layout,size", SIZES, ids=[str(s) for _, s in SIZES])
def test_sizes_are_the_specs(layout, size):
    assert layout.sizeof() == size


@pytest.mark.parametrize("layout,size", SIZES, ids=[str(s) for _, s in SIZES])
@given(data=st.data())
def test_every_layout_round_trips(layout, size, data):
    raw = data.draw(st.binary(min_size=size, max_size=size))
    parsed = layout.parse(raw)
    assert layout.build(parsed) == raw
    assert layout.parse(layout.build(parsed)) == parsed


def test_register_offsets_match_the_declarations():
    hba = L.HBA_REGS.parse(struct.pack("<11I", *range(11)))
    assert [hba[k] for k in ("cap", "ghc", "is_", "pi", "vs", "cap2", "bohc")] == [
        L.CAP // 4, L.GHC // 4, L.IS // 4, L.PI // 4, L.VS // 4, L.CAP2 // 4, L.BOHC // 4]
    port = L.PORT_REGS.parse(struct.pack("<18I", *range(18)))
    for name, off in (("clb", L.P_CLB), ("is_", L.P_IS), ("cmd", L.P_CMD), ("tfd", L.P_TFD), ("ssts", L.P_SSTS),
                      ("sctl", L.P_SCTL), ("sact", L.P_SACT), ("ci", L.P_CI), ("devslp", L.P_DEVSLP)):
        assert port[name] == off // 4, name
    rf = L.RECEIVED_FIS
    assert rf.parse(bytes(256)) is not None
    offsets, pos = {}, 0
    for sub in rf.subcons:
        offsets[sub.name] = pos
        pos += sub.sizeof()
    assert (offsets["dsfis"], offsets["psfis"], offsets["rfis"], offsets["sdbfis"], offsets["ufis"]) == (
        L.RFIS_DSFIS, L.RFIS_PSFIS, L.RFIS_RFIS, L.RFIS_SDBFIS, L.RFIS_UFIS)


@given(flags=st.integers(0, 0xFFFF), prdtl=st.integers(0, 0xFFFF), prdbc=st.integers(0, 2**32 - 1),
       ctba=st.integers(0, 2**64 - 1))
def test_the_header_format_is_the_declaration(flags, prdtl, prdbc, ctba):
    raw = L.HEADER.pack(flags, prdtl, prdbc, ctba) + bytes(16)
    h = L.COMMAND_HEADER.parse(raw)
    assert (h.flags, h.prdtl, h.prdbc, h.ctba) == (flags, prdtl, prdbc, ctba)


@given(dba=st.integers(0, 2**64 - 1), dbc=st.integers(0, 2**32 - 1))
def test_the_prd_format_is_the_declaration(dba, dbc):
    e = L.PRDT_ENTRY.parse(L.PRD.pack(dba, 0, dbc))
    assert (e.dba, e.dbc) == (dba, dbc)


@given(tf=st.binary(min_size=7, max_size=7), status=st.integers(0, 255), error=st.integers(0, 255),
       count=st.integers(0, 0xFFFF), i=st.booleans())
def test_the_d2h_and_pio_formats_are_the_declarations(tf, status, error, count, i):
    raw = L.D2H.pack(L.FIS_TYPE_D2H, L.FIS_I if i else 0, status, error, tf, 0, count & 0xFF, count >> 8)
    f = L.FIS_D2H.parse(raw)
    assert (f.type, f.pm_i, f.status, f.error, f.count | f.count_exp << 8) == (
        L.FIS_TYPE_D2H, L.FIS_I if i else 0, status, error, count)
    assert bytes((f.lba0, f.lba1, f.lba2, f.device, f.lba3, f.lba4, f.lba5)) == tf
    raw = L.PIO_SETUP.pack(L.FIS_TYPE_PIO_SETUP, L.PIO_D, status, error, tf, 0, count & 0xFF, count >> 8, 0,
                           error, count, 0)
    p = L.FIS_PIO_SETUP.parse(raw)
    assert (p.e_status, p.transfer_count, p.status, p.pm_d_i) == (error, count, status, L.PIO_D)


@given(cfis=st.binary(min_size=20, max_size=20))
def test_lba_helpers_read_the_h2d_fields(cfis):
    f = L.FIS_H2D.parse(cfis)
    assert L.lba48(cfis) == (f.lba0 | f.lba1 << 8 | f.lba2 << 16 | f.lba3 << 24 | f.lba4 << 32 | f.lba5 << 40)
    assert L.lba28(cfis) == f.lba0 | f.lba1 << 8 | f.lba2 << 16 | (f.device & 0xF) << 24
    assert L.SDB.unpack(L.FIS_SDB.build(L.FIS_SDB.parse(cfis[:8]))) == L.SDB.unpack(cfis[:8])


def test_ata_strings_swap_each_word():
    assert identify.ata_string("BHYVE", 8) == b"HBVY E  "
    assert len(identify.ata_string("x" * 50, 40)) == 40


@pytest.mark.parametrize("data", [
    identify.disk("SER", "MODEL", "001", 1 << 20, trim=True),
    identify.disk("SER", "MODEL", "001", 1 << 40, sectorsize=4096, physical=16384),
    identify.packet("SER", "CD", "001")])
def test_identify_sums_to_zero_and_reads_back(data):
    w = identify.words(data)
    assert len(data) == 512 and sum(data) % 256 == 0 and w[255] & 0xFF == identify.INTEGRITY_SIGNATURE
    assert identify.ata_string("SER", 20) == data[20:40]


def test_identify_disk_capacity_and_features():
    w = identify.words(identify.disk("S", "M", "F", (1 << 32) + 5, sectorsize=4096, physical=8192, trim=True))
    assert w[60] | w[61] << 16 == identify.LBA28_MAX
    assert sum(w[100 + i] << (16 * i) for i in range(4)) == (1 << 32) + 5
    assert w[106] == identify.VALID_BIT14 | identify.SS_MULTIPLE | identify.SS_LARGE_LOGICAL | 1
    assert w[117] | w[118] << 16 == 2048                       # logical sector size in words
    assert w[169] & 1 and w[105] == 1 and w[77] & identify.SATA2_RCVSND_FPDMA
    assert w[76] & identify.SATA_NCQ and w[75] == 31
    assert w[83] & identify.CS2_LBA48 and w[86] & identify.CS2_FLUSH_EXT
    w = identify.words(identify.packet("S", "M", "F"))
    assert w[0] >> 14 == 2 and (w[0] >> 8) & 0x1F == 5        # ATAPI, CD-ROM
