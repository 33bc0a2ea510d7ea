"""The ``nvme`` emulation in the VM's wiring: the registry and its options (bad values named), the backend
opener (``vmmshim/backends``), and the doorbell fast path end to end: a PCI host placing BAR 0 on an MMIO bus,
the VM's fast paths (``vmmshim/fastpaths.py``) registering the submission queue doorbells with a provider that
takes them (a ``RecordingOps`` with the doorbell feature), the queues served on the device's doorbell thread,
the set of doorbells changed by Doorbell Buffer Config and back by a controller reset."""

import threading
import types

import pytest

from bhyve_devices.backends import MemoryBlockBackend
from bhyve_devices.base import BytesMemory
from bhyve_devices.base import Doorbells as DoorbellDevice
from bhyve_devices.nvme import regs as R
from bhyve_devices.nvme.pci import NEVER, NvmePci, device_options, parse_options
from bhyve_devices.nvme.testdriver import NvmeDriver
from bhyve_devices.pci import registry
from bhyve_devices.pci.host import PciHost
from ops.nvmm.api import FEATURE_DOORBELL
from vmmshim.backends import close_device_backends, open_device_backends
from vmmshim.bus import Bus
from vmmshim.doorbells import HOST_HAS_EVENTFD
from vmmshim.fastpaths import FastPaths
from vmmshim.machine import _bar_changed

from .recording_ops import RecordingOps

MiB = 1 << 20


def test_registered_as_nvme():
    assert registry.lookup("nvme") is NvmePci and "nvme" in registry.names()
    with pytest.raises(ValueError, match="no opened backend"):
        registry.create("nvme", "disk.img")
    dev = NvmePci(dict(backend=MemoryBlockBackend(bytearray(MiB))))
    assert isinstance(dev, DoorbellDevice)
    assert (dev.get_cfg(0, 2), dev.get_cfg(2, 2), dev.get_cfg(0x0B, 1), dev.get_cfg(0x0A, 1),
            dev.get_cfg(0x09, 1)) == (0xFB5D, 0x0A0A, 0x01, 0x08, 0x02)
    assert dev.ctrl.identity.serial == "NVME-0-0" and dev.ctrl.maxq == 16 and dev.ctrl.mqes == 2047


def test_legacy_option_string():
    assert parse_options("disk.img,maxq=4,qsz=64,ro,ser=ABC") == dict(path="disk.img", maxq="4", qsz="64",
                                                                       ro="true", ser="ABC")


@pytest.mark.parametrize("opts,needle", [
    (dict(maxq="0"), "maxq=0 must be 1-64"), (dict(maxq="65"), "maxq=65 must be 1-64"),
    (dict(maxq="x"), "maxq=x is not a number"), (dict(qsz="1"), "qsz=1 must be 2-65536"),
    (dict(qsz="65537"), "qsz=65537"), (dict(sectsz="1024"), "sectsz=1024 must be 512, 4096 or 8192"),
    (dict(ioslots="0"), "ioslots=0"), (dict(dsm="maybe"), "dsm=maybe"), (dict(ser="x" * 21), "ser="),
    (dict(ser="caf\u00e9"), "ser="), (dict(ram="64"), "ram="), (dict(bogus="1"), "unknown option 'bogus'"),
])
def test_bad_options_are_named(opts, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        device_options(opts)


def test_good_options():
    kw = device_options(dict(maxq="0x4", qsz="64", sectsz="4096", ser="S1", eui64="0x1122334455667788",
                             dsm="disable", ioslots="32", nocache="true", nodelete="true"))
    assert kw == dict(maxq=4, qsz=64, sectsz=4096, eui64=0x1122334455667788, nodelete=True, dsm="disable",
                      serial="S1")


def test_backend_opener(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(MiB))
    o = open_device_backends("nvme", dict(path=str(img), maxq="2", slot=4, func=0))
    try:
        assert o["backend"].size == MiB and not o["backend"].readonly
        dev = registry.create("nvme", o)
        assert dev.ctrl.maxq == 2 and dev.ctrl.identity.serial == "NVME-4-0"
    finally:
        close_device_backends(o)
    o = open_device_backends("nvme", f"{img},ro")
    assert o["backend"].readonly and NvmePci(o).ctrl.readonly
    close_device_backends(o)
    with pytest.raises(FileNotFoundError):
        open_device_backends("nvme", dict(path=str(tmp_path / "missing.img")))
    with pytest.raises(ValueError, match="image path"):
        open_device_backends("nvme", {})


class DoorbellOps(RecordingOps):
    """A provider that takes every doorbell (as KVM's ioeventfd would); the writes still reach the bus here."""

    def __init__(self):
        super().__init__()
        self.live = {}

    def vm_features(self, vmi):
        return frozenset({FEATURE_DOORBELL})

    def vm_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        self.live[addr] = (size, datamatch)
        return True

    def vm_remove_doorbell(self, vmi, addr, size, pio, datamatch, fd):
        del self.live[addr]


class FakeVm:
    def __init__(self):
        self.ops, self.vmi, self.log, self.status = DoorbellOps(), "vmi", print, None
        self.config = types.SimpleNamespace(doorbells=True, halt_serve=False, answer_io=False, answer_mmio=False,
                                            posted_io=False)
        self.pio, self.mmio = Bus("port", is_port_bus=True), Bus("mmio")
        self.fast = FastPaths(self)

    def bar_mapped(self, window, dev, idx, base, pio, name=None):
        self.fast.bar_mapped(window, dev, idx, base, pio, name)

    def bar_unmapped(self, window):
        self.fast.bar_unmapped(window)


@pytest.mark.skipif(not HOST_HAS_EVENTFD, reason="doorbells need eventfd and epoll")
def test_doorbells_through_the_fast_paths():
    vm = FakeVm()
    host = PciHost(bar_changed=lambda *a: _bar_changed(vm, *a))
    mem = BytesMemory(16 * MiB)
    dev = host.add(4, 0, NvmePci(dict(backend=MemoryBlockBackend(bytearray(MiB)), guest_memory=mem, maxq="2")))
    base = dev.bars[0].addr
    served = []
    real = dev.ctrl._drain

    def spy(sq):
        served.append(threading.current_thread().name)
        return real(sq)
    dev.ctrl._drain = spy
    try:
        drv = NvmeDriver(dev, mem)
        drv.wait_s = 5

        def mmio(off, value, size=4):
            vm.mmio.access(base + off, True, bytearray(value.to_bytes(size, "little")))
        drv.w = mmio
        bells = lambda: {a - base: v for a, v in vm.ops.live.items()}  # noqa: E731
        assert bells() == {0x1000: (4, NEVER), 0x1008: (4, NEVER), 0x1010: (4, NEVER)}
        assert drv.enable() == R.CSTS_RDY
        drv.create_io_queues(2, 16)
        assert set(served) == {"vmmshim-doorbells nvme"}
        assert drv.doorbell_buffer() == 0
        assert bells() == {0x1000: (4, NEVER), 0x1008: (4, None), 0x1010: (4, None)}
        assert drv.write(7, b"q" * 512, qid=2) == 0 and drv.read(7, 1, qid=1) == (0, b"q" * 512)
        assert set(served) == {"vmmshim-doorbells nvme"} and dev.ctrl.errors == [] and dev.errors == []
        drv.w(R.REG_CC, 0)
        assert bells() == {0x1000: (4, NEVER), 0x1008: (4, NEVER), 0x1010: (4, NEVER)}
        assert drv.enable() == R.CSTS_RDY and drv.identify(R.CNS_CONTROLLER)[0] == 0
    finally:
        vm.fast.close()
