"""NVMe's compiled I/O queue pass (``vmmshim/backends/nvmefast.c``) against the controller's Python path: the same
command stream (good reads and writes with PRP lists chained as Linux builds them, and hostile ones: PRPs and list
pages outside guest RAM or misaligned, LBA ranges past the namespace, other namespaces, fused commands, SGLs, FUA,
protection information, other opcodes mixed in) goes to two controllers over two copies of one image and one
guest memory, one with the compiled pass and one without. Every completion, all of guest memory and the image
must come out the same; the compiled pass must have served the plain commands."""

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.pci import NvmePci
from bhyve_devices.nvme.testdriver import PAGE, NvmeDriver
from vmmshim.backends import nvmefast
from vmmshim.backends.block import FileBlockBackend
from tests.conftest import require_compiled


@pytest.fixture(autouse=True)
def compiled():
    require_compiled(nvmefast, "compiled NVMe queue pass")


MiB = 1 << 20
RAM = 8 * MiB
SANDBOX = 4 * MiB                   # the drivers' own structures stay below; data and hostile pointers above
SECTORS = 2048
INITIAL = os.urandom(SECTORS * 512)
ENTRIES = 16


class Rig:
    def __init__(self, path, compiled, readonly=False, shadow=False):
        with open(path, "wb") as f:
            f.write(INITIAL)
        self.mem = BytesMemory(RAM)
        self.mem.buf[SANDBOX:] = bytes(RAM - SANDBOX)
        accel = nvmefast.accelerator() if compiled else None
        self.pci = NvmePci(dict(backend=FileBlockBackend(path, readonly=readonly, nvme_accel=accel),
                                guest_memory=self.mem))
        self.drv = NvmeDriver(self.pci, self.mem)
        assert self.drv.enable() == R.CSTS_RDY
        self.drv.create_io_queues(1, ENTRIES)
        if shadow:
            assert self.drv.doorbell_buffer() == 0
        self.path = path

    def batch(self, cmds):
        """Submits ``cmds`` (keyword dicts for ``submit``) with one doorbell, then reaps until all are done."""
        drv = self.drv
        cids = [drv.submit(1, ring=False, **c) for c in cmds]
        drv.ring(1)
        done = []
        for _ in range(len(cmds) + 2):
            done += drv.reap(1)
            if len(done) >= len(cids):
                break
            drv.ring(1)                 # a full completion queue stalled the rest: its head moved
        return [(c.cid, c.status, c.sqid) for c in done]

    def image(self):
        with open(self.path, "rb") as f:
            return f.read()


def _rigs(tmp_path, **kw):
    return Rig(str(tmp_path / "c.img"), True, **kw), Rig(str(tmp_path / "p.img"), False, **kw)


def _prp_command(rig, op, lba, nlb, pages, offset=0):
    """A read or write over scattered data pages above the sandbox, its PRP list built by the driver."""
    length = nlb * 512
    n = (offset + length + PAGE - 1) // PAGE
    addrs = [SANDBOX + p * PAGE for p in pages[:n]]
    addrs[0] += offset
    prp1, prp2 = rig.drv.prps(addrs[0], length, pages=addrs)
    return dict(opcode=op, nsid=1, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF, cdw11=lba >> 32, cdw12=nlb - 1)


def test_large_scattered_reads_and_writes_served_in_c(tmp_path):
    c, p = _rigs(tmp_path)
    data_pages = list(range(600))[::-1]                 # scattered, none adjacent in the right order
    for rig in (c, p):
        rig.mem.buf[SANDBOX:SANDBOX + 600 * PAGE] = os.urandom(600 * PAGE) if rig is c else c.mem.buf[
            SANDBOX:SANDBOX + 600 * PAGE]
    cmds = lambda rig: [_prp_command(rig, R.NVM_WRITE, 8, 2048 - 8, data_pages, offset=512),   # 1 MiB - 4 KiB
                        _prp_command(rig, R.NVM_READ, 0, 1024, data_pages[300:]),
                        _prp_command(rig, R.NVM_READ, 100, 1, data_pages[5:]),
                        _prp_command(rig, R.NVM_WRITE, 3, 9, data_pages[7:], offset=3584)]
    got_c, got_p = c.batch(cmds(c)), p.batch(cmds(p))
    assert got_c == got_p and all(s == 0 for _, s, _ in got_c)
    assert c.image() == p.image() != INITIAL
    assert bytes(c.mem.buf) == bytes(p.mem.buf)
    assert c.pci.ctrl.compiled_served == 4 and p.pci.ctrl.compiled_served == 0
    assert c.pci.ctrl.stats == p.pci.ctrl.stats


def test_stops_at_what_it_does_not_serve_and_python_goes_on(tmp_path):
    c, p = _rigs(tmp_path, shadow=True)
    cmds = lambda rig: [_prp_command(rig, R.NVM_READ, 0, 8, [1, 2]),
                        dict(opcode=R.NVM_FLUSH, nsid=1),
                        _prp_command(rig, R.NVM_WRITE, 0, 8, [3, 4]),
                        dict(_prp_command(rig, R.NVM_WRITE, 0, 8, [5]), cdw12=7 | R.RW_FUA),
                        _prp_command(rig, R.NVM_READ, SECTORS - 4, 8, [6, 7])]       # past the end
    got_c, got_p = c.batch(cmds(c)), p.batch(cmds(p))
    assert got_c == got_p
    assert [s for _, s, _ in got_c] == [0, 0, 0, 0, R.LBA_OUT_OF_RANGE]
    assert c.pci.ctrl.compiled_served == 2
    assert bytes(c.mem.buf) == bytes(p.mem.buf) and c.image() == p.image()


def test_full_completion_queue_then_more(tmp_path):
    c, p = _rigs(tmp_path)
    cmds = lambda rig: [_prp_command(rig, R.NVM_READ, i, 1, [i]) for i in range(ENTRIES - 1)]
    assert c.batch(cmds(c)) == p.batch(cmds(p))
    cmds2 = lambda rig: [_prp_command(rig, R.NVM_WRITE, i, 1, [i]) for i in range(ENTRIES - 1)]
    assert c.batch(cmds2(c)) == p.batch(cmds2(p))
    assert c.pci.ctrl.compiled_served == 2 * (ENTRIES - 1)
    assert bytes(c.mem.buf) == bytes(p.mem.buf) and c.image() == p.image()


def test_read_only_image_writes_go_to_python(tmp_path):
    c, p = _rigs(tmp_path, readonly=True)
    cmds = lambda rig: [_prp_command(rig, R.NVM_WRITE, 0, 8, [1]), _prp_command(rig, R.NVM_READ, 0, 8, [2])]
    got = c.batch(cmds(c))
    assert got == p.batch(cmds(p))
    assert got[0][1] == R.status(R.SC_NS_WRITE_PROTECTED) and got[1][1] == 0
    assert c.image() == INITIAL and c.pci.ctrl.compiled_served == 1       # the read


addresses = st.one_of(st.sampled_from([0, 4, 0x800, RAM - 8, RAM - PAGE, RAM, RAM + PAGE, 1 << 40, 2**64 - 8,
                                       2**64 - PAGE]),
                      st.integers(SANDBOX // PAGE, RAM // PAGE - 1).map(lambda p: p * PAGE),
                      st.integers(SANDBOX, RAM + PAGE), st.integers(0, 2**64 - 1))
hostile = st.tuples(st.just("raw"), st.sampled_from([R.NVM_READ, R.NVM_WRITE, R.NVM_READ, R.NVM_FLUSH, 0x05]),
                    st.one_of(st.just(0), st.integers(0, 255)), st.one_of(st.just(1), st.sampled_from([0, 2])),
                    addresses, addresses, st.integers(0, SECTORS + 8), st.integers(0, 600),
                    st.one_of(st.just(0), st.sampled_from([R.RW_FUA, 1 << 26, 1 << 31])))
good = st.tuples(st.just("good"), st.sampled_from([R.NVM_READ, R.NVM_WRITE]), st.integers(0, SECTORS - 1),
                 st.integers(1, 512), st.permutations(list(range(130))), st.integers(0, 7))
# a PRP list with one bad entry: misaligned, or outside RAM
bad_list = st.tuples(st.just("badlist"), st.sampled_from([R.NVM_READ, R.NVM_WRITE]), st.integers(9, 200),
                     st.integers(0, 40), st.sampled_from([RAM, RAM - PAGE + 8, 2**64 - PAGE, SANDBOX + 12]))
streams = st.lists(st.lists(st.one_of(hostile, good, bad_list), min_size=1, max_size=ENTRIES - 1), min_size=1,
                   max_size=4)


def _build(rig, spec):
    kind = spec[0]
    if kind == "raw":
        _, op, flags, nsid, prp1, prp2, lba, nlb, c12 = spec
        return dict(opcode=op, flags=flags, nsid=nsid, prp1=prp1, prp2=prp2, cdw10=lba & 0xFFFFFFFF,
                    cdw11=lba >> 32, cdw12=((nlb - 1) & 0xFFFF) | c12)
    if kind == "good":
        _, op, lba, nlb, pages, off = spec
        nlb = min(nlb, SECTORS - lba)
        return _prp_command(rig, op, lba, nlb, pages, offset=off * 512)
    _, op, nlb, bad_at, bad = spec
    cmd = _prp_command(rig, op, 0, nlb, list(range(64)))
    entries = (nlb * 512 + PAGE - 1) // PAGE - 1
    at = cmd["prp2"] + 8 * min(bad_at, entries - 1)
    rig.drv.a.write(at, struct.pack("<Q", bad))
    return cmd


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(stream=streams, shadow=st.booleans())
def test_hostile_streams_answered_as_python_does(tmp_path_factory, stream, shadow):
    d = tmp_path_factory.mktemp("nvme")
    c, p = _rigs(d, shadow=shadow)
    seed = os.urandom(RAM - SANDBOX)
    c.mem.buf[SANDBOX:] = seed
    p.mem.buf[SANDBOX:] = seed
    for batch in stream:
        got_c = c.batch([_build(c, s) for s in batch])
        got_p = p.batch([_build(p, s) for s in batch])
        assert got_c == got_p
    assert not c.pci.ctrl.errors and not p.pci.ctrl.errors
    assert bytes(c.mem.buf) == bytes(p.mem.buf)
    assert c.image() == p.image()
    assert c.pci.ctrl.stats == p.pci.ctrl.stats
