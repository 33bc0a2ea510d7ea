"""virtio-rnd and virtio-console driven through the PCI transport by the test driver; the registry names."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.virtio.console import CONSOLE_CONFIG, VIRTIO_CONSOLE_F_EMERG_WRITE, VirtioConsole
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.rnd import VirtioRnd
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice


def setup(dev, modern=False, msix=False):
    mem = BytesMemory(1 << 20)
    pci = VirtioPciDevice(dev, mem)
    drv = PciDriver(pci, mem, modern=modern)
    drv.init(msix=msix)
    return mem, pci, drv


@pytest.mark.parametrize("modern,msix", [(False, False), (True, True)])
def test_rnd_fills_buffers(modern, msix):
    mem, pci, drv = setup(VirtioRnd(), modern, msix)
    q = drv.queues[0]
    bufs = [drv.alloc.alloc(64) for _ in range(3)]
    heads = [q.add(inn=[(b, 64)]) for b in bufs]
    drv.notify(0)
    used = q.get_used()
    assert [h for h, _ in used] == heads and all(n == 64 for _, n in used)
    datas = [drv.alloc.read(b, 64) for b in bufs]
    assert len(set(datas)) == 3 and all(d != bytes(64) for d in datas)
    assert (drv.msix_vectors() == [1]) if msix else drv.isr() == 1


def test_rnd_source_callable_cap_and_readable_chains():
    dev = VirtioRnd(source=lambda n: b"\x5a" * n)
    dev.max_request = 100
    mem, pci, drv = setup(dev)
    q = drv.queues[0]
    big = drv.alloc.alloc(300)
    q.add(inn=[(big, 150), (big + 150, 150)])
    q.add(out=[(drv.alloc.put(b"x"), 1)], inn=[(drv.alloc.alloc(8), 8)])
    drv.notify(0)
    assert [n for _, n in q.get_used()] == [100, 0]
    assert drv.alloc.read(big, 101) == b"\x5a" * 100 + b"\0"
    dev.close()


def test_console_output_input_and_emergency_write():
    out = []

    class Sink:
        def write(self, data):
            out.append(bytes(data))
    dev = VirtioConsole(Sink(), backlog=16)
    mem, pci, drv = setup(dev, modern=True, msix=True)
    assert drv.device_features() >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    cfg = CONSOLE_CONFIG.parse(drv.config_bytes(12))
    assert cfg.max_nr_ports == 1
    rx, tx = drv.queues[0], drv.queues[1]
    tx.add(out=[(drv.alloc.put(b"hello "), 6), (drv.alloc.put(b"world\n"), 6)])
    drv.notify(1)
    assert out == [b"hello world\n"] and tx.get_used()[0][1] == 0
    drv.config_write(8, 4, ord("!"))
    assert out[-1] == b"!"
    # input before the guest has buffers is kept (up to the backlog)
    assert dev.enqueue_input(b"0123456789") == 10
    assert dev.enqueue_input(b"abcdefghij") == 6
    assert dev.pending_input() == 16
    b1, b2 = drv.alloc.alloc(8), drv.alloc.alloc(64)
    rx.add(inn=[(b1, 8)])
    rx.add(inn=[(b2, 64)])
    drv.notify(0)
    used = rx.get_used()
    assert [n for _, n in used] == [8, 8]
    assert drv.alloc.read(b1, 8) + drv.alloc.read(b2, 8) == b"0123456789abcdef"
    assert dev.pending_input() == 0
    b3 = drv.alloc.alloc(4)
    rx.add(inn=[(b3, 4)])
    drv.notify(0)
    assert dev.enqueue_input(b"xyz") == 3
    assert rx.get_used() == [(2, 3)] and drv.alloc.read(b3, 3) == b"xyz"
    assert 2 in drv.msix_vectors() or 1 in drv.msix_vectors()


def test_console_with_uart_backend_feed_interface():
    dev = VirtioConsole()
    assert hasattr(dev, "enqueue_input")
    mem, pci, drv = setup(dev)
    assert dev.enqueue_input(b"q") == 1


def test_registry_names(tmp_path):
    reg = pytest.importorskip("bhyve_devices.pci.registry")
    from vmmshim.backends import open_device_backends
    names = reg.names()
    for n in ("virtio-blk", "virtio-net", "virtio-tap", "virtio-rnd", "virtio-console"):
        assert n in names
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    mem = BytesMemory(1 << 20)
    d = reg.create("virtio-blk", open_device_backends("virtio-blk", {"path": str(img), "ro": "true",
                                                                     "guest_memory": mem}))
    assert d.vdev.readonly and d.header().device_id == 0x1001
    d.close()
    d = reg.create("virtio-blk", open_device_backends("virtio-blk", f"{img},sectorsize=4096"))
    assert d.vdev.sectorsize == 4096 and d.mem is None
    d.set_memory(mem)
    drv = PciDriver(d, mem)
    drv.init()
    d.close()
    r = reg.create("virtio-rnd", {"guest_memory": mem, "virtio_msix": "false"})
    assert r.single_vector and r._msix_off is None
    n = reg.create("virtio-net", {"mac": "02:00:00:00:00:09", "guest_memory": mem})
    assert n.vdev.mac == bytes([2, 0, 0, 0, 0, 9]) and n.header().device_id == 0x1000
    n.close()
    c = reg.create("virtio-console", {"guest_memory": mem})
    assert c.header().device_id == 0x1003


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(["rnd", "console"]), qidx=st.integers(0, 1),
       chains=st.lists(st.lists(st.tuples(st.integers(-0x1000, 0x110000), st.integers(0, 0x20000),
                                          st.booleans()), max_size=3), min_size=1, max_size=6),
       feed=st.binary(max_size=64), modern=st.booleans())
def test_hostile_chains(which, qidx, chains, feed, modern):
    dev = VirtioRnd() if which == "rnd" else VirtioConsole()
    mem, pci, drv = setup(dev, modern)
    qidx = min(qidx, len(drv.queues) - 1)
    q = drv.queues[qidx]
    for segs in chains:
        outs, ins = [], []
        for off, n, w in segs:
            (ins if w or ins else outs).append(((mem.base + off) % 2**64, n))
        if not outs and not ins:
            continue
        try:
            q.add(out=outs, inn=ins)
        except IndexError:
            break
        drv.notify(qidx)
        if which == "console":
            dev.enqueue_input(feed)
        q.get_used()
    assert not pci.errors or drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert all("internal" not in e and "notify" not in e for e in pci.errors)
    dev.close()
