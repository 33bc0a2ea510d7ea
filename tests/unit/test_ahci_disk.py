"""An ``hd`` port over a temporary raw image (``vmmshim/backends/block.py``'s FileBlockBackend), driven through
the HBA by the test driver: IDENTIFY, the 28/48-bit PIO and DMA reads and writes, NCQ (one by one, many at once,
on the port's thread), FLUSH, TRIM (DATA SET MANAGEMENT and queued), SET FEATURES, READ LOG EXT, and the errors
(out of range, read-only, a short PRDT, a PRDT or command table outside RAM)."""

import os
import struct

import pytest

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import identify
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.testdriver import Controller, h2d, ncq
from vmmshim.backends.block import FileBlockBackend

SECTORS = 2048


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return str(p)


def original(image, lba, n):
    with open(image, "rb") as f:
        f.seek(lba * 512)
        return f.read(n * 512)


@pytest.fixture
def rig(image):
    c = Controller([("hd", FileBlockBackend(image))])
    c.up()
    yield c
    assert c.hba.errors == []
    c.close()


def test_identify_device(rig):
    st, data = rig.drv.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)
    assert st.ok and st.prdbc == 512
    w = identify.words(data)
    assert w[100] == SECTORS and w[60] == SECTORS and w[169] & 1              # TRIM on a writable file
    assert data[54:94].rstrip() == identify.ata_string("BHYVE SATA DISK", 40).rstrip()
    pio = L.FIS_PIO_SETUP.parse(rig.drv.received_fis(0)[L.RFIS_PSFIS:L.RFIS_PSFIS + 20])
    assert pio.type == L.FIS_TYPE_PIO_SETUP and pio.e_status == L.STS_OK and pio.transfer_count == 512


@pytest.mark.parametrize("read,write,ext", [(A.READ_DMA, A.WRITE_DMA, False),
                                            (A.READ_DMA_EXT, A.WRITE_DMA_EXT, True),
                                            (A.READ_SECTORS, A.WRITE_SECTORS, False),
                                            (A.READ_MULTIPLE_EXT, A.WRITE_MULTIPLE_EXT, True)])
def test_read_and_write(rig, image, read, write, ext):
    d = rig.drv
    st, data = d.read_into(0, h2d(read, lba=3, count=5), 5 * 512, chunk=1000)
    assert st.ok and st.prdbc == 2560 and data == original(image, 3, 5)
    st = d.write_from(0, h2d(write, lba=SECTORS - 2, count=2), b"w" * 1024, chunk=300)
    assert st.ok and original(image, SECTORS - 2, 2) == b"w" * 1024
    assert original(image, SECTORS - 3, 1) != b"w" * 512
    f = L.FIS_D2H.parse(d.received_fis(0)[L.RFIS_RFIS:L.RFIS_RFIS + 20])
    assert f.pm_i & L.FIS_I and f.status == L.STS_OK and f.count == 2


def test_a_zero_count_is_the_maximum(rig, image):
    st, data = rig.drv.read_into(0, h2d(A.READ_DMA, lba=0, count=0), 256 * 512, chunk=65536)
    assert st.ok and data == original(image, 0, 256)


def test_ncq_read_write_and_fua(rig, image):
    d = rig.drv
    st = d.write_from(0, ncq(A.WRITE_FPDMA_QUEUED, 7, 100, 3, fua=True), b"q" * 1536, slot=7, queued=True)
    assert st.ok and st.sact == 0 and st.ci == 0 and st.is_ & L.IS_SDBS and not st.is_ & L.IS_DHRS
    assert original(image, 100, 3) == b"q" * 1536
    sdb = L.FIS_SDB.parse(d.received_fis(0)[L.RFIS_SDBFIS:L.RFIS_SDBFIS + 8])
    assert sdb.type == L.FIS_TYPE_SDB and sdb.sactive == 1 << 7 and sdb.pm_i_n & L.FIS_I
    st, data = d.read_into(0, ncq(A.READ_FPDMA_QUEUED, 2, 99, 5), 5 * 512, slot=2, queued=True)
    assert st.ok and data == original(image, 99, 5)


def test_many_ncq_commands_at_once_on_the_port_thread(image):
    c = Controller([("hd", FileBlockBackend(image))], threaded=True)
    c.enable_msi(1)
    d = c.up()
    for tag in range(32):
        buf = d.put(bytes([tag]) * 2048)
        d.mem.view(d.table(0, tag), 20)[:] = ncq(A.WRITE_FPDMA_QUEUED, tag, tag * 4, 4)
        d.mem.view(d.table(0, tag) + 0x80, 16)[:] = L.PRD.pack(buf, 0, 2047)
        d.mem.view(d.cmdlist(0) + tag * 32, 16)[:] = L.HEADER.pack(5 | L.HDR_WRITE, 1, 0, d.table(0, tag))
    d.pw(0, L.P_SACT, 0xFFFFFFFF)
    d.pw(0, L.P_CI, 0x0000FFFF)                         # 16 commands, then 16 more while they are served
    d.pw(0, L.P_CI, 0xFFFF0000)
    for tag in range(32):
        d.wait(0, tag, queued=True)
    assert d.pr(0, L.P_SACT) == 0 and c.msis and c.hba.errors == []
    for tag in range(32):
        assert original(image, tag * 4, 4) == bytes([tag]) * 2048
    c.close()


def test_flush_and_write_cache_off(rig, image, monkeypatch):
    calls = []
    backend = rig.hba.ports[0].device.backend
    monkeypatch.setattr(backend, "flush", lambda: calls.append(1))
    assert rig.drv.command(0, 0, h2d(A.FLUSH_CACHE_EXT)).ok and calls == [1]
    assert rig.drv.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_DISABLE_WCACHE)).ok
    assert rig.drv.write_from(0, h2d(A.WRITE_DMA, lba=1, count=1), b"z" * 512).ok and calls == [1, 1]
    _, data = rig.drv.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)
    assert not identify.words(data)[85] & identify.CS_WCACHE


def _ranges(*ranges):
    return b"".join(struct.pack("<Q", lba | n << 48) for lba, n in ranges).ljust(512, b"\0")


def test_trim_by_dsm_and_by_send_fpdma(rig, image):
    d = rig.drv
    st = d.write_from(0, h2d(A.DATA_SET_MANAGEMENT, features=A.DSM_TRIM, count=1), _ranges((10, 2), (40, 1)))
    assert st.ok and original(image, 10, 2) == bytes(1024) and original(image, 40, 1) == bytes(512)
    assert original(image, 12, 1) != bytes(512)
    st = d.write_from(0, ncq(A.SEND_FPDMA_QUEUED, 4, 0, 1, aux=A.DSM_TRIM, subcommand=A.SFQ_DSM),
                      _ranges((50, 3)), slot=4, queued=True)
    assert st.ok and original(image, 50, 3) == bytes(1536)
    before = original(image, 60, 1)
    st = d.write_from(0, h2d(A.DATA_SET_MANAGEMENT, features=A.DSM_TRIM, count=1),
                      _ranges((60, 1), (SECTORS, 1)))
    assert st.is_ & L.IS_TFES and st.error == L.ERR_IDNF and original(image, 60, 1) == before


def test_read_only_image(image):
    c = Controller([("hd", FileBlockBackend(image, readonly=True))])
    d = c.up()
    before = open(image, "rb").read()
    st = d.write_from(0, h2d(A.WRITE_DMA, lba=0, count=1), b"x" * 512)
    assert st.is_ & L.IS_TFES and st.error == L.ERR_ABRT
    d.stop(0)
    _, data = d.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)
    assert not identify.words(data)[169] & 1
    d.stop(0)
    st = d.write_from(0, h2d(A.DATA_SET_MANAGEMENT, features=A.DSM_TRIM, count=1), _ranges((0, 1)))
    assert st.error == L.ERR_ABRT and open(image, "rb").read() == before
    c.close()


def test_errors_out_of_range_and_short_prdt(rig, image):
    d = rig.drv
    st, _ = d.read_into(0, h2d(A.READ_DMA_EXT, lba=SECTORS - 1, count=2), 1024)
    assert st.is_ & L.IS_TFES and st.error == L.ERR_IDNF and st.ci == 1
    d.stop(0)
    before = original(image, 0, 4)
    st = d.command(0, 0, h2d(A.WRITE_DMA, lba=0, count=4), [(d.put(b"s" * 1024), 1024)], write=True)
    assert st.error == L.ERR_ABRT and original(image, 0, 4) == before
    d.stop(0)
    st, data = d.read_into(0, ncq(A.READ_FPDMA_QUEUED, 9, SECTORS, 1), 512, slot=9, queued=True)
    assert st.is_ & L.IS_TFES and st.sact == 1 << 9
    d.stop(0)
    st, log = d.read_into(0, h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), 512)
    assert st.ok and log[0] == 9 and log[2] & L.STS_ERR and log[3] == L.ERR_IDNF and sum(log) % 256 == 0


def test_prdt_outside_ram_is_a_host_bus_fatal_error(rig, image):
    d = rig.drv
    before = original(image, 0, 1)
    st = d.command(0, 0, h2d(A.WRITE_DMA, lba=0, count=1), [(d.put(b"a" * 256), 256), (1 << 40, 256)], write=True)
    assert st.is_ & L.IS_HBFS and st.ci == 1 and d.pr(0, L.P_SERR) & L.SERR_E and st.tfd & L.STS_ERR
    assert original(image, 0, 1) == before
    d.stop(0)
    d.pw(0, L.P_CMD, L.CMD_FRE)
    d.pw(0, L.P_CLB, 0xFFFFFC00)                                    # a command list outside RAM
    d.pw(0, L.P_CMD, L.CMD_FRE | L.CMD_ST)
    d.pw(0, L.P_CI, 1)
    assert d.pr(0, L.P_IS) & L.IS_HBFS


def test_set_features_multiple_and_power(rig):
    d = rig.drv
    assert d.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_SET_XFER, count=identify.XFER_UDMA | 5)).ok
    _, data = d.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)
    assert identify.words(data)[88] == 0x7F | 1 << 13
    assert d.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_SET_XFER, count=identify.XFER_UDMA | 7)).error
    d.stop(0)
    assert d.command(0, 0, h2d(A.SET_MULTIPLE_MODE, count=16)).ok
    assert d.command(0, 0, h2d(A.SET_MULTIPLE_MODE, count=3)).error == L.ERR_ABRT
    d.stop(0)
    assert d.command(0, 0, h2d(A.CHECK_POWER_MODE)).ok
    assert L.FIS_D2H.parse(d.received_fis(0)[L.RFIS_RFIS:L.RFIS_RFIS + 20]).count == 0xFF
    assert d.command(0, 0, h2d(A.STANDBY_IMMEDIATE)).ok and d.command(0, 0, h2d(A.READ_VERIFY_EXT, 0, 5)).ok


def test_read_log_directory_and_send_recv(rig):
    d = rig.drv
    st, page = d.read_into(0, h2d(A.READ_LOG_DMA_EXT, lba=A.LOG_DIRECTORY, count=1), 512)
    assert st.ok and struct.unpack_from("<H", page, 0)[0] == 1 and struct.unpack_from("<H", page, 0x26)[0] == 1
    st, page = d.read_into(0, h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_SEND_RECV, count=1), 512)
    assert st.ok and page[0] == 1 and page[4] == 1
    st, _ = d.read_into(0, h2d(A.READ_LOG_EXT, lba=0x30, count=1), 512)
    assert st.error == L.ERR_ABRT


def test_prdbc_reports_the_bytes_moved(rig):
    d = rig.drv
    st, _ = d.read_into(0, h2d(A.READ_DMA, lba=0, count=2), 1024)
    assert st.prdbc == 1024
    assert os.path.getsize(rig.hba.ports[0].device.backend.path) == SECTORS * 512
