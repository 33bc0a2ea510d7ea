"""Issue 19 items 6, 7, 8 (configuration), 11 and 12 as a user meets them: the ``vmmshim`` command run as a
subprocess, checking its exit status, the one line on stderr, that no traceback appears and that the user's files
are left as they were.

The guests that must run use the soft provider and the built-in ``hello`` guest (it prints a line on COM1 and
halts: status 2), so these tests need no ``/dev/kvm``; the refusals happen before any VM is made."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HELLO = "Hello from vmmshim: a real-mode guest on COM1, halting now."
SOFT = ("-o", "vmmshim.provider=soft")
RUN_HELLO = (*SOFT, "-l", "com1,stdio", "-f", "hello")
EXIT_HALT, EXIT_POWEROFF, EXIT_ERROR = 2, 1, 4


def vmmshim(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmmshim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def refused(*args, needle):
    """Runs ``vmmshim args`` and checks for status 4 and exactly one line on stderr that contains ``needle``."""
    p = vmmshim(*args)
    assert "Traceback" not in p.stderr and "internal error" not in p.stderr, p.stderr
    assert p.returncode == EXIT_ERROR, (p.returncode, p.stderr)
    lines = p.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr
    assert p.stdout == ""
    return lines[0]


def runs_hello(*args):
    p = vmmshim(*args, *RUN_HELLO)
    assert p.returncode == EXIT_HALT, p.stderr
    assert p.stdout.splitlines() == [HELLO] and "Traceback" not in p.stderr


# -- item 6: bhyve_config(5)'s own formats ---------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ("-o", "memory.size=64M"), ("-m", "0x4000000"), ("-m", "64m"), ("-m", "64"),
    ("-c", "cpus=2,sockets=2"), ("-c", "sockets=1,cores=2,threads=1"),
    ("-o", "cpus=2", "-o", "sockets=1", "-o", "cores=2"),
    ("-o", "mem=32M", "-o", "memory.size=%(mem)"),
])
def test_bhyve_memory_and_cpu_formats_boot(args):
    runs_hello(*args)


def test_k_file_with_bhyve_keys_and_references(tmp_path):
    conf = tmp_path / "vm.conf"
    conf.write_text("# bhyve_config(5)\nmemory.size=32M\ncpus=2\nsockets=2\nconsole=stdio\n"
                    "lpc.com1.path=%(console)\nfirmware.spec=hello\nvmmshim.provider=soft\n")
    before = conf.read_bytes(), conf.stat().st_mtime_ns
    p = vmmshim("-k", str(conf))
    assert p.returncode == EXIT_HALT and p.stdout.splitlines() == [HELLO], p.stderr
    assert (conf.read_bytes(), conf.stat().st_mtime_ns) == before


def test_config_dump_prints_the_tree_and_exits_as_bhyve_does(tmp_path):
    pidfile = tmp_path / "vm.pid"
    p = vmmshim("-m", "1G", "-o", "disk=/vm/%(name).img", "-F", str(pidfile), "-o", "config.dump=1",
                *RUN_HELLO, "web")
    assert p.returncode == EXIT_POWEROFF and p.stderr == ""       # bhyverun.c: dump_config(); exit(1)
    lines = p.stdout.splitlines()
    assert lines == sorted(lines) and HELLO not in lines
    assert {"memory.size=1G", "disk=/vm/%(name).img", "name=web", "lpc.com1.path=stdio"} <= set(lines)
    assert not pidfile.exists()                                   # no VM was made


@pytest.mark.parametrize("flag,names", [("-s", {"hostbridge", "lpc", "virtio-blk", "virtio-net", "virtio-rnd"}),
                                        ("-l", {"com1", "com2", "com3", "com4", "debug-exit"})])
def test_s_help_and_l_help_list_the_emulations(flag, names):
    p = vmmshim(flag, "help")
    assert p.returncode == 0 and p.stderr == ""
    assert names <= set(p.stdout.split())


@pytest.mark.parametrize("args,needle", [
    (("-o", "lpc.bootrom=/usr/share/uefi.fd"), "lpc.bootrom=/usr/share/uefi.fd: a UEFI boot ROM is not supported "
                                               "yet"),
    (("-l", "bootrom,/usr/share/uefi.fd"), "-l bootrom,/usr/share/uefi.fd: a UEFI boot ROM (lpc.bootrom) is not "
                                           "supported yet"),
    (("-o", "gdb.port=70000"), "gdb.port"),
    (("-G", "12x"), "-G 12x: expected [w][ADDR:]PORT"),
    (("-o", "pci.1.3.0.device=virtio-rnd"), "pci.1.3.0.device: vmmshim has PCI bus 0 only"),
    (("-s", "1:3:0,virtio-rnd"), "-s 1:3:0,virtio-rnd: vmmshim has PCI bus 0 only"),
    (("-c", "cpus=4,sockets=3"), "cpus=4 does not match the topology sockets=3 x cores=1 x threads=1 (3 vCPUs)"),
    (("-c", "sockets=8,cores=8,threads=2"), "makes 128 vCPUs: vmmshim runs at most 64"),
    (("-o", "name=%(vm)", "-o", "vm=%(name)"), "name=%(vm): the references loop (name -> vm -> name)"),
    (("-o", "name=%(nope)"), "name=%(nope): %(nope) names no configuration key that is set"),
])
def test_unsupported_and_inconsistent_keys_are_refused(args, needle):
    refused(*args, *RUN_HELLO, needle=needle)


# -- item 7: typos, overflow, the subcommands' argument errors ---------------------------------------------------

def test_a_typo_in_a_vmmshim_key_names_the_known_keys():
    line = refused("-o", "vmmshim.provder=soft", "-f", "hello", needle="unknown key vmmshim.provder: did you mean "
                                                                       "vmmshim.provider?")
    assert "poweroff_timeout_s" in line and "gil_switch_ms" in line


def test_unknown_keys_outside_vmmshim_are_ignored_as_bhyve_does():
    runs_hello("-o", "bios.vendor=ACME", "-o", "destroy_on_poweroff=true")


@pytest.mark.parametrize("args,needle", [
    (("-m", "99999999999G"), "-m 99999999999G is too large: guest memory must be between 1 MiB and 1 TiB"),
    (("-m", "4T"), "-m 4T is too large: guest memory must be between 1 MiB and 1 TiB"),
    (("-o", "memory.size=99999999999999999999999"), "memory.size=99999999999999999999999 is too large"),
    (("-m", "-5"), "-m -5 is too small"), (("-m", "12X"), "-m 12X is not a memory size"),
    (("-c", "99999999999999999999"), "-c 99999999999999999999: cpus=99999999999999999999 must be between 1 "
                                     "and 64"),
    (("-o", "cpus=abc"), "cpus=abc is not an integer"),
    (("-o", "lpc.debug_exit.port=0x10000"), "lpc.debug_exit.port=0x10000 must be between 0 and 65535"),
    (("-o", "vmmshim.poweroff_timeout_s=soon"), "vmmshim.poweroff_timeout_s=soon must be a number between 0 "
                                                "and 86400"),
])
def test_bad_numbers_are_one_line_not_an_internal_error(args, needle):
    refused(*args, *RUN_HELLO, needle=needle)


@pytest.mark.parametrize("argv,needle", [
    (("linux", "-c", "x"), "vmmshim linux: argument -c/--cpus: invalid int value: 'x'"),
    (("linux", "-c", "0"), "vmmshim linux: -c 0: cpus=0 must be between 1 and 64"),
    (("linux", "-m", "99999999999G"), "vmmshim linux: -m 99999999999G is too large"),
    (("linux", "--bogus"), "vmmshim linux: unrecognized arguments: --bogus"),
    (("conformance", "--bogus"), "vmmshim conformance: unrecognized arguments: --bogus"),
    (("doctor", "extra"), "vmmshim doctor: takes no arguments"),
])
def test_subcommand_argument_errors_exit_4(argv, needle):
    p = vmmshim(*argv)
    assert p.returncode == EXIT_ERROR and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [p.stderr.strip()] and p.stderr.startswith(needle), p.stderr


# -- item 8: every error names its subject -------------------------------------------------------------------

@pytest.mark.parametrize("data,where", [
    (b"memory.size=64M\n\x7fELF\x02\x01\x01\x00=x\n", ":2: binary data"),
    (b"memory.size=64M\ncpus=\xff\xfe\n", ": not UTF-8 text at byte 21"),
    (b"memory.size=64M\ncpus=2\nnovalue\n", ":3: 'novalue' is not key=value"),
    (b"vmmshim.stat=1\n", ":1: unknown key vmmshim.stat: did you mean vmmshim.stats?"),
])
def test_k_file_errors_name_the_file_and_line_and_leave_it_alone(tmp_path, data, where):
    conf = tmp_path / "vm.conf"
    conf.write_bytes(data)
    mtime = conf.stat().st_mtime_ns
    refused("-k", str(conf), *RUN_HELLO, needle=f"vmmshim: {conf}{where}")
    assert conf.read_bytes() == data and conf.stat().st_mtime_ns == mtime


def test_a_refused_command_line_creates_no_file(tmp_path):
    pidfile, log = tmp_path / "vm.pid", tmp_path / "com1.log"
    refused("-F", str(pidfile), "-l", f"com1,file:{log}", "-m", "99999999999G", *SOFT, "-f", "hello",
            needle="-m 99999999999G")
    assert not pidfile.exists() and not log.exists()


# -- item 11: -h and --help ------------------------------------------------------------------------------------

def test_help_and_long_help_document_keys_backends_and_debug_exit():
    short, long_ = vmmshim("-h"), vmmshim("--help")
    assert short.returncode == long_.returncode == 0 and short.stdout == long_.stdout and short.stderr == ""
    text = short.stdout
    from vmmshim.config_keys import VMMSHIM_KEYS
    for key in VMMSHIM_KEYS:
        assert key in text, key
    for needle in ("com1-com4", "tcp=ADDR:PORT", "unix:PATH", "file:PATH", "autopty", "(VALUE << 1) | 1",
                   "Ctrl-A x", "SIGHUP", "-H  accepted for bhyve compatibility", "firmware.spec"):
        assert needle in text, needle
    synopsis = text.split("\n", 1)[0]
    assert synopsis.startswith("usage: vmmshim [-") and "b" not in synopsis.split("[-", 1)[1].split("]")[0]


def test_a_bad_flag_is_one_line_pointing_at_help():
    refused("-Q", needle="vmmshim: option -Q not recognized (vmmshim -h lists the flags)")


# -- item 12: doctor ---------------------------------------------------------------------------------------------

def test_doctor_mentions_the_soft_provider_and_the_lab():
    from ops.nvmm.kvm.provider import hardware_kind
    p = vmmshim("doctor")
    assert p.returncode == 0 and "Traceback" not in p.stderr
    assert "provider soft     available: the software CPU, needs no /dev/kvm" in p.stdout
    present = os.path.exists("/dev/kvm")
    assert ("/dev/kvm present" in p.stdout) == present and "absent" not in p.stdout
    if hardware_kind() == "kvm_pvm":
        assert "-f kexec of a stock Linux kernel crawls on a paravirtual KVM (kvm_pvm)" in p.stdout
        assert "nested lab" in p.stdout
