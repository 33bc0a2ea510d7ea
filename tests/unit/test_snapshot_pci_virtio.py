"""Snapshot and restore (issue 23) of the PCI layer and the virtio devices: a state goes through JSON, a fresh device
of the same configuration takes it over the same guest memory, and the guest's driver goes on where it was."""

import json
import struct

import pytest

from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory, RecordingLine
from bhyve_devices.pci import config as C
from bhyve_devices.pci.device import IO, MEM32, MEM64, PciDevice
from bhyve_devices.pci.host import PciHost
from bhyve_devices.pci.hostbridge import Hostbridge
from bhyve_devices.pci.lpc import Lpc
from bhyve_devices.snapshot import SnapshotError, Snapshottable
from bhyve_devices.virtio import blk as B
from bhyve_devices.virtio import transport as T
from bhyve_devices.virtio.rnd import VirtioRnd
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends.block import FileBlockBackend

SECTORS = 64


def through_json(state):
    text = json.dumps(state)
    back = json.loads(text)
    assert back == state
    return back


class Bus:
    """What the VM keeps of ``bar_changed``: the BAR windows it maps, ``{(idx, is_io): (addr, size)}``."""

    def __init__(self):
        self.mapped, self.calls = {}, []

    def __call__(self, dev, idx, kind, old, new, size, enabled):
        self.calls.append((idx, old, new, enabled))
        cur = self.mapped.get(idx)
        if cur is not None and cur[0] == old:
            del self.mapped[idx]
        if enabled:
            self.mapped[idx] = (new, size)


def host_with(dev, slot=3):
    bus = Bus()
    host = PciHost(bar_changed=bus)
    host.add(0, 0, Hostbridge())
    host.add(31, 0, Lpc())
    host.add(slot, 0, dev)
    return host, bus


def cfg_image(dev):
    return [dev.cfgread(o, 4) for o in range(0, C.CFG_SIZE, 4)]


# ---- the generic PCI function ---------------------------------------------------------------------------------------
def plain():
    d = PciDevice("t", 0x1234, 0x5678, 2, 0)
    d.alloc_bar(0, IO, 0x40)
    d.alloc_bar(1, MEM32, 0x1000)
    d.alloc_bar(2, MEM64, 0x4000)
    d.add_msi_cap(4, per_vector_mask=True)
    d.add_msix_cap(4, 4)
    d.lintr_request(1)
    return d


def program(d):
    """What a guest does: moves BARs, turns I/O decoding off, programs MSI (masked vector 1 pending) and MSI-X."""
    d.cfgwrite(0x14, 4, 0xC8000000)                       # BAR 1
    d.cfgwrite(0x18, 4, 0x00010000)                       # BAR 2/3 (MEM64) low and high halves
    d.cfgwrite(0x1C, 4, 0x2)
    d.cfgwrite(C.COMMAND, 2, C.CMD_MEM | C.CMD_BUSMASTER)  # I/O decoding off
    msi = C.find_capability(lambda o: d.cfgread(o, 1), C.CAP_ID_MSI)
    d.cfgwrite(msi + C.MSI_ADDR_LO, 4, 0xFEE01000)
    d.cfgwrite(msi + C.MSI_DATA, 2, 0x50)
    d.cfgwrite(msi + C.MSI_MASK, 4, 0x2)
    d.cfgwrite(msi + C.MSI_CTRL, 2, C.MSI_CTRL_ENABLE | (2 << C.MSI_CTRL_MME_SHIFT))
    for v in range(4):
        d.bar_access_write(4, 16 * v, 4, 0xFEE00000 + v)
        d.bar_access_write(4, 16 * v + 8, 4, 0x60 + v)
    return msi


def test_plain_function_round_trip():
    a = plain()
    ha, bus_a = host_with(a)
    msi = program(a)
    got = []
    a.msi = lambda addr, data: got.append((addr, data))
    a.msi_notify(1)                                       # masked: pending
    a.msi_notify(2)
    assert got == [(0xFEE01000, 0x52)] and a.msi_pending(1)
    a.bar_access_write(4, 16 * 3 + 12, 4, 0)               # MSI-X vector 3 unmasked (MSI-X itself off)
    state = through_json(a.snapshot())
    assert isinstance(a, Snapshottable) and state["device"] == "PciDevice" and state["version"] == 1

    b = plain()
    hb, bus_b = host_with(b)
    assert bus_b.mapped != bus_a.mapped                   # the host placed the fresh BARs where it always does
    bus_b.calls.clear()
    b.restore(state, 0)
    assert cfg_image(b) == cfg_image(a)
    assert bus_b.mapped == bus_a.mapped                   # mapped where the guest put them, I/O BAR unmapped
    assert (0, 0x2000, 0x2000, False) in bus_b.calls and 0 not in bus_b.mapped
    assert bus_b.mapped[2] == (0x200010000, 0x4000)
    assert [(b.bars[i].addr, b.bars[i].placed) for i in range(6)] == [(x.addr, x.placed) for x in a.bars]
    assert [b.bar_access_read(4, o, 4) for o in range(0, 0x1010, 4)] == \
        [a.bar_access_read(4, o, 4) for o in range(0, 0x1010, 4)]
    assert b.msi_pending(1)
    got.clear()
    b.msi = lambda addr, data: got.append((addr, data))
    b.cfgwrite(msi + C.MSI_MASK, 4, 0)                    # unmasking delivers the pending vector
    assert got == [(0xFEE01000, 0x51)]
    # a second restore of the same state changes nothing the VM maps
    bus_b.calls.clear()
    b.restore(state, 0)
    assert bus_b.calls == []


def test_msix_and_intx_state():
    a = plain()
    ha, _ = host_with(a)
    program(a)
    msix = C.find_capability(lambda o: a.cfgread(o, 1), C.CAP_ID_MSIX)
    a.cfgwrite(msix + 2, 2, C.MSIX_CTRL_ENABLE)
    a.msi_notify(2)                                       # vector 2 still masked: PBA bit
    assert a.msix_pending(2)
    a.cfgwrite(msix + 2, 2, 0)
    a.cfgwrite(msi_ctrl(a), 2, 0)                         # MSI off too: INTx
    a.lintr_assert()
    route = ha.route(a)
    assert ha.router.active[route[0]] == 1
    state = through_json(a.snapshot())

    b = plain()
    hb, _ = host_with(b)
    line = RecordingLine()
    b.intx_line, real = line, b.intx_line
    b.restore(state, 0)
    assert line.level is True and b.cfgread(C.STATUS, 2) & C.STS_INTX
    b.intx_line = real
    b2 = plain()
    hb2, _ = host_with(b2)
    b2.restore(state, 0)
    assert hb2.router.active[route[0]] == 1               # the host's wire-OR counts the restored level
    b2.lintr_deassert()
    assert hb2.router.active[route[0]] == 0
    assert b2.msix_pending(2)
    b2.cfgwrite(msix + 2, 2, C.MSIX_CTRL_ENABLE)
    got = []
    b2.msi = lambda addr, data: got.append((addr, data))
    b2.bar_access_write(4, 16 * 2 + 12, 4, 0)              # unmask: the pending message goes out
    assert got == [(0xFEE00002, 0x62)] and not b2.msix_pending(2)


def msi_ctrl(d):
    return C.find_capability(lambda o: d.cfgread(o, 1), C.CAP_ID_MSI) + C.MSI_CTRL


def test_lpc_pirq_routing_and_host_address_register():
    ha = PciHost()
    lpc = Lpc()
    ha.add(31, 0, lpc)
    lpc.cfgwrite(0x61, 1, 0x0A)
    lpc.cfgwrite(0x68, 1, 0x8B)
    ha.conf1.write(0, 4, 0x8000F860)
    s_lpc, s_host = through_json(lpc.snapshot()), through_json(ha.snapshot())
    hb = PciHost()
    lpc2 = Lpc()
    hb.add(31, 0, lpc2)
    lpc2.restore(s_lpc, 0)
    hb.restore(s_host, 0)
    assert lpc2.cfgread(0x60, 4) == lpc.cfgread(0x60, 4) and lpc2.cfgread(0x68, 1) == 0x8B
    assert hb.router.regs == ha.router.regs and hb.router.isa_irq_of(1) == 10
    assert hb.conf1.read(0, 4) == 0x8000F860
    assert hb.conf1.read(4, 4) == lpc.cfgread(0x60, 4)    # CONFIG_DATA reaches the same register
    bad = dict(s_host, conf1_addr=3)
    with pytest.raises(SnapshotError):
        hb.restore(bad, 0)
    with pytest.raises(SnapshotError):
        lpc2.restore(dict(s_lpc, pirq=[0x80] * 7), 0)


def test_hostbridge_round_trip():
    a, b = Hostbridge(), Hostbridge()
    a.cfgwrite(C.CACHE_LINE, 1, 0x10)
    b.restore(through_json(a.snapshot()), 0)
    assert cfg_image(a) == cfg_image(b)


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.update(version=99), "version 99"),
    (lambda s: s.update(device="Lpc"), "saved by Lpc"),
    (lambda s: s.pop("pci"), "no pci"),
    (lambda s: s["pci"].pop("msix_table"), "lacks"),
    (lambda s: s["pci"].update(cfg="zz"), "not a hex"),
    (lambda s: s["pci"].update(cfg="00" * 256), "256 bytes"),
    (lambda s: s["pci"]["bars"][1].__setitem__(1, 0x2000), "BAR 1"),
    (lambda s: s["pci"].update(slot=9), "saved at 0:9.0"),
])
def test_bad_pci_state_is_refused(mutate, match):
    a = plain()
    host_with(a)
    state = through_json(a.snapshot())
    mutate(state)
    b = plain()
    host_with(b)
    with pytest.raises(SnapshotError, match=match):
        b.restore(state, 0)
    with pytest.raises(SnapshotError):
        b.restore("not a dict", 0)


# ---- virtio ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path):
    p = tmp_path / "disk.img"
    p.write_bytes(bytes((i * 7 + i // 512) & 0xFF for i in range(SECTORS * 512)))
    return str(p)


class Guest:
    """A virtio function at 0:4.0 of a host, its driver (queues in ``mem``) and the requests the test makes."""

    def __init__(self, make, mem, modern, event_idx=False, msix=True):
        self.make, self.mem, self.modern = make, mem, modern
        self.pci = make()
        self.host, self.bus = host_with(self.pci, slot=4)
        self.drv = PciDriver(self.pci, mem, modern=modern)
        self.drv.init(msix=msix, event_idx=event_idx)
        self.event_idx = event_idx

    def restored(self, state):
        """A fresh function of the same configuration on a fresh host, the state restored, the driver moved to it."""
        pci = self.make()
        host, bus = host_with(pci, slot=4)
        pci.restore(state, 12345)
        self.pci, self.host, self.bus_before, self.bus = pci, host, self.bus, bus
        self.drv.dev = pci
        pci.msi = lambda addr, data: self.drv.msis.append((addr, data))
        pci.intx_line = self.drv.intx
        return pci

    def chain(self, q, out=(), inn=()):
        dq = self.drv.queues[q]
        if self.event_idx:
            dq.set_used_event(dq.last_used)
        self.drv.msis.clear()
        head = dq.add(out=out, inn=inn)
        self.drv.notify(q)
        used = dq.get_used()
        assert [h for h, _ in used] == [head]
        return used[0][1]

    def used_idx(self, q):
        dq = self.drv.queues[q]
        return struct.unpack_from("<H", self.mem.buf, dq.used + 2 - self.mem.base)[0]

    def blk_read(self, sector):
        a = self.drv.alloc
        hdr = a.put(struct.pack("<IIQ", B.VIRTIO_BLK_T_IN, 0, sector))
        data, status = a.alloc(512), a.alloc(1)
        n = self.chain(0, out=[(hdr, 16)], inn=[(data, 512), (status, 1)])
        return n, self.mem.buf[status - self.mem.base], a.read(data, 512)

    def visible(self):
        """What the guest can read of the function: config space, the virtio registers, the MSI-X table."""
        pci = self.pci
        regs = ([pci.bar_access_read(T.MODERN_BAR, o, 1) for o in range(T.COMMON_CFG_SIZE)] if self.modern else
                [pci.bar_access_read(T.LEGACY_BAR, o, s) for o, s in sorted(T._LEGACY_REGS.items())
                 if o != T.VIRTIO_PCI_ISR])
        cfg = [self.drv.config_read(o, 1) for o in range(pci.vdev.config_size)]
        table = [pci.bar_access_read(T.MSIX_BAR, o, 4) for o in range(0, 16 * pci._nvec, 4)]
        return cfg_image(pci), regs, cfg, table


def blk_maker(path, mem):
    def make():
        return VirtioPciDevice(B.VirtioBlock(FileBlockBackend(path)), mem)
    return make


@pytest.mark.parametrize("modern,event_idx", [(False, False), (True, False), (True, True)])
def test_virtio_blk_goes_on_after_restore(image, modern, event_idx):
    mem = BytesMemory(4 << 20)
    g = Guest(blk_maker(image, mem), mem, modern, event_idx)
    for s in range(3):
        n, st, data = g.blk_read(s)
        assert (n, st) == (513, 0)
    assert g.drv.msix_vectors() == [1] and g.used_idx(0) == 3
    before = g.visible()
    bars = [(b.addr, b.placed) for b in g.pci.bars]
    state = through_json(g.pci.snapshot())
    assert state["virtio"]["queues"][0]["last_avail"] == 3 and state["vdev"]["name"] == "virtio-blk"

    pci = g.restored(state)
    assert [(b.addr, b.placed) for b in pci.bars] == bars and g.bus.mapped == g.bus_before.mapped
    assert g.visible() == before
    assert pci.queues[0].last_avail == 3 and pci.negotiated == g.drv.features
    n, st, data = g.blk_read(5)
    assert (n, st) == (513, 0)
    assert data == bytes(((5 * 512 + i) * 7 + 5) & 0xFF for i in range(512))
    assert g.used_idx(0) == 4 and pci.queues[0].used_idx == 4
    assert g.drv.msix_vectors() == [1]                     # the queue's vector, as before
    assert pci.queues[0].event_idx == event_idx and pci.queues[0].indirect


def test_virtio_blk_refuses_another_image(image, tmp_path):
    mem = BytesMemory(4 << 20)
    g = Guest(blk_maker(image, mem), mem, True)
    state = through_json(g.pci.snapshot())
    other = tmp_path / "other.img"
    other.write_bytes(bytes(SECTORS * 1024))
    with pytest.raises(SnapshotError, match="capacity"):
        blk_maker(str(other), mem)().restore(state, 0)


@pytest.mark.parametrize("modern", [False, True])
def test_virtio_rnd_goes_on_after_restore(modern):
    mem = BytesMemory(1 << 20)
    make = lambda: VirtioPciDevice(VirtioRnd(lambda n: b"\xab" * n), mem)  # noqa: E731
    g = Guest(make, mem, modern)
    for _ in range(5):
        buf = g.drv.alloc.alloc(32)
        assert g.chain(0, inn=[(buf, 32)]) == 32
    before = g.visible()
    state = through_json(g.pci.snapshot())
    g.restored(state)
    assert g.visible() == before
    buf = g.drv.alloc.alloc(16)
    assert g.chain(0, inn=[(buf, 16)]) == 16 and g.drv.alloc.read(buf, 16) == b"\xab" * 16
    assert g.used_idx(0) == 6 and g.drv.msix_vectors() == [1]
    assert g.drv.status() & 0x4                            # DRIVER_OK still


def test_virtio_status_isr_and_selects_survive():
    mem = BytesMemory(1 << 20)
    make = lambda: VirtioPciDevice(VirtioRnd(), mem, single_vector=True)  # noqa: E731
    g = Guest(make, mem, True, msix=False)
    g.drv.cwrite("device_feature_select", 1)
    g.drv.cwrite("driver_feature_select", 1)
    g.drv.cwrite("queue_select", 0)
    buf = g.drv.alloc.alloc(8)
    g.drv.queues[0].add(inn=[(buf, 8)])
    g.drv.notify(0)                                       # INTx: ISR bit 0, the line up
    assert g.drv.intx.level and g.pci.isr == 1
    state = through_json(g.pci.snapshot())
    pci = g.restored(state)
    assert (pci.device_feature_select, pci.driver_feature_select, pci.modern) == (1, 1, True)
    assert g.drv.isr() == 1 and not g.drv.intx.level      # reading ISR acknowledges, as before


def test_bad_virtio_state_is_refused():
    mem = BytesMemory(1 << 20)
    make = lambda: VirtioPciDevice(VirtioRnd(), mem)  # noqa: E731
    g = Guest(make, mem, True)
    good = through_json(g.pci.snapshot())
    for mutate, match in ((lambda s: s.pop("virtio"), "no virtio"),
                          (lambda s: s["virtio"].update(queues=[]), "1 queues"),
                          (lambda s: s["virtio"].update(status=256), "status"),
                          (lambda s: s["virtio"]["queues"][0].pop("used_idx"), "no used_idx"),
                          (lambda s: s["virtio"]["queues"][0].update(msix_vector=9), "vector 9"),
                          (lambda s: s["virtio"]["queues"][0].update(used_addr=(1 << 20) - 4), "map"),
                          (lambda s: s["vdev"].update(name="virtio-blk"), "virtio-rnd"),
                          (lambda s: s.update(device="VirtioBlkPci"), "saved by")):
        state = json.loads(json.dumps(good))
        mutate(state)
        with pytest.raises(SnapshotError, match=match):
            make().restore(state, 0)


# ---- devices that refuse ---------------------------------------------------------------------------------------------
def test_virtio_9p_refuses_with_an_open_fid(tmp_path):
    from tests.unit.test_virtio_9p import Guest as P9Guest
    share = tmp_path / "share"
    share.mkdir()
    g = P9Guest(str(share))
    g.client.version(msize=32768)
    g.client.attach(0)
    with pytest.raises(SnapshotError, match="virtio-9p: 1 fid open"):
        g.pci.snapshot()
    g.client.clunk(0)
    state = through_json(g.pci.snapshot())
    assert state["vdev"]["msize"] == 32768
    g2 = P9Guest(str(share))
    g2.pci.restore(state, 0)
    assert g2.dev.server.msize == 32768 and g2.pci.queues[0].last_avail == g.pci.queues[0].last_avail


def test_virtio_net_receives_nothing_while_quiesced():
    import threading

    from bhyve_devices.snapshot import Quiescent
    from bhyve_devices.virtio.net import VirtioNet
    net = VirtioNet(backend=None, start=False)
    done = threading.Event()
    with net.quiesced():
        t = threading.Thread(target=lambda: (net.receive_pending(), done.set()), daemon=True)
        t.start()
        assert not done.wait(0.3)            # the receive path waits for the checkpoint
    assert done.wait(5)
    from bhyve_devices.virtio.transport import VirtioPciDevice
    from bhyve_devices.base import BytesMemory
    assert isinstance(VirtioPciDevice(net, BytesMemory(1 << 16)), Quiescent)


def test_virtio_net_link_goes_down_and_up_with_a_config_interrupt():
    from bhyve_devices.virtio.net import VirtioNet
    net = VirtioNet(backend=None, start=False)
    changes = []
    net.config_changed = lambda: changes.append(net.config_bytes()[6])
    net.set_link(False)
    net.set_link(True)
    assert changes == [0, 1]
