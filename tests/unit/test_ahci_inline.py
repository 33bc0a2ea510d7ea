"""AHCI's short commands served on the thread that issued them, the port's thread serving the rest
(``Hba.inline_max``: ``-o vmmshim.ahci_inline_kib``, ``bhyve_devices/ahci/port.py``). Which thread serves which
slot (a compiled read or write up to the bound on the writer; a longer one, a flush, a write that must be flushed,
a slot whose header or table is outside RAM on the port's thread, with every slot after it), and a hypothesis
stream of slots, hostile ones among them, that must leave the guest and the images exactly as the writing
thread alone (``threaded=False``) leaves them."""

import shutil
import threading

import pytest
from hypothesis import HealthCheck, given, settings

from bhyve_devices.ahci import ata as A
from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.port import Port
from bhyve_devices.ahci.testdriver import h2d, ncq
from vmmshim.backends import ahcifast
from tests.conftest import require_compiled
from tests.unit.test_ahci_compiled import (PAGE, SMALL_RAM, Rig, _slot, command, image_bytes, make_image,
                                           place_table, scattered, slot_action)
from hypothesis import strategies as st

BOUND_KIB = 8
BOUND = BOUND_KIB << 10


@pytest.fixture(autouse=True)
def compiled():
    require_compiled(ahcifast, "compiled command")


@pytest.fixture
def served_by(monkeypatch):
    """``[(slot, thread name)]`` of every slot a port served, in order."""
    seen = []
    real = Port._run

    def run(self, slot, epoch, cmdlist):
        seen.append((slot, threading.current_thread().name))
        return real(self, slot, epoch, cmdlist)
    monkeypatch.setattr(Port, "_run", run)
    return seen


@pytest.fixture
def rig(tmp_path):
    r = Rig([(make_image(tmp_path / "a.img"), False)], accel=True, threaded=True, inline_kib=BOUND_KIB)
    yield r
    r.close()


HERE = threading.current_thread().name
THREAD = "ahci-port0"


def test_a_short_read_and_write_end_inside_the_pxci_write(rig, served_by):
    drv = rig.drv
    before = len(rig.ctl.msis) + len(rig.ctl.line.history)
    run = command(h2d(A.READ_DMA_EXT, lba=3, count=BOUND // 512), [PAGE, PAGE])
    st, data = run(drv)
    assert st.ok and data == image_bytes(rig, 3, BOUND // 512)
    st, _ = command(ncq(A.WRITE_FPDMA_QUEUED, 4, 40, 2), [1024], slot=4, queued=True, write=True,
                    fill=lambda i: 0x5A)(drv)
    assert st.ok and image_bytes(rig, 40, 2) == b"\x5A" * 1024
    assert served_by == [(0, HERE), (4, HERE)]
    assert rig.ctl.hba.ports[0]._thread is None            # the port's thread was never needed
    assert len(rig.ctl.msis) + len(rig.ctl.line.history) > before


def test_done_when_the_write_returns(rig, served_by):
    drv = rig.drv
    prdt = scattered(drv, [512])
    drv.issue(0, 2, h2d(A.READ_DMA, lba=9, count=1), ctba=place_table(drv, h2d(A.READ_DMA, lba=9, count=1), prdt),
              prdtl=1)
    assert drv.pr(0, L.P_CI) == 0 and drv.pr(0, L.P_IS) & L.IS_DHRS     # no wait: it ended in the write
    assert drv.get(prdt[0][0], 512) == image_bytes(rig, 9, 1)


@pytest.mark.parametrize("case", ["long", "flush", "fua", "cache off", "header outside RAM"])
def test_what_goes_to_the_port_thread(rig, served_by, case):
    drv = rig.drv
    if case == "cache off":
        assert drv.command(0, 1, h2d(A.SET_FEATURES, features=0x82)).ok          # write cache off
        del served_by[:]
    if case == "long":
        st, data = command(h2d(A.READ_DMA_EXT, lba=0, count=BOUND // 512 + 1), [BOUND + 512])(drv)
        assert st.ok and data == image_bytes(rig, 0, BOUND // 512 + 1)
    elif case == "flush":
        st, _ = command(h2d(A.FLUSH_CACHE_EXT))(drv)
        assert st.ok
    elif case in ("fua", "cache off"):
        st, _ = command(ncq(A.WRITE_FPDMA_QUEUED, 0, 7, 1, fua=case == "fua"), [512], queued=True, write=True,
                        fill=lambda i: 0x33)(drv)
        assert st.ok and image_bytes(rig, 7, 1) == b"\x33" * 512
    else:
        cmdlist = drv.cmdlist(0)
        drv.mem.view(cmdlist, L.HEADER.size)[:] = L.HEADER.pack(5, 1, 0, SMALL_RAM * 64)
        drv.go(0, 0)
        st = drv.wait(0, 0)
        assert st.is_ & L.IS_HBFS
    assert served_by == [(0, THREAD)]


def test_a_long_slot_hands_the_rest_to_the_thread(rig, served_by):
    """NCQ slots issued together: the writer serves the short ones up to the first long one, which goes to the
    port's thread with every slot after it, in the engine's order."""
    drv = rig.drv
    buffers = {}
    for tag in range(6):
        n = BOUND // 512 * 2 if tag == 3 else 4
        prdt = scattered(drv, [n * 512])
        fis = ncq(A.READ_FPDMA_QUEUED, tag, 8 * tag, n)
        drv.issue(0, tag, fis, ctba=place_table(drv, fis, prdt), prdtl=1, go=False)
        buffers[tag] = (prdt[0], n)
    drv.pw(0, L.P_SACT, 0x3F)
    drv.pw(0, L.P_CI, 0x3F)
    for tag in range(6):
        assert drv.wait(0, tag, queued=True).ok
        (gpa, length), n = buffers[tag]
        assert drv.get(gpa, length) == image_bytes(rig, 8 * tag, n)
    assert served_by == [(0, HERE), (1, HERE), (2, HERE), (3, THREAD), (4, THREAD), (5, THREAD)]


def test_without_a_bound_every_slot_goes_to_the_thread(tmp_path, served_by):
    r = Rig([(make_image(tmp_path / "a.img"), False)], accel=True, threaded=True, inline_kib=0)
    try:
        st, _ = command(h2d(A.READ_DMA, lba=1, count=1), [512])(r.drv)
        assert st.ok and served_by == [(0, THREAD)]
    finally:
        r.close()


@pytest.mark.parametrize("value", [-1, 32769, "lots", 1.5])
def test_a_bad_bound_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="inline_kib"):
        Rig([(make_image(tmp_path / "a.img"), False)], accel=True, threaded=True, inline_kib=value)


# ---- the same guest actions, the writing thread alone against the writer and the port's thread ------------------
def _twin(tmp_path):
    src = make_image(tmp_path / "src.img", 64)
    rigs = []
    for kind, kw in (("alone", dict(threaded=False)), ("mixed", dict(threaded=True, inline_kib=2))):
        images = []
        for port, ro in ((0, False), (1, True)):
            path = tmp_path / f"{kind}{port}.img"
            shutil.copyfile(src, path)
            images.append((str(path), ro))
        rigs.append(Rig(images, True, SMALL_RAM, **kw))
    return rigs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(slots=st.lists(_slot, min_size=1, max_size=4))
def test_random_slots_answer_as_the_writing_thread_alone(tmp_path, slots, served_by):
    alone, mixed = _twin(tmp_path)
    try:
        for s in slots:
            action = slot_action(s)
            assert action(alone.drv) == action(mixed.drv)
            a, m = alone.seen(), mixed.seen()
            for key in a:
                assert a[key] == m[key], f"{key} differs"
            assert m["errors"] == [] and mixed.mem.guard_intact()
    finally:
        alone.close()
        mixed.close()
