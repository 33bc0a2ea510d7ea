"""The flags onto keys (issue 19 items 6, 7, 11, 12): ``-c`` topology forms, ``-m`` kept as typed, ``-s help``/
``-l help``/``--help``, refused flags, the subcommands' argparse errors (status 4, one line) and doctor's
``/dev/kvm`` lines."""

import pytest

from vmmshim.config import ConfigError
from vmmshim.doctor import kvm_lines
from vmmshim.flags import USAGE, ArgumentParser, UsageError, help_asked, help_text, listing, parse_args


@pytest.mark.parametrize("arg,keys", [
    ("4", {"cpus": "4"}), ("cpus=4", {"cpus": "4"}),
    ("cpus=8,sockets=2,cores=2,threads=2", {"cpus": "8", "sockets": "2", "cores": "2", "threads": "2"}),
    ("sockets=2,cores=3", {"cpus": "6", "sockets": "2", "cores": "3"}),
    ("", {"cpus": "1", "sockets": "1", "cores": "1", "threads": "1"}),
])
def test_c_takes_bhyves_topology(arg, keys):
    cfg = parse_args(["-c", arg])
    assert {k: cfg.get(k) for k in keys} == keys


@pytest.mark.parametrize("arg,needle", [
    ("0", "-c 0: cpus=0 must be between 1 and 64"), ("65", "-c 65: cpus=65 must be between 1 and 64"),
    ("x", "-c x: cpus=x is not a whole number"), ("dies=2", "-c dies=2: unknown topology field 'dies'"),
    ("4,sockets=3", "cpus=4 does not match the topology sockets=3 x cores=1 x threads=1 (3 vCPUs)"),
])
def test_bad_c_is_one_line(arg, needle):
    with pytest.raises(ConfigError) as exc:
        parse_args(["-c", arg])
    assert str(exc.value) == needle or str(exc.value).startswith(needle), exc.value


def test_m_is_stored_as_typed_and_checked_at_once():
    assert parse_args(["-m", "512M"]).get("memory.size") == "512M"          # xhyve's -m 512M as before
    assert parse_args(["-m", "512M"]).get_int("memory.size") == 512 << 20
    assert parse_args(["-m", "0x40000000"]).get_int("memory.size") == 1 << 30
    with pytest.raises(ConfigError, match=r"^-m 99999999999G is too large: guest memory must be between 1 MiB "
                                          r"and 1 TiB$"):
        parse_args(["-m", "99999999999G"])


def test_o_memory_size_with_a_suffix_and_a_reference():
    cfg = parse_args(["-o", "mem=2G", "-o", "memory.size=%(mem)"])
    assert cfg.get_int("memory.size", 1 << 20) == 2 << 30


@pytest.mark.parametrize("argv,what", [
    (["-h"], "usage"), (["--help"], "usage"), (["-s", "help"], "pci"), (["-s", "h"], "pci"),
    (["-l", "help"], "lpc"), ([], None), (["-s", "4,virtio-rnd"], None),
])
def test_help_requests(argv, what):
    assert help_asked(parse_args(argv)) == what


def test_help_lists():
    assert {"hostbridge", "lpc", "virtio-blk", "virtio-net"} <= set(listing("pci").splitlines())
    assert listing("lpc").splitlines() == ["com1", "com2", "com3", "com4", "debug-exit"]


def test_help_text_documents_what_issue_19_asks():
    text = help_text()
    for needle in ("--help", "com1-com4", "tcp=ADDR:PORT", "unix:PATH", "file:PATH", "autopty", "stdio",
                   "Ctrl-A x", "Ctrl-A b", "Ctrl-A Ctrl-A", "SIGTERM, SIGHUP and SIGINT", "(VALUE << 1) | 1",
                   "vmmshim.poweroff_timeout_s", "firmware.spec", "-H  accepted for bhyve compatibility",
                   "-P  accepted for bhyve compatibility", "config.dump"):
        assert needle in text, needle
    assert "-b" not in USAGE.splitlines()[0] and "b" not in USAGE.split("[-", 1)[1].split("]", 1)[0]
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.parametrize("argv,needle", [
    (["-G", "12x"], "-G 12x: expected [w][ADDR:]PORT"),
    (["-G", "70000"], "-G 70000: expected [w][ADDR:]PORT"),
    (["-g", "1234"], "-g 1234: bhyve's old debug port is not supported (-G PORT is the GDB stub)"),
    (["-l", "bootrom,/usr/share/uefi.fd"], "a UEFI boot ROM (lpc.bootrom) is not supported yet"),
    (["-o", "lpc.bootrom=/x.fd"], "lpc.bootrom=/x.fd: a UEFI boot ROM is not supported yet"),
    (["-o", "pci.1.3.0.device=virtio-rnd"], "pci.1.3.0.device: vmmshim has PCI bus 0 only"),
    (["-s", "1:3:0,virtio-rnd"], "-s 1:3:0,virtio-rnd: vmmshim has PCI bus 0 only"),
    (["-o", "vmmshim.provder=soft"], "did you mean vmmshim.provider?"),
    (["-o", "novalue"], "-o 'novalue' is not key=value"),
    (["-b"], "-b is not supported by vmmshim"),
])
def test_refused_in_one_line(argv, needle):
    with pytest.raises(ConfigError) as exc:
        parse_args(argv)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_keys_outside_vmmshim_are_accepted_and_ignored():
    cfg = parse_args(["-o", "bios.vendor=ACME", "-o", "x86.verbosemsr=true", "-o", "destroy_on_poweroff=1"])
    assert cfg.get("bios.vendor") == "ACME"


def test_dump_skips_the_checks_as_bhyve_does():
    cfg = parse_args(["-o", "config.dump=1", "-o", "cpus=4", "-o", "sockets=3"])
    assert "cpus=4" in cfg.dump()


def test_a_bad_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="option -Q not recognized"):
        parse_args(["-Q"])


def test_subcommand_argument_errors_exit_4_in_one_line(capsys):
    ap = ArgumentParser(prog="vmmshim linux")
    ap.add_argument("-c", type=int)
    with pytest.raises(SystemExit) as exc:
        ap.parse_args(["-c", "x"])
    assert exc.value.code == 4
    assert capsys.readouterr().err == "vmmshim linux: argument -c: invalid int value: 'x'\n"


@pytest.mark.parametrize("present", [True, False])
@pytest.mark.parametrize("kind", ["kvm_intel", "kvm_amd", "kvm_pvm", "unknown"])
def test_doctor_never_says_absent_next_to_a_present_device(present, kind):
    lines = kvm_lines(present, kind)
    assert lines[0].startswith("/dev/kvm present" if present else "/dev/kvm missing")
    assert not any("absent" in line for line in lines)
    assert ("soft provider" in lines[0]) == (not present)
    assert any("crawls" in line and "nested lab" in line for line in lines) == (kind == "kvm_pvm")


def test_doctor_mentions_the_soft_provider(monkeypatch, capsys, tmp_path):
    import ops.nvmm
    import ops.nvmm.kvm.provider as prov
    from vmmshim import doctor

    monkeypatch.setattr(ops.nvmm, "available_providers",
                        lambda: {"kvm": "/dev/kvm does not exist", "libnvmm": "not NetBSD", "soft": None})
    monkeypatch.setattr(prov, "hardware_kind", lambda: "unknown")
    assert doctor.doctor(kvm_device=str(tmp_path / "kvm")) == 0
    out = capsys.readouterr().out
    assert "provider soft     available: the software CPU, needs no /dev/kvm" in out
    assert "/dev/kvm missing: no KVM module here; the soft provider works without it" in out


@pytest.mark.parametrize("spec,port,address,wait", [
    ("1234", "1234", None, None), ("w1234", "1234", None, "true"), ("0.0.0.0:99", "99", "0.0.0.0", None),
    ("w[::1]:5", "5", "::1", "true"),
])
def test_gdb_option_sets_bhyves_keys(spec, port, address, wait):
    cfg = parse_args(["-G", spec, "-f", "hello"])
    assert (cfg.get("gdb.port"), cfg.get("gdb.address"), cfg.get("gdb.wait")) == (port, address, wait)
