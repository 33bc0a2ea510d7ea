"""Snapshot and restore (issue 23) of the storage controllers, NVMe and AHCI: each is brought up by its test
driver, its state goes through JSON into a fresh device of the same configuration over the same guest memory and
image, and the same driver goes on: new I/O completes, data reads back, registers read the same; commands issued
and not yet taken are served after the restore; bad states are refused with SnapshotError."""

import copy
import json
import os
import struct
import threading

import pytest

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import atapi as P
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.testdriver import Controller, h2d, ncq
from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.admin import IRQ_CD
from bhyve_devices.nvme.pci import NEVER, NvmePci
from bhyve_devices.nvme.testdriver import NvmeDriver
from bhyve_devices.snapshot import Quiescent, SnapshotError, Snapshottable
from vmmshim.backends.block import FileBlockBackend

MiB = 1 << 20
RAM = 32 * MiB
SECTORS = 2048


def through_json(state):
    back = json.loads(json.dumps(state))
    assert back == state
    return back


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(SECTORS * 512))
    return str(p)


def on_disk(path, off, n):
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


# -- NVMe -------------------------------------------------------------------------------------------------------------
NVME_OPTS = dict(slot=4, maxq="4", qsz="64")


def nvme(image, mem):
    return NvmePci(dict(backend=FileBlockBackend(image), guest_memory=mem, **NVME_OPTS))


def nvme_up(image, shadow=False):
    mem = BytesMemory(RAM)
    pci = nvme(image, mem)
    drv = NvmeDriver(pci, mem)
    assert drv.enable() == R.CSTS_RDY
    drv.enable_msix()
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_NUM_QUEUES, cdw11=0x00020002).dw0 == 0x00020002
    drv.create_io_queues(2, 16)
    return mem, pci, drv


def nvme_move_to(drv, pci2):
    """The driver's hooks onto ``pci2`` (what the VM's wiring does for the restored function)."""
    drv.pci = pci2
    pci2.msi = lambda addr, data: drv.msis.append(data)
    pci2.intx_line = drv.intx


def feature(drv, fid, cdw11=0):
    c = drv.admin(R.ADM_GET_FEATURES, cdw10=fid, cdw11=cdw11)
    assert c.status == 0
    return c.dw0


def bad_doorbell(drv):
    """A write to the doorbell of submission queue 3, which does not exist: an Error event."""
    drv.w(R.DOORBELL_BASE + 2 * 3 * R.DOORBELL_STRIDE, 1)


@pytest.mark.parametrize("shadow", [False, True])
def test_nvme_goes_on_after_restore(image, shadow):
    mem, pci, drv = nvme_up(image)
    assert pci.ctrl is not None and isinstance(pci, Snapshottable)
    for fid, value in ((R.FEAT_WRITE_CACHE, 0), (R.FEAT_TEMP_THRESHOLD, 300), (R.FEAT_IRQ_CONFIG, 2 | IRQ_CD),
                       (R.FEAT_ARBITRATION, 0x0303), (R.FEAT_ASYNC_EVENT_CONFIG, 0xFF)):
        assert drv.admin(R.ADM_SET_FEATURES, cdw10=fid, cdw11=value).status == 0
    data = {}
    for i in range(21):                     # queue 1's completion queue wraps: phase tag 0 from then on
        data[i] = os.urandom(1024)
        assert drv.write(2 * i, data[i], qid=1) == 0
    assert drv.read(0, 2, qid=2) == (0, data[0])
    if shadow:
        assert drv.doorbell_buffer() == 0 and pci.ctrl.shadow is not None
        assert drv.write(100, b"s" * 512, qid=2) == 0
    aer1 = drv.submit(0, R.ADM_ASYNC_EVENT)
    bad_doorbell(drv)
    (c,) = drv.reap(0)
    assert c.cid == aer1 and (c.dw0 >> 8) & 0xFF == R.AE_INFO_INVALID_DOORBELL
    aer2 = drv.submit(0, R.ADM_ASYNC_EVENT)            # outstanding at the checkpoint
    assert drv.reap(0) == []
    assert pci.ctrl.cqs[1].phase == 0 and pci.ctrl._aers == [aer2] and pci.ctrl._masked == {R.AE_TYPE_ERROR}
    regs = [drv.r(off) for off in range(0, 0x40, 4)]
    smart = drv.get_log(R.LOG_SMART, 512)

    state = through_json(pci.snapshot())
    assert state["device"] == "NvmePci" and state["nvme"]["aers"] == [aer2]
    pci.close()
    pci2 = nvme(image, mem)
    rebinds = []
    pci2.ctrl.rebind = lambda: rebinds.append([d[2] for d in pci2.doorbells(0)])
    nvme_move_to(drv, pci2)
    pci2.restore(state, 0)
    assert pci2.snapshot() == state
    assert rebinds == ([[NEVER, None, None, None, None]] if shadow else [])
    assert [drv.r(off) for off in range(0, 0x40, 4)] == regs
    assert drv.get_log(R.LOG_SMART, 512) == smart

    # the queues go on: phase tags, CIDs, the MSI-X vector of each queue
    new = os.urandom(4096)
    msis = len(drv.msis)
    assert drv.write(200, new, qid=2) == 0 and drv.msis[msis:] == [2]
    assert drv.read(200, 8, qid=1) == (0, new) and drv.msis[-1] == 1
    assert on_disk(image, 200 * 512, 4096) == new
    for i in (0, 7, 20):
        assert drv.read(2 * i, 2, qid=1) == (0, data[i])
    assert pci2.ctrl.cqs[1].phase == 0
    # the features set before the checkpoint
    assert feature(drv, R.FEAT_WRITE_CACHE) == 0 and feature(drv, R.FEAT_TEMP_THRESHOLD) == 300
    assert feature(drv, R.FEAT_IRQ_CONFIG, 2) == 2 | IRQ_CD and feature(drv, R.FEAT_ARBITRATION) == 0x0303
    assert feature(drv, R.FEAT_NUM_QUEUES) == 0x00020002
    # the Error type stays masked; reading the error log unmasks it and the outstanding AER reports it
    bad_doorbell(drv)
    assert drv.reap(0) == []
    st, log = drv.get_log(R.LOG_ERROR, 64 * 16)
    assert st == 0 and struct.unpack_from("<Q", log, 0)[0] == 2 and struct.unpack_from("<Q", log, 64)[0] == 1
    (ev,) = drv.stray
    assert ev.cid == aer2 and (ev.dw0 >> 8) & 0xFF == R.AE_INFO_INVALID_DOORBELL and drv.msis[-1] == 0
    assert pci2.ctrl.errors == [] and pci2.errors == []
    pci2.close()


def test_nvme_commands_not_yet_fetched_are_served_after_restore(image):
    """The doorbell rang but the doorbell thread had not served it (the checkpoint holds it): the tail is state."""
    mem, pci, drv = nvme_up(image)
    rung = []
    pci.ring_with(lambda bar, y: rung.append(y))
    buf = drv.a.alloc(4096)
    drv.a.write(buf, b"q" * 1024)
    cid = drv.submit(1, R.NVM_WRITE, nsid=1, prp1=buf, cdw10=40, cdw12=1)
    assert rung == [1] and drv.reap(1) == []
    state = through_json(pci.snapshot())
    assert state["nvme"]["sqs"][1]["tail"] != state["nvme"]["sqs"][1]["head"]
    pci.close()
    pci2 = nvme(image, mem)
    nvme_move_to(drv, pci2)
    pci2.restore(state, 0)
    pci2.ctrl.rang(1)                               # what the VM's ring_all does when it starts
    (c,) = drv.reap(1)
    assert (c.cid, c.status, c.sqid) == (cid, 0, 1) and on_disk(image, 40 * 512, 1024) == b"q" * 1024
    pci2.close()


def test_nvme_intx_and_intms_after_restore(image):
    """Without MSI-X: INTMS and the level of INTx (a completion the host has not consumed) come back."""
    mem = BytesMemory(RAM)
    pci = nvme(image, mem)
    drv = NvmeDriver(pci, mem)
    drv.enable()
    drv.create_io_queues(1, 8)
    drv.submit(1, R.NVM_FLUSH, nsid=1)
    assert pci.intx_line is drv.intx and drv.intx.level
    state = through_json(pci.snapshot())
    assert state["pci"]["intx_asserted"]
    pci2 = nvme(image, mem)
    nvme_move_to(drv, pci2)
    pci2.restore(state, 0)
    assert drv.intx.level
    drv.reap(1)
    assert not drv.intx.level
    drv.w(R.REG_INTMS, 1)
    state2 = through_json(pci2.snapshot())
    pci3 = nvme(image, mem)
    nvme_move_to(drv, pci3)
    pci3.restore(state2, 0)
    assert drv.r(R.REG_INTMS) == 1 and drv.r(R.REG_INTMC) == 1
    for p in (pci, pci2, pci3):
        p.close()


def test_nvme_refuses_while_serving(image):
    mem, pci, drv = nvme_up(image)
    pci.ctrl._serving = True
    with pytest.raises(SnapshotError, match="being served"):
        pci.snapshot()
    pci.ctrl._serving = False
    pci.snapshot()
    pci.close()


def _set(state, path, value):
    s = copy.deepcopy(state)
    d = s
    for k in path[:-1]:
        d = d[k]
    if value is KeyError:
        del d[path[-1]]
    else:
        d[path[-1]] = value
    return s


NVME_BAD = [
    (("version",), 99, "version"),
    (("device",), "AhciPci", "saved by AhciPci"),
    (("nvme",), KeyError, "no nvme"),
    (("msi_pending",), KeyError, "no msi_pending"),
    (("nvme", "cqs"), KeyError, "no cqs"),
    (("nvme", "cqs", 1, "head"), 16, "head"),
    (("nvme", "cqs", 1, "phase"), 2, "phase"),
    (("nvme", "cqs", 1, "iv"), 5, "vector"),
    (("nvme", "cqs", 1, "base"), RAM, "not in guest memory"),
    (("nvme", "cqs", 1, "base"), 0x10008, "page aligned"),
    (("nvme", "cqs", 1, "size"), 65, "size"),
    (("nvme", "sqs", 1, "tail"), -1, "tail"),
    (("nvme", "sqs", 2, "cqid"), 3, "posts to completion queue 3"),
    (("nvme", "sqs", 1, "qid"), 2, "saved as queue 2"),
    (("nvme", "sqs"), [None] * 4, "list of 5"),
    (("nvme", "csts"), 0x10, "CSTS"),
    (("nvme", "csts"), 0, "RDY"),
    (("nvme", "cc"), 1 << 31, "CC"),
    (("nvme", "asq"), 0x123, "ASQ"),
    (("nvme", "aers"), [1, 2, 3, 4, 5], "at most 4"),
    (("nvme", "aers"), [1 << 16], "aers"),
    (("nvme", "nsq"), 1, "beyond the 1 granted"),
    (("nvme", "features", "6"), KeyError, "features"),
    (("nvme", "features", "6"), "x", "feature 6"),
    (("nvme", "events"), [[0, 1]], "list of 3"),
    (("nvme", "error_entries"), [{"count": 1}], "error log entry"),
    (("nvme", "shadow"), [0x10001, 0x20000], "page aligned"),
    (("nvme", "stats", "reads"), -1, "stats.reads"),
    (("nvme", "config", "maxq"), 8, "saved by a controller"),
    (("pci", "cfg"), "zz", "hex"),
    (("msi_pending",), 1 << 32, "msi_pending"),
]


@pytest.mark.parametrize("path,value,match", NVME_BAD, ids=[f"{'.'.join(map(str, p))}={v!r:.12}"
                                                            for p, v, _ in NVME_BAD])
def test_nvme_refuses_a_bad_state(image, path, value, match):
    mem, pci, drv = nvme_up(image)
    drv.submit(0, R.ADM_ASYNC_EVENT)
    state = through_json(pci.snapshot())
    pci2 = nvme(image, mem)
    pci2.restore(copy.deepcopy(state), 0)           # the good one is taken
    pci3 = nvme(image, mem)
    with pytest.raises(SnapshotError, match=match):
        pci3.restore(_set(state, path, value), 0)
    assert pci3.ctrl.csts == 0 and pci3.ctrl.sqs[0] is None and pci3.ctrl._aers == []   # untouched
    for p in (pci, pci2, pci3):
        p.close()


def test_nvme_refuses_another_configuration(image):
    mem, pci, drv = nvme_up(image)
    state = through_json(pci.snapshot())
    other = NvmePci(dict(backend=FileBlockBackend(image), guest_memory=mem, slot=4, maxq="4", qsz="64",
                         sectsz="4096"))
    with pytest.raises(SnapshotError, match="saved by a controller"):
        other.restore(state, 0)
    for p in (pci, other):
        p.close()


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
