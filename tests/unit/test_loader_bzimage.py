"""The kexec loader: a fake bzImage built here checked byte by byte, the zero page layout against boot.rst's
offsets, every refusal as a one-line LoaderError, and a real Debian kernel when one is cached."""

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmmshim.loader import BootImage, LoaderError, load_kexec
from vmmshim.loader.boot_params import BootParams, E820Entry, SetupHeader

MiB = 1 << 20
GiB = 1 << 30

# Offsets in the file and in the zero page (boot.rst, zero-page.rst).
OFF = dict(setup_sects=0x1F1, syssize=0x1F4, boot_flag=0x1FE, jump=0x200, header=0x202, version=0x206,
           kernel_version=0x20E, type_of_loader=0x210, loadflags=0x211, ramdisk_image=0x218,
           ramdisk_size=0x21C, cmd_line_ptr=0x228, initrd_addr_max=0x22C, kernel_alignment=0x230,
           relocatable_kernel=0x234, min_alignment=0x235, xloadflags=0x236, cmdline_size=0x238,
           hardware_subarch=0x23C, pref_address=0x258, init_size=0x260, handover_offset=0x264,
           kernel_info_offset=0x268)
FMT = dict(setup_sects="B", syssize="I", boot_flag="H", jump="H", header="I", version="H", kernel_version="H",
           type_of_loader="B", loadflags="B", ramdisk_image="I", ramdisk_size="I", cmd_line_ptr="I",
           initrd_addr_max="I", kernel_alignment="I", relocatable_kernel="B", min_alignment="B",
           xloadflags="H", cmdline_size="I", hardware_subarch="I", pref_address="Q", init_size="I",
           handover_offset="I", kernel_info_offset="I")


def put(buf, field, value):
    struct.pack_into("<" + FMT[field], buf, OFF[field], value)


def get(buf, field, base=0):
    return struct.unpack_from("<" + FMT[field], buf, base + OFF[field])[0]


def make_bzimage(*, payload=None, setup_sects=4, version=0x020F, loadflags=0x01, relocatable=1,
                 kernel_alignment=0x200000, pref_address=0x1000000, init_size=0x400000, cmdline_size=0x7FF,
                 initrd_addr_max=0x7FFFFFFF, header_end=0x26C, boot_flag=0xAA55, magic=b"HdrS",
                 syssize=None, version_string=b"6.1.0-test (builder@host) #1 SMP"):
    """A bzImage as far as a loader can tell: boot sector, setup header, setup code and protected-mode code."""
    if payload is None:
        payload = bytes((i * 7 + 3) & 0xFF for i in range(0x3000 + 123))
    n_setup = setup_sects or 4
    setup = bytearray((n_setup + 1) * 512)
    for i in range(len(setup)):  # recognisable filler, so stray copies show up
        setup[i] = (i * 13 + 5) & 0xFF
    setup[0x1F1:0x26C] = bytes(0x26C - 0x1F1)
    setup[0x200] = 0xEB
    setup[0x201] = header_end - 0x202
    setup[0x202:0x206] = magic
    put(setup, "setup_sects", setup_sects)
    put(setup, "syssize", len(payload) // 16 if syssize is None else syssize)
    put(setup, "boot_flag", boot_flag)
    put(setup, "version", version)
    put(setup, "loadflags", loadflags)
    put(setup, "relocatable_kernel", relocatable)
    put(setup, "kernel_alignment", kernel_alignment)
    put(setup, "pref_address", pref_address)
    put(setup, "init_size", init_size)
    put(setup, "cmdline_size", cmdline_size)
    put(setup, "initrd_addr_max", initrd_addr_max)
    put(setup, "min_alignment", 21)
    put(setup, "xloadflags", 0x7F)
    put(setup, "handover_offset", 0x1234)
    put(setup, "kernel_info_offset", 0x5678)
    put(setup, "hardware_subarch", 0xDEAD)  # the loader must overwrite it with 0 (PC)
    put(setup, "kernel_version", 0x400)
    setup[0x600:0x600 + len(version_string) + 1] = version_string + b"\0"
    return bytes(setup) + payload


def memory(img: BootImage, size: int) -> bytearray:
    """Guest RAM [0, size) after the image's writes, checking that no two writes overlap."""
    mem = bytearray(size)
    spans = sorted((a, a + len(d)) for a, d in img.writes)
    for (s0, e0), (s1, e1) in zip(spans, spans[1:]):
        assert e0 <= s1, f"writes overlap: [{s0:#x},{e0:#x}) and [{s1:#x},{e1:#x})"
    for a, d in img.writes:
        assert a + len(d) <= size
        mem[a:a + len(d)] = d
    return mem


def expected_zero_page(kernel: bytes, *, cmd_line_ptr=0x4000, ramdisk=(0, 0), lowmem, highmem=0):
    """Every byte of the zero page the loader should write, built with struct at boot.rst's offsets."""
    zp = bytearray(4096)
    end = 0x202 + kernel[0x201]
    zp[0x1F1:end] = kernel[0x1F1:end]
    put(zp, "type_of_loader", 0x0D)
    put(zp, "cmd_line_ptr", cmd_line_ptr)
    put(zp, "hardware_subarch", 0)
    put(zp, "ramdisk_image", ramdisk[0])
    put(zp, "ramdisk_size", ramdisk[1])
    struct.pack_into("<I", zp, 0x1E0, (lowmem - MiB) >> 10)  # alt_mem_k
    e820 = [(0, 0x9FC00, 1), (MiB, lowmem - MiB, 1)] + ([(4 * GiB, highmem, 1)] if highmem else [])
    zp[0x1E8] = len(e820)
    for i, (a, s, t) in enumerate(e820):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, a, s, t)
    return bytes(zp)


# ---------------------------------------------------------------------------------------------------------
# Layouts

def test_setup_header_and_zero_page_sizes():
    assert SetupHeader.sizeof() == 0x26C - 0x1F1
    assert BootParams.sizeof() == 4096
    assert E820Entry.sizeof() == 20


def test_boot_params_fields_at_boot_rst_offsets():
    zp = BootParams.parse(bytes(4096))
    values = {}
    for i, field in enumerate(OFF):
        v = (0x11 * (i + 1)) & {"B": 0xFF, "H": 0xFFFF, "I": 0xFFFFFFFF, "Q": (1 << 64) - 1}[FMT[field]]
        setattr(zp.hdr, field, v)
        values[field] = v
    zp.e820_entries = 3
    zp.alt_mem_k = 0xCAFE
    zp.ext_ramdisk_image, zp.ext_ramdisk_size, zp.ext_cmd_line_ptr = 1, 2, 3
    zp.acpi_rsdp_addr = 0xF2400
    zp.sentinel = 0xFF
    zp.e820_table[0].addr, zp.e820_table[0].size, zp.e820_table[0].type = 0x1111, 0x2222, 1
    zp.e820_table[127].addr, zp.e820_table[127].size, zp.e820_table[127].type = 0x3333, 0x4444, 2
    raw = BootParams.build(zp)
    assert len(raw) == 4096
    for field, v in values.items():
        assert get(raw, field) == v, field
    assert raw[0x1E8] == 3
    assert struct.unpack_from("<I", raw, 0x1E0)[0] == 0xCAFE
    assert struct.unpack_from("<III", raw, 0xC0) == (1, 2, 3)
    assert struct.unpack_from("<Q", raw, 0x70)[0] == 0xF2400
    assert raw[0x1EF] == 0xFF
    assert struct.unpack_from("<QQI", raw, 0x2D0) == (0x1111, 0x2222, 1)
    assert struct.unpack_from("<QQI", raw, 0x2D0 + 127 * 20) == (0x3333, 0x4444, 2)
    # And back: a page written with struct parses to the same fields.
    back = BootParams.parse(raw)
    for field, v in values.items():
        assert back.hdr[field] == v


@settings(max_examples=50, suppress_health_check=[HealthCheck.large_base_example])
@given(st.binary(min_size=4096, max_size=4096))
def test_boot_params_round_trip(raw):
    assert BootParams.build(BootParams.parse(raw)) == raw


@given(st.binary(min_size=0x26C - 0x1F1, max_size=0x26C - 0x1F1))
def test_setup_header_round_trip(raw):
    assert SetupHeader.build(SetupHeader.parse(raw)) == raw


@given(st.binary(min_size=20, max_size=20))
def test_e820_entry_round_trip(raw):
    assert E820Entry.build(E820Entry.parse(raw)) == raw


# ---------------------------------------------------------------------------------------------------------
# The layout of a fake kernel, every byte

LOWMEM = 256 * MiB


def test_every_placed_byte_relocatable_kernel():
    kernel = make_bzimage()
    initrd = bytes((i * 31 + 1) & 0xFF for i in range(12345))
    cmdline = "console=ttyS0 earlyprintk=serial root=/dev/ram0"
    img = load_kexec(kernel, initrd, cmdline, LOWMEM)
    mem = memory(img, LOWMEM)

    # Only these regions are written.
    load_addr = 0x200000  # ALIGNUP(1 MiB, kernel_alignment 2 MiB)
    payload = kernel[5 * 512:]
    rd_addr = ((LOWMEM - 1 - len(initrd)) // 4096) * 4096
    assert sorted((a, len(d)) for a, d in img.writes) == sorted(
        [(0x2000, 32), (0x3000, 4096), (0x4000, len(cmdline) + 1), (load_addr, len(payload)),
         (rd_addr, len(initrd))])

    # GDT.
    assert struct.unpack_from("<4Q", mem, 0x2000) == (0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    # Zero page, every byte.
    assert bytes(mem[0x3000:0x4000]) == expected_zero_page(kernel, ramdisk=(rd_addr, len(initrd)),
                                                           lowmem=LOWMEM)
    # Parsed back with the construct layout.
    zp = BootParams.parse(bytes(mem[0x3000:0x4000]))
    assert zp.hdr.type_of_loader == 0xD and zp.hdr.cmd_line_ptr == 0x4000
    assert zp.hdr.ramdisk_image == rd_addr and zp.hdr.ramdisk_size == len(initrd)
    assert zp.hdr.version == 0x020F and zp.hdr.boot_flag == 0xAA55 and zp.hdr.header == 0x53726448
    assert zp.e820_entries == 2
    assert [(e.addr, e.size, e.type) for e in zp.e820_table[:2]] == [(0, 0x9FC00, 1), (MiB, LOWMEM - MiB, 1)]
    assert zp.alt_mem_k == (LOWMEM - MiB) >> 10
    assert zp.sentinel == 0 and zp.ext_cmd_line_ptr == 0 and zp.ext_ramdisk_image == 0
    # Command line and its terminating zero.
    assert bytes(mem[0x4000:0x4000 + len(cmdline) + 1]) == cmdline.encode() + b"\0"
    # Kernel.
    assert bytes(mem[load_addr:load_addr + len(payload)]) == payload
    # initrd: 4 KiB aligned, as high as it goes below lowmem - 1.
    assert rd_addr % 4096 == 0 and rd_addr + len(initrd) <= LOWMEM - 1
    assert rd_addr + len(initrd) > LOWMEM - 1 - 4096
    assert bytes(mem[rd_addr:rd_addr + len(initrd)]) == initrd

    # Entry state.
    assert img.regs["rip"] == load_addr
    assert img.regs["rsi"] == 0x3000
    assert img.regs["rflags"] == 2
    assert img.regs["cr0"] == 0x21
    assert img.regs["rbx"] == img.regs["rbp"] == img.regs["rdi"] == 0
    assert img.regs["cr3"] == img.regs["cr4"] == img.regs["efer"] == 0
    assert img.segs["cs"] == (0x10, 0, 0xFFFFFFFF, 0xC09B)
    for s in ("ds", "es", "ss"):
        assert img.segs[s] == (0x18, 0, 0xFFFFFFFF, 0xC093)
    assert set(img.segs) == {"cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr"}
    assert img.gdtr == (0x2000, 0x1F)
    assert img.e820 == [(0, 0x9FC00, 1), (MiB, LOWMEM - MiB, 1)]
    assert "6.1.0-test" in img.description and "2.15" in img.description


def test_gdt_descriptors_match_segment_access_rights():
    """The cached CS/DS access rights are what the GDT descriptors at 0x10/0x18 say (bits 40-55), as xhyve."""
    img = load_kexec(make_bzimage(), None, "", LOWMEM)
    gdt = dict(img.writes)[0x2000]
    for seg in ("cs", "ds"):
        sel, base, limit, access = img.segs[seg]
        d = struct.unpack_from("<Q", gdt, sel)[0]
        # The same but for the accessed bit (type bit 0), which the CPU sets when it loads the descriptor.
        assert (d >> 40) & 0xF0FF == access & ~1
        assert ((d & 0xFFFF) | ((d >> 32) & 0xF0000)) == 0xFFFFF  # limit 0xFFFFF pages with G = 4 GiB
        assert base == 0 and limit == 0xFFFFFFFF


def test_non_relocatable_kernel_loads_at_pref_address():
    kernel = make_bzimage(relocatable=0, pref_address=0x400000, init_size=0x200000)
    img = load_kexec(kernel, None, "x", LOWMEM)
    assert img.regs["rip"] == 0x400000
    assert dict(img.writes)[0x400000] == kernel[5 * 512:]


def test_setup_sects_zero_means_four():
    kernel = make_bzimage(setup_sects=0)
    img = load_kexec(kernel, None, "", LOWMEM)
    assert dict(img.writes)[0x200000] == kernel[5 * 512:]


@pytest.mark.parametrize("sects", [1, 4, 27, 39])
def test_setup_sects_decides_payload_offset(sects):
    kernel = make_bzimage(setup_sects=sects)
    img = load_kexec(kernel, None, "", LOWMEM)
    assert dict(img.writes)[0x200000] == kernel[(sects + 1) * 512:]


def test_kernel_alignment_16m():
    img = load_kexec(make_bzimage(kernel_alignment=0x1000000), None, "", LOWMEM)
    assert img.regs["rip"] == 0x1000000


def test_initrd_below_initrd_addr_max():
    initrd = bytes(100_000)
    img = load_kexec(make_bzimage(initrd_addr_max=0x0FFFFFFF), initrd, "", 1 * GiB)
    zp = BootParams.parse(dict(img.writes)[0x3000])
    assert zp.hdr.ramdisk_image == (0x0FFFFFFF - len(initrd)) // 4096 * 4096
    assert zp.hdr.ramdisk_image + len(initrd) <= 0x0FFFFFFF


def test_highmem_in_e820_and_zero_page():
    img = load_kexec(make_bzimage(), None, "", 3 * GiB, 2 * GiB)
    assert img.e820 == [(0, 0x9FC00, 1), (MiB, 3 * GiB - MiB, 1), (4 * GiB, 2 * GiB, 1)]
    zp = dict(img.writes)[0x3000]
    assert zp == expected_zero_page(make_bzimage(), lowmem=3 * GiB, highmem=2 * GiB)


def test_cmdline_exactly_cmdline_size_is_accepted():
    img = load_kexec(make_bzimage(cmdline_size=16), None, "a" * 16, LOWMEM)
    assert dict(img.writes)[0x4000] == b"a" * 16 + b"\0"


def test_header_end_from_jump_byte():
    """A protocol 2.10 header ends at 0x264: the bytes past it in the file are not copied."""
    kernel = bytearray(make_bzimage(version=0x020A, header_end=0x264))
    kernel[0x264:0x26C] = b"\xEE" * 8  # setup code, not header
    img = load_kexec(bytes(kernel), None, "", LOWMEM)
    zp = dict(img.writes)[0x3000]
    assert zp[0x264:0x26C] == bytes(8)
    assert zp == expected_zero_page(bytes(kernel), lowmem=LOWMEM)


def test_paths_are_read(tmp_path):
    k = tmp_path / "vmlinuz"
    r = tmp_path / "initrd.gz"
    k.write_bytes(make_bzimage())
    r.write_bytes(b"initrd!")
    img = load_kexec(str(k), r, "c", LOWMEM)
    assert b"initrd!" in [d for _, d in img.writes]


@settings(max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(lowmem=st.integers(8, 4096).map(lambda m: m * MiB),
       rd_size=st.integers(0, 64 * MiB), addr_max=st.sampled_from([0x7FFFFFFF, 0x37FFFFFF, 0x0FFFFFFF]))
def test_initrd_placement_property(lowmem, rd_size, addr_max):
    kernel = make_bzimage(initrd_addr_max=addr_max, init_size=0x400000)
    try:
        img = load_kexec(kernel, b"\1" * rd_size, "", lowmem)
    except LoaderError as exc:
        assert "\n" not in str(exc)
        top = min(addr_max, lowmem - 1)
        kernel_end = 0x1000000 + 0x400000
        assert kernel_end > lowmem or (top - rd_size) // 4096 * 4096 < kernel_end
        return
    zp = BootParams.parse(dict(img.writes)[0x3000])
    start = zp.hdr.ramdisk_image
    assert start % 4096 == 0
    assert start == (min(addr_max, lowmem - 1) - rd_size) // 4096 * 4096
    assert start + rd_size <= min(addr_max, lowmem - 1)
    assert start >= 0x1000000 + 0x400000  # past the kernel's runtime area (pref_address + init_size)
    assert zp.hdr.ramdisk_size == rd_size


# ---------------------------------------------------------------------------------------------------------
# Refusals: one line each

def _truncated():
    k = make_bzimage()
    return k[:-100]


ERRORS = [
    ("not a bzImage", lambda: (b"\x7fELF" + bytes(4000), None, ""), "not a bzImage"),
    ("empty", lambda: (b"", None, ""), "not a bzImage"),
    ("no 0xAA55", lambda: (make_bzimage(boot_flag=0), None, ""), "0xAA55"),
    ("no HdrS", lambda: (make_bzimage(magic=b"HdrX"), None, ""), "HdrS"),
    ("protocol 2.06", lambda: (make_bzimage(version=0x0206), None, ""), "2.06 is too old"),
    ("protocol 2.09", lambda: (make_bzimage(version=0x0209), None, ""), "too old"),
    ("zImage", lambda: (make_bzimage(loadflags=0), None, ""), "zImage"),
    ("cmdline too long", lambda: (make_bzimage(cmdline_size=255), None, "x" * 256), "at most 255"),
    ("NUL in cmdline", lambda: (make_bzimage(), None, "a\0b"), "NUL"),
    ("kernel too big", lambda: (make_bzimage(init_size=300 * MiB), None, ""), "too big for memory"),
    ("initrd too big", lambda: (make_bzimage(), bytes(250 * MiB), ""), "does not fit"),
    ("truncated file", lambda: (_truncated(), None, ""), "truncated"),
    ("truncated header", lambda: (make_bzimage()[:0x230], None, ""), "truncated"),
    ("short header", lambda: (make_bzimage(header_end=0x250), None, ""), "setup header ends"),
    ("bad alignment", lambda: (make_bzimage(kernel_alignment=0x300000), None, ""), "power of two"),
    ("pref below 1M", lambda: (make_bzimage(relocatable=0, pref_address=0x10000), None, ""), "below 1 MiB"),
    ("missing file", lambda: ("/nonexistent/vmlinuz", None, ""), "cannot read kernel"),
    ("missing initrd", lambda: (make_bzimage(), "/nonexistent/initrd", ""), "cannot read initrd"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_are_one_line(case):
    _, make, phrase = case
    kernel, initrd, cmdline = make()
    with pytest.raises(LoaderError) as ei:
        load_kexec(kernel, initrd, cmdline, LOWMEM)
    msg = str(ei.value)
    assert phrase in msg
    assert "\n" not in msg and msg
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize("lowmem,highmem", [(1 * MiB, 0), (5 * GiB, 0), (LOWMEM, -1)])
def test_bad_memory_sizes(lowmem, highmem):
    with pytest.raises(LoaderError):
        load_kexec(make_bzimage(), None, "", lowmem, highmem)


# ---------------------------------------------------------------------------------------------------------
# A real kernel

def _cached_kernel():
    cands = []
    if os.environ.get("VMMSHIM_CACHE"):
        cands.append(Path(os.environ["VMMSHIM_CACHE"]) / "guest" / "vmlinuz")
    cands.append(Path.home() / ".cache" / "vmmshim" / "guest" / "vmlinuz")
    cands += sorted(Path("/boot").glob("vmlinuz-*"))
    for p in cands:
        try:
            if p.is_file() and p.read_bytes()[0x202:0x206] == b"HdrS":
                return p
        except OSError:
            continue
    return None


REAL = _cached_kernel()


@pytest.mark.skipif(REAL is None, reason="no cached Debian kernel ($VMMSHIM_CACHE/guest/vmlinuz, "
                                        "~/.cache/vmmshim/guest/vmlinuz or /boot/vmlinuz-*); the guest build "
                                        "script makes one")
def test_real_kernel():
    data = REAL.read_bytes()
    initrd = REAL.with_name("initramfs.gz")
    rd = initrd.read_bytes() if initrd.is_file() else b"\x1f\x8b" + bytes(1000)
    img = load_kexec(data, rd, "console=ttyS0 earlyprintk=serial", 1 * GiB)
    mem = dict(img.writes)
    hdr = SetupHeader.parse(data[0x1F1:0x26C])
    assert hdr.version >= 0x020A and hdr.relocatable_kernel
    load = img.regs["rip"]
    assert load == max(MiB, hdr.kernel_alignment) and load % hdr.kernel_alignment == 0
    sects = hdr.setup_sects or 4
    assert mem[load] == data[(sects + 1) * 512:]
    zp = BootParams.parse(mem[0x3000])
    assert zp.hdr.ramdisk_size == len(rd)
    # The initrd sits above the kernel's runtime area: pref_address (or the load address) + init_size.
    runtime = max(load, hdr.pref_address)
    assert zp.hdr.ramdisk_image >= runtime + hdr.init_size
    assert mem[0x3000] == expected_zero_page(data, ramdisk=(zp.hdr.ramdisk_image, len(rd)), lowmem=1 * GiB)
    assert img.description.startswith("kexec: Linux ")
    # Not enough memory for its init_size is refused before the guest starts.
    with pytest.raises(LoaderError, match="too big for memory"):
        load_kexec(data, None, "", 32 * MiB)
