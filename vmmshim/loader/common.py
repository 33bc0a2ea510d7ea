"""What every loader shares: the boot image, the error, the memory map and the flat 32-bit entry state.

A loader is pure: it reads files, checks them and returns a :class:`BootImage` (bytes to copy into guest RAM
and the boot vCPU's initial state). It makes no hypervisor call; the VM applies the image.

Not supported: loading anything above 4 GiB (RAM there appears only in the memory map).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ops.nvmm.constants import CR0_NE, CR0_PE, RFLAGS_RESERVED1

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE = 4 * KiB

#: The end of conventional RAM (640 KiB less the 1 KiB EBDA), as xhyve's e820 map has it.
LOW_RAM_END = 0x9FC00
#: Guest RAM above 4 GiB starts here (bhyve's highmem).
HIGHMEM_BASE = 4 * GiB

E820_RAM = 1
E820_RESERVED = 2

#: xhyve's boot GDT (``kexec.c``): null, null, flat 4 GiB code at selector 0x10, flat 4 GiB data at 0x18.
BOOT_GDT_ADDR = 0x2000
BOOT_GDT = (0x0000000000000000, 0x0000000000000000, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
BOOT_GDT_LIMIT = 8 * len(BOOT_GDT) - 1
BOOT_CS = 0x10
BOOT_DS = 0x18
#: VMX access rights of those two descriptors: G, D/B, P, S and type 0xB (code: execute/read, accessed) or
#: 0x3 (data: read/write, accessed).
ACCESS_CODE32 = 0xC09B
ACCESS_DATA32 = 0xC093
#: bhyve's reset values (``vcpu_reset``): a busy 32-bit TSS and an LDT, both present, base 0, limit 0xFFFF.
ACCESS_TSS_BUSY = 0x8B
ACCESS_LDT = 0x82

#: CR0 at entry: PE and NE, as xhyve's kexec and hyperkit's multiboot set it (paging off).
ENTRY_CR0 = CR0_PE | CR0_NE


class LoaderError(ValueError):
    """A kernel, initrd or module that cannot be booted, said in one line before the guest starts."""


@dataclass
class BootImage:
    """A guest ready to start: bytes to copy into guest RAM plus the boot vCPU's state.

    ``regs`` uses bhyve's register names without the ``VM_REG_GUEST_`` prefix, in lower case. ``segs`` maps a
    segment name to ``(selector, base, limit, access)`` with ``access`` in VMX access-rights format. ``gdtr``
    and ``idtr`` are ``(base, limit)``. ``e820`` is the memory map the guest was told, as
    ``(addr, size, type)``.
    """

    writes: list[tuple[int, bytes]]
    regs: dict[str, int]
    segs: dict[str, tuple[int, int, int, int]]
    gdtr: tuple[int, int]
    idtr: tuple[int, int]
    e820: list[tuple[int, int, int]]
    description: str = ""


class InputFileError(ValueError):
    """A file vmmshim was told to read (kernel, initrd, module, ``-k`` file) that it cannot or will not read."""


#: What a path is when it is not a regular file, for messages.
_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def _require_regular(st, what: str, path: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise InputFileError(f"{what} {path} is not a regular file ({kind})")


def read_regular_file(path, what: str, limit: int | None = None) -> bytes:
    """The contents of the regular file ``path``, or :class:`InputFileError` with one line naming it.

    A FIFO, a device, a directory or a socket is refused before anything is read, and a FIFO never blocks: the
    path is ``stat``-ed first and opened with ``O_NONBLOCK`` (then checked again with ``fstat``, in case it
    changed in between). A file of more than ``limit`` bytes is refused without being read into memory.
    """
    path = os.fspath(path)
    try:
        _require_regular(os.stat(path), what, path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            _require_regular(st, what, path)
            os.set_blocking(fd, True)
            if limit is not None and st.st_size > limit:
                raise InputFileError(f"{what} {path} ({st.st_size} bytes) does not fit in {limit} bytes "
                                     "of guest memory")
            data = f.read() if limit is None else f.read(limit + 1)
    except OSError as exc:
        raise InputFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if limit is not None and len(data) > limit:      # it grew while being read
        raise InputFileError(f"{what} {path} grew past the {limit} bytes of guest memory while being read")
    return data


def read_input(what: str, src, limit: int | None = None) -> tuple[bytes, str]:
    """``src`` (bytes or a path) as bytes, and a name to use in messages and multiboot command lines.

    A path must name a regular file of at most ``limit`` bytes (see :func:`read_regular_file`)."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        if limit is not None and len(src) > limit:
            raise LoaderError(f"{what} ({len(src)} bytes) does not fit in {limit} bytes of guest memory")
        return bytes(src), what
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        try:
            return read_regular_file(path, what, limit), path
        except InputFileError as exc:
            raise LoaderError(str(exc)) from None
    raise LoaderError(f"{what} must be bytes or a path, not {type(src).__name__}")


def span(start: int, end: int) -> str:
    """``start-end`` in hex, the way messages give an address range (``end`` excluded)."""
    return f"{start:#x}-{end:#x}"


def align_up(x: int, a: int) -> int:
    return (x + a - 1) // a * a if a > 1 else x


def align_down(x: int, a: int) -> int:
    return x // a * a if a > 1 else x


def check_memory(lowmem: int, highmem: int) -> None:
    if not isinstance(lowmem, int) or not 2 * MiB <= lowmem <= 4 * GiB:
        raise LoaderError(f"lowmem {lowmem!r} must be between 2 MiB and 4 GiB")
    if not isinstance(highmem, int) or highmem < 0:
        raise LoaderError(f"highmem {highmem!r} must be a size in bytes, 0 or more")


def e820_map(lowmem: int, highmem: int = 0) -> list[tuple[int, int, int]]:
    """xhyve's map: [0, 0x9FC00) RAM, [1 MiB, lowmem) RAM and, with highmem, [4 GiB, 4 GiB + highmem) RAM.

    Everything else (the EBDA, the VGA hole and the BIOS area where the MP and ACPI tables live, and the
    32-bit MMIO window above lowmem) is left out of the map, so the guest treats it as not RAM.
    """
    m = [(0, LOW_RAM_END, E820_RAM), (MiB, lowmem - MiB, E820_RAM)]
    if highmem:
        m.append((HIGHMEM_BASE, highmem, E820_RAM))
    return m


def boot_gdt_bytes() -> bytes:
    return b"".join(d.to_bytes(8, "little") for d in BOOT_GDT)


def flat32_state(rip: int, **gprs: int) -> tuple[dict[str, int], dict[str, tuple[int, int, int, int]]]:
    """Registers and segments of a 32-bit protected-mode entry on the boot GDT: paging off, IF clear.

    CS is selector 0x10, DS/ES/FS/GS/SS selector 0x18, all base 0 and limit 4 GiB; TR and LDTR keep bhyve's
    reset values. General registers not given are zero.
    """
    regs = {r: 0 for r in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")}
    regs.update(gprs)
    regs.update(rip=rip, rflags=RFLAGS_RESERVED1, cr0=ENTRY_CR0, cr3=0, cr4=0, efer=0)
    flat_data = (BOOT_DS, 0, 0xFFFFFFFF, ACCESS_DATA32)
    segs = {
        "cs": (BOOT_CS, 0, 0xFFFFFFFF, ACCESS_CODE32),
        "ds": flat_data, "es": flat_data, "fs": flat_data, "gs": flat_data, "ss": flat_data,
        "tr": (0, 0, 0xFFFF, ACCESS_TSS_BUSY),
        "ldtr": (0, 0, 0xFFFF, ACCESS_LDT),
    }
    return regs, segs


@dataclass
class Placer:
    """Guest-physical regions claimed so far; a new claim that overlaps one is a :class:`LoaderError`."""

    lowmem: int
    regions: list[tuple[int, int, str]] = field(default_factory=list)

    def claim(self, start: int, size: int, what: str) -> None:
        end = start + size
        if start < 0 or end > self.lowmem:
            raise LoaderError(f"{what} at {span(start, end)} does not fit in guest memory below "
                              f"lowmem {self.lowmem:#x}")
        for s, e, name in self.regions:
            if start < e and s < end:
                raise LoaderError(f"{what} at {span(start, end)} overlaps {name} at {span(s, e)}")
        self.regions.append((start, end, what))
