"""Snapshot and restore (issue 23) of AHCI: the controller brought up by its test driver, its state through JSON
into a fresh controller over the same guest memory and image, and the same driver goes on (new NCQ and DMA I/O,
slots issued and not yet taken, a CD's sense data and lock); ``quiesced()`` waits for a command being served; bad
states are refused with SnapshotError. NVMe and the shared helpers: ``test_snapshot_storage.py``."""

import copy
import os
import threading

import pytest

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import atapi as P
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.testdriver import Controller, h2d, ncq
from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.snapshot import Quiescent, SnapshotError, Snapshottable
from tests.unit.test_snapshot_storage import (SECTORS, _set, image, on_disk,  # noqa: F401 (image: a fixture)
                                              through_json)
from vmmshim.backends.block import FileBlockBackend


# -- AHCI -------------------------------------------------------------------------------------------------------------
class Rig:
    """A Controller, and a fresh one over the same memory and images to restore into (the same driver object
    goes on with it)."""

    def __init__(self, ports, threaded=False):
        self.ports, self.threaded = ports, threaded
        self.c = Controller([make() for make in ports], threaded=threaded)
        self.drv = self.c.up()

    def fresh(self):
        c = Controller([make() for make in self.ports], threaded=self.threaded)
        c.mem = c.drv.mem = self.c.mem
        c.pci.set_memory(self.c.mem)
        return c

    def restore(self, state, close=True):
        """Restores ``state`` into a fresh controller and moves the driver (and the recorders) onto it."""
        old = self.c
        new = self.fresh()
        new.pci.restore(state, 0)
        if close:
            old.close()
        new.drv = self.drv
        self.drv.pci = new.pci
        new.line, new.msis = old.line, old.msis
        new.pci.intx_line = old.line
        new.pci.msi = lambda addr, data: old.msis.append(data)
        self.c = new
        return new


def port_regs(drv, port):
    return [drv.pr(port, reg) for reg in range(0, 0x40, 4)]


def hba_regs(drv):
    return [drv.r(off) for off in range(0, 0x20, 4)]


def test_ahci_disk_goes_on_after_restore(image):
    rig = Rig([lambda: ("hd", FileBlockBackend(image))])
    d = rig.drv
    assert isinstance(rig.c.pci, Quiescent) and isinstance(rig.c.pci, Snapshottable)
    data = os.urandom(8 * 512)
    assert d.write_from(0, h2d(A.WRITE_DMA_EXT, lba=10, count=8), data).ok
    assert d.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_DISABLE_WCACHE)).ok
    assert d.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_DISABLE_LOOKAHEAD)).ok
    assert d.command(0, 0, h2d(A.SET_MULTIPLE_MODE, count=16)).ok
    assert d.command(0, 0, h2d(A.SET_FEATURES, features=A.SF_SET_XFER, count=0x44)).ok
    st = d.command(0, 1, h2d(A.READ_DMA_EXT, lba=SECTORS, count=1), [(d.alloc(512), 512)])   # an error
    assert st.is_ & L.IS_TFES
    d.stop(0)
    st, back = d.read_into(0, ncq(A.READ_FPDMA_QUEUED, 3, 10, 8), 8 * 512, slot=3, queued=True)
    assert st.ok and back == data
    ident = d.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)[1]
    before = port_regs(d, 0), hba_regs(d), d.received_fis(0)
    dev = rig.c.hba.ports[0].device
    assert not dev.write_cache and dev.error_log is not None

    state = through_json(rig.c.pci.snapshot())
    assert state["device"] == "AhciPci" and state["ahci"]["ports"][0]["device"]["multiple"] == 16
    new = rig.restore(state)
    assert new.pci.snapshot() == state
    assert (port_regs(d, 0), hba_regs(d), d.received_fis(0)) == before
    dev2 = new.hba.ports[0].device
    assert (dev2.write_cache, dev2.lookahead, dev2.multiple, dev2.xfer) == (False, False, 16, 0x44)
    assert d.read_into(0, h2d(A.IDENTIFY_DEVICE), 512)[1] == ident
    more = os.urandom(4 * 512)
    assert d.write_from(0, ncq(A.WRITE_FPDMA_QUEUED, 5, 100, 4), more, slot=5, queued=True).ok
    assert on_disk(image, 100 * 512, len(more)) == more
    st, back = d.read_into(0, h2d(A.READ_DMA_EXT, lba=10, count=8), 8 * 512, slot=7)
    assert st.ok and st.prdbc == 8 * 512 and back == data
    st, log = d.read_into(0, h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), 512)
    assert st.ok and log[0] == A.NCQ_ERROR_NQ and log[3] == L.ERR_IDNF      # the error before the checkpoint
    assert new.hba.errors == []
    new.close()


def test_ahci_issued_slots_are_served_after_restore(image):
    """Slots in PxCI the engine had not taken at the checkpoint (a threaded HBA held by ``quiesced``)."""
    rig = Rig([lambda: ("hd", FileBlockBackend(image))], threaded=True)
    d = rig.drv
    data = os.urandom(512)
    assert d.write_from(0, h2d(A.WRITE_DMA, lba=7, count=1), data).ok
    buf = d.alloc(512)
    with rig.c.pci.quiesced():
        d.issue(0, 2, h2d(A.READ_DMA, lba=7, count=1), [(buf, 512)])
        d.issue(0, 4, ncq(A.READ_FPDMA_QUEUED, 4, 7, 1), [(buf + 4096, 512)], queued=True)
        assert d.pr(0, L.P_CI) == 0b10100 and d.pr(0, L.P_SACT) == 0b10000
        state = through_json(rig.c.pci.snapshot())
        rig.c.close()                               # the old controller never serves them
    assert state["ahci"]["ports"][0]["ci"] == 0b10100 and d.get(buf, 512) == bytes(512)
    rig.restore(state, close=False)
    assert d.wait(0, 2).ok and d.wait(0, 4, queued=True).ok
    assert d.get(buf, 512) == data and d.get(buf + 4096, 512) == data
    rig.c.close()


def test_ahci_quiesced_waits_for_the_command_being_served(image):
    gate, entered = threading.Event(), threading.Event()
    rig = Rig([lambda: ("hd", FileBlockBackend(image))], threaded=True)
    d = rig.drv
    backend = rig.c.hba.ports[0].device.backend
    real = backend.preadv_full

    def slow(*a):
        entered.set()
        gate.wait(5)
        return real(*a)

    backend.preadv_full = slow
    d.issue(0, 0, h2d(A.READ_DMA, lba=0, count=1), [(d.alloc(512), 512)])
    assert entered.wait(5)
    with pytest.raises(SnapshotError, match="port 0: the command in slot 0 is being served"):
        rig.c.pci.snapshot()
    threading.Timer(0.05, gate.set).start()
    with rig.c.pci.quiesced():
        state = rig.c.pci.snapshot()
    assert state["ahci"]["ports"][0]["ci"] == 0 and d.wait(0, 0).ok
    rig.c.close()


def test_ahci_cd_and_two_ports_after_restore(image):
    blocks = bytearray(b"".join(bytes([i]) * 2048 for i in range(40)))
    rig = Rig([lambda: ("hd", FileBlockBackend(image)), lambda: ("cd", MemoryBlockBackend(blocks, readonly=True))])
    rig.c.enable_msi(2)
    d = rig.drv

    def packet(acmd, n=2048):
        st, data = d.read_into(1, h2d(A.PACKET, features=1), n, acmd=acmd)
        if st.is_ & L.IS_TFES:
            d.stop(1)
        return st, data

    cdb = lambda *b: bytes(b).ljust(12, b"\0")     # noqa: E731
    assert packet(cdb(P.PREVENT_ALLOW, 0, 0, 0, 1))[0].ok
    assert not packet(cdb(P.READ_10, 0, 0, 0, 0, 100, 0, 0, 1))[0].ok          # past the end: sense kept
    assert d.command(1, 0, h2d(A.SET_FEATURES, features=A.SF_SET_XFER, count=0x42)).ok
    before = port_regs(d, 0), port_regs(d, 1), hba_regs(d)
    state = through_json(rig.c.pci.snapshot())
    assert state["ahci"]["ports"][1]["device"]["sense"] == [P.ILLEGAL_REQUEST, P.ASC_LBA_OUT_OF_RANGE, 0]
    new = rig.restore(state)
    assert (port_regs(d, 0), port_regs(d, 1), hba_regs(d)) == before
    st, sense = packet(cdb(P.REQUEST_SENSE, 0, 0, 0, 18), 18)
    assert st.ok and (sense[2], sense[12]) == (P.ILLEGAL_REQUEST, P.ASC_LBA_OUT_OF_RANGE)
    st, _ = packet(cdb(P.START_STOP_UNIT, 0, 0, 0, 2))                       # eject: still locked
    assert not st.ok and new.hba.ports[1].device.medium and new.hba.ports[1].device.xfer == 0x42
    st, blk = packet(cdb(P.READ_10, 0, 0, 0, 0, 5, 0, 0, 1))
    assert st.ok and blk == bytes([5]) * 2048
    msis = len(rig.c.msis)
    st, back = d.read_into(0, h2d(A.READ_DMA, lba=3, count=2), 1024)
    assert st.ok and back == on_disk(image, 3 * 512, 1024) and rig.c.msis[msis:] == [0x40]    # port 0's vector
    assert new.hba.errors == []
    new.close()


AHCI_BAD = [
    (("version",), 2, "version"),
    (("device",), "AhciCdPci", "saved by AhciCdPci"),
    (("ahci",), KeyError, "no ahci"),
    (("ahci", "ports"), [], "32 port states"),
    (("ahci", "ghc"), 1, "GHC"),
    (("ahci", "is_"), 1 << 32, "IS"),
    (("ahci", "intx"), 1, "intx"),
    (("ahci", "ports", 0, "ci"), KeyError, "no ci"),
    (("ahci", "ports", 0, "ci"), 1 << 32, "ci"),
    (("ahci", "ports", 0, "clb"), 0x10001, "clb"),
    (("ahci", "ports", 0, "ie"), 1 << 29 | 1 << 9, "ie"),
    (("ahci", "ports", 0, "tfd"), 1 << 16, "tfd"),
    (("ahci", "ports", 0, "next_slot"), 32, "next_slot"),
    (("ahci", "ports", 0, "fisbase"), -1, "fisbase"),
    (("ahci", "ports", 0, "cmd"), 0, "with PxCMD.ST clear"),
    (("ahci", "ports", 0, "device", "multiple"), 3, "multiple"),
    (("ahci", "ports", 0, "device", "xfer"), 0x47, "transfer mode"),
    (("ahci", "ports", 0, "device", "write_cache"), 1, "write_cache"),
    (("ahci", "ports", 0, "device", "error_log"), [1, 2, 3, "00"], "bytes"),
    (("ahci", "ports", 0, "device"), None, "not a mapping"),
    (("ahci", "config", "devices"), [["atapi", SECTORS]], "saved by a controller"),
]


@pytest.mark.parametrize("path,value,match", AHCI_BAD, ids=[f"{'.'.join(map(str, p))}={v!r:.12}"
                                                            for p, v, _ in AHCI_BAD])
def test_ahci_refuses_a_bad_state(image, path, value, match):
    rig = Rig([lambda: ("hd", FileBlockBackend(image))])
    d = rig.drv
    d.issue(0, 1, h2d(A.FLUSH_CACHE), go=False)
    with rig.c.pci.quiesced():
        d.go(0, 1)                                  # issued, not taken: PxCI 2 in the state
        state = through_json(rig.c.pci.snapshot())
    assert state["ahci"]["ports"][0]["ci"] == 2
    fresh = rig.fresh()
    fresh.pci.restore(copy.deepcopy(state), 0)      # the good one is taken (and its slot served)
    assert fresh.drv.pr(0, L.P_CI) == 0
    bad = rig.fresh()
    with pytest.raises(SnapshotError, match=match):
        bad.pci.restore(_set(state, path, value), 0)
    assert bad.drv.pr(0, L.P_CMD) & L.CMD_ST == 0 and bad.hba.ghc == L.GHC_AE        # untouched
    for c in (rig.c, fresh, bad):
        c.close()


def test_ahci_cd_refuses_a_bad_sense(image):
    blocks = bytearray(2048 * 4)
    make = [lambda: ("cd", MemoryBlockBackend(blocks, readonly=True))]
    rig = Rig(make)
    state = through_json(rig.c.pci.snapshot())
    for path, value, match in ((("ahci", "ports", 0, "device", "sense"), [16, 0, 0], "sense"),
                               (("ahci", "ports", 0, "device", "event"), 1, "media event"),
                               (("ahci", "ports", 0, "device", "medium"), "yes", "medium")):
        with pytest.raises(SnapshotError, match=match):
            rig.fresh().pci.restore(_set(state, path, value), 0)
    rig.fresh().pci.restore(state, 0)
    rig.c.close()
