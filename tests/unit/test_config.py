"""The configuration tree (issue 19 items 6-8): bhyve's memory sizes, integers, booleans, ``%(var)`` expansion,
the vCPU topology, the vmmshim key table and its typo check, PCI bus 0, the ``-k`` file checks and the messages,
each of which names its subject and states the accepted range in words."""

import os
import re

import pytest

from vmmshim.config import MiB, TiB, Config, ConfigError, parse_memsize, size_words, strtol
from vmmshim.config_keys import BHYVE_KEYS, VMMSHIM_KEYS, help_sections, unknown_vmmshim_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("text,size", [
    ("256M", 256 * MiB), ("256m", 256 * MiB), ("2G", 2 << 30), ("2g", 2 << 30), ("1T", TiB), ("4096K", 4 * MiB),
    ("512", 512 * MiB),                 # a bare number below 1048576 counts MiB (vm_parse_memsize)
    ("1048576", MiB), ("0x10000000", 256 * MiB), ("0x100", 256 * MiB), ("0x10M", 16 * MiB),
    ("512MB", 512 * MiB), ("1Gb", 1 << 30), ("020", 16 * MiB),           # expand_number's B; strtol's octal
])
def test_memory_sizes_as_bhyve_reads_them(text, size):
    assert parse_memsize(text, "-m " + text) == size


@pytest.mark.parametrize("text,words", [
    ("99999999999G", "-m 99999999999G is too large: guest memory must be between 1 MiB and 1 TiB"),
    ("2T", "-m 2T is too large: guest memory must be between 1 MiB and 1 TiB"),
    ("1P", "-m 1P is too large"), ("1E", "-m 1E is too large"),
    ("0", "-m 0 is too small: guest memory must be between 1 MiB and 1 TiB"),
    ("512b", "-m 512b is too small"), ("-5", "-m -5 is too small"),
    ("12X", "-m 12X is not a memory size (examples: 512M, 2G, 0x40000000)"),
    ("", "is not a memory size"), ("M", "is not a memory size"), ("08", "is not a memory size"),
    ("1.5G", "is not a memory size"), ("512 M", "is not a memory size"),
])
def test_bad_memory_sizes_are_one_line_in_words(text, words):
    with pytest.raises(ConfigError) as exc:
        parse_memsize(text, "-m " + text)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_size_words():
    assert (size_words(MiB), size_words(TiB), size_words(3 << 30), size_words(1536)) == \
        ("1 MiB", "1 TiB", "3 GiB", "1536 bytes")


def test_strtol_is_c_base_0():
    assert [strtol(t) for t in ("10", "0x1f", "010", "-3", " 7", "0")] == [10, 31, 8, -3, 7, 0]
    assert [strtol(t) for t in ("", "x", "1x", "08", "1.0")] == [None] * 5


def test_get_int_states_the_range_in_words():
    cfg = Config()
    cfg.set("cpus", "0")
    with pytest.raises(ConfigError, match=r"^cpus=0 must be between 1 and 64$"):
        cfg.get_int("cpus", 1, 64)
    cfg.set("cpus", "many")
    with pytest.raises(ConfigError, match=r"^cpus=many is not an integer$"):
        cfg.get_int("cpus", 1, 64)
    cfg.set("memory.size", "0x100000")      # a bare number of 1048576 or more is bytes
    assert cfg.get_int("memory.size", 1 << 20) == MiB
    cfg.set("memory.size", "512K")
    with pytest.raises(ConfigError, match=r"^memory.size=512K is too small: guest memory must be between 1 MiB"):
        cfg.get_int("memory.size", 1 << 20)
    cfg.set("lpc.debug_exit.port", "0x10000")
    with pytest.raises(ConfigError, match=r"^lpc.debug_exit.port=0x10000 must be between 0 and 65535$"):
        cfg.get_int("lpc.debug_exit.port", 0, 0xFFFF)
    with pytest.raises(ConfigError, match="^nothing.here is not set$"):
        cfg.get_int("nothing.here")


def test_the_runner_reads_memory_size_with_a_suffix():
    cfg = Config()
    assert cfg.get_int("memory.size", 1 << 20) == 256 * MiB          # the default is bhyve's "256M"
    cfg.set_option("memory.size=2G")
    assert cfg.get_int("memory.size", 1 << 20) == 2 << 30


def test_booleans_are_bhyves():
    cfg = Config()
    for word, val in (("TRUE", True), ("On", True), ("yes", True), ("1", True), ("off", False), ("No", False)):
        cfg.set("x86.x2apic", word)
        assert cfg.get_bool("x86.x2apic") is val
    cfg.set("x86.x2apic", "maybe")
    with pytest.raises(ConfigError, match=r"^x86.x2apic=maybe is not a boolean \(true or false"):
        cfg.get_bool("x86.x2apic")


def test_expansion_is_recursive_and_on_get():
    cfg = Config()
    cfg.set("name", "web")
    cfg.set("dir", "/vm/%(name)")
    cfg.set("pci.0.4.0.device", "virtio-blk")
    cfg.set("pci.0.4.0.path", "%(dir)/disk.img")
    assert cfg.get("pci.0.4.0.path") == "/vm/web/disk.img"
    assert cfg.pci_slots() == [(0, 4, 0, {"device": "virtio-blk", "path": "/vm/web/disk.img"})]
    cfg.set("name", "db")                   # expanded when read, not when set
    assert cfg.get("pci.0.4.0.path") == "/vm/db/disk.img"
    assert "pci.0.4.0.path=%(dir)/disk.img" in cfg.dump()


def test_expansion_escapes_and_lone_percent():
    cfg = Config()
    cfg.set("a", r"50% and \%(name) and %(name)")
    assert cfg.get("a") == "50% and %(name) and vm"
    cfg.set("b", r"C:\dir")                 # no % at all: bhyve leaves the value alone, backslash included
    assert cfg.get("b") == r"C:\dir"
    cfg.set("c", "%(unclosed")
    assert cfg.get("c") == "%(unclosed"


def test_expansion_errors_name_the_key():
    cfg = Config()
    cfg.set("a", "%(b)")
    cfg.set("b", "x%(a)")
    with pytest.raises(ConfigError, match=r"^a=%\(b\): the references loop \(a -> b -> a\)$"):
        cfg.get("a")
    cfg.set("c", "%(nope)")
    with pytest.raises(ConfigError, match=r"^c=%\(nope\): %\(nope\) names no configuration key that is set$"):
        cfg.get("c")
    cfg.set("d", "%()")
    with pytest.raises(ConfigError, match="empty"):
        cfg.get("d")
    for i in range(20):
        cfg.set(f"k{i}", f"%(k{i + 1})")
    cfg.set("k20", "end")
    with pytest.raises(ConfigError, match="deeper than 15"):
        cfg.get("k0")
    assert cfg.get("k10") == "end"


def _topology(*sets):
    cfg = Config()
    for text in sets:
        cfg.set_option(text)
    return cfg.validate()


def test_topology_as_bhyves_calc_topology():
    assert _topology().get("cpus") == "1"
    assert _topology("sockets=2", "cores=2", "threads=2").get("cpus") == "8"
    assert _topology("cpus=4", "sockets=2", "cores=2").get("cpus") == "4"
    assert _topology("cpus=4").get("cpus") == "4"
    with pytest.raises(ConfigError, match=r"^cpus=4 does not match the topology sockets=3 x cores=1 x threads=1 "
                                          r"\(3 vCPUs\)$"):
        _topology("cpus=4", "sockets=3")
    with pytest.raises(ConfigError, match="sockets=4 x cores=2"):     # no sockets: bhyve takes sockets = cpus
        _topology("cpus=4", "cores=2")
    with pytest.raises(ConfigError, match=r"makes 128 vCPUs: vmmshim runs at most 64$"):
        _topology("sockets=8", "cores=8", "threads=2")
    with pytest.raises(ConfigError, match=r"^cores=0 must be between 1 and 64$"):
        _topology("cores=0")


def test_a_vmmshim_typo_names_the_close_match_and_the_known_keys():
    cfg = Config()
    with pytest.raises(ConfigError) as exc:
        cfg.set("vmmshim.provder", "soft")
    msg = str(exc.value)
    assert msg.startswith("unknown key vmmshim.provder: did you mean vmmshim.provider?")
    assert all(k[len("vmmshim."):] in msg for k in VMMSHIM_KEYS)
    cfg.set("bhyve.future.key", "1")                  # outside vmmshim's namespace: accepted, ignored
    cfg.set("x86.verbosemsr", "true")
    assert unknown_vmmshim_key("vmmshim.zzzzzz").startswith("unknown key vmmshim.zzzzzz: vmmshim's keys are")


def _keys_read_in(paths):
    found = set()
    for top in paths:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        found |= set(re.findall(r"""["'](vmmshim\.[a-z_]+)["'=]""", fh.read()))
    return found


def test_every_vmmshim_key_the_code_reads_is_in_the_table():
    read = _keys_read_in(("vmmshim", "ops", "bhyve_devices", "bench")) - {"vmmshim.run", "vmmshim.exit"}
    assert read and read <= set(VMMSHIM_KEYS), read - set(VMMSHIM_KEYS)     # (those two are kernel arguments)
    assert "vmmshim.poweroff_timeout_s" in VMMSHIM_KEYS


def test_help_documents_every_key_within_100_columns():
    text = "\n".join(help_sections())
    for key in list(VMMSHIM_KEYS) + list(BHYVE_KEYS):
        assert key in text
    assert max(len(line) for line in text.splitlines()) <= 100


@pytest.mark.parametrize("key,needle", [
    ("pci.1.3.0.device", "pci.1.3.0.device: vmmshim has PCI bus 0 only"),
    ("pci.0.32.0.device", "out of range"), ("pci.0.3.8.device", "out of range"),
    ("pci.0.3.device", "a PCI key is pci.BUS.SLOT.FUNCTION.OPTION"),
])
def test_pci_keys_off_bus_0_are_refused(key, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Config().set(key, "virtio-rnd")


def test_pci_slots_refuses_bus_1_set_behind_its_back():
    cfg = Config()
    cfg.values["pci.1.3.0.device"] = "virtio-rnd"       # as a caller that skipped set() would
    with pytest.raises(ConfigError, match="bus 0 only"):
        cfg.pci_slots()


@pytest.mark.parametrize("key,value,needle", [
    ("lpc.bootrom", "/usr/share/uefi.fd", "lpc.bootrom=/usr/share/uefi.fd: a UEFI boot ROM is not supported yet"),
])
def test_unsupported_bhyve_keys_are_refused_not_ignored(key, value, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        Config().set(key, value)
    Config().set("gdb.port", "1234")                    # the GDB stub (vmmshim/gdb/)


def test_a_value_cannot_become_a_node_nor_the_reverse():
    cfg = Config()
    with pytest.raises(ConfigError, match=r"^memory=1: memory is a node of the configuration tree"):
        cfg.set("memory", "1")
    with pytest.raises(ConfigError, match=r"^name.first=x: name is a value"):
        cfg.set("name.first", "x")


def test_k_file(tmp_path):
    f = tmp_path / "vm.conf"
    f.write_text("# a comment\n\n  memory.size=1G\ncpus=2\r\nname=%(x) # not a comment\nx=y\n")
    cfg = Config()
    cfg.load_file(str(f))
    assert cfg.get_int("memory.size") == 1 << 30 and cfg.get("cpus") == "2"
    assert cfg.get("name") == "y # not a comment"          # bhyve: only a whole line is a comment


@pytest.mark.parametrize("data,needle", [
    (b"cpus=2\nmemory.size=\xff\xfe\n", "vm.conf: not UTF-8 text at byte 19"),
    (b"cpus=2\n\x7fELF\x02\x01\x01\x00\x00=1\n", "vm.conf:2: binary data (byte 0x02)"),
    (b"cpus=2\nnovalue\n", "vm.conf:2: 'novalue' is not key=value"),
    (b"cpus=2\n\nmemory.size=\n", "vm.conf:3: 'memory.size=' has no value after '='"),
    (b"vmmshim.stat=1\n", "vm.conf:1: unknown key vmmshim.stat: did you mean vmmshim.stats?"),
])
def test_k_file_errors_name_file_and_line(tmp_path, data, needle):
    f = tmp_path / "vm.conf"
    f.write_bytes(data)
    with pytest.raises(ConfigError) as exc:
        Config().load_file(str(f))
    assert str(exc.value).startswith(str(f)) and needle in str(exc.value), exc.value
    assert "\n" not in str(exc.value)
    assert f.read_bytes() == data


def test_vmmshim_key_values_are_checked():
    for text, needle in (("vmmshim.stats=2", "vmmshim.stats=2 is not a boolean"),
                         ("vmmshim.gil_switch_ms=0", "vmmshim.gil_switch_ms=0 must be auto or a whole number between "
                                                     "1 and 10000"),
                         ("vmmshim.poweroff_timeout_s=-1", "must be a number between 0 and 86400"),
                         ("vmmshim.provider=qemu", "vmmshim.provider=qemu is not a provider (kvm, libnvmm, soft)"),
                         ("vmmshim.ahci_inline_kib=40000", "vmmshim.ahci_inline_kib=40000 must be between 0 and "
                                                           "32768"),
                         ("vmmshim.ahci_inline_kib=lots", "is not an integer"),
                         ("vmmshim.exit_notify=virtio-9p,floppy", "vmmshim.exit_notify=virtio-9p,floppy: no device "
                                                                  "named 'floppy'")):
        cfg = Config()
        cfg.set_option(text)
        with pytest.raises(ConfigError, match=re.escape(needle)):
            cfg.validate()
    cfg = Config()
    cfg.set_option("vmmshim.poweroff_timeout_s=2.5")
    cfg.set_option("vmmshim.gil_switch_ms=auto")
    cfg.validate()
    assert cfg.get_names("vmmshim.exit_notify") == {"virtio-9p"}           # the default
    for value, names in (("none", set()), ("virtio-blk, nvme", {"virtio-blk", "nvme"})):
        cfg.set_option(f"vmmshim.exit_notify={value}")
        cfg.validate()
        assert cfg.get_names("vmmshim.exit_notify") == names


def test_dump_is_sorted_and_raw():
    cfg = Config()
    cfg.set("sockets", "2")
    lines = cfg.dump()
    assert lines == sorted(lines) and "sockets=2" in lines and "memory.size=256M" in lines
    assert not any(line.startswith("cpus=") for line in lines)     # bhyve has no default: computed later
