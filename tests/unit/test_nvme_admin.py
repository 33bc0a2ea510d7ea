"""The NVMe controller's registers and admin command set, driven as Linux's ``nvme`` driver would by the test
driver (``bhyve_devices/nvme/testdriver.py``) through the PCI function's BAR 0 over a ``BytesMemory``."""

import pytest

from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import identify as I
from bhyve_devices.nvme import layouts as L
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.pci import NEVER, NvmePci
from bhyve_devices.nvme.testdriver import NvmeDriver

MiB = 1 << 20
RAM = 16 * MiB
CMD = R.SCT_COMMAND


def make(size=MiB, readonly=False, enable=True, **opts):
    mem = BytesMemory(RAM)
    backend = MemoryBlockBackend(bytearray(size), readonly=readonly)
    pci = NvmePci(dict(backend=backend, guest_memory=mem, slot=4, **opts))
    drv = NvmeDriver(pci, mem)
    if enable:
        assert drv.enable() & R.CSTS_RDY
    return pci, drv


def sc(status):
    """(type, code) of a 15-bit status field."""
    return (status >> 8) & 7, status & 0xFF


def test_registers_and_enable():
    pci, drv = make(enable=False, qsz=256)
    cap = R.CAP_REG.parse(drv.r(R.REG_CAP, 8).to_bytes(8, "little"))
    assert (cap.mqes, cap.cqr, cap.css, cap.dstrd, cap.mpsmin, cap.mpsmax) == (255, True, 1, 0, 0, 0)
    assert drv.r(R.REG_CAP) | (drv.r(R.REG_CAP + 4) << 32) == drv.r(R.REG_CAP, 8)
    assert drv.r(R.REG_VS) == 0x00010400 and drv.csts() == 0
    assert drv.enable() == R.CSTS_RDY
    assert drv.r(R.REG_CC) & R.CC_EN and drv.r(R.DOORBELL_BASE) == 0 and drv.r(0x800) == 0
    drv.w(R.REG_CC, 0)
    assert drv.csts() == 0 and pci.ctrl.sqs[0] is None


@pytest.mark.parametrize("how", ["asq outside RAM", "one-entry queue", "8 KiB pages"])
def test_an_enable_that_cannot_work_is_a_fatal_status(how):
    pci, drv = make(enable=False)
    drv.w(R.REG_AQA, 0x000F000F if how != "one-entry queue" else 0)
    drv.w(R.REG_ASQ, RAM + 0x1000 if how == "asq outside RAM" else 0x1000, 8)
    drv.w(R.REG_ACQ, 0x2000, 8)
    drv.w(R.REG_CC, R.CC_EN | ((1 << R.CC_MPS_SHIFT) if how == "8 KiB pages" else 0))
    assert drv.csts() == R.CSTS_CFS
    drv.w(R.DOORBELL_BASE, 1)                           # ignored: not ready
    assert drv.enable() == R.CSTS_RDY and drv.identify(R.CNS_CONTROLLER)[0] == 0


def test_shutdown_flushes_and_completes():
    pci, drv = make()
    drv.w(R.REG_CC, drv.r(R.REG_CC) | (1 << R.CC_SHN_SHIFT))
    assert (drv.csts() >> R.CSTS_SHST_SHIFT) & 3 == R.SHST_COMPLETE and pci.ctrl.backend.flushes == 1
    assert drv.r(R.REG_CC) & R.CC_EN
    drv.w(R.REG_CC, 0)
    assert drv.csts() == 0


def test_identify():
    pci, drv = make(size=8 * MiB, sectsz="4096", ser="SERIAL-1")
    st, data = drv.identify(R.CNS_CONTROLLER)
    c = L.IDENTIFY_CONTROLLER.parse(data)
    assert st == 0 and c.sn == b"SERIAL-1".ljust(20) and c.mn.rstrip() == b"bhyve-NVMe" and c.vid == 0xFB5D
    assert c.oacs & I.OACS_DBBUF and c.sgls & 1 and c.vwc & 1 and c.aerl == I.AERL
    st, data = drv.identify(R.CNS_NAMESPACE, nsid=1)
    n = L.IDENTIFY_NAMESPACE.parse(data)
    assert st == 0 and n.nsze == 2048 and n.lbaf[0].lbads == 12 and n.dlfeat == I.DLFEAT_ZEROES_WZ_DEAC
    st, data = drv.identify(R.CNS_ACTIVE_NSIDS, nsid=0)
    assert st == 0 and data[:8] == b"\1\0\0\0\0\0\0\0"
    assert drv.identify(R.CNS_ACTIVE_NSIDS, nsid=1)[1] == bytes(4096)
    st, data = drv.identify(R.CNS_NS_DESCRIPTORS, nsid=1)
    assert st == 0 and data[0:2] == b"\1\x08" and data[4:12] == n.eui64 and data[12:14] == b"\2\x10"
    for cns, nsid, want in ((R.CNS_NAMESPACE, 2, R.INVALID_NAMESPACE), (R.CNS_NAMESPACE, R.NSID_ALL,
                                                                       R.INVALID_NAMESPACE),
                            (R.CNS_NS_DESCRIPTORS, 0, R.INVALID_NAMESPACE), (0x06, 0, R.INVALID_FIELD),
                            (R.CNS_ACTIVE_NSIDS, R.NSID_ALL, R.INVALID_NAMESPACE)):
        assert drv.identify(cns, nsid=nsid)[0] == want, (cns, nsid)


def test_identify_into_memory_outside_ram_is_a_data_transfer_error():
    pci, drv = make()
    c = drv.admin(R.ADM_IDENTIFY, prp1=RAM - 0x800, prp2=RAM, cdw10=R.CNS_CONTROLLER)
    assert c.status == R.DATA_TRANSFER_ERROR
    c = drv.admin(R.ADM_IDENTIFY, prp1=0x4002, cdw10=R.CNS_CONTROLLER)
    assert c.status == R.PRP_OFFSET_INVALID


@pytest.mark.parametrize("what,cmd,want", [
    ("cq id 0", (R.ADM_CREATE_CQ, 0, 15, 1), (CMD, R.SC_INVALID_QID)),
    ("cq id past maxq", (R.ADM_CREATE_CQ, 5, 15, 1), (CMD, R.SC_INVALID_QID)),
    ("cq of one entry", (R.ADM_CREATE_CQ, 2, 0, 1), (CMD, R.SC_INVALID_QSIZE)),
    ("cq past MQES", (R.ADM_CREATE_CQ, 2, 64, 1), (CMD, R.SC_INVALID_QSIZE)),
    ("cq not contiguous", (R.ADM_CREATE_CQ, 2, 15, 0), (0, R.SC_INVALID_FIELD)),
    ("cq vector past the table", (R.ADM_CREATE_CQ, 2, 15, 1 | (5 << 16)), (CMD, R.SC_INVALID_VECTOR)),
    ("sq without its cq", (R.ADM_CREATE_SQ, 2, 15, 1 | (2 << 16)), (CMD, R.SC_CQ_INVALID)),
    ("sq on the admin cq", (R.ADM_CREATE_SQ, 2, 15, 1), (CMD, R.SC_CQ_INVALID)),
    ("sq id taken", (R.ADM_CREATE_SQ, 1, 15, 1 | (1 << 16)), (CMD, R.SC_INVALID_QID)),
    ("delete the admin sq", (R.ADM_DELETE_SQ, 0, 0, 0), (CMD, R.SC_INVALID_QID)),
    ("delete a missing sq", (R.ADM_DELETE_SQ, 3, 0, 0), (CMD, R.SC_INVALID_QID)),
    ("delete a cq in use", (R.ADM_DELETE_CQ, 1, 0, 0), (CMD, R.SC_INVALID_QUEUE_DELETION)),
    ("delete a missing cq", (R.ADM_DELETE_CQ, 4, 0, 0), (CMD, R.SC_INVALID_QID)),
])
def test_queue_commands_refuse_bad_ids_and_sizes(what, cmd, want):
    pci, drv = make(maxq="4", qsz="64")
    drv.create_io_queues(1, 16)
    op, qid, size, c11 = cmd
    c = drv.admin(op, prp1=drv.a.alloc(0x10000), cdw10=qid | (size << 16), cdw11=c11)
    assert sc(c.status) == want and c.status & R.STATUS_DNR, what


def test_queue_memory_must_be_aligned_ram_and_entry_sizes_set():
    pci, drv = make()
    assert sc(drv.admin(R.ADM_CREATE_CQ, prp1=0x10008, cdw10=1 | (15 << 16), cdw11=1).status) == \
        (0, R.SC_PRP_OFFSET_INVALID)
    assert sc(drv.admin(R.ADM_CREATE_CQ, prp1=RAM - 0x1000, cdw10=1 | (1023 << 16), cdw11=1).status) == \
        (0, R.SC_INVALID_FIELD)
    drv.w(R.REG_CC, R.CC_EN)                            # IOSQES / IOCQES cleared (EN stays set)
    assert sc(drv.admin(R.ADM_CREATE_CQ, prp1=0x20000, cdw10=1 | (15 << 16), cdw11=1).status) == \
        (0, R.SC_INVALID_FIELD)


def test_queues_come_and_go():
    pci, drv = make(maxq="2")
    drv.create_io_queues(2, 16)
    assert drv.write(0, b"x" * 512, qid=2) == 0
    assert drv.admin(R.ADM_DELETE_SQ, cdw10=2).status == 0 and pci.ctrl.sqs[2] is None
    assert drv.admin(R.ADM_DELETE_CQ, cdw10=2).status == 0 and pci.ctrl.cqs[2] is None
    assert drv.create_cq(2, 8) == 0 and drv.create_sq(2, 8) == 0
    assert drv.read(0, 1, qid=2) == (0, b"x" * 512)


def test_number_of_queues():
    pci, drv = make(maxq="8")
    c = drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_NUM_QUEUES, cdw11=1 | (1 << 16))
    assert c.status == 0 and c.dw0 == 1 | (1 << 16)
    assert drv.admin(R.ADM_GET_FEATURES, cdw10=R.FEAT_NUM_QUEUES).dw0 == 1 | (1 << 16)
    assert sc(drv.admin(R.ADM_CREATE_CQ, prp1=drv.a.alloc(4096), cdw10=3 | (15 << 16), cdw11=1).status) == \
        (CMD, R.SC_INVALID_QID)
    drv.create_io_queues(2, 16)
    assert sc(drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_NUM_QUEUES, cdw11=7).status) == (0, R.SC_SEQUENCE_ERROR)
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_NUM_QUEUES, cdw11=0xFFFF).status == R.INVALID_FIELD
    c = drv.admin(R.ADM_GET_FEATURES, cdw10=R.FEAT_NUM_QUEUES | (R.SEL_DEFAULT << 8))
    assert c.dw0 == 7 | (7 << 16)


def test_features():
    pci, drv = make()
    get = lambda fid, sel=0, c11=0: drv.admin(R.ADM_GET_FEATURES, cdw10=fid | (sel << 8), cdw11=c11)  # noqa: E731
    assert get(R.FEAT_WRITE_CACHE).dw0 == 1
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_WRITE_CACHE, cdw11=0).status == 0
    assert get(R.FEAT_WRITE_CACHE).dw0 == 0 and get(R.FEAT_WRITE_CACHE, R.SEL_DEFAULT).dw0 == 1
    assert get(R.FEAT_ERROR_RECOVERY, R.SEL_SUPPORTED).dw0 == R.FEAT_CAP_CHANGEABLE | R.FEAT_CAP_NS_SPECIFIC
    assert get(R.FEAT_TEMP_THRESHOLD).dw0 == I.WCTEMP
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_TEMP_THRESHOLD, cdw11=350).status == 0
    assert get(R.FEAT_TEMP_THRESHOLD).dw0 == 350 and get(R.FEAT_TEMP_THRESHOLD, c11=1 << 20).dw0 == 0
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_IRQ_CONFIG, cdw11=3 | (1 << 16)).status == 0
    assert get(R.FEAT_IRQ_CONFIG, c11=3).dw0 == 3 | (1 << 16) and get(R.FEAT_IRQ_CONFIG, c11=99).status != 0
    assert drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_POWER_MGMT, cdw11=1).status == R.INVALID_FIELD
    assert sc(drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_ARBITRATION | R.FEAT_SAVE).status) == \
        (CMD, R.SC_FEATURE_NOT_SAVEABLE)
    assert sc(drv.admin(R.ADM_SET_FEATURES, nsid=1, cdw10=R.FEAT_ARBITRATION).status) == \
        (CMD, R.SC_FEATURE_NOT_NS_SPECIFIC)
    for fid in (0x0C, 0x0E, 0x0F, 0x80, 0x00):                     # APST, timestamp, keep alive, ...
        assert get(fid).status == R.INVALID_FIELD
        assert drv.admin(R.ADM_SET_FEATURES, cdw10=fid).status == R.INVALID_FIELD


def test_log_pages():
    pci, drv = make()
    drv.create_io_queues(1, 16)
    for _ in range(3):
        assert drv.write(0, bytes(4096)) == 0
    assert drv.read(0, 8)[0] == 0
    st, data = drv.get_log(R.LOG_SMART, 512)
    s = L.SMART_LOG.parse(data)
    assert st == 0 and (s.host_writes, s.host_reads, s.data_units_written, s.data_units_read) == (3, 1, 1, 1)
    assert s.temperature == I.TEMPERATURE and s.avail_spare == 100 and s.power_cycles == 1
    st, data = drv.get_log(R.LOG_FIRMWARE, 64)
    assert st == 0 and data[0] == 1 and data[8:16] == b"1.0     "
    st, data = drv.get_log(R.LOG_EFFECTS, 4096)
    assert st == 0 and L.EFFECTS_LOG.parse(data).iocs[R.NVM_DSM].csupp
    st, tail = drv.get_log(R.LOG_EFFECTS, 8, offset=4 * R.NVM_WRITE + 1024)
    assert st == 0 and tail[:4] == (L.EFFECT_CSUPP | L.EFFECT_LBCC).to_bytes(4, "little")
    assert drv.get_log(R.LOG_SMART, 1024)[1][512:] == bytes(512)             # past the page: zeros
    assert sc(drv.get_log(0x07, 512)[0]) == (CMD, R.SC_INVALID_LOG_PAGE)
    assert drv.get_log(R.LOG_SMART, 512, offset=2)[0] == R.INVALID_FIELD
    assert drv.get_log(R.LOG_SMART, 512, offset=512)[0] == R.INVALID_FIELD
    assert drv.get_log(R.LOG_SMART, 512, nsid=7)[0] == R.INVALID_NAMESPACE
    assert drv.get_log(R.LOG_CHANGED_NS, 4096) == (0, bytes(4096))


def test_admin_commands_take_prps_only_and_no_fusing():
    pci, drv = make()
    buf = drv.a.alloc(4096)
    assert drv.admin(R.ADM_IDENTIFY, prp1=buf, cdw10=1, flags=R.PSDT_SGL << R.FLAGS_PSDT_SHIFT).status == \
        R.INVALID_FIELD
    assert drv.admin(R.ADM_IDENTIFY, prp1=buf, cdw10=1, flags=1).status == R.INVALID_FIELD
    for op in (0x80, 0x10, 0x11, 0x18, 0x81, 0xFF):                 # format, firmware, keep alive, security ...
        assert drv.admin(op).status == R.INVALID_OPCODE
    c = drv.admin(R.ADM_ABORT, cdw10=0 | (5 << 16))
    assert c.status == 0 and c.dw0 & 1


def _aer(drv):
    return drv.submit(0, R.ADM_ASYNC_EVENT)


def test_bad_doorbell_writes_are_asynchronous_events():
    pci, drv = make(maxq="2")
    drv.create_io_queues(1, 16)
    cid = _aer(drv)
    assert drv.reap(0) == []                                        # held
    drv.w(R.DOORBELL_BASE + 2 * 2 * 4, 1)                           # SQ 2 does not exist
    (c,) = drv.reap(0)
    assert c.cid == cid and c.status == 0 and c.dw0 == R.AE_TYPE_ERROR | (R.AE_INFO_INVALID_DOORBELL << 8) | \
        (R.LOG_ERROR << 16)
    cid = _aer(drv)
    drv.w(R.DOORBELL_BASE + 2 * 4, 99)                              # SQ 1 tail past its 16 entries
    assert drv.reap(0) == []                                        # Error events masked until the log is read
    st, log = drv.get_log(R.LOG_ERROR, 128, rae=True)
    entries = [L.ERROR_ENTRY.parse(log[i:i + 64]) for i in (0, 64)]
    assert st == 0 and [e.count for e in entries] == [2, 1] and entries[0].sqid == 0xFFFF
    assert drv.reap(0) == []                                        # RAE kept the mask
    drv.get_log(R.LOG_ERROR, 64)
    (c,) = drv.stray
    assert c.cid == cid and (c.dw0 >> 8) & 0xFF == R.AE_INFO_INVALID_DB_VALUE
    assert pci.ctrl.sqs[1].tail == 0 and drv.write(0, b"y" * 512) == 0     # the bad tail was dropped


def test_a_cq_head_past_what_was_posted_is_an_invalid_value():
    pci, drv = make()
    drv.create_io_queues(1, 16)
    _aer(drv)
    drv.w(R.DOORBELL_BASE + 3 * 4, 5)                               # CQ 1: nothing posted yet
    (c,) = drv.reap(0)
    assert (c.dw0 >> 8) & 0xFF == R.AE_INFO_INVALID_DB_VALUE and pci.ctrl.cqs[1].head == 0
    drv.w(R.DOORBELL_BASE + 0x800, 1)                               # far past the last queue
    assert pci.ctrl.stats["error_entries"] == 2


def test_asynchronous_event_request_limit():
    pci, drv = make()
    cids = [_aer(drv) for _ in range(I.AERL + 1)]
    assert drv.reap(0) == [] and len(cids) == 4
    (c,) = drv.reap(0) or [drv.admin(R.ADM_ASYNC_EVENT)]
    assert sc(c.status) == (CMD, R.SC_AER_LIMIT)


def test_doorbell_buffer_config_changes_the_doorbells_offered():
    pci, drv = make(maxq="3")
    rebinds = []
    pci.ctrl.rebind = lambda: rebinds.append(pci.doorbells(0))
    assert [d[2] for d in pci.doorbells(0)] == [NEVER] * 4
    assert pci.doorbells(4) == []
    assert drv.admin(R.ADM_DOORBELL_BUFFER, prp1=0x10010, prp2=0x20000).status == R.INVALID_FIELD
    assert drv.admin(R.ADM_DOORBELL_BUFFER, prp1=RAM, prp2=0x20000).status == R.INVALID_FIELD
    assert rebinds == []
    drv.create_io_queues(1, 16)
    assert drv.doorbell_buffer() == 0
    assert [[d[:3] for d in r] for r in rebinds] == [[(0x1000, 4, NEVER), (0x1008, 4, None), (0x1010, 4, None),
                                                       (0x1018, 4, None)]]
    assert drv.write(3, b"z" * 512) == 0 and drv.read(3, 1) == (0, b"z" * 512)
    drv.w(R.REG_CC, 0)
    assert len(rebinds) == 2 and [d[2] for d in rebinds[1]] == [NEVER] * 4 and pci.ctrl.shadow is None


def test_linux_bring_up_and_shutdown():
    """The order Linux 6.1's ``nvme_reset_work`` and ``nvme_dev_disable`` go in, with its register access
    widths: CAP as two dwords, CMBSZ, disable, AQA/ASQ/ACQ (low dword first), enable; Identify, the effects log,
    Identify CNS 06h (refused: NVMe 2.0), the SMART log and a temperature threshold (hwmon), Number of Queues, the
    I/O queues (1024 entries: io_queue_depth), Doorbell Buffer Config, the namespace scan, an AER held; at power
    off the I/O queues deleted and a normal shutdown."""
    pci, drv = make(enable=False)
    cap = drv.r(R.REG_CAP) | (drv.r(R.REG_CAP + 4) << 32)
    depth = min((cap & 0xFFFF) + 1, 1024)
    assert drv.r(0x3C) == 0 and drv.r(R.REG_VS) >= 0x10300
    drv.w(R.REG_CC, 0)
    asq, acq = drv.a.alloc(32 * 64), drv.a.alloc(32 * 16)
    drv.w(R.REG_AQA, 31 | (31 << 16))
    for reg, addr in ((R.REG_ASQ, asq), (R.REG_ACQ, acq)):
        drv.w(reg, addr & 0xFFFFFFFF)
        drv.w(reg + 4, addr >> 32)
    drv.w(R.REG_CC, R.CC_EN | (6 << R.CC_IOSQES_SHIFT) | (4 << R.CC_IOCQES_SHIFT))
    assert drv.csts() == R.CSTS_RDY
    from bhyve_devices.nvme.testdriver import _Queue
    drv.sqs[0], drv.cqs[0] = _Queue(0, asq, 32, 0), _Queue(0, acq, 32)
    assert drv.identify(R.CNS_CONTROLLER)[0] == 0
    assert drv.get_log(R.LOG_EFFECTS, 4096, nsid=0)[0] == 0
    assert drv.identify(0x06)[0] == R.INVALID_FIELD
    assert drv.get_log(R.LOG_SMART, 512)[0] == 0
    assert drv.admin(R.ADM_GET_FEATURES, cdw10=R.FEAT_TEMP_THRESHOLD, cdw11=0).dw0 == I.WCTEMP
    c = drv.admin(R.ADM_SET_FEATURES, cdw10=R.FEAT_NUM_QUEUES, cdw11=1 | (1 << 16))
    assert c.status == 0 and c.dw0 == 1 | (1 << 16)
    drv.create_io_queues(2, depth)
    assert depth == 1024 and drv.doorbell_buffer() == 0
    assert drv.identify(R.CNS_ACTIVE_NSIDS)[1][:4] == b"\1\0\0\0"
    assert drv.identify(R.CNS_NS_DESCRIPTORS, nsid=1)[0] == 0 and drv.identify(R.CNS_NAMESPACE, nsid=1)[0] == 0
    drv.submit(0, R.ADM_ASYNC_EVENT)
    assert drv.write(1, b"L" * 512) == 0 and drv.read(1, 1, qid=2) == (0, b"L" * 512)
    for op in (R.ADM_DELETE_SQ, R.ADM_DELETE_CQ):
        for q in (2, 1):
            assert drv.admin(op, cdw10=q).status == 0
    drv.w(R.REG_CC, drv.r(R.REG_CC) | (1 << R.CC_SHN_SHIFT))
    assert (drv.csts() >> R.CSTS_SHST_SHIFT) & 3 == R.SHST_COMPLETE
    assert pci.ctrl.errors == [] and pci.errors == []
