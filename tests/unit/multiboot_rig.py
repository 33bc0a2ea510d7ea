"""Helpers of the multiboot loader tests (Multiboot Specification 0.6.96: 3.1 the OS image format, 3.2 the machine
state at entry, 3.3 the boot information format): ELF kernels built with GNU as and ld, their sections and
symbols read back with binutils, guest memory with an image loaded, the information structure parsed back, and
hand-made ELF headers. Shared by ``test_loader_multiboot.py`` and ``test_loader_multiboot_aout.py``.

Not here: a.out kludge images (``test_loader_multiboot_aout.py`` builds them by hand), Multiboot 2.
"""

import re
import shutil
import struct
import subprocess

import pytest

from vmmshim.loader.multiboot import MultibootInfo, MultibootMmapEntry, MultibootModule

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


def elf_header(cls=1, data=1, machine=3, etype=2, phnum=1, phoff=52, entry=0x100000):
    e = bytearray(0x2000)
    e[:4] = b"\x7fELF"
    e[4], e[5], e[6] = cls, data, 1
    struct.pack_into("<HHIIIIIHHHHHH", e, 16, etype, machine, 1, entry, phoff, 0, 0, 52, 32, phnum, 40, 0, 0)
    struct.pack_into("<3I", e, 0x1000, MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    return e


def elf_with_segment(offset, filesz, memsz, paddr=0x100000, entry=0x100000, ptype=1):
    e = elf_header(entry=entry)
    struct.pack_into("<8I", e, 52, ptype, offset, paddr, paddr, filesz, memsz, 5, 0x1000)
    return bytes(e)


def elf_with_segments(segments, entry, bits=32):
    """An ELF32 or ELF64 executable without section headers: a multiboot header at 0x1000 and one PT_LOAD
    program header per ``(offset, vaddr, paddr, filesz, memsz)``."""
    e = bytearray(0x2000)
    e[:4] = b"\x7fELF"
    e[4], e[5], e[6] = (1 if bits == 32 else 2), 1, 1
    if bits == 32:
        struct.pack_into("<HHIIIIIHHHHHH", e, 16, 2, 3, 1, entry, 52, 0, 0, 52, 32, len(segments), 40, 0, 0)
        for i, (off, vaddr, paddr, filesz, memsz) in enumerate(segments):
            struct.pack_into("<8I", e, 52 + 32 * i, 1, off, vaddr, paddr, filesz, memsz, 5, 0x1000)
    else:
        struct.pack_into("<HHIQQQIHHHHHH", e, 16, 2, 62, 1, entry, 64, 0, 0, 64, 56, len(segments), 64, 0, 0)
        for i, (off, vaddr, paddr, filesz, memsz) in enumerate(segments):
            struct.pack_into("<IIQQQQQQ", e, 64 + 56 * i, 1, 5, off, vaddr, paddr, filesz, memsz, 0x1000)
    struct.pack_into("<3I", e, 0x1000, MAGIC, 0, (-MAGIC) & 0xFFFFFFFF)
    return bytes(e)
