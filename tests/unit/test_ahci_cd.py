"""A ``cd`` port: ATAPI and SCSI/MMC (``bhyve_devices/ahci/atapi.py``) through the HBA with the test driver, over
an ISO that ``xorriso`` builds (its primary volume descriptor and a file read back through READ(10)/READ(12)), and
over small images for the rest: IDENTIFY PACKET DEVICE, INQUIRY and its VPD pages, TEST UNIT READY, READ
CAPACITY, READ TOC formats 0-2 in LBA and MSF, GET CONFIGURATION's profiles and features, GET EVENT STATUS
NOTIFICATION, MODE SENSE(10), REQUEST SENSE after each kind of error, eject and load, REPORT LUNS."""

import shutil
import struct
import subprocess

import pytest

from bhyve_devices.ahci import atapi as P
from bhyve_devices.ahci import identify
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.ata import IDENTIFY_DEVICE, IDENTIFY_PACKET_DEVICE, PACKET
from bhyve_devices.ahci.testdriver import Controller, h2d
from bhyve_devices.backends import MemoryBlockBackend
from vmmshim.backends.block import FileBlockBackend

BLOCKS = 40


def cdb(*b):
    return bytes(b).ljust(12, b"\0")


class Cd:
    def __init__(self, backend):
        self.c = Controller([("cd", backend)])
        self.d = self.c.up()

    def packet(self, acmd, n=2048, chunk=2048):
        st, data = self.d.read_into(0, h2d(PACKET, features=1), n, acmd=acmd, chunk=chunk)
        if st.is_ & L.IS_TFES:
            self.d.stop(0)
        return st, data

    def sense(self):
        st, data = self.packet(cdb(P.REQUEST_SENSE, 0, 0, 0, 18), 18)
        assert st.ok
        return data[2], data[12], data[13]


@pytest.fixture
def cd():
    data = bytearray(b"".join(bytes([i]) * 2048 for i in range(BLOCKS)))
    c = Cd(MemoryBlockBackend(data, readonly=True))
    yield c
    assert c.c.hba.errors == []
    c.c.close()


@pytest.mark.skipif(shutil.which("xorriso") is None, reason="xorriso is not installed (scripts/install-deps.sh)")
def test_an_iso_built_by_xorriso_reads_back(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    payload = bytes(range(256)) * 40 + b"end of file"
    (src / "hello.txt").write_bytes(payload)
    iso = tmp_path / "t.iso"
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "VMMSHIM", "-o", str(iso), str(src)], check=True,
                   capture_output=True)
    cd = Cd(FileBlockBackend(str(iso), readonly=True))
    st, pvd = cd.packet(cdb(P.READ_10, 0, 0, 0, 0, 16, 0, 0, 1))
    assert st.ok and st.prdbc == 2048 and pvd[1:6] == b"CD001" and pvd[40:47] == b"VMMSHIM"
    st, cap = cd.packet(cdb(P.READ_CAPACITY), 8)
    assert st.ok and struct.unpack(">II", cap) == (iso.stat().st_size // 2048 - 1, 2048)
    root_lba, root_len = struct.unpack_from("<I4xI", pvd, 156 + 2)
    st, root = cd.packet(cdb(P.READ_12, 0, *root_lba.to_bytes(4, "big"), 0, 0, 0, 1), 2048)
    assert st.ok
    off = 0
    while off < root_len and root[off]:
        rlen, lba, size, nlen = root[off], *struct.unpack_from("<I4xI", root, off + 2), root[off + 32]
        if root[off + 33:off + 33 + nlen].upper().startswith(b"HELLO.TXT"):
            blocks = (size + 2047) // 2048
            st, data = cd.packet(cdb(P.READ_10, 0, *lba.to_bytes(4, "big"), 0, 0, blocks), blocks * 2048,
                                 chunk=512)
            assert st.ok and data[:size] == payload
            break
        off += rlen
    else:
        pytest.fail("hello.txt is not in the root directory")
    cd.c.close()


def test_identify_packet_device_and_identify_device_aborts(cd):
    st, data = cd.d.read_into(0, h2d(IDENTIFY_PACKET_DEVICE), 512)
    assert st.ok and identify.words(data)[0] == identify.CONFIG_CD and sum(data) % 256 == 0
    st, _ = cd.d.read_into(0, h2d(IDENTIFY_DEVICE), 512)
    f = L.FIS_D2H.parse(cd.d.received_fis(0)[L.RFIS_RFIS:L.RFIS_RFIS + 20])
    assert st.error == L.ERR_ABRT and (f.lba1, f.lba2) == (0x14, 0xEB)


def test_inquiry_and_vpd(cd):
    st, data = cd.packet(cdb(P.INQUIRY, 0, 0, 0, 36), 36)
    assert st.ok and data[0] == 5 and data[1] & 0x80 and data[8:16] == b"BHYVE   "
    st, data = cd.packet(cdb(P.INQUIRY, 0, 0, 0, 5), 36)
    assert st.prdbc == 5
    st, data = cd.packet(cdb(P.INQUIRY, 1, 0, 0, 64), 64)
    assert st.ok and data[1] == 0 and data[4:6] == b"\x00\x80"
    st, data = cd.packet(cdb(P.INQUIRY, 1, 0x80, 0, 64), 64)
    assert st.ok and data[4:4 + data[3]].startswith(b"BHYVE-")
    st, _ = cd.packet(cdb(P.INQUIRY, 1, 0x83, 0, 64), 64)
    assert st.tfd & L.STS_ERR and st.error >> 4 == P.ILLEGAL_REQUEST
    assert cd.sense() == (P.ILLEGAL_REQUEST, P.ASC_INVALID_FIELD, 0)
    assert cd.sense() == (P.NO_SENSE, 0, 0)                          # read once


def test_reads_and_their_errors(cd):
    st, data = cd.packet(cdb(P.READ_10, 0, 0, 0, 0, 3, 0, 0, 2), 4096, chunk=1000)
    assert st.ok and data == b"\x03" * 2048 + b"\x04" * 2048
    st, _ = cd.packet(cdb(P.READ_12, 0, 0, 0, 0, BLOCKS - 1, 0, 0, 0, 2), 4096)
    assert st.error >> 4 == P.ILLEGAL_REQUEST and cd.sense()[1] == P.ASC_LBA_OUT_OF_RANGE
    st, _ = cd.packet(cdb(P.READ_10, 0, 0, 0, 0, 0, 0, 0, 2), 2048)      # PRDT too short
    assert st.error >> 4 == P.ABORTED_COMMAND
    st, _ = cd.packet(cdb(0x2A, 0, 0, 0, 0, 0, 0, 0, 1), 2048)           # WRITE(10)
    assert cd.sense() == (P.ILLEGAL_REQUEST, P.ASC_INVALID_OPCODE, 0)
    st, _ = cd.packet(cdb(P.TEST_UNIT_READY), 0)
    assert st.ok
    f = L.FIS_D2H.parse(cd.d.received_fis(0)[L.RFIS_RFIS:L.RFIS_RFIS + 20])
    assert f.count == P.IREASON_CD_IO


@pytest.mark.parametrize("msf", [False, True])
def test_read_toc_formats(cd, msf):
    m = 2 if msf else 0
    st, data = cd.packet(cdb(P.READ_TOC, m, 0, 0, 0, 0, 0, 0, 100), 100)
    assert st.ok and struct.unpack_from(">HBB", data) == (18, 1, 1)
    assert data[4:8] == bytes((0, 0x14, 1, 0)) and data[12:16] == bytes((0, 0x14, 0xAA, 0))
    lead_out = bytes((0,) + P.msf(BLOCKS)) if msf else struct.pack(">I", BLOCKS)
    assert data[16:20] == lead_out and data[8:12] == (bytes((0, 0, 2, 0)) if msf else bytes(4))
    st, data = cd.packet(cdb(P.READ_TOC, m, 0, 0, 0, 0, 0xAA, 0, 100), 100)
    assert st.ok and data[0:2] == b"\x00\x0a" and data[6] == 0xAA
    st, data = cd.packet(cdb(P.READ_TOC, m, 0, 0, 0, 0, 0, 0, 12, 0x40), 12)      # session info (SFF-8020)
    assert st.ok and data[:4] == bytes((0, 10, 1, 1)) and data[6] == 1
    st, data = cd.packet(cdb(P.READ_TOC, m, 2, 0, 0, 0, 0, 0, 100), 100)          # full TOC
    assert st.ok and data[1] == 2 + 44 and [data[4 + 11 * i + 3] for i in range(4)] == [0xA0, 0xA1, 0xA2, 1]
    st, _ = cd.packet(cdb(P.READ_TOC, m, 0, 0, 0, 0, 2, 0, 100), 100)
    assert st.error >> 4 == P.ILLEGAL_REQUEST


def features(data):
    """``[(feature code, current)]`` of a GET CONFIGURATION reply."""
    length, codes, off = struct.unpack_from(">I", data)[0], [], 8
    while off < length + 4:
        code, flags, n = struct.unpack_from(">HBB", data, off)
        codes.append((code, flags & 1))
        off += 4 + n
    return codes


def test_get_configuration(cd):
    st, data = cd.packet(cdb(P.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 1, 0), 256, chunk=256)
    length, profile = struct.unpack_from(">I2xH", data)
    assert st.ok and profile == P.PROFILE_CD_ROM and st.prdbc == length + 4
    assert features(data) == [(0, 1), (1, 1), (3, 1), (0x10, 1), (0x1E, 1), (0x1F, 0)]
    assert data[12:14] == b"\x00\x10" and data[16:18] == b"\x00\x08" and data[18] & 1      # CD-ROM current
    st, data = cd.packet(cdb(P.GET_CONFIGURATION, 2, 0, 0x1F, 0, 0, 0, 1, 0), 256, chunk=256)
    assert st.ok and struct.unpack_from(">I", data)[0] == 4 + 8 and data[8:10] == b"\x00\x1f"
    st, data = cd.packet(cdb(P.GET_CONFIGURATION, 1, 0, 0, 0, 0, 0, 1, 0), 256, chunk=256)
    assert st.ok and features(data) == [(0, 1), (1, 1), (3, 1), (0x10, 1), (0x1E, 1)]


def test_dvd_profile_for_large_media():
    big = MemoryBlockBackend(bytearray(0), readonly=True)
    big.size = (P.CD_MAX_SECTORS + 1) * 2048
    cd = Cd(big)
    st, data = cd.packet(cdb(P.GET_CONFIGURATION, 0, 0, 0, 0, 0, 0, 0, 8), 8)
    assert st.ok and struct.unpack_from(">H", data, 6)[0] == P.PROFILE_DVD_ROM
    cd.c.close()


def test_event_status_mode_sense_and_luns(cd):
    st, data = cd.packet(cdb(P.GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8), 8)
    assert st.ok and data == bytes((0, 6, 4, 0x10, 0, 2, 0, 0))
    st, _ = cd.packet(cdb(P.GET_EVENT_STATUS, 0, 0, 0, 0x10, 0, 0, 0, 8), 8)
    assert st.error >> 4 == P.ILLEGAL_REQUEST
    st, data = cd.packet(cdb(P.MODE_SENSE_10, 0, 0x2A, 0, 0, 0, 0, 0, 128), 128)
    assert st.ok and st.prdbc == 30 and data[8] == 0x2A and data[8 + 6] & 0x08
    assert struct.unpack_from(">H", data, 8 + 8)[0] // 176 == 24
    st, data = cd.packet(cdb(P.MODE_SENSE_10, 0, 0x3F, 0, 0, 0, 0, 0, 128), 128)
    assert st.ok and struct.unpack_from(">H", data)[0] == 6 + 12 + 22
    st, _ = cd.packet(cdb(P.MODE_SENSE_10, 0, 0xC0 | 0x2A, 0, 0, 0, 0, 0, 128), 128)
    assert cd.sense()[1] == P.ASC_SAVING_NOT_SUPPORTED
    st, data = cd.packet(cdb(P.REPORT_LUNS, 0, 0, 0, 0, 0, 0, 0, 0, 16), 16)
    assert st.ok and data[:4] == b"\x00\x00\x00\x08"


def test_eject_and_load(cd):
    st, _ = cd.packet(cdb(P.PREVENT_ALLOW, 0, 0, 0, 1), 0)
    st, _ = cd.packet(cdb(P.START_STOP_UNIT, 0, 0, 0, 2), 0)
    assert cd.sense()[1] == P.ASC_REMOVAL_PREVENTED
    cd.packet(cdb(P.PREVENT_ALLOW, 0, 0, 0, 0), 0)
    st, _ = cd.packet(cdb(P.START_STOP_UNIT, 0, 0, 0, 2), 0)
    assert st.ok
    st, _ = cd.packet(cdb(P.TEST_UNIT_READY), 0)
    assert cd.sense() == (P.NOT_READY, P.ASC_NO_MEDIUM, 0)
    st, data = cd.packet(cdb(P.GET_EVENT_STATUS, 1, 0, 0, 0x10, 0, 0, 0, 8), 8)
    assert data[4:6] == bytes((P.MEDIA_EVENT_REMOVED, 0))
    st, _ = cd.packet(cdb(P.READ_CAPACITY), 8)
    assert st.error >> 4 == P.NOT_READY
    cd.packet(cdb(P.START_STOP_UNIT, 0, 0, 0, 3), 0)
    st, _ = cd.packet(cdb(P.TEST_UNIT_READY), 0)
    assert st.ok
