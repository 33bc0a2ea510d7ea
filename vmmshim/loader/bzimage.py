"""The kexec loader: a Linux bzImage (boot protocol 2.10 or later) and an initrd, entered in 32-bit mode.

The layout is xhyve's (``src/firmware/kexec.c``, recorded in ``shared/reference/anchors.md`` (e)):

- the boot GDT at 0x2000 (code 0x10, data 0x18, flat 4 GiB), GDTR {0x2000, 0x1F};
- the zero page (``struct boot_params``) at 0x3000, the setup header copied from file offset 0x1F1,
  ``type_of_loader`` 0xD, ``alt_mem_k`` and the e820 map filled in;
- the command line at 0x4000 (``cmd_line_ptr``), at most ``cmdline_size`` bytes plus its zero;
- the protected-mode kernel (the file past its ``(setup_sects + 1) * 512`` bytes of real-mode setup) at
  1 MiB aligned up to ``kernel_alignment`` when it is relocatable, else at ``pref_address``;
- the initrd at ``ALIGNDOWN(min(initrd_addr_max, lowmem - 1) - size, 4 KiB)``;
- the boot vCPU in 32-bit protected mode, paging off: CR0 = PE|NE, CS 0x10, DS/ES/SS 0x18, ESI = 0x3000,
  EIP = the kernel's load address, EFLAGS = 2, EBX = EBP = EDI = 0 (boot.rst "32-bit boot protocol").

Where this differs from xhyve: xhyve puts the initrd right after the kernel's ``init_size`` and only requires
protocol 2.12; this follows the anchors (2.10, initrd at the top of what the kernel accepts). Memory checks
use the kernel's runtime area as boot.rst defines it (a relocatable kernel loaded below ``pref_address``
decompresses at ``pref_address``), so a kernel that would run out of memory is refused here, not in the guest:
one whose runtime area starts past lowmem is named with that address, one that runs out of RAM with the range
it needs. A file that is shorter than its header says or that has nothing after its setup sectors is refused.

Not supported: boot protocols before 2.10, zImages, the 64-bit and EFI handover entries, an initrd or command
line above 4 GiB (``ext_ramdisk_image``, ``ext_cmd_line_ptr``).
"""

from __future__ import annotations

from .boot_params import (BOOT_FLAG, BOOT_PARAMS_SIZE, BootParams, E820_MAX_ENTRIES_ZEROPAGE, HDRS_MAGIC,
                          LOADED_HIGH, LOADER_TYPE_KEXEC, SETUP_HEADER_END, SETUP_HEADER_OFFSET, SetupHeader)
from .common import (BOOT_GDT_ADDR, BOOT_GDT_LIMIT, LOW_RAM_END, MiB, PAGE, BootImage, LoaderError, Placer,
                     align_down, align_up, boot_gdt_bytes, check_memory, e820_map, flat32_state, read_input, span)

ZERO_PAGE_ADDR = 0x3000
CMDLINE_ADDR = 0x4000
KERNEL_BASE = 1 * MiB
MIN_PROTOCOL = 0x020A
#: The header must reach ``init_size`` (0x260..0x264), the last field protocol 2.10 needs.
MIN_HEADER_END = 0x264
#: boot.rst: a kernel whose header leaves ``initrd_addr_max`` zero accepts an initrd up to here.
DEFAULT_INITRD_ADDR_MAX = 0x37FFFFFF


def _version(v: int) -> str:
    return f"{v >> 8}.{v & 0xFF:02d}"


def parse_setup_header(data: bytes, name: str = "kernel"):
    """Check that ``data`` is a bzImage this loader can boot; returns the parsed setup header.

    The header is read the way boot.rst says a loader should: its end is 0x202 plus the byte at 0x201, and
    fields past that end read as zero.
    """
    if len(data) < 0x206:
        raise LoaderError(f"{name} is not a bzImage: {len(data)} bytes, too short for a setup header")
    if int.from_bytes(data[0x1FE:0x200], "little") != BOOT_FLAG:
        raise LoaderError(f"{name} is not a bzImage: no boot sector magic 0xAA55 at 0x1FE")
    if int.from_bytes(data[0x202:0x206], "little") != HDRS_MAGIC:
        raise LoaderError(f"{name} is not a bzImage: no \"HdrS\" setup header magic at 0x202")
    if len(data) < SETUP_HEADER_END:
        raise LoaderError(f"{name} is truncated: {len(data)} bytes, the setup header alone ends at "
                          f"{SETUP_HEADER_END:#x}")
    hdr = SetupHeader.parse(data[SETUP_HEADER_OFFSET:SETUP_HEADER_END])
    if hdr.version < MIN_PROTOCOL:
        raise LoaderError(f"{name}: Linux boot protocol {_version(hdr.version)} is too old "
                          f"(kexec needs {_version(MIN_PROTOCOL)} or later)")
    if not hdr.loadflags & LOADED_HIGH:
        raise LoaderError(f"{name} is a zImage, not a bzImage (loadflags LOADED_HIGH clear): "
                          f"it must be loaded at 0x10000, which kexec does not do")
    end = 0x202 + data[0x201]
    if end < MIN_HEADER_END:
        raise LoaderError(f"{name}: setup header ends at {end:#x}, before init_size at 0x260 "
                          f"(a protocol {_version(hdr.version)} header reaches at least {MIN_HEADER_END:#x})")
    if end < SETUP_HEADER_END:
        raw = data[SETUP_HEADER_OFFSET:end].ljust(SETUP_HEADER_END - SETUP_HEADER_OFFSET, b"\0")
        hdr = SetupHeader.parse(raw)
    return hdr


def _runtime_start(hdr, load_addr: int) -> int:
    """boot.rst, ``init_size``: where the kernel will run (and need ``init_size`` bytes of memory)."""
    if hdr.relocatable_kernel:
        la = max(load_addr, hdr.pref_address)
        return align_up(la, hdr.kernel_alignment)
    return hdr.pref_address or load_addr


def load_kexec(kernel, initrd, cmdline: str, lowmem: int, highmem: int = 0) -> BootImage:
    """Load a bzImage, an optional initrd and a command line the way xhyve's kexec does.

    ``kernel`` and ``initrd`` are bytes or paths; ``lowmem`` is the guest RAM size below 4 GiB (RAM from 0),
    ``highmem`` the RAM at 4 GiB. Raises :class:`LoaderError` with one line for anything that cannot boot.
    """
    check_memory(lowmem, highmem)
    data, kname = read_input("kernel", kernel, lowmem)
    hdr = parse_setup_header(data, kname)

    setup_sects = hdr.setup_sects or 4
    kernel_offset = (setup_sects + 1) * 512
    need = kernel_offset + hdr.syssize * 16
    if len(data) < need:
        raise LoaderError(f"{kname} is truncated: {len(data)} bytes, its header says "
                          f"{need} ({setup_sects} setup sectors and {hdr.syssize * 16} bytes of kernel)")
    payload = data[kernel_offset:]
    if not payload:
        raise LoaderError(f"{kname} has no protected-mode code after its {setup_sects} setup sectors "
                          f"(the file ends at {kernel_offset:#x})")

    if hdr.relocatable_kernel:
        align = hdr.kernel_alignment
        if not align or align & (align - 1):
            raise LoaderError(f"{kname}: kernel_alignment {align:#x} is not a power of two")
        load_addr = align_up(KERNEL_BASE, align)
        where = f"pref_address {hdr.pref_address:#x} aligned to kernel_alignment {align:#x}"
    else:
        load_addr = hdr.pref_address or KERNEL_BASE
        where = f"pref_address {hdr.pref_address:#x}, not relocatable"
    if load_addr < KERNEL_BASE:
        raise LoaderError(f"{kname}: load address {load_addr:#x} is below 1 MiB")
    runtime = _runtime_start(hdr, load_addr)
    ram = f"guest RAM ends at lowmem {lowmem:#x} ({lowmem // MiB} MiB)"
    if runtime >= lowmem:
        raise LoaderError(f"{kname} runs at {runtime:#x} ({where}), above the end of guest RAM: {ram}")
    init_size = align_up(hdr.init_size, PAGE)
    kernel_end = max(load_addr + align_up(len(payload), PAGE), runtime + init_size)
    if kernel_end > lowmem:
        raise LoaderError(f"{kname} is too big for memory: it needs {span(load_addr, kernel_end)} "
                          f"({len(payload)} bytes at {load_addr:#x}, init_size {hdr.init_size:#x} from "
                          f"{runtime:#x}), {ram}")

    place = Placer(lowmem)
    place.claim(LOW_RAM_END, KERNEL_BASE - LOW_RAM_END, "the EBDA, VGA and BIOS area")
    place.claim(BOOT_GDT_ADDR, 8 * 4, "the boot GDT")
    place.claim(ZERO_PAGE_ADDR, BOOT_PARAMS_SIZE, "the zero page")
    place.claim(load_addr, kernel_end - load_addr, "the kernel and its init_size")

    # Command line.
    if "\0" in cmdline:
        raise LoaderError("kernel command line contains a NUL character")
    cmd = cmdline.encode()
    if len(cmd) > hdr.cmdline_size:
        raise LoaderError(f"kernel command line is {len(cmd)} bytes, {kname} accepts at most "
                          f"{hdr.cmdline_size} (cmdline_size)")
    place.claim(CMDLINE_ADDR, len(cmd) + 1, "the kernel command line")

    # Zero page: cleared, the setup header as read from the file, then what the loader owns.
    zp = BootParams.parse(bytes(BOOT_PARAMS_SIZE))
    zp.hdr = hdr
    zp.hdr.type_of_loader = LOADER_TYPE_KEXEC
    zp.hdr.hardware_subarch = 0  # PC
    zp.hdr.cmd_line_ptr = CMDLINE_ADDR
    zp.ext_cmd_line_ptr = 0
    zp.alt_mem_k = min((lowmem - MiB) >> 10, 0xFFFFFFFF)
    e820 = e820_map(lowmem, highmem)
    assert len(e820) <= E820_MAX_ENTRIES_ZEROPAGE
    zp.e820_entries = len(e820)
    for i, (addr, size, typ) in enumerate(e820):
        zp.e820_table[i].addr, zp.e820_table[i].size, zp.e820_table[i].type = addr, size, typ

    writes = [(BOOT_GDT_ADDR, boot_gdt_bytes()), (CMDLINE_ADDR, cmd + b"\0"), (load_addr, payload)]

    desc_initrd = "no initrd"
    if initrd is not None:
        rd, rname = read_input("initrd", initrd, lowmem)
        rlabel = "the initrd" if rname == "initrd" else f"initrd {rname}"
        top = min(hdr.initrd_addr_max or DEFAULT_INITRD_ADDR_MAX, lowmem - 1)
        start = align_down(top - len(rd), PAGE)
        if start < kernel_end:
            raise LoaderError(f"{rlabel} ({len(rd)} bytes) does not fit between the kernel's end "
                              f"{kernel_end:#x} and min(initrd_addr_max {hdr.initrd_addr_max:#x}, "
                              f"lowmem - 1 {lowmem - 1:#x})")
        place.claim(start, len(rd), rlabel)
        zp.hdr.ramdisk_image = start
        zp.hdr.ramdisk_size = len(rd)
        if rd:
            writes.append((start, rd))
        desc_initrd = f"initrd {len(rd)} bytes at {start:#x}"

    writes.insert(1, (ZERO_PAGE_ADDR, BootParams.build(zp)))
    regs, segs = flat32_state(load_addr, rsi=ZERO_PAGE_ADDR)
    return BootImage(
        writes=writes, regs=regs, segs=segs,
        gdtr=(BOOT_GDT_ADDR, BOOT_GDT_LIMIT), idtr=(0, 0xFFFF), e820=e820,
        description=(f"kexec: {_kernel_version(data, hdr) or 'Linux'} (boot protocol {_version(hdr.version)}) "
                     f"at {load_addr:#x}, {desc_initrd}, command line {len(cmd)} bytes"),
    )


def _kernel_version(data: bytes, hdr) -> str:
    """The version string ``kernel_version`` points at (offset + 0x200 in the file), or ''."""
    if not hdr.kernel_version:
        return ""
    off = hdr.kernel_version + 0x200
    raw = data[off:off + 256].split(b"\0", 1)[0]
    try:
        return "Linux " + raw.decode("ascii").split(" ", 1)[0] if raw else ""
    except UnicodeDecodeError:
        return ""
