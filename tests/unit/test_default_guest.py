"""``vmmshim linux``: the command line it builds is one the CLI accepts, and where it runs follows /dev/kvm."""

import base64

from vmmshim import default_guest
from vmmshim.cli import parse_args


def test_guest_argv_is_a_valid_xhyve_command_line():
    argv = default_guest.guest_argv("/g", 2, "512M", "stdio", run="echo hi", cmdline_extra="quiet")
    cfg = parse_args(argv)
    assert cfg.get("cpus") == "2"
    fw = argv[argv.index("-f") + 1]
    assert fw.startswith("kexec,/g/vmlinuz,/g/initramfs.gz,console=ttyS0 panic=-1 quiet vmmshim.run=")
    assert base64.b64decode(fw.rsplit("vmmshim.run=", 1)[1]) == b"echo hi"


def test_where_to_run_follows_the_kvm_kind(monkeypatch):
    import ops.nvmm.kvm.provider as prov

    monkeypatch.delenv("VMMSHIM_LAB", raising=False)
    for kind, where in (("kvm_amd", "here"), ("kvm_intel", "here"), ("kvm_pvm", "lab"), ("unknown", "lab")):
        monkeypatch.setattr(prov, "hardware_kind", lambda k=kind: k)
        got, why = default_guest.where_to_run()
        assert got == where and kind in why
    monkeypatch.setenv("VMMSHIM_LAB", "1")
    assert default_guest.where_to_run()[0] == "here"
