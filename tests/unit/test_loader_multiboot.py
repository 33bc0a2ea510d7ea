"""The multiboot 1 loader: the layouts, and ELF kernels built here with GNU as and ld (modules and command lines,
the information structure parsed back). a.out kludge images and the refusals: ``test_loader_multiboot_aout.py``."""

import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from vmmshim.loader import LoaderError, load_multiboot
from vmmshim.loader.multiboot import MultibootHeader, MultibootInfo, MultibootMmapEntry, MultibootModule
from tests.unit.multiboot_rig import (ASM, GiB, HIGHER_HALF_LDS, LOWMEM, MiB, build_elf, check_entry_state, check_gdt,
                                      check_sections, cstring, elf_with_segment, load_segments, memory, needs_tools,
                                      parse_info, symbols)


# ---------------------------------------------------------------------------------------------------------
# Layouts

def test_layout_sizes_and_offsets():
    assert MultibootInfo.sizeof() == 116
    assert MultibootModule.sizeof() == 16
    assert MultibootMmapEntry.sizeof() == 24
    assert MultibootHeader.sizeof() == 48
    info = MultibootInfo.parse(bytes(116))
    info.flags, info.cmdline, info.mods_count, info.mods_addr = 1, 2, 3, 4
    info.mmap_length, info.mmap_addr, info.boot_loader_name = 5, 6, 7
    raw = MultibootInfo.build(info)
    assert struct.unpack_from("<I", raw, 0)[0] == 1
    assert struct.unpack_from("<III", raw, 16) == (2, 3, 4)
    assert struct.unpack_from("<II", raw, 44) == (5, 6)
    assert struct.unpack_from("<I", raw, 64)[0] == 7


@pytest.mark.parametrize("layout", [MultibootHeader, MultibootInfo, MultibootModule, MultibootMmapEntry])
@given(data=st.data())
def test_round_trip(layout, data):
    raw = data.draw(st.binary(min_size=layout.sizeof(), max_size=layout.sizeof()))
    assert layout.build(layout.parse(raw)) == raw


# ---------------------------------------------------------------------------------------------------------
# ELF kernels

@needs_tools
def test_elf_kernel_modules_and_info(tmp_path):
    kpath = build_elf(tmp_path)
    m1 = tmp_path / "mod1.bin"
    m1.write_bytes(bytes(range(256)) * 20)
    m2 = b"second module, given as bytes"
    img = load_multiboot(kpath, [(m1, "arg1 arg2"), (m2, "")], "console=com0 -v", LOWMEM)
    mem = memory(img)
    data = kpath.read_bytes()
    sym = symbols(kpath)

    check_gdt(mem)
    check_entry_state(img, sym["_start"])
    # Every allocated section at its address, the bss zero, as readelf reads the file.
    secs = check_sections(mem, kpath)
    kernel_end = max(addr + size for _, _, addr, _, size in secs)
    assert sym["buf_end"] <= kernel_end
    # Every PT_LOAD segment's bytes from .text on (ld's header-only segment below 1 MiB is left out).
    segs = load_segments(kpath)
    for off, vaddr, paddr, filesz, memsz in segs:
        if paddr >= 0x100000:
            assert bytes(mem[paddr:paddr + filesz]) == data[off:off + filesz]
            assert bytes(mem[paddr + filesz:paddr + memsz]) == bytes(memsz - filesz)
    assert all(a >= 0x100000 or a < 0x9FC00 for a, _ in img.writes)
    # The flat image objcopy makes is what memory holds from the lowest section on.
    flat = tmp_path / "k.bin"
    subprocess.run(["objcopy", "-O", "binary", str(kpath), str(flat)], check=True)
    lo = min(s[2] for s in secs)
    assert lo == 0x100000
    assert bytes(mem[lo:lo + flat.stat().st_size]) == flat.read_bytes()

    info, mods, mmap = parse_info(mem, img.regs["rbx"])
    assert info.flags == (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)
    assert info.mem_lower == 639 and info.mem_upper == (LOWMEM - MiB) >> 10
    assert cstring(mem, info.cmdline) == f"{kpath} console=com0 -v"
    assert cstring(mem, info.boot_loader_name) == "vmmshim"
    assert mmap == [(0, 0x9FC00, 1), (MiB, LOWMEM - MiB, 1)] == img.e820
    # Modules: page-aligned, in order, after the kernel, with their command lines.
    assert len(mods) == 2
    assert mods[0].mod_start == (kernel_end + 4095) // 4096 * 4096
    assert mods[1].mod_start == (mods[0].mod_end + 4095) // 4096 * 4096
    for m, blob in zip(mods, [m1.read_bytes(), m2]):
        assert m.mod_start % 4096 == 0
        assert m.mod_end - m.mod_start == len(blob)
        assert bytes(mem[m.mod_start:m.mod_end]) == blob
    assert cstring(mem, mods[0].string) == f"{m1} arg1 arg2"
    assert cstring(mem, mods[1].string) == "module1"  # bytes have no file name; no command line given
    # Strings and tables all in low memory, below the EBDA.
    for a in (info.cmdline, info.boot_loader_name, info.mods_addr, info.mmap_addr, mods[0].string):
        assert 0x3000 <= a < 0x9FC00
    assert "ELF" in img.description


@needs_tools
def test_higher_half_elf_entry_translated(tmp_path):
    """NetBSD style: linked at 0xC0100000, loaded at 0x100000; the entry point becomes physical."""
    kpath = build_elf(tmp_path, script=HIGHER_HALF_LDS)
    img = load_multiboot(kpath, [], "", LOWMEM)
    sym = symbols(kpath)
    assert sym["_start"] >= 0xC0100000
    check_entry_state(img, sym["_start"] - 0xC0000000)
    mem = memory(img)
    for off, vaddr, paddr, filesz, memsz in load_segments(kpath):
        assert vaddr - paddr == 0xC0000000
    check_sections(mem, kpath, lma_offset=0xC0000000)


@needs_tools
def test_elf64_kernel(tmp_path):
    kpath = build_elf(tmp_path, bits=64)
    img = load_multiboot(kpath, [], "x", LOWMEM)
    check_entry_state(img, symbols(kpath)["_start"])
    check_sections(memory(img), kpath)


@needs_tools
def test_elf_without_separate_code(tmp_path):
    """Older ld (or -z noseparate-code): one segment from 0xFF000 holding the headers and .text."""
    src = tmp_path / "k.S"
    src.write_text(ASM.format(flags=3))
    subprocess.run(["as", "--32", "-o", str(tmp_path / "k.o"), str(src)], check=True)
    kpath = tmp_path / "k.elf"
    r = subprocess.run(["ld", "-m", "elf_i386", "-z", "noseparate-code", "-Ttext", "0x100000", "-o", str(kpath),
                        str(tmp_path / "k.o")], capture_output=True)
    if r.returncode:
        pytest.skip("this ld has no -z noseparate-code")
    assert min(s[2] for s in load_segments(kpath)) < 0x100000
    img = load_multiboot(kpath, [], "", LOWMEM)
    check_sections(memory(img), kpath)
    assert min(a for a, _ in img.writes if a >= 0x9FC00) == 0x100000


def test_elf_without_section_headers_loads_whole_segments():
    k = elf_with_segment(0x1000, 0x100, 0x180)
    img = load_multiboot(k, [], "", LOWMEM)
    assert (0x100000, k[0x1000:0x1100] + bytes(0x80)) in img.writes


@needs_tools
def test_video_mode_flag_refused(tmp_path):
    kpath = build_elf(tmp_path, flags=0x7)
    with pytest.raises(LoaderError, match="video mode"):
        load_multiboot(kpath, [], "", LOWMEM)


@needs_tools
def test_unknown_required_flag_refused(tmp_path):
    kpath = build_elf(tmp_path, flags=0x9)
    with pytest.raises(LoaderError, match=r"flags 0x8"):
        load_multiboot(kpath, [], "", LOWMEM)


@needs_tools
def test_optional_flags_accepted(tmp_path):
    kpath = build_elf(tmp_path, flags=0x00020003)  # bit 17: undefined, but optional
    load_multiboot(kpath, [], "", LOWMEM)


@needs_tools
def test_highmem_in_memory_map(tmp_path):
    img = load_multiboot(build_elf(tmp_path), [], "", 3 * GiB, 1 * GiB)
    lowmem = 3 * GiB
    mem = bytearray(0x10000)
    for a, d in img.writes:
        if a < len(mem):
            mem[a:a + len(d)] = d
    info, mods, mmap = parse_info(mem, 0x3000)
    assert mmap == [(0, 0x9FC00, 1), (MiB, lowmem - MiB, 1), (4 * GiB, 1 * GiB, 1)]
    assert info.mem_upper == (lowmem - MiB) >> 10


@needs_tools
def test_module_too_big(tmp_path):
    with pytest.raises(LoaderError, match="does not fit"):
        load_multiboot(build_elf(tmp_path), [(bytes(LOWMEM), "")], "", LOWMEM)
