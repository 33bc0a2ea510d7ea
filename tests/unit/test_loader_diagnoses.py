"""Issue 19 item 13: what the loaders say about an image they cannot boot, one line each, naming the file's own
numbers: an ELF segment outside guest RAM (not "no PT_LOAD segment"), an entry point outside every loaded segment,
``p_memsz`` below ``p_filesz``, file bytes past the end of the file, a segment ending past 4 GiB; the same for
the a.out kludge; a bzImage with no protected-mode code, one that runs above RAM, an initrd that does not fit."""

import struct

import pytest

from vmmshim.loader import LoaderError, load_kexec, load_multiboot
from tests.unit.multiboot_rig import (GiB, MAGIC, MiB, elf_with_segment, elf_with_segments, memory)
from tests.unit.test_loader_bzimage import make_bzimage

LOWMEM = 64 * MiB
RAM = "(0x0-0x9fc00 and 0x100000-0x4000000)"


def refusal(kernel, lowmem=LOWMEM, modules=(), cmdline=""):
    with pytest.raises(LoaderError) as ei:
        load_multiboot(kernel, list(modules), cmdline, lowmem)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    return msg


def kexec_refusal(kernel, initrd=None, lowmem=LOWMEM):
    with pytest.raises(LoaderError) as ei:
        load_kexec(kernel, initrd, "", lowmem)
    msg = str(ei.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------------------------------------
# ELF segments and guest RAM

@pytest.mark.parametrize("paddr,memsz,where", [
    (LOWMEM, 0x180, "0x4000000-0x4000180"),              # just above lowmem
    (LOWMEM - 0x100, 0x180, "0x3ffff00-0x4000080"),      # straddling lowmem
    (0x10000000, 0x1000, "0x10000000-0x10001000"),       # far above
    (0xA0000, 0x100, "0xa0000-0xa0100"),                 # the VGA hole
    (0x9F000, 0x2000, "0x9f000-0xa1000"),                # across the end of conventional RAM
    (0xF0000, 0x100, "0xf0000-0xf0100"),                 # the BIOS area (MP and ACPI tables)
])
def test_segment_outside_guest_ram_is_named_with_its_range(paddr, memsz, where):
    msg = refusal(elf_with_segment(0x1000, 0x100, memsz, paddr=paddr, entry=paddr))
    assert msg == f"kernel: ELF segment 0 at {where} is outside guest RAM {RAM}"


def test_outside_ram_names_the_program_header_index():
    k = elf_with_segments([(0x1000, 0x100000, 0x100000, 0x100, 0x100),
                           (0x1100, 0x8000000, 0x8000000, 0x100, 0x100)], entry=0x100000)
    assert refusal(k) == f"kernel: ELF segment 1 at 0x8000000-0x8000100 is outside guest RAM {RAM}"


def test_outside_ram_is_not_reported_as_no_pt_load():
    assert "PT_LOAD" not in refusal(elf_with_segment(0x1000, 0x100, 0x100, paddr=0x20000000, entry=0x20000000))


@pytest.mark.parametrize("paddr,what", [(0x1000, "the boot GDT at 0x2000-0x2020"),
                                        (0x3000, "the multiboot information at 0x3000-0x3074")])
def test_segment_over_a_reserved_area_names_it(paddr, what):
    msg = refusal(elf_with_segment(0x1000, 0x100, 0x1100, paddr=paddr, entry=paddr))
    assert msg == f"kernel: ELF segment 0 at {paddr:#x}-{paddr + 0x1100:#x} overlaps {what}"


def test_overlapping_segments_name_both():
    k = elf_with_segments([(0x1000, 0x100000, 0x100000, 0x100, 0x2000),
                           (0x1100, 0x101000, 0x101000, 0x100, 0x100)], entry=0x100000)
    assert refusal(k) == ("kernel: ELF segment 1 at 0x101000-0x101100 overlaps ELF segment 0 at "
                          "0x100000-0x102000")


def test_segment_in_low_ram_is_loaded():
    k = elf_with_segment(0x1000, 0x100, 0x180, paddr=0x10000, entry=0x10000)
    img = load_multiboot(k, [], "", LOWMEM)
    assert bytes(memory(img, LOWMEM)[0x10000:0x10180]) == k[0x1000:0x1100] + bytes(0x80)


# ---------------------------------------------------------------------------------------------------------
# The entry point

@pytest.mark.parametrize("entry", [0x200000, 0x0FFFFF, 0x100180, 0])
def test_entry_outside_every_segment_is_refused(entry):
    msg = refusal(elf_with_segment(0x1000, 0x100, 0x180, entry=entry))
    assert msg == f"kernel: bad ELF: entry point {entry:#x} is outside every loaded segment (0x100000-0x100180)"


def test_entry_message_lists_the_segments():
    k = elf_with_segments([(0x1000, 0x100000, 0x100000, 0x100, 0x100),
                           (0x1100, 0x200000, 0x200000, 0x100, 0x1000)], entry=0x180000)
    assert refusal(k).endswith("entry point 0x180000 is outside every loaded segment "
                               "(0x100000-0x100100, 0x200000-0x201000)")


def test_entry_in_the_bss_is_accepted():
    img = load_multiboot(elf_with_segment(0x1000, 0x100, 0x180, entry=0x100170), [], "", LOWMEM)
    assert img.regs["rip"] == 0x100170


def test_virtual_entry_is_translated_but_an_untranslatable_one_is_refused():
    seg = (0x1000, 0xC0100000, 0x100000, 0x100, 0x100)
    img = load_multiboot(elf_with_segments([seg], entry=0xC0100010), [], "", LOWMEM)
    assert img.regs["rip"] == 0x100010
    msg = refusal(elf_with_segments([seg], entry=0xC0200000))
    assert "entry point 0xc0200000 is outside every loaded segment (0x100000-0x100100)" in msg


def test_elf64_entry_above_4g_is_refused():
    k = elf_with_segments([(0x1000, 0x100000, 0x100000, 0x100, 0x100)], entry=0xFFFFFFFF80100000, bits=64)
    assert "entry point 0xffffffff80100000 is outside every loaded segment" in refusal(k)


# ---------------------------------------------------------------------------------------------------------
# Program header sizes

def test_memsz_below_filesz():
    assert refusal(elf_with_segment(0x1000, 0x800, 0x400)) == \
        "kernel: bad ELF: segment 0 has p_memsz 0x400 smaller than p_filesz 0x800"


def test_file_bytes_past_the_end_of_the_file():
    assert refusal(elf_with_segment(0x1000, 0x5000, 0x5000)) == (
        "kernel: bad ELF: segment 0's file bytes 0x1000-0x6000 (p_offset 0x1000 + p_filesz 0x5000) run past "
        "the end of the file (8192 bytes)")


@pytest.mark.parametrize("paddr,memsz", [(0xFFFFFF00, 0x180), (0x100000, 0xFFFFFFFF)])
def test_memsz_overflowing_32_bits(paddr, memsz):
    msg = refusal(elf_with_segment(0x1000, 0x100, memsz, paddr=paddr, entry=paddr))
    assert msg == (f"kernel: bad ELF: segment 0 at physical {paddr:#x} + p_memsz {memsz:#x} ends at "
                   f"{paddr + memsz:#x}, past 4 GiB (multiboot loads a kernel into 32-bit physical memory)")


def test_elf64_segment_above_4g():
    k = elf_with_segments([(0x1000, 0x100000000, 0x100000000, 0x100, 0x100)], entry=0x100000000, bits=64)
    assert "segment 0 at physical 0x100000000 is above 4 GiB" in refusal(k)


def test_no_pt_load_and_nothing_to_load_are_told_apart():
    assert refusal(elf_with_segment(0x1000, 0x100, 0x100, ptype=4)) == "kernel: bad ELF: no PT_LOAD segment"
    assert "nothing to load: its 1 PT_LOAD segment(s) are empty" in refusal(elf_with_segment(0x1000, 0, 0))


def test_section_headers_without_an_allocated_section_load_whole_segments():
    """A table of section headers naming no allocated section says nothing about the segments: load them."""
    k = bytearray(elf_with_segment(0x1000, 0x100, 0x180))
    struct.pack_into("<I", k, 32, 0x1800)                       # e_shoff
    struct.pack_into("<HH", k, 46, 40, 2)                        # e_shentsize, e_shnum
    struct.pack_into("<10I", k, 0x1800 + 40, 1, 1, 0, 0, 0x1000, 0x100, 0, 0, 1, 0)   # PROGBITS, not SHF_ALLOC
    img = load_multiboot(bytes(k), [], "", LOWMEM)
    assert (0x100000, bytes(k[0x1000:0x1100]) + bytes(0x80)) in img.writes


# ---------------------------------------------------------------------------------------------------------
# a.out kludge images

def aout(load_addr=0x100000, entry=None, size=0x1000, bss_end=0, load_end=True):
    k = bytearray(size)
    flags = 0x10000
    entry = load_addr + 0x40 if entry is None else entry
    struct.pack_into("<8I", k, 0, MAGIC, flags, (-(MAGIC + flags)) & 0xFFFFFFFF, load_addr, load_addr,
                     load_addr + size if load_end else 0, bss_end, entry)
    return bytes(k)


def test_aout_entry_outside_the_image():
    assert refusal(aout(entry=0x200000)) == ("kernel: a.out kludge entry_addr 0x200000 is outside the loaded image "
                                             "(0x100000-0x101000)")


def test_aout_image_outside_guest_ram():
    assert refusal(aout(load_addr=0x8000000)) == \
        f"kernel: the a.out kludge image at 0x8000000-0x8001000 is outside guest RAM {RAM}"


def test_aout_image_past_4g():
    msg = refusal(aout(load_addr=0xFFFFF800, load_end=False))
    assert msg == ("kernel: the a.out kludge image at load_addr 0xfffff800 + 0x1000 bytes ends at 0x100000800, "
                   "past 4 GiB")


# ---------------------------------------------------------------------------------------------------------
# The information structure's strings

def test_nul_in_the_command_line_names_the_string_not_its_bytes():
    msg = refusal(elf_with_segment(0x1000, 0x100, 0x180), cmdline="x" * 5000 + "\0")
    assert msg == "kernel's command line contains a NUL character"
    msg = refusal(elf_with_segment(0x1000, 0x100, 0x180), modules=[(b"m", "a\0b")])
    assert msg == "module module0's command line contains a NUL character"


# ---------------------------------------------------------------------------------------------------------
# bzImage

def test_bzimage_without_protected_mode_code():
    assert kexec_refusal(make_bzimage(payload=b"")) == \
        "kernel has no protected-mode code after its 4 setup sectors (the file ends at 0xa00)"


def test_bzimage_setup_sects_past_the_end_of_the_file():
    k = bytearray(make_bzimage())
    k[0x1F1] = 200
    msg = kexec_refusal(bytes(k))
    assert msg.startswith(f"kernel is truncated: {len(k)} bytes, its header says ") and "200 setup sectors" in msg


@pytest.mark.parametrize("kw,where", [
    (dict(relocatable=0, pref_address=0x40000000), "0x40000000 (pref_address 0x40000000, not relocatable)"),
    (dict(pref_address=0xFFFFFFFF00000000),
     "0xffffffff00000000 (pref_address 0xffffffff00000000 aligned to kernel_alignment 0x200000)"),
])
def test_bzimage_running_above_guest_ram(kw, where):
    assert kexec_refusal(make_bzimage(**kw)) == (f"kernel runs at {where}, above the end of guest RAM: guest RAM "
                                                 f"ends at lowmem 0x4000000 (64 MiB)")


def test_bzimage_too_big_names_the_range_it_needs():
    msg = kexec_refusal(make_bzimage(init_size=0xFFFFFFFF))
    assert msg.startswith("kernel is too big for memory: it needs 0x200000-0x101000000 (")
    assert msg.endswith("init_size 0xffffffff from 0x1000000), guest RAM ends at lowmem 0x4000000 (64 MiB)")


def test_bzimage_kernel_alignment_zero():
    assert kexec_refusal(make_bzimage(kernel_alignment=0)) == "kernel: kernel_alignment 0x0 is not a power of two"


def test_kernel_or_initrd_bigger_than_ram():
    assert kexec_refusal(make_bzimage(payload=bytes(LOWMEM))).startswith("kernel (")
    assert kexec_refusal(make_bzimage(), bytes(LOWMEM + 1)) == \
        f"initrd ({LOWMEM + 1} bytes) does not fit in {LOWMEM} bytes of guest memory"


def test_initrd_that_does_not_fit_is_named_once():
    msg = kexec_refusal(make_bzimage(), bytes(60 * MiB))
    assert msg == ("the initrd (62914560 bytes) does not fit between the kernel's end 0x1400000 and "
                   "min(initrd_addr_max 0x7fffffff, lowmem - 1 0x3ffffff)")


def test_highmem_does_not_take_a_segment_above_4g():
    k = elf_with_segments([(0x1000, 0x100000000, 0x100000000, 0x100, 0x100)], entry=0x100000000, bits=64)
    with pytest.raises(LoaderError, match="above 4 GiB"):
        load_multiboot(k, [], "", 3 * GiB, 2 * GiB)
