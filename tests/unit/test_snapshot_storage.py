"""Snapshot and restore (issue 23) of NVMe (AHCI: ``test_snapshot_ahci.py``, which shares the helpers here): it is
brought up by its test driver, its state goes through JSON into a fresh device of the same configuration over the
same guest memory and image, and the same driver goes on: new I/O completes, data reads back, registers read the same; commands issued
and not yet taken are served after the restore; bad states are refused with SnapshotError."""

import copy
import json
import os
import struct

import pytest

from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.admin import IRQ_CD
from bhyve_devices.nvme.pci import NEVER, NvmePci
from bhyve_devices.nvme.testdriver import NvmeDriver
from bhyve_devices.snapshot import SnapshotError, Snapshottable
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
