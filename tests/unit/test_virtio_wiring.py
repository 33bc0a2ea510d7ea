"""The command line to the virtio devices: ``-s`` options become bhyve config keys, the keys become devices.

``-s 5,virtio-net,tap0`` stores the tap's name as ``pci.0.5.0.path`` (the first option of any emulation); the
first Linux guest on virtio-net sent every frame into a device without a backend because only ``backend``/``tap``
were read. The VM opens the backends (``vmmshim.backends.open_device_backends``) before the registry builds the
device, which opens nothing itself.
"""

import pytest

from bhyve_devices.base import BytesMemory
from bhyve_devices.pci import registry
from bhyve_devices.virtio import pci as P
from bhyve_devices.virtio.testdriver import PciDriver
from vmmshim import backends
from vmmshim.backends import net as NB
from vmmshim.config import Config, parse_slot


def slot_opts(spec):
    cfg = Config()
    parse_slot(spec, cfg)
    (_, _, _, opts), = cfg.pci_slots()
    return {k: v for k, v in opts.items() if k != "device"}


def test_net_backend_from_the_command_line(monkeypatch):
    opened = []

    def fake_open(name, options=None, compiled=False):
        opened.append(name)
        return NB.SocketPairBackend(vnet_hdr=True)

    monkeypatch.setattr(NB, "open_backend", fake_open)
    opts = backends.open_device_backends("virtio-net", dict(slot_opts("5,virtio-net,tap0,mac=02:00:00:00:00:05"),
                                                            slot=5))
    dev = registry.create("virtio-net", opts)
    try:
        assert opened == ["tap0"]
        assert dev.vdev.backend is not None and dev.vdev.mac == bytes.fromhex("020000000005")
    finally:
        dev.close()
    dev = registry.create("virtio-net", backends.open_device_backends("virtio-net", {"backend": "tap7"}))
    dev.close()
    assert opened == ["tap0", "tap7"]
    with pytest.raises(ValueError, match="not open"):
        registry.create("virtio-net", {"backend": "tap7"})         # the device never opens it itself
    assert opened == ["tap0", "tap7"]


def test_blk_path_and_ro_from_the_command_line(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    dev = registry.create("virtio-blk", backends.open_device_backends("virtio-blk",
                                                                     slot_opts(f"4,virtio-blk,{img},ro")))
    try:
        assert dev.vdev.readonly and dev.vdev.backend.path == str(img)
    finally:
        dev.close()
    assert P.VirtioBlkPci is registry.lookup("virtio-blk")
    with pytest.raises(ValueError, match="no backend"):
        registry.create("virtio-blk", slot_opts(f"4,virtio-blk,{img}"))


def test_blk_compiled_request_attached_when_asked(tmp_path, monkeypatch):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    monkeypatch.setattr(backends.blkfast, "accelerator", lambda: "compiled")
    for flag, want in ((True, "compiled"), ("true", "compiled"), (False, None), ("false", None)):
        opts = backends.open_device_backends("virtio-blk", {"path": str(img), "blk_compiled": flag})
        assert opts["backend"].accel == want and opts["backend"].compiled == (want is not None)
        backends.close_device_backends(opts)
        assert opts["backend"].fd == -1


def test_open_errors_are_the_host_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        backends.open_device_backends("virtio-blk", {"path": str(tmp_path / "missing.img")})
    with pytest.raises(ValueError):
        backends.open_device_backends("virtio-blk", {})
    assert backends.open_device_backends("hostbridge", {"x": 1}) == {"x": 1}      # no backend: as given


def test_virtio_rnd_gets_the_host_entropy_source():
    from bhyve_devices.backends import EntropySource
    mem = BytesMemory(1 << 20)
    opts = backends.open_device_backends("virtio-rnd", {"guest_memory": mem})
    assert isinstance(opts["backend"], EntropySource)
    dev = registry.create("virtio-rnd", opts)
    buf = [memoryview(bytearray(64))]
    assert dev.vdev._fill(buf) == 64 and bytes(buf[0]) != bytes(64)
    dev.close()


def test_console_backend_opened_started_and_closed(tmp_path):
    log = tmp_path / "hvc0.log"
    mem = BytesMemory(1 << 20)
    opts = backends.open_device_backends("virtio-console", {"backend": f"file:{log}", "guest_memory": mem})
    dev = registry.create("virtio-console", opts)
    assert opts["backend"]._feed == dev.vdev.enqueue_input     # started: input goes to the console
    drv = PciDriver(dev, mem)
    drv.init()
    drv.config_write(8, 4, ord("!"))                # the emergency write goes straight to the backend
    dev.close()
    assert log.read_bytes() == b"!"
