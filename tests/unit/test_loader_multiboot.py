"""The multiboot 1 loader: ELF kernels built here with GNU as and ld, a.out kludge images built by hand,
modules and command lines, the information structure parsed back, and every refusal as a one-line error."""

import re
import shutil
import struct
import subprocess

import pytest
from hypothesis import given, strategies as st

from vmmshim.loader import LoaderError, load_multiboot
from vmmshim.loader.multiboot import MultibootHeader, MultibootInfo, MultibootMmapEntry, MultibootModule

MiB = 1 << 20
GiB = 1 << 30
LOWMEM = 128 * MiB
MAGIC = 0x1BADB002

HAVE_TOOLS = all(shutil.which(t) for t in ("as", "ld", "readelf", "nm", "objcopy"))
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason="GNU as, ld, readelf, nm and objcopy are needed")

ASM = """
    .text
    .globl _start
    .align 4
mb_header:
    .long 0x1BADB002
    .long {flags}
    .long -(0x1BADB002 + {flags})
_start:
    cli
    mov $0x12345678, %eax
    mov $msg, %esi
1:  hlt
    jmp 1b
    .data
msg:
    .ascii "hello from a multiboot kernel"
    .fill 5000, 1, 0x5A
    .bss
    .globl buf
buf:
    .skip 20000
    .globl buf_end
buf_end:
"""

HIGHER_HALF_LDS = """
ENTRY(_start)
SECTIONS {
  . = 0xC0100000;
  .text : AT(0x100000) { *(.text) }
  . = ALIGN(4096);
  .data : AT(ADDR(.data) - 0xC0000000) { *(.data) }
  .bss : AT(ADDR(.bss) - 0xC0000000) { *(.bss) *(COMMON) }
}
"""


def build_elf(tmp_path, *, flags=0x3, bits=32, script=None, name="kernel.elf"):
    src = tmp_path / "k.S"
    src.write_text(ASM.format(flags=flags))
    obj = tmp_path / "k.o"
    out = tmp_path / name
    subprocess.run(["as", f"--{bits}", "-o", str(obj), str(src)], check=True, capture_output=True)
    emul = "elf_i386" if bits == 32 else "elf_x86_64"
    link = ["ld", "-m", emul, "-o", str(out), str(obj)]
    if script:
        lds = tmp_path / "k.lds"
        lds.write_text(script)
        link += ["-T", str(lds)]
    else:
        link += ["-Ttext", "0x100000"]
    subprocess.run(link, check=True, capture_output=True)
    return out


def symbols(path):
    out = subprocess.run(["nm", str(path)], check=True, capture_output=True, text=True).stdout
    return {f[2]: int(f[0], 16) for f in (line.split() for line in out.splitlines()) if len(f) == 3}


def load_segments(path):
    """(offset, vaddr, paddr, filesz, memsz) of each LOAD program header, as readelf prints them."""
    out = subprocess.run(["readelf", "-lW", str(path)], check=True, capture_output=True, text=True).stdout
    segs = []
    for line in out.splitlines():
        f = line.split()
        if f and f[0] == "LOAD":
            segs.append(tuple(int(x, 16) for x in f[1:6]))
    return segs


def alloc_sections(path):
    """(name, type, addr, offset, size) of each allocated section, as readelf prints them."""
    out = subprocess.run(["readelf", "-SW", str(path)], check=True, capture_output=True, text=True).stdout
    secs = []
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+(\S+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+\S+\s+(\S*)",
                     line)
        if m and "A" in m.group(6) and int(m.group(5), 16):
            secs.append((m.group(1), m.group(2), int(m.group(3), 16), int(m.group(4), 16), int(m.group(5), 16)))
    return secs


def check_sections(mem, path, lma_offset=0):
    """Every allocated section at its load address: PROGBITS as in the file, NOBITS (bss) zero."""
    data = path.read_bytes()
    secs = alloc_sections(path)
    assert {s[0] for s in secs} >= {".text", ".data", ".bss"}
    for name, typ, addr, off, size in secs:
        lma = addr - lma_offset
        want = bytes(size) if typ == "NOBITS" else data[off:off + size]
        assert bytes(mem[lma:lma + size]) == want, name
    return secs


def memory(img, size=LOWMEM):
    mem = bytearray(size)
    spans = sorted((a, a + len(d)) for a, d in img.writes)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1, f"writes overlap: [{s0:#x},{e0:#x}) and [{s1:#x},{e1:#x})"
    for a, d in img.writes:
        mem[a:a + len(d)] = d
    return mem


def cstring(mem, addr):
    return bytes(mem[addr:mem.index(b"\0", addr)]).decode()


def parse_info(mem, addr):
    info = MultibootInfo.parse(bytes(mem[addr:addr + MultibootInfo.sizeof()]))
    mods = [MultibootModule.parse(bytes(mem[info.mods_addr + 16 * i:info.mods_addr + 16 * (i + 1)]))
            for i in range(info.mods_count)]
    mmap, p = [], info.mmap_addr
    while p < info.mmap_addr + info.mmap_length:
        e = MultibootMmapEntry.parse(bytes(mem[p:p + 24]))
        mmap.append((e.base_addr, e.length, e.type))
        p += e.size + 4
    return info, mods, mmap


def check_entry_state(img, entry):
    assert img.regs["rip"] == entry
    assert img.regs["rax"] == 0x2BADB002
    assert img.regs["rbx"] == 0x3000
    assert img.regs["rflags"] == 2  # IF and VM clear
    assert img.regs["cr0"] & 1 and not img.regs["cr0"] & (1 << 31)
    assert img.regs["cr0"] == 0x21
    assert img.regs["efer"] == 0 and img.regs["cr4"] == 0
    assert img.segs["cs"] == (0x10, 0, 0xFFFFFFFF, 0xC09B)
    for s in ("ds", "es", "fs", "gs", "ss"):
        assert img.segs[s] == (0x18, 0, 0xFFFFFFFF, 0xC093)
    assert img.gdtr == (0x2000, 0x1F)


def check_gdt(mem):
    assert struct.unpack_from("<4Q", mem, 0x2000) == (0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)


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
    k = _elf_with_segment(0x1000, 0x100, 0x180)
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


def _elf_header(cls=1, data=1, machine=3, etype=2, phnum=1, phoff=52):
    e = bytearray(0x2000)
    e[:4] = b"\x7fELF"
    e[4], e[5], e[6] = cls, data, 1
    struct.pack_into("<HHIIIIIHHHHHH", e, 16, etype, machine, 1, 0x100000, phoff, 0, 0, 52, 32, phnum, 40, 0, 0)
    struct.pack_into("<3I", e, 0x1000, MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    return e


def _elf_with_segment(offset, filesz, memsz, paddr=0x100000):
    e = _elf_header()
    struct.pack_into("<8I", e, 52, 1, offset, paddr, paddr, filesz, memsz, 5, 0x1000)
    return bytes(e)


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
    ("big-endian ELF", lambda: bytes(_elf_header(data=2)), "bad ELF"),
    ("ELF class 3", lambda: bytes(_elf_header(cls=3)), "bad ELF"),
    ("ELF for ARM", lambda: bytes(_elf_header(machine=40)), "machine 40"),
    ("ELF shared object", lambda: bytes(_elf_header(etype=3)), "not an executable"),
    ("ELF no phdrs", lambda: bytes(_elf_header(phnum=0)), "no program headers"),
    ("ELF phdrs past end", lambda: bytes(_elf_header(phoff=0x1FFF)), "past the end"),
    ("ELF segment past end", lambda: _elf_with_segment(0x1000, 0x5000, 0x5000), "past the end of the file"),
    ("ELF filesz > memsz", lambda: _elf_with_segment(0x1000, 0x800, 0x400), "p_filesz"),
    ("ELF no PT_LOAD", lambda: _elf_with_segment(0x1000, 0, 0), "no PT_LOAD"),
    ("ELF too big", lambda: _elf_with_segment(0x1000, 0x100, 200 * MiB), "does not fit"),
    ("ELF in low area", lambda: _elf_with_segment(0x1000, 0x100, 0x100, paddr=0x3000), "overlaps"),
    ("ELF in BIOS area", lambda: _elf_with_segment(0x1000, 0x100, 0x100, paddr=0xF0000), "BIOS area"),
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
    ("kludge too big", lambda: aout_image(bss=300 * MiB), "does not fit"),
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
