"""The multiboot 1 loader (Multiboot Specification 0.6.96), as hyperkit's ``-f multiboot`` has it.

- The header (magic 0x1BADB002, flags, checksum) is searched for, 4-byte aligned, in the first 8192 bytes.
- Flags 0-15 are requirements: bit 0 (page-align modules) and bit 1 (memory information) are always honoured;
  bit 2 (a video mode) and any undefined bit are refused, as the specification asks of a loader that cannot
  provide them. Bit 16 (the a.out kludge) makes ``header_addr``, ``load_addr``, ``load_end_addr``,
  ``bss_end_addr`` and ``entry_addr`` authoritative; without it the image must be ELF.
- ELF images: the ``PT_LOAD`` program headers are loaded at ``p_paddr`` with their bss zeroed, less any part
  before the segment's first allocated section when the file has section headers (the ELF and program headers
  that GNU ld maps below ``.text``: with ``-Ttext 0x100000`` they would land at 0xFF000, in the BIOS area
  where the VM's MP and ACPI tables live); an entry point
  given as a virtual address inside a segment whose ``p_vaddr`` differs from ``p_paddr`` is translated, as GRUB
  and hyperkit do (NetBSD kernels link at 0xC0100000 and load at 0x100000). ELF32 (EM_386) and, as GRUB
  allows, ELF64 (EM_X86_64) images below 4 GiB.
- Modules are placed page-aligned after the kernel's end (bss included), in order.
- The boot GDT is at 0x2000 (xhyve's, shared with the kexec loader); the multiboot information structure at
  0x3000, followed by the module list, the memory map, and the strings (the kernel and module command lines
  and the boot loader name), all in low memory below 0x9FC00.
- Command lines begin with the file's name, as GRUB, QEMU and hyperkit pass them: the kernel's is
  ``"KERNEL CMDLINE"``, a module's ``"MODULE CMDLINE"`` (the name alone when the command line is empty).
  ``argv[0]`` of kvm-unit-tests and NetBSD's boot path come from there. A kernel or module given as bytes
  is named ``kernel`` or ``moduleN``.
- Information flags given: mem_lower/mem_upper (bit 0), cmdline (2), mods (3), mmap (6), boot_loader_name
  (9). The memory map is the e820 map of the kexec loader.
- Entry (specification section 3.2): EAX = 0x2BADB002, EBX = the information structure's address, 32-bit
  protected mode with paging off (CR0 = PE|NE as hyperkit), CS a flat execute/read segment (0x10), DS, ES,
  FS, GS and SS flat read/write (0x18), EFLAGS = 2 (IF and VM clear). A20 is always on in this VM.

Not supported: ELF symbol tables (info flags 4/5), boot device (1), drives, APM, VBE and framebuffer
information, multiboot 2.
"""

from __future__ import annotations

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from .common import (BOOT_GDT_ADDR, BOOT_GDT_LIMIT, GiB, LOW_RAM_END, MiB, PAGE, BootImage, LoaderError, Placer,
                     align_up, boot_gdt_bytes, check_memory, e820_map, flat32_state, read_input)

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192

# Header flags.
MB_PAGE_ALIGN = 1 << 0
MB_MEMORY_INFO = 1 << 1
MB_VIDEO_MODE = 1 << 2
MB_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = MB_PAGE_ALIGN | MB_MEMORY_INFO

# Information structure flags.
MBI_MEMORY = 1 << 0
MBI_BOOTDEV = 1 << 1
MBI_CMDLINE = 1 << 2
MBI_MODS = 1 << 3
MBI_AOUT_SYMS = 1 << 4
MBI_ELF_SHDR = 1 << 5
MBI_MEM_MAP = 1 << 6
MBI_DRIVE_INFO = 1 << 7
MBI_CONFIG_TABLE = 1 << 8
MBI_BOOT_LOADER_NAME = 1 << 9

MBI_ADDR = 0x3000
BOOT_LOADER_NAME = "vmmshim"

#: The multiboot header (specification section 3.1.1): the magic fields, then the a.out kludge's address
#: fields (valid with flag 16) and the graphics fields (valid with flag 2).
MultibootHeader = Struct(
    "magic" / Int32ul,
    "flags" / Int32ul,
    "checksum" / Int32ul,
    "header_addr" / Int32ul,
    "load_addr" / Int32ul,
    "load_end_addr" / Int32ul,
    "bss_end_addr" / Int32ul,
    "entry_addr" / Int32ul,
    "mode_type" / Int32ul,
    "width" / Int32ul,
    "height" / Int32ul,
    "depth" / Int32ul,
)

#: The boot information structure (specification section 3.3), 116 bytes.
MultibootInfo = Struct(
    "flags" / Int32ul,              # 0
    "mem_lower" / Int32ul,          # 4   KiB of RAM from 0
    "mem_upper" / Int32ul,          # 8   KiB of RAM from 1 MiB to the first hole
    "boot_device" / Int32ul,        # 12
    "cmdline" / Int32ul,            # 16
    "mods_count" / Int32ul,         # 20
    "mods_addr" / Int32ul,          # 24
    "syms" / Bytes(16),             # 28  a.out symbol table or ELF section header table
    "mmap_length" / Int32ul,        # 44
    "mmap_addr" / Int32ul,          # 48
    "drives_length" / Int32ul,      # 52
    "drives_addr" / Int32ul,        # 56
    "config_table" / Int32ul,       # 60
    "boot_loader_name" / Int32ul,   # 64
    "apm_table" / Int32ul,          # 68
    "vbe_control_info" / Int32ul,   # 72
    "vbe_mode_info" / Int32ul,      # 76
    "vbe_mode" / Int16ul,           # 80
    "vbe_interface_seg" / Int16ul,  # 82
    "vbe_interface_off" / Int16ul,  # 84
    "vbe_interface_len" / Int16ul,  # 86
    "framebuffer_addr" / Int64ul,   # 88
    "framebuffer_pitch" / Int32ul,  # 96
    "framebuffer_width" / Int32ul,  # 100
    "framebuffer_height" / Int32ul,  # 104
    "framebuffer_bpp" / Int8ul,     # 108
    "framebuffer_type" / Int8ul,    # 109
    "color_info" / Bytes(6),        # 110
)
assert MultibootInfo.sizeof() == 116

#: A module list entry (16 bytes).
MultibootModule = Struct(
    "mod_start" / Int32ul,
    "mod_end" / Int32ul,
    "string" / Int32ul,
    "reserved" / Int32ul,
)

#: A memory map entry. ``size`` counts the bytes after itself (20); ``mmap_addr`` points at ``size``.
MultibootMmapEntry = Struct(
    "size" / Int32ul,
    "base_addr" / Int64ul,
    "length" / Int64ul,
    "type" / Int32ul,
)

# ELF (System V gABI and the i386/x86-64 psABI supplements): the headers a loader reads.
ELFMAG = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
SHT_NULL = 0

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
SHF_ALLOC = 0x2
Elf32Phdr = Struct(
    "p_type" / Int32ul, "p_offset" / Int32ul, "p_vaddr" / Int32ul, "p_paddr" / Int32ul,
    "p_filesz" / Int32ul, "p_memsz" / Int32ul, "p_flags" / Int32ul, "p_align" / Int32ul,
)
Elf64Phdr = Struct(
    "p_type" / Int32ul, "p_flags" / Int32ul, "p_offset" / Int64ul, "p_vaddr" / Int64ul, "p_paddr" / Int64ul,
    "p_filesz" / Int64ul, "p_memsz" / Int64ul, "p_align" / Int64ul,
)


def find_header(data: bytes, name: str = "kernel") -> tuple[int, object]:
    """The offset and parsed fields of the first valid multiboot header in the first 8192 bytes."""
    limit = min(len(data), MULTIBOOT_SEARCH)
    bad_sum = None
    for off in range(0, limit - 11, 4):
        if int.from_bytes(data[off:off + 4], "little") != MULTIBOOT_HEADER_MAGIC:
            continue
        magic, flags, csum = (int.from_bytes(data[off + i:off + i + 4], "little") for i in (0, 4, 8))
        if (magic + flags + csum) & 0xFFFFFFFF:
            bad_sum = off if bad_sum is None else bad_sum
            continue
        raw = data[off:off + MultibootHeader.sizeof()]
        need = 32 if flags & MB_AOUT_KLUDGE else 12
        if len(raw) < need or off + need > MULTIBOOT_SEARCH:
            raise LoaderError(f"{name}: multiboot header at {off:#x} is cut off (the a.out kludge fields "
                              f"must lie within the first 8192 bytes of the file)")
        return off, MultibootHeader.parse(raw.ljust(MultibootHeader.sizeof(), b"\0"))
    hint = f" (magic at {bad_sum:#x} has a bad checksum)" if bad_sum is not None else ""
    raise LoaderError(f"{name} is not a multiboot image: no header with magic 0x1BADB002 and a valid "
                      f"checksum in its first 8192 bytes{hint}")


def _load_aout_kludge(data: bytes, off: int, h, name: str):
    """Segments (paddr, bytes, memsz) and the entry point from the header's address fields."""
    if h.header_addr < h.load_addr:
        raise LoaderError(f"{name}: a.out kludge header_addr {h.header_addr:#x} is below "
                          f"load_addr {h.load_addr:#x}")
    file_off = off - (h.header_addr - h.load_addr)
    if file_off < 0:
        raise LoaderError(f"{name}: a.out kludge load_addr {h.load_addr:#x} lies before the start of the file")
    if h.load_end_addr:
        if h.load_end_addr < h.header_addr:
            raise LoaderError(f"{name}: a.out kludge load_end_addr {h.load_end_addr:#x} is below "
                              f"header_addr {h.header_addr:#x}")
        size = h.load_end_addr - h.load_addr
        if file_off + size > len(data):
            raise LoaderError(f"{name} is truncated: the a.out kludge loads {size} bytes from file offset "
                              f"{file_off:#x}, the file has {len(data)}")
    else:
        size = len(data) - file_off
    memsz = size
    if h.bss_end_addr:
        end = h.load_addr + size
        if h.bss_end_addr < end:
            raise LoaderError(f"{name}: a.out kludge bss_end_addr {h.bss_end_addr:#x} is below the end of "
                              f"the loaded image {end:#x}")
        memsz = h.bss_end_addr - h.load_addr
    return [(h.load_addr, data[file_off:file_off + size], memsz)], h.entry_addr


def _alloc_section_starts(data: bytes, eh, shdr_t) -> list[int] | None:
    """Virtual addresses of the file's allocated, non-empty sections; None without usable section headers."""
    if not eh.e_shnum or eh.e_shentsize < shdr_t.sizeof() or eh.e_shoff + eh.e_shnum * eh.e_shentsize > len(data):
        return None
    starts = []
    for i in range(eh.e_shnum):
        sh = shdr_t.parse(data[eh.e_shoff + i * eh.e_shentsize:])
        if sh.sh_type != SHT_NULL and sh.sh_flags & SHF_ALLOC and sh.sh_size:
            starts.append(sh.sh_addr)
    return starts


def _load_elf(data: bytes, name: str):
    """Segments (paddr, bytes, memsz) and the entry point (physical) of an ELF executable."""
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
    sections = _alloc_section_starts(data, eh, shdr_t)
    segs = []
    entry = eh.e_entry
    translated = False
    for i in range(eh.e_phnum):
        ph = phdr_t.parse(data[eh.e_phoff + i * eh.e_phentsize:])
        if ph.p_type != PT_LOAD:
            continue
        if ph.p_filesz > ph.p_memsz:
            raise LoaderError(f"{name}: bad ELF: segment {i} has p_filesz {ph.p_filesz:#x} > "
                              f"p_memsz {ph.p_memsz:#x}")
        if ph.p_offset + ph.p_filesz > len(data):
            raise LoaderError(f"{name}: bad ELF: segment {i} [{ph.p_offset:#x}, +{ph.p_filesz:#x}) runs past "
                              f"the end of the file ({len(data)} bytes)")
        if ph.p_paddr + ph.p_memsz > 4 * GiB:
            raise LoaderError(f"{name}: bad ELF: segment {i} at physical {ph.p_paddr:#x} is above 4 GiB")
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
            segs.append((paddr, blob, memsz))
    if not segs:
        raise LoaderError(f"{name}: bad ELF: no PT_LOAD segment")
    if entry >= 4 * GiB:
        raise LoaderError(f"{name}: bad ELF: entry point {entry:#x} is above 4 GiB")
    return segs, entry


def load_multiboot(kernel, modules, cmdline: str, lowmem: int, highmem: int = 0) -> BootImage:
    """Load a multiboot 1 kernel and its modules; ``modules`` is a list of ``(path_or_bytes, cmdline)``.

    ``lowmem`` is the guest RAM below 4 GiB (RAM from 0), ``highmem`` the RAM at 4 GiB. Raises
    :class:`LoaderError` with one line for anything that cannot boot.
    """
    check_memory(lowmem, highmem)
    data, kname = read_input("kernel", kernel)
    off, h = find_header(data, kname)
    required = h.flags & 0xFFFF
    if required & ~MB_SUPPORTED_REQUIRED:
        what = "a video mode (flag 2), which vmmshim cannot provide" if required & MB_VIDEO_MODE else \
            f"flags {required & ~MB_SUPPORTED_REQUIRED:#x} this loader does not know"
        raise LoaderError(f"{kname}: multiboot header requires {what}")
    if h.flags & MB_AOUT_KLUDGE:
        segs, entry = _load_aout_kludge(data, off, h, kname)
        kind = "a.out kludge"
    else:
        segs, entry = _load_elf(data, kname)
        kind = "ELF"

    place = Placer(lowmem)
    place.claim(LOW_RAM_END, MiB - LOW_RAM_END, "the EBDA, VGA and BIOS area")
    place.claim(BOOT_GDT_ADDR, 8 * 4, "the boot GDT")
    writes: list[tuple[int, bytes]] = [(BOOT_GDT_ADDR, boot_gdt_bytes())]
    kernel_end = 0
    for i, (paddr, blob, memsz) in enumerate(segs):
        place.claim(paddr, memsz, f"kernel segment {i}")
        img = blob + bytes(memsz - len(blob))  # bss is zeroed
        writes.append((paddr, img))
        kernel_end = max(kernel_end, paddr + memsz)

    # Modules, page-aligned after the kernel.
    mod_entries = []
    strings = bytearray()
    string_offsets = []

    def add_string(s: str) -> int:
        if "\0" in s:
            raise LoaderError(f"multiboot string {s!r} contains a NUL character")
        string_offsets.append(len(strings))
        strings.extend(s.encode() + b"\0")
        return string_offsets[-1]

    addr = align_up(kernel_end, PAGE)
    for i, item in enumerate(modules or []):
        try:
            src, mcmd = item
        except (TypeError, ValueError):
            raise LoaderError(f"module {i} must be a (path_or_bytes, cmdline) pair") from None
        blob, mname = read_input(f"module{i}", src, lowmem)
        place.claim(addr, len(blob), f"module {mname}")
        if blob:
            writes.append((addr, blob))
        mod_entries.append([addr, addr + len(blob), add_string(_with_name(mname, mcmd))])
        addr = align_up(addr + len(blob), PAGE)

    cmd_off = add_string(_with_name(kname, cmdline))
    name_off = add_string(BOOT_LOADER_NAME)

    # Low memory: information structure, module list, memory map, strings.
    e820 = e820_map(lowmem, highmem)
    mods_addr = MBI_ADDR + MultibootInfo.sizeof()
    mmap_addr = align_up(mods_addr + MultibootModule.sizeof() * len(mod_entries), 8)
    mmap = b"".join(MultibootMmapEntry.build(dict(size=20, base_addr=a, length=n, type=t)) for a, n, t in e820)
    str_addr = mmap_addr + len(mmap)
    low_end = str_addr + len(strings)
    place.claim(MBI_ADDR, low_end - MBI_ADDR, "the multiboot information and strings")

    info = MultibootInfo.parse(bytes(MultibootInfo.sizeof()))
    info.flags = MBI_MEMORY | MBI_CMDLINE | MBI_MODS | MBI_MEM_MAP | MBI_BOOT_LOADER_NAME
    info.mem_lower = LOW_RAM_END >> 10
    info.mem_upper = (lowmem - MiB) >> 10
    info.cmdline = str_addr + cmd_off
    info.mods_count = len(mod_entries)
    info.mods_addr = mods_addr
    info.mmap_length = len(mmap)
    info.mmap_addr = mmap_addr
    info.boot_loader_name = str_addr + name_off
    mods = b"".join(MultibootModule.build(dict(mod_start=s, mod_end=e, string=str_addr + so, reserved=0))
                    for s, e, so in mod_entries)
    low = MultibootInfo.build(info) + mods
    low = low.ljust(mmap_addr - MBI_ADDR, b"\0") + mmap + bytes(strings)
    writes.append((MBI_ADDR, low))

    regs, segs_state = flat32_state(entry, rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=MBI_ADDR)
    return BootImage(
        writes=writes, regs=regs, segs=segs_state,
        gdtr=(BOOT_GDT_ADDR, BOOT_GDT_LIMIT), idtr=(0, 0xFFFF), e820=e820,
        description=(f"multiboot: {kname} ({kind}, {len(segs)} segment(s) up to {kernel_end:#x}) entry "
                     f"{entry:#x}, {len(mod_entries)} module(s), information at {MBI_ADDR:#x}"),
    )


def _with_name(name: str, cmdline: str | None) -> str:
    return f"{name} {cmdline}" if cmdline else name
