"""``-s N,virtio-9p,NAME=/path[,ro]`` from the command line: the share opens (the hello guest does not use it: it
halts with status 2 and the share is closed), and a missing directory, a file instead of a directory, a bad option,
two share names or none end with one line naming it and status 4."""

import pytest

from tests.kvm.test_cli import vmmshim

VM_TIMEOUT_S = 60
BASE = ("-m", "64M", "-s", "0:0,hostbridge", "-s", "31,lpc")


def _hello(*slots):
    args = [a for s in slots for a in ("-s", s)]
    return vmmshim(*BASE, *args, "-f", "hello", timeout=VM_TIMEOUT_S)


def test_a_share_opens_and_the_guest_halts(kvm_provider, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    p = _hello(f"4,virtio-9p,share={tmp_path / 'x'}", f"5,virtio-9p,other={tmp_path / 'y'},ro")
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("opts,needle", [
    ("share={missing}", "No such file or directory"),
    ("share={file}", "Not a directory"),
    ("share={dir},bogus", "unknown option 'bogus'"),
    ("a={dir},b={dir}", "more than one share name"),
    ("{dir}", "share name required"),
])
def test_bad_shares_are_one_line_and_status_4(kvm_provider, tmp_path, opts, needle):
    d, f = tmp_path / "d", tmp_path / "f"
    d.mkdir()
    f.write_bytes(b"")
    p = _hello("4,virtio-9p," + opts.format(missing=tmp_path / "missing", file=f, dir=d))
    assert p.returncode == 4, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[0].startswith("vmmshim: ") and needle in lines[0] and "virtio-9p" in lines[0], p.stderr
    assert all(line.startswith(("vmmshim: ", "usage: ")) for line in lines), p.stderr
    assert "Traceback" not in p.stderr
