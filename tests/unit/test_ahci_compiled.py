"""AHCI's compiled data command (``vmmshim/backends/ahcifast.py``, ``ahcifast.c``, carried by the block backend)
against the port's Python path. Each case runs on two controllers built alike, one whose disk backends carry the
compiled command and one whose backends do not, with the same guest actions (the test driver of
``bhyve_devices/ahci/testdriver.py``, commands served on the writing thread), and compares everything the guest or
the host could see afterwards: all of guest RAM (received FISes, PRD byte counts, data buffers), the port and HBA
registers, the interrupts, the device's NCQ error log, and the images. Guest RAM is followed by a guard area the
device must never write. The counters say which commands the compiled path served: DMA and NCQ reads and writes,
one PRDT entry or 256, odd byte counts, a host I/O error (ABORT, as in Python), NCQ accepted before its data moves
(a buffer over the received-FIS area); hostile slots (PRDT entries or a command table past RAM, a PRDT too short,
a range past the end, a read-only image, the A bit, too many entries) fall back and are answered as before, and a
hypothesis run mixes both kinds."""

import errno
import os
import pathlib
import shutil

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.pci import AhciPci
from bhyve_devices.ahci.testdriver import Controller, h2d, ncq
from vmmshim.backends import ahcifast, open_device_backends
from vmmshim.backends.block import FileBlockBackend
from tests.conftest import require_compiled

SECTORS = 4096                  #: 2 MiB images
RAM = 16 << 20
GUARD = 1 << 16                 #: bytes after RAM the device must not touch
GUARD_BYTE = 0xA5
PAGE = 4096
PERIOD = 251


@pytest.fixture(autouse=True)
def compiled():
    require_compiled(ahcifast, "compiled command")


class GuardedMemory:
    """A GuestMemory of ``size`` bytes of RAM from 0 (``ram``) followed by a guard area outside it."""

    def __init__(self, size):
        self.whole = bytearray(size) + bytes([GUARD_BYTE]) * GUARD
        self._ram = self.ram = memoryview(self.whole)[:size]

    def view(self, gpa, size):
        if size < 0 or gpa < 0 or gpa + size > len(self._ram):
            raise OSError(errno.EFAULT, f"gpa {gpa:#x}+{size:#x} is outside guest RAM")
        return self._ram[gpa:gpa + size]

    def guard_intact(self):
        return self.whole[len(self._ram):] == bytes([GUARD_BYTE]) * GUARD


def make_image(path, sectors=SECTORS, size=512):
    """An image whose sectors all differ (a pattern of a prime period)."""
    n = sectors * size
    path.write_bytes((bytes(range(PERIOD)) * (n // PERIOD + 1))[:n])
    return str(path)


class Rig:
    """A controller over ``images`` (``[(path, readonly)]``, ports 0, 1...), with or without the compiled command."""

    def __init__(self, images, accel, ram=RAM, options=None, threaded=False, inline_kib=0):
        self.paths = [p for p, _ in images]
        self.accels = [ahcifast.accelerator() if accel else None for _ in images]
        backends = [("hd", FileBlockBackend(p, readonly=ro, accel=a)) for (p, ro), a in zip(images, self.accels)]
        self.ctl = Controller(backends, ram=ram, options=options, threaded=threaded, inline_kib=inline_kib)
        self.mem = GuardedMemory(ram)
        self.ctl.pci.set_memory(self.mem)
        self.ctl.mem = self.ctl.drv.mem = self.mem
        self.drv = self.ctl.up()

    def served(self):
        return sum(a.served for a in self.accels if a is not None)

    def seen(self):
        hba = self.ctl.hba
        ports = [(p.is_, p.ie, p.cmd, p.tfd, p.sig, p.ssts, p.serr, p.sact, p.ci, p.waitforclear, p.next_slot,
                  p.device.error_log) for p in hba.ports if p.device is not None]
        images = [pathlib.Path(path).read_bytes() for path in self.paths]
        return {"ram": bytes(self.mem.whole), "ports": ports, "hba": (hba.is_, hba.ghc), "msis": list(self.ctl.msis),
                "intx": list(self.ctl.line.history), "errors": list(hba.errors), "images": images}

    def close(self):
        self.ctl.close()


class Twin:
    """The same disks (port 0 read-write, port 1 read-only) behind a Python-only rig and a compiled one."""

    def __init__(self, tmp_path, ram=RAM, options=None, sectors=SECTORS, size=512):
        src = make_image(tmp_path / "src.img", sectors, size)
        rigs = []
        for kind, accel in (("py", False), ("c", True)):
            images = []
            for port, ro in ((0, False), (1, True)):
                path = tmp_path / f"{kind}{port}.img"
                shutil.copyfile(src, path)
                images.append((str(path), ro))
            rigs.append(Rig(images, accel, ram, options))
        self.py, self.c = rigs

    def run(self, action):
        """``action(drv)`` on both rigs: its result (the same on both) and how many slots the compiled path served."""
        before = self.c.served()
        got_py, got_c = action(self.py.drv), action(self.c.drv)
        assert got_py == got_c
        seen_py, seen_c = self.py.seen(), self.c.seen()
        for key in seen_py:
            assert seen_py[key] == seen_c[key], f"{key} differs"
        assert seen_c["errors"] == [] and self.py.mem.guard_intact() and self.c.mem.guard_intact()
        assert self.py.served() == 0
        return got_c, self.c.served() - before

    def close(self):
        self.py.close()
        self.c.close()


@pytest.fixture
def twin(tmp_path):
    t = Twin(tmp_path)
    yield t
    t.close()


def place_table(drv, fis, prdt):
    """A command table of its own (any number of PRDT entries ``[(gpa, bytes)]``): its address."""
    body = fis.ljust(L.PRDT_OFFSET, b"\0") + b"".join(L.PRD.pack(g % 2**64, 0, (n - 1) & L.PRD_DBC_MASK)
                                                       for g, n in prdt)
    table = drv.alloc(len(body), align=L.CTBA_ALIGN + 1)
    drv.mem.view(table, len(body))[:] = body
    return table


def scattered(drv, sizes, fill=None):
    """A buffer per size, a page apart (the PRDT's entries); filled with ``fill(i)`` bytes when given."""
    prdt = []
    for i, n in enumerate(sizes):
        gpa = drv.alloc(n + PAGE, align=2)
        if fill is not None:
            drv.mem.view(gpa, n)[:] = bytes([fill(i)]) * n
        prdt.append((gpa, n))
    return prdt


def command(fis, sizes=(), port=0, slot=0, write=False, queued=False, extra=(), ctba=None, prdtl=None,
            atapi=False, fill=None):
    """An action: slot ``slot`` of ``port`` with ``fis`` and buffers of ``sizes`` (then the entries ``extra``), its
    table at ``ctba`` when given; waits for it, reads the buffers back and recovers the port after an error."""
    def action(drv):
        prdt = scattered(drv, sizes, fill) + list(extra)
        table = place_table(drv, fis, prdt) if ctba is None else ctba
        drv.issue(port, slot, fis, acmd=b"\x00" if atapi else b"", write=write, ctba=table,
                  prdtl=len(prdt) if prdtl is None else prdtl, go=False)
        drv.go(port, slot, queued)
        st = drv.wait(port, slot, queued=queued)
        data = b"".join(drv.get(g, n) for g, n in prdt[:len(sizes)])
        if not st.ok:
            drv.stop(port)
        return st, data
    return action


def image_bytes(rig, lba, n, port=0, size=512):
    with open(rig.paths[port], "rb") as f:
        f.seek(lba * size)
        return f.read(n * size)


def test_a_1_mib_ncq_read_of_256_entries_goes_through_it(twin):
    (st, data), served = twin.run(command(ncq(A.READ_FPDMA_QUEUED, 5, 8, 2048), [PAGE] * 256, slot=5, queued=True))
    assert served == 1 and st.ok and st.sact == 0 and st.is_ & L.IS_SDBS and st.prdbc == 0
    assert data == image_bytes(twin.c, 8, 2048)


ODD = [1, 3, 500, 1000, 7, 511, 513, 2, 4095]     # 6632 bytes: the last entry is used in part


@pytest.mark.parametrize("op,queued", [(A.READ_DMA, False), (A.WRITE_DMA, False), (A.READ_DMA_EXT, False),
                                       (A.WRITE_DMA_EXT, False), (A.READ_FPDMA_QUEUED, True),
                                       (A.WRITE_FPDMA_QUEUED, True)])
def test_each_data_command_with_odd_byte_counts(twin, op, queued):
    write = op in (A.WRITE_DMA, A.WRITE_DMA_EXT, A.WRITE_FPDMA_QUEUED)
    fis = ncq(op, 3, 77, 12, fua=True) if queued else h2d(op, lba=77, count=12)
    beyond = [(2**64 - 2, 512), (RAM, 512)]          # entries after the transfer's last byte: never looked at
    (st, data), served = twin.run(command(fis, ODD, slot=3, write=write, queued=queued, extra=beyond,
                                          fill=lambda i: 0x30 + i))
    assert served == 1 and st.ok and (st.prdbc == 0 if queued else st.prdbc == 12 * 512)
    assert data[:12 * 512] == image_bytes(twin.c, 77, 12)
    if write:
        assert image_bytes(twin.c, 77, 12) == b"".join(bytes([0x30 + i]) * n for i, n in enumerate(ODD))[:6144]


def test_counts_of_zero_and_the_last_sector(twin):
    (st, data), served = twin.run(command(h2d(A.READ_DMA, lba=0, count=0), [64 * 1024, 64 * 1024]))
    assert served == 1 and st.ok and data == image_bytes(twin.c, 0, 256)
    (st, _), served = twin.run(command(h2d(A.WRITE_DMA_EXT, lba=SECTORS - 1, count=1), [512], write=True))
    assert served == 1 and st.ok
    (st, _), served = twin.run(command(h2d(A.READ_DMA_EXT, lba=0, count=0), [512]))
    assert served == 0 and st.error == L.ERR_IDNF, "65536 sectors: past the end, Python's answer"


def _header_outside_ram(drv):
    drv.pw(0, L.P_CMD, L.CMD_FRE)
    drv.pw(0, L.P_CLBU, 1)                              # a command list above 4 GiB: outside RAM
    drv.pw(0, L.P_CMD, L.CMD_FRE | L.CMD_ST)
    drv.pw(0, L.P_CI, 1)
    got = (drv.pr(0, L.P_IS), drv.pr(0, L.P_TFD), drv.pr(0, L.P_SERR))
    drv.pw(0, L.P_CMD, L.CMD_FRE)
    drv.pw(0, L.P_CLBU, 0)
    drv.start(0, comreset=False)
    return got


def _table_straddling_the_end_of_ram(drv):
    """A table whose first entry (in RAM) covers the transfer, but whose PRDTL takes it past RAM's end."""
    fis = h2d(A.READ_DMA_EXT, lba=1, count=1)
    table = RAM - 2 * L.PRDT_OFFSET                     # 8 entries fit before the end of RAM
    body = fis.ljust(L.PRDT_OFFSET, b"\0") + L.PRD.pack(drv.alloc(512), 0, 511)
    drv.mem.view(table, len(body))[:] = body
    return command(fis, ctba=table, prdtl=L.PRDT_OFFSET // L.PRD.size + 1)(drv)


HOSTILE = {
    "table straddling RAM's end": _table_straddling_the_end_of_ram,
    "entry past RAM": command(h2d(A.WRITE_DMA_EXT, lba=1, count=2), [512], write=True, extra=[(RAM - 256, 512)]),
    "entry wrapping": command(h2d(A.READ_DMA_EXT, lba=1, count=2), [512], extra=[(2**64 - 256, 512)]),
    "table past RAM": command(h2d(A.READ_DMA_EXT, lba=1, count=1), ctba=RAM - L.PRDT_OFFSET, prdtl=1),
    "table wrapping": command(h2d(A.READ_DMA_EXT, lba=1, count=1), ctba=2**64 - L.PRDT_OFFSET, prdtl=1),
    "PRDTL 65535 in RAM": command(h2d(A.READ_DMA_EXT, lba=1, count=1), [512], prdtl=0xFFFF),
    "PRDT too short": command(h2d(A.WRITE_DMA, lba=1, count=4), [512, 1023], write=True),
    "no PRDT": command(ncq(A.READ_FPDMA_QUEUED, 2, 0, 1), slot=2, queued=True),
    "past the end": command(h2d(A.READ_DMA_EXT, lba=SECTORS - 1, count=2), [1024]),
    "48-bit overflow": command(ncq(A.WRITE_FPDMA_QUEUED, 1, 2**48 - 1, 0xFFFF), [512], slot=1, queued=True),
    "28-bit LBA nibble": command(h2d(A.READ_DMA, lba=5, count=1, device=0x4F), [512]),
    "read-only image": command(h2d(A.WRITE_DMA_EXT, lba=0, count=1), [512], port=1, write=True, fill=lambda i: 1),
    "read-only NCQ": command(ncq(A.WRITE_FPDMA_QUEUED, 4, 0, 1), [512], port=1, slot=4, queued=True, write=True),
    "A bit on a disk": command(h2d(A.READ_DMA_EXT, lba=3, count=1), [512], atapi=True),
    "control FIS": command(h2d(A.READ_DMA_EXT, lba=3, count=1, c=False), [512]),
    "not a command FIS": command(bytes([L.FIS_TYPE_D2H]) + h2d(A.READ_DMA_EXT, 3, 1)[1:], [512]),
    "a PIO read": command(h2d(A.READ_SECTORS_EXT, lba=3, count=1), [512]),
    "IDENTIFY": command(h2d(A.IDENTIFY_DEVICE), [512]),
    "1025 entries": command(h2d(A.READ_DMA_EXT, lba=0, count=1025), [512] * 1025),
    "header outside RAM": _header_outside_ram,
}
SERVED_ANYWAY = {"PRDTL 65535 in RAM": 1}       #: the whole table is in RAM, and its first entry is enough


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_slots_fall_back_and_answer_as_python(twin, case):
    _, served = twin.run(HOSTILE[case])
    assert served == SERVED_ANYWAY.get(case, 0)
    (st, data), served = twin.run(command(h2d(A.READ_DMA_EXT, lba=9, count=1), [512]))
    assert served == 1 and st.ok and data == image_bytes(twin.c, 9, 1), "the port works on after it"


def test_entries_ending_at_the_end_of_ram_and_odd_addresses(twin):
    (st, data), served = twin.run(command(h2d(A.READ_DMA_EXT, lba=2, count=2), [512],
                                          extra=[(RAM - 512 + 1, 512)]))       # bit 0 is reserved: RAM - 512
    assert served == 1 and st.ok and data + twin.c.drv.get(RAM - 512, 512) == image_bytes(twin.c, 2, 2)


@pytest.mark.parametrize("op", [A.READ_FPDMA_QUEUED, A.WRITE_FPDMA_QUEUED, A.READ_DMA_EXT])
def test_a_buffer_over_the_received_fis_area(twin, op):
    """The NCQ acceptance FIS is posted before the data moves, as in Python: a read over it leaves the data, a
    write takes the FIS."""
    def action(drv):
        fis = ncq(op, 0, 20, 1) if op in A.NCQ else h2d(op, lba=20, count=1)
        prdt = [(drv.fis_area(0), L.RECEIVED_FIS_SIZE), (drv.alloc(512), 512 - L.RECEIVED_FIS_SIZE)]
        drv.issue(0, 0, fis, write=op == A.WRITE_FPDMA_QUEUED, ctba=place_table(drv, fis, prdt), prdtl=2,
                  go=False)
        drv.go(0, 0, op in A.NCQ)
        return drv.wait(0, 0, queued=op in A.NCQ)
    st, served = twin.run(action)
    assert served == 1 and st.ok


def test_many_ncq_slots_issued_at_once(twin):
    def action(drv):
        for tag in range(8):
            write = tag % 2 == 0
            fis = ncq(A.WRITE_FPDMA_QUEUED if write else A.READ_FPDMA_QUEUED, tag, 40 + 4 * tag, 4)
            prdt = scattered(drv, [1024, 1024], fill=lambda i: tag)
            drv.issue(0, tag, fis, write=write, ctba=place_table(drv, fis, prdt), prdtl=2, go=False)
        drv.pw(0, L.P_SACT, 0xFF)
        drv.pw(0, L.P_CI, 0xFF)
        return drv.wait(0, 7, queued=True)
    st, served = twin.run(action)
    assert served == 8 and st.ok and st.sact == 0 and image_bytes(twin.c, 40, 4) == bytes(2048)


def test_fua_a_disabled_write_cache_and_a_failing_flush(twin, monkeypatch):
    flushes = {}
    for rig in (twin.py, twin.c):
        be = rig.ctl.hba.ports[0].device.backend
        flushes[rig] = []
        monkeypatch.setattr(be, "flush", lambda log=flushes[rig]: log.append(1))
    _, served = twin.run(command(ncq(A.WRITE_FPDMA_QUEUED, 6, 3, 1, fua=True), [512], slot=6, queued=True,
                                 write=True))
    _, more = twin.run(command(ncq(A.WRITE_FPDMA_QUEUED, 6, 3, 1), [512], slot=6, queued=True, write=True))
    assert served == more == 1 and flushes[twin.py] == flushes[twin.c] == [1]
    twin.run(command(h2d(A.SET_FEATURES, features=A.SF_DISABLE_WCACHE)))
    (st, _), served = twin.run(command(h2d(A.WRITE_DMA, lba=1, count=1), [512], write=True))
    assert served == 1 and st.ok and flushes[twin.c] == [1, 1]

    def broken():
        raise OSError(5, "flush failed")
    for rig in (twin.py, twin.c):
        monkeypatch.setattr(rig.ctl.hba.ports[0].device.backend, "flush", broken)
    (st, _), served = twin.run(command(ncq(A.WRITE_FPDMA_QUEUED, 9, 5, 1), [512], slot=9, queued=True, write=True))
    assert served == 1 and st.is_ & L.IS_TFES and st.sact == 1 << 9
    (st, log), _ = twin.run(command(h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), [512]))
    assert st.ok and log[0] == 9 and log[3] == L.ERR_ABRT


def test_a_failed_host_transfer_is_an_abort_as_in_python(twin):
    for rig in (twin.py, twin.c):                       # the images shrink under the open disks
        os.truncate(rig.paths[0], 100 * 512)
    (st, _), served = twin.run(command(ncq(A.READ_FPDMA_QUEUED, 3, 98, 4), [2048], slot=3, queued=True))
    assert served == 1 and st.is_ & L.IS_TFES and st.sact == 1 << 3
    (st, _), served = twin.run(command(h2d(A.READ_DMA_EXT, lba=120, count=1), [512]))
    assert served == 1 and st.error == L.ERR_ABRT and st.ci == 1
    (st, log), _ = twin.run(command(h2d(A.READ_LOG_EXT, lba=A.LOG_NCQ_ERROR, count=1), [512]))
    assert st.ok and log[0] == A.NCQ_ERROR_NQ and log[3] == L.ERR_ABRT


def test_4096_byte_sectors(tmp_path):
    t = Twin(tmp_path, options={0: {"sectorsize": "4096"}}, sectors=SECTORS // 8, size=4096)
    (st, data), served = t.run(command(h2d(A.READ_DMA_EXT, lba=3, count=2), [PAGE, PAGE]))
    assert served == 1 and st.ok and data == image_bytes(t.c, 3, 2, size=4096)
    (st, _), served = t.run(command(h2d(A.WRITE_DMA_EXT, lba=SECTORS // 8 - 1, count=2), [2 * PAGE], write=True))
    assert served == 0 and st.error == L.ERR_IDNF
    t.close()


def test_a_28_bit_lba_above_2_to_the_24(tmp_path):
    path = tmp_path / "big.img"
    with open(path, "wb") as f:
        f.truncate(((1 << 24) + 16) * 512)             # sparse
    rig = Rig([(str(path), False)], accel=True)
    lba = (1 << 24) + 3
    run = command(h2d(A.WRITE_DMA, lba=lba & 0xFFFFFF, count=1, device=0x40 | lba >> 24), [512], write=True,
                  fill=lambda i: 0x77)
    st, _ = run(rig.drv)
    assert st.ok and rig.served() == 1 and image_bytes(rig, lba, 1) == b"\x77" * 512
    rig.close()


def test_on_the_port_thread_and_without_a_ram_view(tmp_path):
    rig = Rig([(make_image(tmp_path / "a.img"), False)], accel=True, threaded=True)
    st, data = command(ncq(A.READ_FPDMA_QUEUED, 0, 0, 2048), [PAGE] * 256, queued=True)(rig.drv)
    assert st.ok and rig.served() == 1 and data == image_bytes(rig, 0, 2048)
    rig.mem.ram = None                                  # e.g. a memory whose first area is not from 0
    st, data = command(h2d(A.READ_DMA_EXT, lba=1, count=1), [512])(rig.drv)
    assert st.ok and rig.served() == 1 and data == image_bytes(rig, 1, 1)
    rig.close()


@pytest.mark.parametrize("flag", [True, False])
def test_the_opener_gives_disks_not_cds_the_compiled_command(tmp_path, flag):
    hd, cd = make_image(tmp_path / "hd.img"), make_image(tmp_path / "cd.iso", 4, 2048)
    opts = open_device_backends("ahci", {"port.0.type": "hd", "port.0.path": hd, "port.1.type": "cd",
                                         "port.1.path": cd, "blk_compiled": flag})
    ports = opts["backend"].ports
    assert isinstance(ports[0].backend.accel, ahcifast.Accelerator) == flag and ports[1].backend.accel is None
    dev = AhciPci(opts)
    assert dev.hba.ports[0].compiled == flag and not dev.hba.ports[1].compiled
    dev.close()


# ---- differential: random slots, most of them ones the compiled path takes, some bent one way ----------------
SMALL_RAM = 4 << 20
DATA_OPS = [A.READ_DMA, A.WRITE_DMA, A.READ_DMA_EXT, A.WRITE_DMA_EXT, A.READ_FPDMA_QUEUED, A.WRITE_FPDMA_QUEUED]
_addr = st.one_of(st.sampled_from([SMALL_RAM - 512, SMALL_RAM - 1, SMALL_RAM, 2**64 - 2, 2**64 - 0x80]),
                  st.integers(0, SMALL_RAM + PAGE))
_bend = st.one_of(st.none(), st.none(), st.none(), st.tuples(st.just("ctba"), _addr),
                  st.tuples(st.just("prdtl"), st.integers(0, 0xFFFF)), st.tuples(st.just("atapi"), st.just(True)),
                  st.tuples(st.just("extra"), st.lists(st.tuples(_addr, st.integers(1, 8192)), min_size=1,
                                                       max_size=2)),
                  st.tuples(st.just("short"), st.integers(1, 600)))
_slot = st.fixed_dictionaries({
    "op": st.one_of(st.sampled_from(DATA_OPS), st.sampled_from(DATA_OPS), st.sampled_from(DATA_OPS),
                    st.integers(0, 255)),
    "port": st.sampled_from([0, 0, 0, 1]), "tag": st.integers(0, 31),
    "lba": st.one_of(st.integers(0, 63), st.integers(0, 63), st.sampled_from([56, 63, 64, 2**24, 2**48 - 1])),
    "count": st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(0, 0xFFFF)),
    "device": st.sampled_from([0x40, 0x40, 0x40, 0x41, 0xC0]),
    "sizes": st.lists(st.one_of(st.sampled_from([512, 1024, 4096]), st.integers(1, 5000)), max_size=5),
    "bend": _bend,
})


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(slots=st.lists(_slot, min_size=1, max_size=4))
def test_random_slots_answer_alike(tmp_path, slots):
    t = Twin(tmp_path, ram=SMALL_RAM, sectors=64)
    try:
        for s in slots:
            t.run(slot_action(s))
    finally:
        t.close()


def slot_action(s):
    """The :func:`command` action for one drawn ``_slot``: its FIS, buffers covering the transfer (or falling
    short, or bent another way as drawn)."""
    op, bend = s["op"], s["bend"] or (None, None)
    queued = op in A.NCQ
    fis = ncq(op, s["tag"], s["lba"], s["count"]) if queued else h2d(op, s["lba"], s["count"], device=s["device"])
    sizes = list(s["sizes"])
    need = (s["count"] or 1) * 512 - sum(sizes)
    last = need - bend[1] if bend[0] == "short" else need
    if 0 < need <= 16 * PAGE and last > 0:      # the PRDT covers a small transfer, or falls short
        sizes.append(last)
    kw = {bend[0]: bend[1]} if bend[0] in ("ctba", "prdtl", "atapi", "extra") else {}
    return command(fis, sizes, port=s["port"], slot=s["tag"] if queued else 0, queued=queued,
                   write=op in (A.WRITE_DMA, A.WRITE_DMA_EXT, A.WRITE_FPDMA_QUEUED), fill=lambda i: 0x41 + i, **kw)
