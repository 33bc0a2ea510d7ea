"""``-s N,nvme,IMG[,maxq=,qsz=,ioslots=,sectsz=,ser=]`` from the command line: the controller is built on its
image and the hello guest (which never touches it) halts with status 2, with the options, two controllers, and
KVM's doorbells off; a missing image and bad option values end with one line naming them and status 4."""

import pytest

from tests.kvm.test_cli import vmmshim

VM_TIMEOUT_S = 60
BASE = ("-m", "64M", "-s", "0:0,hostbridge", "-s", "31,lpc")


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "nvme.img"
    p.write_bytes(b"\x5a" * (4 << 20))
    return str(p)


def _hello(*slots, extra=()):
    args = [a for s in slots for a in ("-s", s)]
    return vmmshim(*BASE, *extra, *args, "-f", "hello", timeout=VM_TIMEOUT_S)


def _status_4(p, needle):
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("vmmshim: ") and needle in lines[0], p.stderr
    assert all(line.startswith(("vmmshim: ", "usage: ")) for line in lines), p.stderr
    assert "Traceback" not in p.stderr


def test_hello_with_an_nvme_controller(kvm_provider, image):
    p = _hello(f"4,nvme,{image}")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    with open(image, "rb") as f:
        assert f.read() == b"\x5a" * (4 << 20)


def test_options_two_controllers_and_no_doorbells(kvm_provider, image, tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(bytes(1 << 20))
    p = _hello(f"4,nvme,{image},maxq=4,qsz=64,ioslots=16,sectsz=4096,ser=VMMSHIM-1", f"5,nvme,{other},ro",
               extra=("-o", "vmmshim.doorbells=false"))
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr


def test_a_missing_image_is_status_4(kvm_provider, tmp_path):
    missing = tmp_path / "missing.img"
    _status_4(_hello(f"4,nvme,{missing}"), f"-s 4,nvme: {missing}: No such file or directory")


@pytest.mark.parametrize("opt,needle", [("maxq=0", "maxq=0 must be 1-64"), ("maxq=100", "maxq=100 must be 1-64"),
                                        ("qsz=1", "qsz=1 must be 2-65536"), ("qsz=lots", "qsz=lots is not a number"),
                                        ("sectsz=1000", "sectsz=1000 must be 512, 4096 or 8192"),
                                        ("ioslots=0", "ioslots=0 must be")])
def test_bad_values_are_status_4(kvm_provider, image, opt, needle):
    _status_4(_hello(f"4,nvme,{image},{opt}"), f"-s 4,nvme: {needle}")
