"""Hostile input for AHCI (issue 21): hypothesis drives an HBA with a read-write disk (port 0), a read-only disk
(port 1), a CD (port 2) and an empty port (3) through random command slots (any opcode and taskfile, ATAPI
commands, NCQ or not, PRDTs past RAM or huge, command tables outside RAM, PRDTL up to 65535) and random register
writes, commands served on the writing thread. After every step:

- no exception escaped and the HBA turned none into an aborted command (``hba.errors``);
- guest RAM changed only where the guest let the HBA write: the received-FIS areas and PRD byte counts of the
  command lists the ports latched, and the PRDT buffers of the commands issued in that step;
- the read-write image was written only by write commands, exactly over the sectors they named, and discarded
  only by TRIM inside the image; the read-only image and the CD were never written nor discarded.
"""

from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import atapi as P
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.testdriver import DATA, RECEIVED_FIS_SIZE, STRUCTS, Controller, h2d
from bhyve_devices.backends import MemoryBlockBackend

RAM = 4 << 20
SECTORS = 64
WRITES = A.WRITES_28 | A.WRITES_48 | {A.WRITE_FPDMA_QUEUED}
TRIMS = {A.DATA_SET_MANAGEMENT, A.SEND_FPDMA_QUEUED}
OPS = [A.WRITE_DMA_EXT, A.WRITE_FPDMA_QUEUED, A.READ_FPDMA_QUEUED, A.WRITE_DMA, A.READ_DMA_EXT, A.PACKET,
       A.DATA_SET_MANAGEMENT, A.SEND_FPDMA_QUEUED, A.WRITE_SECTORS, A.WRITE_MULTIPLE_EXT, A.READ_SECTORS_EXT,
       A.READ_MULTIPLE, A.FLUSH_CACHE_EXT, A.IDENTIFY_DEVICE, A.IDENTIFY_PACKET_DEVICE, A.READ_LOG_EXT,
       A.READ_LOG_DMA_EXT, A.SET_FEATURES, A.SET_MULTIPLE_MODE, A.DEVICE_RESET, A.EXECUTE_DEVICE_DIAGNOSTIC,
       A.CHECK_POWER_MODE, A.READ_VERIFY_EXT, A.STANDBY_IMMEDIATE, A.NOP]
SCSI = [P.TEST_UNIT_READY, P.REQUEST_SENSE, P.INQUIRY, P.START_STOP_UNIT, P.PREVENT_ALLOW, P.READ_CAPACITY,
        P.READ_10, P.READ_12, P.READ_TOC, P.GET_CONFIGURATION, P.GET_EVENT_STATUS, P.MODE_SENSE_10,
        P.REPORT_LUNS, P.SET_CD_SPEED, 0x2A, 0xBE]
PORT_REGS = [L.P_CLB, L.P_CLBU, L.P_FB, L.P_FBU, L.P_IS, L.P_IE, L.P_CMD, L.P_TFD, L.P_SCTL, L.P_SERR, L.P_SACT,
             L.P_CI]


class Recording(MemoryBlockBackend):
    """A MemoryBlockBackend that records every write and discard."""

    def __init__(self, data, readonly=False):
        super().__init__(data, readonly=readonly)
        self.log = []

    def pwritev_full(self, segs, offset, total=None):
        self.log.append(("write", offset, sum(map(len, segs))))
        return super().pwritev_full(segs, offset, total)

    def discard(self, offset, length):
        self.log.append(("discard", offset, length))
        MemoryBlockBackend.write_zeroes(self, offset, length, True)

    def write_zeroes(self, offset, length, unmap):
        self.log.append(("zeroes", offset, length))
        super().write_zeroes(offset, length, unmap)


gpa = st.one_of(st.integers(DATA, DATA + 0x40000), st.integers(RAM - 0x3000, RAM + 0x3000),
                st.integers(0, 2**64 - 1), st.sampled_from([0, STRUCTS, RAM]))
length = st.one_of(st.integers(1, 4096), st.integers(1, 1 << 22))
command = st.fixed_dictionaries({
    "kind": st.just("cmd"),
    "port": st.sampled_from([0, 0, 0, 1, 2, 2, 3]), "slot": st.integers(0, 31),
    "op": st.one_of(st.sampled_from(OPS), st.sampled_from(OPS), st.sampled_from(OPS), st.integers(0, 255)),
    "lba": st.one_of(st.integers(0, SECTORS + 2), st.integers(0, SECTORS + 2), st.integers(0, 2**48 - 1)),
    "count": st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(0, 0xFFFF)),
    "features": st.one_of(st.integers(0, 8), st.integers(0, 0xFFFF)),
    "device": st.sampled_from([0x40, 0x40, 0xC0, 0x00, 0xFF]),
    "control": st.sampled_from([0, L.CONTROL_SRST]), "c": st.integers(0, 9).map(bool),
    "aux": st.sampled_from([0, 1, 0xFFFFFFFF]),
    "fit": st.booleans(),                   # one PRDT entry the size of the transfer, in RAM
    "prdt": st.lists(st.tuples(gpa, length), max_size=6),
    "prdtl": st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
    "acmd": st.tuples(st.one_of(st.sampled_from(SCSI), st.integers(0, 255)), st.binary(min_size=11, max_size=11)),
    "queued": st.booleans(), "write": st.booleans(),
    "ctba": st.one_of(st.none(), st.none(), st.none(), gpa),
    "payload": st.sampled_from([b"", b"\x0a\x00\x00\x00\x00\x00\x02\x00", b"\xff" * 8]),
    "recover": st.integers(0, 4).map(bool),  # the guest's error handling: clear ST, then set it
})
regwrite = st.fixed_dictionaries({
    "kind": st.just("reg"),
    "off": st.one_of(st.builds(lambda p, r: L.PORT_BASE + p * L.PORT_STRIDE + r, st.integers(0, 3),
                               st.sampled_from(PORT_REGS)),
                     st.sampled_from([L.GHC, L.IS]), st.integers(0, 0x2000 // 4).map(lambda x: 4 * x)),
    "value": st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, L.CMD_ST | L.CMD_FRE, L.CMD_FRE,
                                                                  L.SCTL_DET_COMRESET, 0xFFFFFFFF])),
})


def _allowed(hba):
    """The RAM ranges the HBA may write into on its own: each port's latched FIS area and PRD byte counts."""
    out = []
    for p in hba.ports:
        if p.fisbase is not None:
            out.append((p.fisbase, RECEIVED_FIS_SIZE))
        out += [(p.cmdlist + s * L.COMMAND_HEADER_SIZE + L.HDR_PRDBC_OFFSET, 4) for s in range(32)]
    return out


def _changed(before, after, chunk=4096):
    for off in range(0, len(before), chunk):
        if before[off:off + chunk] != after[off:off + chunk]:
            for i in range(off, min(off + chunk, len(before))):
                if before[i] != after[i]:
                    yield i


def _table_entries(ctl, drv, a):
    """The PRDT entries past those the test wrote that a PRDTL larger than them names: whatever the table's
    memory holds there is the guest's own description of its buffers (the device may write where they say)."""
    if a["prdtl"] is None:
        return []
    table = drv.table(a["port"], a["slot"]) if a["ctba"] is None else a["ctba"]
    out = []
    for i in range(a["prdtl"]):
        at = table + L.PRDT_OFFSET + i * L.PRD.size
        if at + L.PRD.size > RAM:
            break
        dba, _, dbc = L.PRD.unpack_from(ctl.mem.buf, at)
        out.append((dba & ~1, (dbc & 0x3FFFFF) + 1))
    return out


def _inside(i, ranges):
    return any(base <= i < base + n for base, n in ranges)


def _expected_write(a):
    """The image range a write command may write: ``(offset, length)``, or None."""
    op = a["op"]
    if op not in WRITES:
        return None
    if op == A.WRITE_FPDMA_QUEUED:
        count = a["features"] or 65536
        lba = a["lba"]
    elif op in A.WRITES_48:
        count, lba = a["count"] or 65536, a["lba"]
    else:
        count, lba = (a["count"] & 0xFF) or 256, (a["lba"] & 0xFFFFFF) | (a["device"] & 0xF) << 24
    return lba * 512, count * 512


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(actions=st.lists(st.one_of(command, command, regwrite), min_size=1, max_size=12))
def test_hostile_commands_and_registers(actions):
    rw = Recording(bytearray(bytes(range(256)) * 2 * SECTORS))
    ro = Recording(bytearray(b"r" * 512 * SECTORS), readonly=True)
    cd = Recording(bytearray(b"c" * 2048 * 16), readonly=True)
    ctl = Controller([("hd", rw), ("hd", ro), ("cd", cd)], ram=RAM)
    drv = ctl.up(0, 1, 2, 3)
    writes = set()
    for a in actions:
        allowed = _allowed(ctl.hba)
        if a["kind"] == "reg":
            before = bytes(ctl.mem.buf)
            drv.w(a["off"], a["value"])
        else:
            fis = h2d(a["op"], a["lba"], a["count"], a["features"], a["device"], a["control"], a["c"], a["aux"])
            if a["op"] == A.WRITE_FPDMA_QUEUED or a["op"] == A.SEND_FPDMA_QUEUED:
                fis = fis[:12] + bytes(((a["slot"] << 3) & 0xFF, fis[13])) + fis[14:]
            prdt = list(a["prdt"])
            if a["fit"]:
                n = (a["features"] if a["op"] in A.NCQ else a["count"]) or 1
                prdt = [(DATA + 0x10000, min(n * 2048, 1 << 20))]
            if a["payload"]:
                prdt.insert(0, (drv.put(a["payload"].ljust(512, b"\0")), 512))
            acmd = bytes([a["acmd"][0]]) + a["acmd"][1] if a["op"] == A.PACKET else b""
            drv.issue(a["port"], a["slot"], fis, prdt, a["write"], acmd, a["queued"], a["ctba"], go=False,
                      prdtl=a["prdtl"])
            if a["port"] == 0 and _expected_write(a) is not None:
                writes.add(_expected_write(a))
            allowed += [(g & ~1, n) for g, n in prdt] + _table_entries(ctl, drv, a)
            before = bytes(ctl.mem.buf)
            drv.go(a["port"], a["slot"], a["queued"])
            if a["recover"] and drv.pr(a["port"], L.P_IS) & (L.IS_TFES | L.IS_HBFS):
                drv.stop(a["port"])
        assert ctl.hba.errors == []
        allowed += _allowed(ctl.hba)
        stray = [i for i in _changed(before, ctl.mem.buf) if not _inside(i, allowed)]
        assert not stray, f"RAM written at {stray[0]:#x} by {a}"
    assert ro.log == [] and cd.log == []
    for what, off, n in rw.log:
        assert off + n <= len(rw.data)
        assert what == "discard" or (off, n) in writes, (what, off, n, writes)
    ctl.close()
