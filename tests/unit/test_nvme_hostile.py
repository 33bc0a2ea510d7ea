"""The NVMe controller against hostile input (issue 21): hypothesis drives it through the test driver with random
admin and I/O commands (bogus queue ids and sizes, bad PRPs and SGLs, data pointers outside guest RAM, LBA ranges
past the namespace), random doorbell writes and register writes. Whatever comes: no exception escapes and the
controller records no internal error, every command gets one completion (with a valid phase tag), no access
leaves guest RAM (``BytesMemory`` raises for any), a failed write changes nothing in the image, no sector outside
what a successful write, Write Zeroes or deallocation named ever changes, and a read-only image never changes."""

import os
import struct

from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.pci import NvmePci
from bhyve_devices.nvme.testdriver import PAGE, NvmeDriver

MiB = 1 << 20
RAM = 4 * MiB
SANDBOX = 2 * MiB                   # the driver's own structures stay below; hostile pointers land above
SECTORS = 256
INITIAL = os.urandom(SECTORS * 512)

addresses = st.one_of(st.sampled_from([0, 4, 0x800, RAM - 8, RAM - PAGE, RAM, RAM + PAGE, 1 << 40, 2**64 - 8,
                                       2**64 - 1]),
                      st.integers(SANDBOX, RAM).map(lambda a: a & ~3), st.integers(SANDBOX, RAM),
                      st.integers(0, 2**64 - 1))
dwords = st.one_of(st.sampled_from([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))
admin_ops = st.sampled_from([R.ADM_DELETE_SQ, R.ADM_CREATE_SQ, R.ADM_GET_LOG_PAGE, R.ADM_DELETE_CQ,
                             R.ADM_CREATE_CQ, R.ADM_IDENTIFY, R.ADM_ABORT, R.ADM_SET_FEATURES, R.ADM_GET_FEATURES,
                             R.ADM_DOORBELL_BUFFER, 0x80, 0xC0])
io_ops = st.one_of(st.sampled_from([R.NVM_READ, R.NVM_WRITE]),
                   st.sampled_from([R.NVM_FLUSH, R.NVM_WRITE_ZEROES, R.NVM_DSM, 0x05, 0x81]))
flags = st.one_of(st.just(0), st.just(R.PSDT_SGL << R.FLAGS_PSDT_SHIFT), st.sampled_from([0x80, 0xC0, 1, 2]),
                  st.integers(0, 255))
nsids = st.one_of(st.just(1), st.sampled_from([0, 2, R.NSID_ALL]))
pages = st.one_of(st.integers(SANDBOX // PAGE, RAM // PAGE - 1).map(lambda p: p * PAGE), addresses)

admin_cmd = st.tuples(st.just("admin"), admin_ops, st.integers(0, 255), dwords, addresses, addresses, dwords,
                      dwords, dwords, dwords)
io_cmd = st.tuples(st.just("io"), io_ops, flags, nsids, pages, pages, st.integers(0, SECTORS + 8),
                   st.integers(0, 40), st.integers(0, 3), st.integers(0, 7))
good_write = st.tuples(st.just("write"), st.integers(0, SECTORS - 1), st.integers(1, 16), st.booleans(),
                       st.integers(1, 3))
doorbell = st.tuples(st.just("doorbell"), st.integers(0, 0x3000 // 4 - 1), dwords, st.sampled_from([4, 4, 2, 8]))
register = st.tuples(st.just("register"), st.sampled_from([R.REG_INTMS, R.REG_INTMC, R.REG_NSSR, R.REG_CSTS,
                                                           R.REG_CAP, R.REG_AQA, 0x3C, 0x50]), dwords)
commands = st.lists(st.one_of(admin_cmd, io_cmd, good_write), min_size=1, max_size=20)
pokes = st.lists(st.one_of(good_write, doorbell, register), min_size=1, max_size=20)


def setup(readonly):
    mem = BytesMemory(RAM)
    image = bytearray(INITIAL)
    pci = NvmePci(dict(backend=MemoryBlockBackend(image, readonly=readonly), guest_memory=mem, maxq="3",
                       qsz="64"))
    drv = NvmeDriver(pci, mem)
    assert drv.enable() == R.CSTS_RDY
    drv.enable_msix()
    drv.create_io_queues(3, 16)
    return pci, drv, image


def usable(drv, qid):
    """An I/O queue both the driver and the controller still have (hostile admin commands delete some)."""
    ctrl = drv.pci.ctrl
    for q in (qid, 1, 2, 3):
        if q and q in drv.sqs and ctrl.sqs[q] is not None and drv.sqs[q].cqid in drv.cqs:
            return q
    return None


def check_end(pci, drv, image, readonly, touched):
    assert pci.errors == [] and pci.ctrl.errors == [], (pci.errors, pci.ctrl.errors)
    assert drv.a.next < SANDBOX
    for s in range(SECTORS):
        if s not in touched:
            assert image[s * 512:(s + 1) * 512] == INITIAL[s * 512:(s + 1) * 512], s
    if readonly:
        assert image == INITIAL
    assert drv.enable() == R.CSTS_RDY and drv.identify(R.CNS_CONTROLLER)[0] == 0   # a reset brings it back


def run_commands(readonly, program):
    """Hostile commands, submitted as a driver does: each gets exactly one completion."""
    pci, drv, image = setup(readonly)
    touched = set()
    for op in program:
        before = bytes(image)
        if op[0] == "admin":
            _, opc, flags, nsid, prp1, prp2, c10, c11, c12, c13 = op
            if opc == R.ADM_DOORBELL_BUFFER and not (prp1 | prp2) & (PAGE - 1) and prp1 < RAM and prp2 < RAM:
                prp1, prp2 = drv.a.alloc(PAGE), drv.a.alloc(PAGE)   # would work: pages of the driver's own
            c = drv.admin(opc, flags=flags, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=c10, cdw11=c11, cdw12=c12,
                          cdw13=c13)
            assert image == before
            if c.status == 0 and opc in (R.ADM_DELETE_SQ, R.ADM_DELETE_CQ):   # the driver forgets it too
                (drv.sqs if opc == R.ADM_DELETE_SQ else drv.cqs).pop(c10 & 0xFFFF, None)
            if c.status == 0 and opc == R.ADM_DOORBELL_BUFFER:
                drv.shadow = (prp1, prp2)
        elif op[0] == "io":
            _, opc, flags, nsid, prp1, prp2, slba, nlb, qid, attrs = op
            qid = usable(drv, qid)
            if qid is None:
                continue
            c = drv.command(qid, opc, flags=flags, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=slba,
                            cdw12=nlb | (R.WZ_DEAC if attrs & 1 else 0) | (1 << 26 if attrs == 7 else 0),
                            cdw11=R.DSM_DEALLOCATE if attrs & 2 else 0)
            if c.status != 0:
                assert image == before, (op, c)
            elif opc in (R.NVM_WRITE, R.NVM_WRITE_ZEROES):
                touched.update(range(slba, slba + nlb + 1))
            elif opc == R.NVM_DSM:
                touched.update(range(SECTORS))      # any range in the list may have been deallocated
        else:
            _, slba, nlb, sgl, qid = op
            nlb, qid = min(nlb, SECTORS - slba), usable(drv, qid)
            if qid is None:
                continue
            data = os.urandom(nlb * 512)
            st_ = drv.write(slba, data, qid=qid, sgl=sgl)
            if readonly:
                assert st_ == R.status(R.SC_NS_WRITE_PROTECTED) and image == before
            else:
                assert st_ == 0 and image[slba * 512:(slba + nlb) * 512] == data
                touched.update(range(slba, slba + nlb))
    check_end(pci, drv, image, readonly, touched)


def run_pokes(readonly, program):
    """Hostile doorbell and register writes between a driver's writes: a bad doorbell may make the controller
    serve stale entries again or skip some, so completions are not matched; what was never asked to be written
    must still not change."""
    pci, drv, image = setup(readonly)
    touched = set()
    for op in program:
        before = bytes(image)
        if op[0] == "write":
            _, slba, nlb, sgl, qid = op
            nlb = min(nlb, SECTORS - slba)
            buf = drv.a.alloc(nlb * 512)
            drv.a.write(buf, os.urandom(nlb * 512))
            prp1, prp2 = drv.sgl([(buf, nlb * 512)]) if sgl else drv.prps(buf, nlb * 512)
            drv.submit(qid, R.NVM_WRITE, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba, cdw12=nlb - 1,
                       flags=(R.PSDT_SGL << R.FLAGS_PSDT_SHIFT) if sgl else 0)
            touched.update(range(slba, slba + nlb))
        elif op[0] == "doorbell":
            _, dw, value, size = op
            drv.w(R.DOORBELL_BASE + 4 * dw, value & ((1 << (8 * size)) - 1), size)
            assert image == before
        else:
            _, off, value = op
            drv.w(off, value)
        for q in list(drv.cqs):
            drv.reap(q)
    check_end(pci, drv, image, readonly, touched)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(program=commands)
def test_hostile_commands_on_a_writable_image(program):
    run_commands(False, program)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=commands)
def test_hostile_commands_on_a_read_only_image(program):
    run_commands(True, program)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=pokes, readonly=st.booleans())
def test_hostile_doorbells_and_registers(program, readonly):
    run_pokes(readonly, program)


list_values = st.one_of(pages, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1).map(lambda v: v & ~0xF0FF))


def _list_command(lists, sgl, nlb, at, kind=3):
    """A list page (PRP list or SGL segment) of random entries at offset ``at`` of its page: any status, nothing
    outside RAM, no bug, a failed write changes nothing."""
    mem = BytesMemory(RAM)
    image = bytearray(INITIAL)
    pci = NvmePci(dict(backend=MemoryBlockBackend(image), guest_memory=mem))
    drv = NvmeDriver(pci, mem)
    drv.enable()
    drv.create_io_queues(1, 16)
    page = drv.a.alloc(2 * PAGE) + at
    for slot, value in enumerate(lists):
        drv.a.write(page + 8 * slot, struct.pack("<Q", value))
    data_page = drv.a.alloc(PAGE)
    if sgl:
        prp1, prp2, flags = page, (8 * len(lists)) | (kind << 60), R.PSDT_SGL << R.FLAGS_PSDT_SHIFT
    else:
        prp1, prp2, flags = data_page, page, 0
    for op in (R.NVM_READ, R.NVM_WRITE):
        before = bytes(image)
        c = drv.command(1, op, nsid=1, prp1=prp1, prp2=prp2, cdw12=nlb, flags=flags)
        if c.status:
            assert image == before
    assert pci.ctrl.errors == [] and pci.errors == []


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lists=st.lists(list_values, min_size=1, max_size=12), nlb=st.integers(0, 31),
       at=st.sampled_from([0, PAGE - 64, PAGE - 24, PAGE - 8]))
def test_hostile_prp_lists(lists, nlb, at):
    _list_command(lists, False, nlb, at)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lists=st.lists(list_values, min_size=2, max_size=12), nlb=st.integers(0, 31))
def test_hostile_prp_list_chains(lists, nlb):
    """The list starts at its page's last slot: its only entry is the pointer to the next list page."""
    _list_command(lists, False, max(nlb, 16), PAGE - 8)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lists=st.lists(list_values, min_size=2, max_size=12).map(lambda v: v[:len(v) // 2 * 2]),
       nlb=st.integers(0, 31), kind=st.sampled_from([2, 3]))
def test_hostile_sgl_segments(lists, nlb, kind):
    """A Segment or Last Segment of random descriptors (address, then length and identifier)."""
    _list_command(lists, True, nlb, 0, kind)
