"""The ELF executables a multiboot 1 loader boots (System V gABI, i386 and x86-64 psABI): the headers it reads,
the ``PT_LOAD`` segments it copies to guest memory and the physical entry point.

- ELF32 (EM_386) and, as GRUB allows, ELF64 (EM_X86_64) executables (ET_EXEC), little-endian.
- Each ``PT_LOAD`` segment is loaded at ``p_paddr``: ``p_filesz`` bytes from ``p_offset``, zeroed up to
  ``p_memsz``. A segment is refused when ``p_filesz`` exceeds ``p_memsz``, when its file bytes run past the end
  of the file, or when it ends above 4 GiB (multiboot loads into 32-bit physical memory).
- With section headers, the part of a segment before its first allocated section is left out (the ELF and
  program headers that GNU ld maps below ``.text``: with ``-Ttext 0x100000`` they would land at 0xFF000, in the
  BIOS area where the VM's MP and ACPI tables live), and a segment holding no allocated section is not loaded.
  A file whose section headers name no allocated section at all has its segments loaded whole.
- An entry point given as a virtual address inside a segment whose ``p_vaddr`` differs from ``p_paddr`` is
  translated, as GRUB and hyperkit do (NetBSD kernels link at 0xC0100000 and load at 0x100000). An entry point
  outside every loaded segment is refused.

Where the segments may go in guest RAM is the loader's business (:mod:`vmmshim.loader.multiboot`).

Not supported: big-endian files, shared objects and relocatable files, symbol tables.
"""

from __future__ import annotations

from typing import NamedTuple

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from .common import GiB, LoaderError, span

ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
SHT_NULL = 0
SHF_ALLOC = 0x2
#: Multiboot 1 hands over in 32-bit protected mode with paging off: everything lies below this.
PHYS_LIMIT = 4 * GiB
#: At most this many segments are listed in a message.
MAX_LISTED = 4

ElfIdent = Struct("magic" / Bytes(4), "ei_class" / Int8ul, "ei_data" / Int8ul, "ei_version" / Int8ul,
                  "pad" / Bytes(9))
Elf32Ehdr = Struct(
    "e_ident" / ElfIdent, "e_type" / Int16ul, "e_machine" / Int16ul, "e_version" / Int32ul,
    "e_entry" / Int32ul, "e_phoff" / Int32ul, "e_shoff" / Int32ul, "e_flags" / Int32ul,
    "e_ehsize" / Int16ul, "e_phentsize" / Int16ul, "e_phnum" / Int16ul, "e_shentsize" / Int16ul,
    "e_shnum" / Int16ul, "e_shstrndx" / Int16ul,
)
Elf64Ehdr = Struct(
    "e_ident" / ElfIdent, "e_type" / Int16ul, "e_machine" / Int16ul, "e_version" / Int32ul,
    "e_entry" / Int64ul, "e_phoff" / Int64ul, "e_shoff" / Int64ul, "e_flags" / Int32ul,
    "e_ehsize" / Int16ul, "e_phentsize" / Int16ul, "e_phnum" / Int16ul, "e_shentsize" / Int16ul,
    "e_shnum" / Int16ul, "e_shstrndx" / Int16ul,
)
Elf32Shdr = Struct(
    "sh_name" / Int32ul, "sh_type" / Int32ul, "sh_flags" / Int32ul, "sh_addr" / Int32ul, "sh_offset" / Int32ul,
    "sh_size" / Int32ul, "sh_link" / Int32ul, "sh_info" / Int32ul, "sh_addralign" / Int32ul,
    "sh_entsize" / Int32ul,
)
Elf64Shdr = Struct(
    "sh_name" / Int32ul, "sh_type" / Int32ul, "sh_flags" / Int64ul, "sh_addr" / Int64ul, "sh_offset" / Int64ul,
    "sh_size" / Int64ul, "sh_link" / Int32ul, "sh_info" / Int32ul, "sh_addralign" / Int64ul,
    "sh_entsize" / Int64ul,
)
Elf32Phdr = Struct(
    "p_type" / Int32ul, "p_offset" / Int32ul, "p_vaddr" / Int32ul, "p_paddr" / Int32ul,
    "p_filesz" / Int32ul, "p_memsz" / Int32ul, "p_flags" / Int32ul, "p_align" / Int32ul,
)
Elf64Phdr = Struct(
    "p_type" / Int32ul, "p_flags" / Int32ul, "p_offset" / Int64ul, "p_vaddr" / Int64ul, "p_paddr" / Int64ul,
    "p_filesz" / Int64ul, "p_memsz" / Int64ul, "p_align" / Int64ul,
)


class Segment(NamedTuple):
    """What goes into guest RAM: ``data`` at ``paddr``, zeroed up to ``memsz``; ``what`` names it in messages."""

    what: str
    paddr: int
    data: bytes
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


def spans(segs) -> str:
    """The ranges of ``segs`` for a message, at most :data:`MAX_LISTED` of them."""
    listed = ", ".join(span(s.paddr, s.end) for s in segs[:MAX_LISTED])
    more = len(segs) - MAX_LISTED
    return listed + (f" and {more} more" if more > 0 else "")


def _alloc_section_starts(data: bytes, eh, shdr_t) -> list[int] | None:
    """Virtual addresses of the file's allocated, non-empty sections; None without usable section headers."""
    if not eh.e_shnum or eh.e_shentsize < shdr_t.sizeof() or eh.e_shoff + eh.e_shnum * eh.e_shentsize > len(data):
        return None
    starts = []
    for i in range(eh.e_shnum):
        sh = shdr_t.parse(data[eh.e_shoff + i * eh.e_shentsize:])
        if sh.sh_type != SHT_NULL and sh.sh_flags & SHF_ALLOC and sh.sh_size:
            starts.append(sh.sh_addr)
    return starts or None


def _headers(data: bytes, name: str):
    """The ELF header and the program and section header layouts of its class, checked."""
    if len(data) < 16 or data[:4] != ELFMAG:
        raise LoaderError(f"{name}: multiboot header without the a.out kludge (flag 16), and not an ELF file")
    ident = ElfIdent.parse(data[:16])
    if ident.ei_class not in (ELFCLASS32, ELFCLASS64) or ident.ei_data != ELFDATA2LSB:
        raise LoaderError(f"{name}: bad ELF: class {ident.ei_class}, data {ident.ei_data} "
                          f"(want a little-endian ELF32 or ELF64)")
    ehdr_t, phdr_t, shdr_t = ((Elf32Ehdr, Elf32Phdr, Elf32Shdr) if ident.ei_class == ELFCLASS32
                              else (Elf64Ehdr, Elf64Phdr, Elf64Shdr))
    if len(data) < ehdr_t.sizeof():
        raise LoaderError(f"{name}: bad ELF: truncated ELF header")
    eh = ehdr_t.parse(data)
    want_machine = EM_386 if ident.ei_class == ELFCLASS32 else EM_X86_64
    if eh.e_machine != want_machine:
        raise LoaderError(f"{name}: bad ELF: machine {eh.e_machine}, want {want_machine} for its class")
    if eh.e_type != ET_EXEC:
        raise LoaderError(f"{name}: bad ELF: type {eh.e_type} is not an executable (ET_EXEC)")
    if eh.e_phnum == 0 or eh.e_phentsize < phdr_t.sizeof():
        raise LoaderError(f"{name}: bad ELF: no program headers")
    if eh.e_phoff + eh.e_phnum * eh.e_phentsize > len(data):
        raise LoaderError(f"{name}: bad ELF: program headers past the end of the file")
    return eh, phdr_t, shdr_t


def _check_segment(data: bytes, ph, i: int, name: str) -> None:
    """The file and address checks of PT_LOAD program header ``i``."""
    if ph.p_filesz > ph.p_memsz:
        raise LoaderError(f"{name}: bad ELF: segment {i} has p_memsz {ph.p_memsz:#x} smaller than "
                          f"p_filesz {ph.p_filesz:#x}")
    file_end = ph.p_offset + ph.p_filesz
    if file_end > len(data):
        raise LoaderError(f"{name}: bad ELF: segment {i}'s file bytes {span(ph.p_offset, file_end)} (p_offset "
                          f"{ph.p_offset:#x} + p_filesz {ph.p_filesz:#x}) run past the end of the file "
                          f"({len(data)} bytes)")
    end = ph.p_paddr + ph.p_memsz
    if ph.p_paddr >= PHYS_LIMIT:
        raise LoaderError(f"{name}: bad ELF: segment {i} at physical {ph.p_paddr:#x} is above 4 GiB "
                          f"(multiboot loads a kernel into 32-bit physical memory)")
    if end > PHYS_LIMIT:
        raise LoaderError(f"{name}: bad ELF: segment {i} at physical {ph.p_paddr:#x} + p_memsz "
                          f"{ph.p_memsz:#x} ends at {end:#x}, past 4 GiB (multiboot loads a kernel into 32-bit "
                          f"physical memory)")


def load_elf(data: bytes, name: str) -> tuple[list[Segment], int]:
    """The segments to load and the physical entry point of the ELF executable ``data`` (``name`` in messages)."""
    eh, phdr_t, shdr_t = _headers(data, name)
    sections = _alloc_section_starts(data, eh, shdr_t)
    segs: list[Segment] = []
    entry, translated, n_load = eh.e_entry, False, 0
    for i in range(eh.e_phnum):
        ph = phdr_t.parse(data[eh.e_phoff + i * eh.e_phentsize:])
        if ph.p_type != PT_LOAD:
            continue
        n_load += 1
        _check_segment(data, ph, i, name)
        if (not translated and ph.p_vaddr != ph.p_paddr
                and ph.p_vaddr <= eh.e_entry < ph.p_vaddr + ph.p_memsz):
            entry = eh.e_entry - ph.p_vaddr + ph.p_paddr
            translated = True
        blob = data[ph.p_offset:ph.p_offset + ph.p_filesz]
        paddr, memsz = ph.p_paddr, ph.p_memsz
        if sections is not None:
            # Leave out the part of the segment before its first section: the ELF and program headers that
            # ld maps below .text (with -z separate-code a segment of nothing else, at 0xFF000 for a kernel
            # linked at 1 MiB, in the BIOS area). No section in the segment: nothing to load.
            inside = [a for a in sections if ph.p_vaddr <= a < ph.p_vaddr + ph.p_memsz]
            trim = min(inside) - ph.p_vaddr if inside else memsz
            paddr, memsz, blob = paddr + trim, memsz - trim, blob[trim:]
        if memsz:
            segs.append(Segment(f"ELF segment {i}", paddr, blob, memsz))
    if not n_load:
        raise LoaderError(f"{name}: bad ELF: no PT_LOAD segment")
    if not segs:
        raise LoaderError(f"{name}: bad ELF: nothing to load: its {n_load} PT_LOAD segment(s) are empty "
                          f"(p_memsz 0) or hold no allocated section")
    if not any(s.paddr <= entry < s.end for s in segs):
        raise LoaderError(f"{name}: bad ELF: entry point {entry:#x} is outside every loaded segment "
                          f"({spans(segs)})")
    return segs, entry
