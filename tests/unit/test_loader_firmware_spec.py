"""``-f`` as hyperkit's ``firmware_parse`` splits it (issue 19 item 13): at the first three commas only, so the
command line keeps its commas, and ``multiboot,KERNEL,MOD`` loads ``MOD`` as a module. The multiboot information
the loader builds is read back here; ``tests/kvm/test_cli_loader.py`` has a guest print it."""

import pytest

from vmmshim.config import ConfigError
from vmmshim.firmware.boot import boot_image, multiboot_modules, split_spec
from vmmshim.loader import LoaderError
from tests.unit.multiboot_rig import LOWMEM, cstring, elf_with_segment, memory, parse_info
from tests.unit.test_loader_bzimage import make_bzimage


class Cfg:
    def __init__(self, spec):
        self.spec = spec

    def get(self, key):
        assert key == "firmware.spec"
        return self.spec


@pytest.fixture
def files(tmp_path):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(elf_with_segment(0x1000, 0x100, 0x180))
    mod, mod2 = tmp_path / "mod.bin", tmp_path / "mod2.bin"
    mod.write_bytes(b"first module")
    mod2.write_bytes(b"second")
    return str(kernel), str(mod), str(mod2)


def booted(spec):
    """The kernel's command line and ``(module string, module bytes)`` of the image ``-f spec`` makes."""
    img = boot_image(Cfg(spec), LOWMEM, 0)
    mem = memory(img)
    info, mods, _ = parse_info(mem, img.regs["rbx"])
    return cstring(mem, info.cmdline), [(cstring(mem, m.string), bytes(mem[m.mod_start:m.mod_end])) for m in mods]


@pytest.mark.parametrize("spec,want", [
    ("multiboot,K", ("multiboot", "K", None, None)),
    ("multiboot,K,M", ("multiboot", "K", "M", None)),
    ("multiboot,K,,console=ttyS0,115200", ("multiboot", "K", None, "console=ttyS0,115200")),
    ("multiboot,K,M:N,a,b,c", ("multiboot", "K", "M:N", "a,b,c")),
    ("kexec,K,I,\"console=ttyS0,115200 quiet\"", ("kexec", "K", "I", "\"console=ttyS0,115200 quiet\"")),
    ("hello", ("hello", None, None, None)),
])
def test_split_at_three_commas(spec, want):
    assert split_spec(spec) == want


def test_command_line_keeps_its_commas(files):
    k, m, _ = files
    cmd, mods = booted(f"multiboot,{k},{m},console=ttyS0,115200")
    assert cmd == f"{k} console=ttyS0,115200"
    assert mods == [(m, b"first module")]


def test_quoted_command_line_without_modules(files):
    k, _, _ = files
    assert booted(f"multiboot,{k},,\"console=ttyS0,115200\"") == (f"{k} console=ttyS0,115200", [])


def test_three_fields_is_a_module_not_a_command_line(files):
    """hyperkit: ``multiboot,KERNEL,MOD`` -- the third field is the module list; no command line."""
    k, m, _ = files
    assert booted(f"multiboot,{k},{m}") == (k, [(m, b"first module")])


def test_module_list_with_module_command_lines(files):
    k, m, m2 = files
    cmd, mods = booted(f"multiboot,{k},{m};root=/dev/x debug:{m2},-v")
    assert cmd == f"{k} -v"
    assert mods == [(f"{m} root=/dev/x debug", b"first module"), (m2, b"second")]


def test_module_list_parsing():
    assert multiboot_modules(None) == []
    assert multiboot_modules("a;x=1:b:c;") == [("a", "x=1"), ("b", None), ("c", None)]
    with pytest.raises(ConfigError, match="module 1 of the module list a::b has no file name"):
        multiboot_modules("a::b")


def test_a_command_line_given_as_the_third_field_is_explained(files):
    k, _, _ = files
    with pytest.raises(LoaderError) as ei:
        boot_image(Cfg(f"multiboot,{k},console=ttyS0"), LOWMEM, 0)
    msg = str(ei.value)
    assert msg.startswith("cannot read module0 console=ttyS0: ") and "\n" not in msg
    assert "multiboot,KERNEL,,CMDLINE" in msg


def test_kexec_command_line_keeps_its_commas(tmp_path):
    k = tmp_path / "vmlinuz"
    k.write_bytes(make_bzimage())
    img = boot_image(Cfg(f"kexec,{k},,\"console=ttyS0,115200 quiet\""), LOWMEM, 0)
    assert dict(img.writes)[0x4000] == b"console=ttyS0,115200 quiet\0"


@pytest.mark.parametrize("spec,needle", [
    ("multiboot", "-f multiboot needs a kernel"),
    ("multiboot,,M", "-f multiboot needs a kernel"),
    ("kexec", "-f kexec needs a kernel"),
    ("", "no firmware"),
    ("fbsd,x", "unknown firmware \"fbsd\""),
])
def test_bad_specs(spec, needle):
    with pytest.raises(ValueError, match=needle):
        boot_image(Cfg(spec), LOWMEM, 0)
