"""A checkpoint's files (``vmmshim/snapshot/files.py``): memory written sparse, the three files checked against
each other on read, one-line errors for each kind of damage; and the control socket's answers to bad requests
(``vmmshim/control.py``)."""

import json
import os

import pytest

from vmmshim.control import ControlSocket
from vmmshim.snapshot import files as F


def _memory(size=8 << 20):
    buf = bytearray(size)
    buf[0:5] = b"hello"
    buf[3 << 20:(3 << 20) + 4096] = b"\x01" * 4096
    buf[size - 1] = 0x7F
    return buf


def test_memory_is_written_sparse_and_reads_back(tmp_path):
    base = str(tmp_path / "ck")
    mem = _memory()
    F.write(base, memoryview(mem), {"vcpus": {}}, {"config": ["name=x"], "devices": {}, "timer_ns": 5})
    assert open(base, "rb").read() == bytes(mem)
    st = os.stat(base)
    assert st.st_size == len(mem) and st.st_blocks * 512 <= 64 << 10       # three pages' worth, not 8 MiB
    meta, kern = F.read(base)
    assert kern == {"vcpus": {}} and meta["config"] == ["name=x"] and meta["memory"]["size"] == len(mem)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    assert oct(os.stat(base + ".meta").st_mode & 0o777) == "0o600"


def _rewrite(path, fn):
    text = open(path).read()
    with open(path, "w") as f:
        f.write(fn(text))


@pytest.mark.parametrize("damage,words", [
    (lambda b: os.truncate(b, 4096), "not this checkpoint's"),
    (lambda b: open(b, "r+b").write(b"X"), "not this checkpoint's"),
    (lambda b: open(b + ".kern", "a").write(" "), "does not match the metadata"),
    (lambda b: os.unlink(b + ".kern"), "No such file"),
    (lambda b: os.unlink(b), "No such file"),
    (lambda b: open(b + ".meta", "w").write("{"), "not JSON"),
    (lambda b: open(b + ".meta", "w").write(json.dumps({"format": "other"})), "not a vmmshim checkpoint"),
    (lambda b: _rewrite(b + ".meta", lambda t: t.replace('"version": 1', '"version": 2')), "version 2"),
])
def test_damage_is_one_line(tmp_path, damage, words):
    base = str(tmp_path / "ck")
    F.write(base, memoryview(_memory(1 << 20)), {}, {"config": [], "devices": {}, "timer_ns": 0})
    damage(base)
    with pytest.raises(F.CheckpointError) as e:
        F.read(base)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_write_that_fails_leaves_nothing(tmp_path):
    base = str(tmp_path / "missing-dir" / "ck")
    with pytest.raises(F.CheckpointError):
        F.write(base, memoryview(bytearray(4096)), {}, {"config": [], "devices": {}, "timer_ns": 0})
    assert not os.path.exists(tmp_path / "missing-dir")


class _Vm:
    class pauser:
        holding = False


def test_control_requests_that_are_not_understood_get_an_error_reply():
    ctl = ControlSocket.__new__(ControlSocket)
    ctl.vm = _Vm()
    for line, words in ((b"nonsense", "not JSON"), (b"[1]", "not a JSON object"), (b'{"op": "x"}', "unknown"),
                        (b'{"op": "checkpoint"}', "needs a file"), (b'{"op": "resume"}', "not paused"),
                        (b"{too long", "not JSON")):
        reply = ctl.handle(line)
        assert reply["ok"] is False and words in reply["error"], (line, reply)


def test_ctl_bad_flags_are_one_line_and_status_4(capsys):
    from vmmshim.ctl import main
    for argv in (["--status"], ["--vm=x"], ["--vm=x", "--pause", "--resume"], ["--vm=x", "--bogus"]):
        assert main(argv) == 4, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("vmmshim ctl: "), (argv, err)
