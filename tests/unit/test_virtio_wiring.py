"""The command line to the virtio devices: ``-s`` options become bhyve config keys, the keys become devices.

``-s 5,virtio-net,tap0`` stores the tap's name as ``pci.0.5.0.path`` (the first option of any emulation); the
first Linux guest on virtio-net sent every frame into a device without a backend because only ``backend``/``tap``
were read.
"""

from bhyve_devices.pci import registry
from bhyve_devices.virtio import net as N
from bhyve_devices.virtio import pci as P
from vmmshim.config import Config, parse_slot


def slot_opts(spec):
    cfg = Config()
    parse_slot(spec, cfg)
    (_, _, _, opts), = cfg.pci_slots()
    return {k: v for k, v in opts.items() if k != "device"}


def test_net_backend_from_the_command_line(monkeypatch):
    opened = []

    def fake_open(name):
        opened.append(name)
        return N.SocketPairBackend(vnet_hdr=True)

    monkeypatch.setattr(N, "open_backend", fake_open)
    dev = registry.create("virtio-net", dict(slot_opts("5,virtio-net,tap0,mac=02:00:00:00:00:05"), slot=5))
    try:
        assert opened == ["tap0"]
        assert dev.vdev.backend is not None and dev.vdev.mac == bytes.fromhex("020000000005")
    finally:
        dev.close()
    dev = registry.create("virtio-net", {"backend": "tap7"})
    dev.close()
    assert opened == ["tap0", "tap7"]


def test_blk_path_and_ro_from_the_command_line(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    dev = registry.create("virtio-blk", slot_opts(f"4,virtio-blk,{img},ro"))
    try:
        assert dev.vdev.readonly and dev.vdev.path == str(img)
    finally:
        dev.close()
    assert P.VirtioBlkPci is registry.lookup("virtio-blk")
