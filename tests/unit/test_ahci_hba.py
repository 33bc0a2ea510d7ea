"""The AHCI HBA's registers and interrupts (``bhyve_devices/ahci/hba.py``, ``port.py``), driven as a guest's
driver does by ``bhyve_devices.ahci.testdriver``: CAP/GHC/PI/VS, GHC.HR, PxCMD's ST/CR/FRE/CLO, a COMRESET's
signature FIS, PxCI/PxSACT only while started, error recovery by clearing ST, INTx's level, MSI per port and
shared, the PCI identity, and an HBA reset while the port's thread is in a transfer."""

import threading
import time

import pytest

from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.ata import IDENTIFY_DEVICE
from bhyve_devices.ahci.pci import ABAR
from bhyve_devices.ahci.testdriver import Controller, h2d
from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.pci import config as C

MiB = 1 << 20


def disk(n=MiB, **kw):
    return MemoryBlockBackend(bytearray(n), **kw)


@pytest.fixture
def ctl():
    c = Controller([("hd", disk()), ("cd", disk(2048 * 16, readonly=True))])
    yield c
    c.close()


def test_pci_identity_and_abar(ctl):
    h = ctl.pci.header()
    assert (h.vendor_id, h.device_id) == (0x8086, 0x2821)
    assert (ctl.pci.get_cfg(C.CLASS, 1), ctl.pci.get_cfg(C.SUBCLASS, 1), ctl.pci.get_cfg(C.PROG_IF, 1)) == (1, 6, 1)
    assert ctl.pci.bars[ABAR].size == 0x2000 and ctl.pci.get_cfg(C.INTR_PIN, 1) == 1
    assert ctl.pci.msi_vectors() == 0 and ctl.pci._msi_nvec == 16


def test_generic_registers(ctl):
    d = ctl.drv
    cap = d.r(L.CAP)
    assert cap & 0x1F == 31 and (cap >> L.CAP_NCS_SHIFT) & 0x1F == 31
    assert cap & L.CAP_S64A and cap & L.CAP_SNCQ and cap & L.CAP_SAM and cap & L.CAP_SCLO
    assert d.r(L.PI) == 0b11 and d.r(L.VS) == 0x10301 and d.r(L.GHC) & L.GHC_AE
    assert ctl.pci.barread(ABAR, L.VS, 2) == 0x0301 and ctl.pci.barread(ABAR, L.VS + 2, 1) == 1
    assert ctl.pci.barread(ABAR, L.CAP, 8) == cap | d.r(L.GHC) << 32
    d.w(L.CAP, 0)
    d.w(L.PI, 0)
    assert d.r(L.CAP) == cap and d.r(L.PI) == 0b11
    assert ctl.pci.barread(ABAR, 0x1FF0, 4) == 0                       # past the last port


def test_port_without_device(ctl):
    d = ctl.drv
    assert d.pr(5, L.P_SSTS) == 0 and d.pr(5, L.P_SIG) == L.SIG_NONE and d.pr(5, L.P_TFD) == L.TFD_NONE
    d.start(5)
    d.issue(5, 0, h2d(IDENTIFY_DEVICE))
    assert d.pr(5, L.P_CI) == 1                                        # nobody takes it


def test_comreset_posts_the_signature(ctl):
    d = ctl.up()
    for port, sig, status in ((0, L.SIG_ATA, L.STS_OK), (1, L.SIG_ATAPI, 0)):
        assert d.pr(port, L.P_SIG) == sig and d.pr(port, L.P_TFD) == (1 << 8) | status
        assert d.pr(port, L.P_SSTS) == 0x133
        f = L.FIS_D2H.parse(d.received_fis(port)[L.RFIS_RFIS:L.RFIS_RFIS + 20])
        assert (f.type, f.count, f.lba0, f.lba1, f.lba2) == (
            L.FIS_TYPE_D2H, sig & 0xFF, (sig >> 8) & 0xFF, (sig >> 16) & 0xFF, sig >> 24)


def test_st_cr_fre_and_stopping_clears_ci_and_sact(ctl):
    d = ctl.drv
    d.init()
    d.pw(0, L.P_CI, 1)
    assert d.pr(0, L.P_CI) == 0                                        # not started: ignored
    d.pw(0, L.P_CLB, 0x12345)
    assert d.pr(0, L.P_CLB) == 0x12000                                 # 1 KiB aligned
    d.start(0)
    cmd = d.pr(0, L.P_CMD)
    assert cmd & L.CMD_ST and cmd & L.CMD_CR and cmd & L.CMD_FRE and cmd & L.CMD_FR
    ctl.hba.ports[0].waitforclear = True                               # hold the port: nothing is served
    d.pw(0, L.P_SACT, 0b110)
    d.pw(0, L.P_CI, 0b110)
    assert d.pr(0, L.P_CI) == 0b110 and d.pr(0, L.P_SACT) == 0b110
    d.pw(0, L.P_CMD, L.CMD_FRE)
    cmd = d.pr(0, L.P_CMD)
    assert not cmd & (L.CMD_ST | L.CMD_CR) and d.pr(0, L.P_CI) == 0 and d.pr(0, L.P_SACT) == 0
    d.pw(0, L.P_CMD, 0)
    assert not d.pr(0, L.P_CMD) & L.CMD_FR


def test_clo_clears_busy(ctl):
    d = ctl.up()
    ctl.hba.ports[0].tfd |= L.STS_BSY
    d.pw(0, L.P_CMD, L.CMD_FRE | L.CMD_ST | L.CMD_CLO)
    assert not d.pr(0, L.P_TFD) & L.STS_BSY and not d.pr(0, L.P_CMD) & L.CMD_CLO


def test_hba_reset_returns_to_defaults(ctl):
    d = ctl.up()
    d.pw(0, L.P_IE, 0xFFFFFFFF)
    d.w(L.GHC, L.GHC_HR)
    assert d.r(L.GHC) == L.GHC_AE and d.r(L.IS) == 0
    assert d.pr(0, L.P_IE) == 0 and d.pr(0, L.P_CMD) == L.CMD_SUD | L.CMD_POD and d.pr(0, L.P_SIG) == L.SIG_ATA


def test_serr_and_is_are_write_one_to_clear(ctl):
    d = ctl.up()
    p = ctl.hba.ports[0]
    p.serr, p.is_ = 0xFF, L.IS_DHRS | L.IS_SDBS
    d.pw(0, L.P_SERR, 0x0F)
    d.pw(0, L.P_IS, L.IS_DHRS)
    assert d.pr(0, L.P_SERR) == 0xF0 and d.pr(0, L.P_IS) == L.IS_SDBS


def test_software_reset_fis_pair(ctl):
    d = ctl.up()
    ctl.hba.ports[1].tfd = 0x7F00 | L.STS_DRDY
    st = d.command(1, 0, h2d(0, control=L.CONTROL_SRST, c=False))
    assert st.ci == 0
    st = d.command(1, 1, h2d(0, control=0, c=False))
    assert st.ci == 0 and d.pr(1, L.P_TFD) == 1 << 8 and d.pr(1, L.P_SIG) == L.SIG_ATAPI


def test_an_error_holds_the_port_until_st_is_cleared(ctl):
    d = ctl.up()
    st = d.command(0, 0, h2d(0x00))                                    # NOP aborts
    assert st.is_ & L.IS_TFES and not st.is_ & L.IS_DHRS and st.ci == 1 and st.error == L.ERR_ABRT
    assert d.pr(0, L.P_CMD) >> L.CMD_CCS_SHIFT & 0x1F == 0
    d.issue(0, 1, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert d.pr(0, L.P_CI) == 0b11                                     # held
    d.stop(0)
    assert d.pr(0, L.P_CI) == 0
    st = d.command(0, 1, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert st.ok and st.ci == 0


def test_intx_follows_is_and_ghc_ie(ctl):
    d = ctl.up()
    assert not ctl.line.level
    d.issue(0, 0, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert ctl.line.level and d.r(L.IS) == 1
    d.pw(0, L.P_IS, 0xFFFFFFFF)
    assert ctl.line.level                                              # IS stays until written
    d.w(L.IS, 1)
    assert not ctl.line.level and d.r(L.IS) == 0
    d.w(L.GHC, L.GHC_AE)
    d.issue(0, 1, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert not ctl.line.level and d.r(L.IS) == 1
    d.w(L.GHC, L.GHC_AE | L.GHC_IE)
    assert ctl.line.level


def test_intx_is_reasserted_when_a_port_is_still_pending(ctl):
    d = ctl.up()
    d.issue(0, 0, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    d.w(L.IS, 1)                                                       # PxIS not cleared: still pending
    assert ctl.line.level and d.r(L.IS) == 1


def test_single_msi_is_shared_and_not_lost():
    c = Controller([("hd", disk()), ("hd", disk())])
    c.enable_msi(1)
    d = c.up()
    d.issue(0, 0, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    d.issue(1, 0, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert c.msis == [0x40, 0x40] and not c.line.level
    d.pw(0, L.P_IS, 0xFFFFFFFF)
    d.issue(0, 1, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert len(c.msis) == 2                                            # port 0's IS bit is still set
    d.w(L.IS, 0b01)                                                    # the handler's end: port 0 pending again
    assert len(c.msis) == 3
    d.pw(0, L.P_IS, 0xFFFFFFFF)
    d.pw(1, L.P_IS, 0xFFFFFFFF)
    d.w(L.IS, 0b11)
    assert len(c.msis) == 3 and d.r(L.IS) == 0
    c.close()


def test_msi_vector_per_port():
    c = Controller({0: ("hd", disk()), 3: ("hd", disk()), 20: ("hd", disk())})
    c.enable_msi(16)
    d = c.up()
    for port in (0, 3, 20):
        d.issue(port, 0, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert c.msis == [0x40, 0x43, 0x4F]                                # port 20 shares the last vector
    d.pw(3, L.P_IS, 0xFFFFFFFF)
    d.issue(3, 1, h2d(IDENTIFY_DEVICE), [(d.alloc(512), 512)])
    assert c.msis[-1] == 0x43                                          # its own vector: always sent
    c.close()


class _Slow(MemoryBlockBackend):
    """A backend whose reads wait until ``go`` is set."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.started, self.go = threading.Event(), threading.Event()

    def preadv_full(self, segs, offset, total=None):
        self.started.set()
        self.go.wait(5)
        return super().preadv_full(segs, offset, total)


def test_a_reset_while_a_command_is_served_drops_its_ending():
    """threaded: GHC.HR while the port's thread reads; the stale ending posts nothing and CR clears after it."""
    slow = _Slow(bytearray(1 << 20))
    c = Controller([("hd", slow)], threaded=True)
    d = c.up()
    d.issue(0, 0, h2d(0xC8, lba=0, count=1), [(d.alloc(512), 512)])      # READ DMA
    assert slow.started.wait(5)
    assert d.pr(0, L.P_CMD) & L.CMD_CR and d.pr(0, L.P_TFD) & L.STS_BSY
    assert d.r(L.VS) == 0x10301                                         # registers answer meanwhile
    d.w(L.GHC, L.GHC_HR)
    assert d.pr(0, L.P_CMD) & L.CMD_CR                                  # still in flight
    d.w(L.GHC, L.GHC_AE | L.GHC_IE)
    slow.go.set()
    for _ in range(500):
        if not d.pr(0, L.P_CMD) & L.CMD_CR:
            break
        time.sleep(0.01)
    assert not d.pr(0, L.P_CMD) & L.CMD_CR and d.pr(0, L.P_IS) == 0 and d.pr(0, L.P_CI) == 0
    assert not c.line.level and c.hba.errors == []
    d.start(0)
    st, _ = d.read_into(0, h2d(0xC8, lba=0, count=1), 512)
    assert st.ok
    c.close()
