"""``-s N,ahci,...``, ``-s N,ahci-hd,IMG`` and ``-s N,ahci-cd,ISO`` from the command line: the controllers are
built with their images open (the hello guest does not use them: it halts with status 2, the images are
closed), and bad input (a missing image, a bad port spec, too many ports, a port out of range) ends with one line
naming it and status 4."""

import pytest

from tests.kvm.test_cli import vmmshim
from vmmshim.config import Config, ConfigError, parse_slot

VM_TIMEOUT_S = 60
BASE = ("-m", "64M", "-s", "0:0,hostbridge", "-s", "31,lpc")


def _legacy_ports_parse():
    """Whether the command line takes ``-s N,ahci,hd:A,cd:B`` (bhyve's ``pe_legacy_config`` for ahci)."""
    try:
        parse_slot("5,ahci,hd:/a.img,cd:/b.iso", Config())
        return True
    except ConfigError:
        return False


needs_legacy = pytest.mark.skipif(not _legacy_ports_parse(),
                                  reason="vmmshim/config.py parse_slot does not take ahci's hd:/cd: list yet")


@pytest.fixture
def images(tmp_path):
    img, img2, iso = tmp_path / "disk.img", tmp_path / "disk2.img", tmp_path / "cd.iso"
    img.write_bytes(bytes(1 << 20))
    img2.write_bytes(bytes(1 << 20))
    iso.write_bytes(bytes(64 * 2048))
    return str(img), str(img2), str(iso)


def _hello(*args):
    return vmmshim(*BASE, *args, "-f", "hello", timeout=VM_TIMEOUT_S)


def _status_4(p, needle):
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("vmmshim: ") and needle in lines[0], p.stderr
    assert all(line.startswith(("vmmshim: ", "usage: ")) for line in lines), p.stderr
    assert "Traceback" not in p.stderr


def test_shorthands_and_a_two_port_controller_start_and_end(kvm_provider, images):
    img, img2, iso = images
    p = _hello("-s", f"4,ahci-hd,{img}", "-s", f"5,ahci-cd,{iso}", "-s", f"6,ahci,hd:{img2},ro",
               "-o", "pci.0.7.0.device=ahci", "-o", "pci.0.7.0.port.0.type=hd", "-o", f"pci.0.7.0.port.0.path={img}",
               "-o", "pci.0.7.0.port.1.type=cd", "-o", f"pci.0.7.0.port.1.path={iso}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr


@needs_legacy
def test_bhyves_legacy_port_list(kvm_provider, images):
    img, img2, iso = images
    p = _hello("-s", f"4,ahci-hd,{img}", "-s", f"5,ahci,hd:{img2},cd:{iso}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr


@needs_legacy
def test_too_many_ports_is_status_4(images):
    img = images[0]
    _status_4(_hello("-s", "5,ahci," + ",".join([f"hd:{img}"] * 33)), "33 ports given")


def test_a_missing_image_is_status_4(images):
    _status_4(_hello("-s", "4,ahci-hd,/nonexistent/disk.img"), "/nonexistent/disk.img: No such file or directory")
    _status_4(_hello("-s", "4,ahci,cd:/nonexistent/cd.iso"), "/nonexistent/cd.iso")


@pytest.mark.parametrize("slot,needle", [
    ("5,ahci,dvd:{img}", "port 0: 'dvd:"),
    ("5,ahci-hd,{img},sectorsize=100", "sectorsize=100"),
    ("5,ahci-hd", "ahci-hd needs a path"),
])
def test_a_bad_port_spec_is_status_4(images, slot, needle):
    _status_4(_hello("-s", slot.format(img=images[0])), needle)


def test_a_port_out_of_range_is_status_4(images):
    _status_4(_hello("-o", "pci.0.5.0.device=ahci", "-o", "pci.0.5.0.port.32.type=hd",
                     "-o", f"pci.0.5.0.port.32.path={images[0]}"), "port 32: out of range")
