"""The multiboot 1 loader (Multiboot Specification 0.6.96), as hyperkit's ``-f multiboot`` has it.

- The header (magic 0x1BADB002, flags, checksum) is searched for, 4-byte aligned, in the first 8192 bytes.
- Flags 0-15 are requirements: bit 0 (page-align modules) and bit 1 (memory information) are always honoured;
  bit 2 (a video mode) and any undefined bit are refused, as the specification asks of a loader that cannot
  provide them. Bit 16 (the a.out kludge) makes ``header_addr``, ``load_addr``, ``load_end_addr``,
  ``bss_end_addr`` and ``entry_addr`` authoritative; without it the image must be ELF.
- ELF images (ELF32 and, as GRUB allows, ELF64, loaded below 4 GiB): :mod:`vmmshim.loader.elf` reads the
  ``PT_LOAD`` segments and the physical entry point. An a.out kludge image is one segment from ``load_addr``.
- Every segment must lie in guest RAM ([0, 0x9FC00) or [1 MiB, lowmem)) clear of the boot GDT and the
  multiboot information; one that does not is refused, named with its address range and the RAM there is.
  The entry point must lie inside a loaded segment.
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

from .common import (BOOT_GDT_ADDR, BOOT_GDT_LIMIT, LOW_RAM_END, MiB, PAGE, BootImage, LoaderError, Placer,
                     align_up, boot_gdt_bytes, check_memory, e820_map, flat32_state, read_input, span)
from .elf import PHYS_LIMIT, Segment, load_elf

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
    """The one segment and the entry point the header's address fields give, checked."""
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
    seg = Segment("the a.out kludge image", h.load_addr, data[file_off:file_off + size], memsz)
    if seg.end > PHYS_LIMIT:
        raise LoaderError(f"{name}: the a.out kludge image at load_addr {h.load_addr:#x} + {memsz:#x} bytes "
                          f"ends at {seg.end:#x}, past 4 GiB")
    if not seg.paddr <= h.entry_addr < seg.end:
        raise LoaderError(f"{name}: a.out kludge entry_addr {h.entry_addr:#x} is outside the loaded image "
                          f"({span(seg.paddr, seg.end)})")
    return [seg], h.entry_addr


def _check_in_ram(seg: Segment, name: str, lowmem: int) -> None:
    """A segment must lie in one RAM range of the memory map below 4 GiB, not in the hole below 1 MiB."""
    if seg.end <= LOW_RAM_END or (seg.paddr >= MiB and seg.end <= lowmem):
        return
    raise LoaderError(f"{name}: {seg.what} at {span(seg.paddr, seg.end)} is outside guest RAM "
                      f"({span(0, LOW_RAM_END)} and {span(MiB, lowmem)})")


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
        segs, entry = load_elf(data, kname)
        kind = "ELF"

    place = Placer(lowmem)
    place.claim(LOW_RAM_END, MiB - LOW_RAM_END, "the EBDA, VGA and BIOS area")
    place.claim(BOOT_GDT_ADDR, 8 * 4, "the boot GDT")
    place.claim(MBI_ADDR, MultibootInfo.sizeof(), "the multiboot information")
    writes: list[tuple[int, bytes]] = [(BOOT_GDT_ADDR, boot_gdt_bytes())]
    for seg in segs:
        _check_in_ram(seg, kname, lowmem)
        try:
            place.claim(seg.paddr, seg.memsz, seg.what)
        except LoaderError as exc:
            raise LoaderError(f"{kname}: {exc}") from None
    for seg in segs:
        writes.append((seg.paddr, seg.data + bytes(seg.memsz - len(seg.data))))  # bss is zeroed
    kernel_end = max(seg.end for seg in segs)

    # Modules, page-aligned after the kernel.
    mod_entries = []
    strings = bytearray()

    def add_string(s: str, what: str) -> int:
        if "\0" in s:
            raise LoaderError(f"{what} contains a NUL character")
        at = len(strings)
        strings.extend(s.encode() + b"\0")
        return at

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
        string = add_string(_with_name(mname, mcmd), f"module {mname}'s command line")
        mod_entries.append([addr, addr + len(blob), string])
        addr = align_up(addr + len(blob), PAGE)

    cmd_off = add_string(_with_name(kname, cmdline), f"{kname}'s command line")
    name_off = add_string(BOOT_LOADER_NAME, "the boot loader name")

    # Low memory: information structure, module list, memory map, strings.
    e820 = e820_map(lowmem, highmem)
    mods_addr = MBI_ADDR + MultibootInfo.sizeof()
    mmap_addr = align_up(mods_addr + MultibootModule.sizeof() * len(mod_entries), 8)
    mmap = b"".join(MultibootMmapEntry.build(dict(size=20, base_addr=a, length=n, type=t)) for a, n, t in e820)
    str_addr = mmap_addr + len(mmap)
    low_end = str_addr + len(strings)
    place.claim(mods_addr, low_end - mods_addr, "the multiboot information's module list, memory map and "
                "strings")

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
