"""The ports of ``ahci``/``ahci-hd``/``ahci-cd`` from bhyve's options (``bhyve_devices/ahci/options.py``) and
their opening by the VM (``vmmshim.backends.open_device_backends``): the legacy ``hd:PATH,cd:PATH`` string,
the shorthands, ``port.N.*`` keys, the errors (a bad type, too many ports, a port out of range, a missing image),
and the registry building the device from what was opened."""

import pytest

from bhyve_devices.ahci import options as O
from bhyve_devices.ahci.pci import AhciPci
from bhyve_devices.base import BytesMemory
from bhyve_devices.pci import registry
from vmmshim.backends import close_device_backends, open_device_backends


def test_legacy_config_is_bhyves():
    keys = O.legacy_config("hd:/a.img,ro,ser=X1,cd:/b.iso,hd:,hd:/c.img,sectorsize=512/4096")
    assert keys == {"port.0.type": "hd", "port.0.path": "/a.img", "port.0.ro": "true", "port.0.ser": "X1",
                    "port.1.type": "cd", "port.1.path": "/b.iso",
                    "port.3.type": "hd", "port.3.path": "/c.img", "port.3.sectorsize": "512/4096"}
    specs = O.port_specs("ahci", "hd:/a.img,ro,ser=X1,cd:/b.iso,hd:,hd:/c.img,sectorsize=512/4096")
    assert [(s.port, s.kind, s.path, s.readonly) for s in specs] == [
        (0, "hd", "/a.img", True), (1, "cd", "/b.iso", True), (3, "hd", "/c.img", False)]
    assert specs[0].serial() == "X1" and specs[2].sector_sizes() == (512, 4096)


def test_the_default_serial_is_bhyves():
    s = O.PortSpec(0, "hd", "/tmp/disk.img")
    assert s.serial().startswith("BHYVE-") and len(s.serial()) == 20


@pytest.mark.parametrize("name,opts,expect", [
    ("ahci-hd", "/a.img,nodelete", [(0, "hd", "/a.img")]),
    ("ahci-cd", {"path": "/b.iso", "slot": 4}, [(0, "cd", "/b.iso")]),
    ("ahci", {"path": "cd:/b.iso", "guest_memory": None}, [(0, "cd", "/b.iso")]),
    ("ahci", {"port.2.type": "hd", "port.2.path": "/a", "port.5.type": "cd", "port.5.path": "/b"},
     [(2, "hd", "/a"), (5, "cd", "/b")]),
    ("ahci", {}, []),
])
def test_forms(name, opts, expect):
    assert [(s.port, s.kind, s.path) for s in O.port_specs(name, opts)] == expect


def test_top_level_flags_are_port_0s():
    (s,) = O.port_specs("ahci-hd", {"path": "/a.img", "ro": "true", "ser": "S", "vmname": "vm"})
    assert s.readonly and s.serial() == "S"


@pytest.mark.parametrize("name,opts,needle", [
    ("ahci", "xx:/a.img", "port 0: 'xx:/a.img' is not hd:PATH"),
    ("ahci", "hd:/a,/b", "port 0: unknown option '/b'"),
    ("ahci", ",".join(["hd:/a"] * 33), "33 ports given: an AHCI controller has 32"),
    ("ahci", {"port.32.type": "hd", "port.32.path": "/a"}, "port 32: out of range"),
    ("ahci", {"port.x.type": "hd"}, "port x: out of range"),
    ("ahci", {"port.1.type": "dvd", "port.1.path": "/a"}, "port 1: type 'dvd' is not hd or cd"),
    ("ahci", {"port.1.path": "/a"}, "port 1: no type"),
    ("ahci", {"port.1.type": "cd"}, "port 1: no path"),
    ("ahci", {"port.1.type": "cd", "port.1.path": "/a", "port.1.speed": "1"}, "port 1: unknown option 'speed'"),
    ("ahci", {"path": "hd:/a", "port.0.type": "cd", "port.0.path": "/b"}, "port 0 is given twice"),
    ("ahci-hd", {}, "ahci-hd needs a path"),
    ("ahci-hd", "", "ahci-hd needs a path"),
    ("ahci-hd", "/a,sectorsize=1024/512", "sectorsize=1024/512"),
])
def test_errors_name_the_port(name, opts, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        O.port_specs(name, opts)


def test_the_vm_opens_every_port_and_the_registry_builds_it(tmp_path):
    a, b = tmp_path / "a.img", tmp_path / "b.iso"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(4096))
    o = open_device_backends("ahci", {"port.0.type": "hd", "port.0.path": str(a), "port.1.type": "cd",
                                      "port.1.path": str(b), "guest_memory": BytesMemory(1 << 20)})
    ports = o["backend"].ports
    assert [(p.spec.port, p.backend.readonly) for p in ports] == [(0, False), (1, True)]
    dev = registry.create("ahci", dict(o, threaded="false"))
    assert isinstance(dev, AhciPci) and dev.hba.pi == 0b11 and not dev.hba.threaded
    dev.close()
    assert all(p.backend.fd < 0 for p in ports)
    o = open_device_backends("ahci-cd", f"{b}")
    assert o["backend"].ports[0].spec.atapi
    close_device_backends(o)


def test_a_missing_image_closes_what_was_opened(tmp_path, monkeypatch):
    from vmmshim.backends import block
    a = tmp_path / "a.img"
    a.write_bytes(bytes(4096))
    opened = []
    real = block.FileBlockBackend.__init__

    def spy(self, *args, **kw):
        real(self, *args, **kw)
        opened.append(self)
    monkeypatch.setattr(block.FileBlockBackend, "__init__", spy)
    with pytest.raises(FileNotFoundError):
        open_device_backends("ahci", f"hd:{a},cd:{tmp_path}/missing.iso")
    assert len(opened) == 1 and opened[0].fd < 0


def test_the_device_refuses_unopened_ports():
    with pytest.raises(ValueError, match="not open"):
        registry.create("ahci-hd", "/a.img")
    assert {"ahci", "ahci-hd", "ahci-cd"} <= set(registry.names())
