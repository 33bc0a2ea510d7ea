"""The multiboot 1 loader: a.out kludge images built by hand, kernel and module paths, and every refusal as a
one-line error. The layouts and ELF kernels: ``test_loader_multiboot.py``."""

import re
import struct

import pytest

from vmmshim.loader import LoaderError, load_multiboot
from tests.unit.multiboot_rig import (LOWMEM, MAGIC, MiB, check_entry_state, cstring, elf_header, elf_with_segment,
                                      memory, parse_info)


# ---------------------------------------------------------------------------------------------------------
# a.out kludge images, by hand

def aout_image(*, hdr_off=0x40, load_addr=0x100000, body=4096, bss=0x3000, entry_off=0x80, load_end=True,
               flags=0x00010003):
    img = bytearray((i * 3 + 1) & 0xFF for i in range(body))
    header_addr = load_addr + hdr_off
    load_end_addr = load_addr + body if load_end else 0
    bss_end_addr = load_addr + body + bss if bss else 0
    struct.pack_into("<8I", img, hdr_off, MAGIC, flags, (-(MAGIC + flags)) & 0xFFFFFFFF, header_addr, load_addr,
                     load_end_addr, bss_end_addr, load_addr + entry_off)
    return bytes(img)


@pytest.mark.parametrize("load_end", [True, False])
@pytest.mark.parametrize("bss", [0, 0x3000])
def test_aout_kludge(load_end, bss):
    k = aout_image(load_end=load_end, bss=bss)
    img = load_multiboot(k, [(b"MODULE", "m")], "hello", LOWMEM)
    mem = memory(img)
    check_entry_state(img, 0x100000 + 0x80)
    assert bytes(mem[0x100000:0x100000 + len(k)]) == k
    assert (0x100000, k + bytes(bss)) in img.writes  # the bss is written as zeros
    info, mods, _ = parse_info(mem, 0x3000)
    assert cstring(mem, info.cmdline) == "kernel hello"
    assert mods[0].mod_start == (0x100000 + len(k) + bss + 4095) // 4096 * 4096
    assert bytes(mem[mods[0].mod_start:mods[0].mod_end]) == b"MODULE"
    assert cstring(mem, mods[0].string) == "module0 m"
    assert "a.out kludge" in img.description


def test_aout_kludge_load_addr_inside_file():
    """load_addr after the file's start: the image starts at file offset header - (header_addr - load_addr)."""
    k = bytearray(0x3000)
    k[:] = bytes((i * 5) & 0xFF for i in range(0x3000))
    hdr_off, skip = 0x1000, 0x800
    load_addr = 0x200000
    flags = 0x00010000
    struct.pack_into("<8I", k, hdr_off, MAGIC, flags, (-(MAGIC + flags)) & 0xFFFFFFFF,
                     load_addr + hdr_off - skip, load_addr, load_addr + 0x2000, 0, load_addr)
    img = load_multiboot(bytes(k), [], "", LOWMEM)
    mem = memory(img)
    assert bytes(mem[load_addr:load_addr + 0x2000]) == bytes(k[skip:skip + 0x2000])
    assert img.regs["rip"] == load_addr


def test_kernel_path_and_module_path(tmp_path):
    kp = tmp_path / "kern"
    kp.write_bytes(aout_image())
    mp = tmp_path / "root.img"
    mp.write_bytes(b"root")
    img = load_multiboot(str(kp), [(str(mp), None)], "", LOWMEM)
    mem = memory(img)
    info, mods, _ = parse_info(mem, 0x3000)
    assert cstring(mem, info.cmdline) == str(kp)
    assert cstring(mem, mods[0].string) == str(mp)


def _header_beyond_8k():
    k = bytearray(0x4000)
    struct.pack_into("<3I", k, 0x2000, MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    return bytes(k)


def _bad_checksum():
    k = bytearray(0x1000)
    struct.pack_into("<3I", k, 0x100, MAGIC, 0, 0)
    return bytes(k)


ERRORS = [
    ("no header", lambda: bytes(10000), "not a multiboot image"),
    ("empty", lambda: b"", "not a multiboot image"),
    ("bad checksum", _bad_checksum, "bad checksum"),
    ("header past 8 KiB", _header_beyond_8k, "not a multiboot image"),
    ("not ELF, no kludge", lambda: bytes(16) + struct.pack("<3I", MAGIC, 3, (-(MAGIC + 3)) & 0xFFFFFFFF),
     "not an ELF file"),
    ("big-endian ELF", lambda: bytes(elf_header(data=2)), "bad ELF"),
    ("ELF class 3", lambda: bytes(elf_header(cls=3)), "bad ELF"),
    ("ELF for ARM", lambda: bytes(elf_header(machine=40)), "machine 40"),
    ("ELF shared object", lambda: bytes(elf_header(etype=3)), "not an executable"),
    ("ELF no phdrs", lambda: bytes(elf_header(phnum=0)), "no program headers"),
    ("ELF phdrs past end", lambda: bytes(elf_header(phoff=0x1FFF)), "past the end"),
    ("ELF segment past end", lambda: elf_with_segment(0x1000, 0x5000, 0x5000), "past the end of the file"),
    ("ELF filesz > memsz", lambda: elf_with_segment(0x1000, 0x800, 0x400), "p_filesz"),
    ("ELF no PT_LOAD", lambda: elf_with_segment(0x1000, 0x100, 0x100, ptype=2), "no PT_LOAD segment"),
    ("ELF empty PT_LOAD", lambda: elf_with_segment(0x1000, 0, 0), "nothing to load"),
    ("ELF too big", lambda: elf_with_segment(0x1000, 0x100, 200 * MiB), "is outside guest RAM"),
    ("ELF in low area", lambda: elf_with_segment(0x1000, 0x100, 0x100, paddr=0x3000, entry=0x3000),
     "overlaps the multiboot information"),
    ("ELF in BIOS area", lambda: elf_with_segment(0x1000, 0x100, 0x100, paddr=0xF0000, entry=0xF0000),
     "is outside guest RAM"),
    ("kludge header below load", lambda: aout_image(hdr_off=0x40, load_addr=0x100000)[:0x40] + struct.pack(
        "<8I", MAGIC, 0x10000, (-(MAGIC + 0x10000)) & 0xFFFFFFFF, 0xFF000, 0x100000, 0, 0, 0x100000),
     "below load_addr"),
    ("kludge load before file", lambda: bytes(8) + struct.pack(
        "<8I", MAGIC, 0x10000, (-(MAGIC + 0x10000)) & 0xFFFFFFFF, 0x101000, 0x100000, 0, 0, 0x100000),
     "before the start of the file"),
    ("kludge truncated", lambda: aout_image()[:2048], "truncated"),
    ("kludge bss below end", lambda: bytes(struct.pack(
        "<8I", MAGIC, 0x10000, (-(MAGIC + 0x10000)) & 0xFFFFFFFF, 0x100000, 0x100000, 0x100020, 0x100010,
        0x100000)), "bss_end_addr"),
    ("kludge too big", lambda: aout_image(bss=300 * MiB), "is outside guest RAM"),
    ("missing kernel", lambda: "/nonexistent/kernel", "cannot read kernel"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line(case):
    _, make, phrase = case
    with pytest.raises(LoaderError) as ei:
        load_multiboot(make(), [], "", LOWMEM)
    msg = str(ei.value)
    assert phrase in msg
    assert "\n" not in msg and msg


def test_bad_module_arguments():
    with pytest.raises(LoaderError, match="cannot read module"):
        load_multiboot(aout_image(), [("/nonexistent/mod", "")], "", LOWMEM)
    with pytest.raises(LoaderError, match="pair"):
        load_multiboot(aout_image(), [b"just bytes"], "", LOWMEM)
    with pytest.raises(LoaderError, match="NUL"):
        load_multiboot(aout_image(), [], "a\0b", LOWMEM)


def test_low_area_overflow_is_refused():
    """Strings that would run into the EBDA are refused, not truncated."""
    with pytest.raises(LoaderError, match="multiboot information"):
        load_multiboot(aout_image(), [], "x" * 0xA0000, LOWMEM)


def test_entry_registers_and_description():
    """No stray registers: only the general registers, RIP, RFLAGS and the control registers are set."""
    img = load_multiboot(aout_image(), [], "", LOWMEM)
    assert set(img.regs) == {"rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip", "rflags", "cr0",
                             "cr3", "cr4", "efer"}
    assert re.match(r"multiboot: kernel \(a\.out kludge", img.description)
