"""A small guest harness over the NVMM primitives, shared by the provider tests, the conformance suite and the
exit benchmark: RAM with optional holes, code loading, CPU mode set-up through ``setstate`` (real mode, flat
32-bit protected mode, 64-bit long mode with identity paging) and a run loop with recorded exits.

Layout used by the 64-bit set-up (NetBSD ``h_io_assist``/``h_mem_assist`` style): code at 0x2000, page tables
at 0x3000 (PML4), 0x4000 (PDPT), 0x5000 (PD) and 0x6000 (PT, 4 KiB pages for the first 2 MiB, so single pages
can be left out) unless a caller asks for 2 MiB pages.
"""

import ctypes
import mmap
import struct

from ops.nvmm import api
from ops.nvmm import constants as C

PAGE = 4096
PML4, PDPT, PD, PT = 0x3000, 0x4000, 0x5000, 0x6000
CODE = 0x2000
GDT, IDT = 0x7000, 0x8000
GDT_ENTRIES = (0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)   # null, 0x08 64-bit code, 0x10 flat data
PTE_P, PTE_W, PTE_PS = 1, 2, 0x80

# NVMM attrib words (type | S | DPL | P | L | DEF | G)
ATTR_CODE64 = 0xB | 0x10 | 0x80 | 0x200 | 0x800
ATTR_CODE32 = 0xB | 0x10 | 0x80 | 0x400 | 0x800
ATTR_DATA32 = 0x3 | 0x10 | 0x80 | 0x400 | 0x800
ATTR_CODE16 = 0xB | 0x10 | 0x80
ATTR_DATA16 = 0x3 | 0x10 | 0x80
ATTR_TSS64 = 0xB | 0x80
ATTR_LDT = 0x2 | 0x80


class HostMemory:
    """Anonymous host memory with a stable address (what ``hva_map`` takes)."""

    def __init__(self, size):
        self.size = size
        self.mm = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.view = memoryview(self.mm)


class Guest:
    """One machine with RAM at [0, ram) except the ``holes`` (GPA page ranges left unmapped, i.e. MMIO)."""

    def __init__(self, provider, ram=2 << 20, holes=(), readonly=(), vcpus=1):
        self.provider = provider
        self.machine = provider.machine_create()
        self.mem = HostMemory(ram)
        self.machine.hva_map(self.mem.addr, ram)
        self._map_ram(ram, holes, readonly)
        self.vcpus = [self.machine.vcpu_create(i) for i in range(vcpus)]
        self.vcpu = self.vcpus[0]
        self.io_log, self.mem_log = [], []
        self.io_in = {}            # port -> bytes returned by IN (cycled)
        self.mmio = bytearray(PAGE * 16)   # backing store of the holes, indexed by gpa - first hole
        self.mmio_base = holes[0][0] if holes else 0
        for v in self.vcpus:
            v.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=self._io, mem=self._mem))

    def _map_ram(self, ram, holes, readonly):
        cuts = sorted([(s, e, None) for s, e in holes] + [(s, e, "ro") for s, e in readonly])
        pos = 0
        for start, end, kind in cuts + [(ram, ram, None)]:
            if start > pos:
                self.machine.gpa_map(self.mem.addr + pos, pos, start - pos, C.NVMM_PROT_ALL)
            if kind == "ro":
                self.machine.gpa_map(self.mem.addr + start, start, end - start,
                                     C.NVMM_PROT_READ | C.NVMM_PROT_EXEC)
            pos = max(pos, end)

    def close(self):
        self.machine.destroy()

    # -- callbacks ---------------------------------------------------------------------------------------------
    def _io(self, port, is_in, data):
        if is_in:
            src = self.io_in.get(port, b"\xff" * 8)
            n = len(data)
            data[:] = (src * (n // max(len(src), 1) + 1))[:n] if len(src) < n else src[:n]
            self.io_in[port] = src[n:] + src[:n] if len(src) > n else src
        self.io_log.append((port, is_in, bytes(data)))

    def _mem(self, gpa, is_write, data):
        off = gpa - self.mmio_base
        if is_write:
            self.mmio[off:off + len(data)] = data
        else:
            data[:] = self.mmio[off:off + len(data)]
        self.mem_log.append((gpa, is_write, bytes(data)))

    # -- loading and modes -------------------------------------------------------------------------------------
    def load(self, gpa, data):
        self.mem.view[gpa:gpa + len(data)] = data

    def read(self, gpa, size):
        return bytes(self.mem.view[gpa:gpa + size])

    def u64(self, gpa):
        return struct.unpack_from("<Q", self.mem.view, gpa)[0]

    def setup_real(self, rip, vcpu=None, cs_base=0):
        v = vcpu or self.vcpu
        v.getstate(C.NVMM_X64_STATE_ALL)
        s = v.state
        for i in (C.NVMM_X64_SEG_ES, C.NVMM_X64_SEG_SS, C.NVMM_X64_SEG_DS, C.NVMM_X64_SEG_FS, C.NVMM_X64_SEG_GS):
            s.segs[i].set(0, ATTR_DATA16, 0xFFFF, 0)
        s.segs[C.NVMM_X64_SEG_CS].set(cs_base >> 4, ATTR_CODE16, 0xFFFF, cs_base)
        s.gprs[C.NVMM_X64_GPR_RIP] = rip
        s.gprs[C.NVMM_X64_GPR_RFLAGS] = C.RFLAGS_RESERVED1
        v.setstate(C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_GPRS)

    def setup_prot32(self, rip, vcpu=None):
        v = vcpu or self.vcpu
        v.getstate(C.NVMM_X64_STATE_ALL)
        s = v.state
        for i in (C.NVMM_X64_SEG_ES, C.NVMM_X64_SEG_SS, C.NVMM_X64_SEG_DS, C.NVMM_X64_SEG_FS, C.NVMM_X64_SEG_GS):
            s.segs[i].set(0x10, ATTR_DATA32, 0xFFFFFFFF, 0)
        s.segs[C.NVMM_X64_SEG_CS].set(0x08, ATTR_CODE32, 0xFFFFFFFF, 0)
        s.crs[C.NVMM_X64_CR_CR0] = C.CR0_PE | C.CR0_NE | C.CR0_ET
        s.gprs[C.NVMM_X64_GPR_RIP] = rip
        s.gprs[C.NVMM_X64_GPR_RFLAGS] = C.RFLAGS_RESERVED1
        v.setstate(C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_CRS)

    def build_identity_paging(self, unmapped=(), large=False):
        """Identity-maps the first 2 MiB (4 KiB pages unless ``large``), leaving ``unmapped`` pages out."""
        for off in range(PML4, PT + PAGE, 8):
            struct.pack_into("<Q", self.mem.view, off, 0)
        struct.pack_into("<Q", self.mem.view, PML4, PDPT | PTE_P | PTE_W)
        struct.pack_into("<Q", self.mem.view, PDPT, PD | PTE_P | PTE_W)
        if large:
            struct.pack_into("<Q", self.mem.view, PD, 0 | PTE_P | PTE_W | PTE_PS)
            return
        struct.pack_into("<Q", self.mem.view, PD, PT | PTE_P | PTE_W)
        for i in range(512):
            if i * PAGE not in unmapped:
                struct.pack_into("<Q", self.mem.view, PT + 8 * i, i * PAGE | PTE_P | PTE_W)

    def setup_long64(self, rip, vcpu=None, unmapped=(), large=False, build=True):
        """64-bit mode as NetBSD's harness sets it: CR0 PG|PE|NE|TS|MP|WP|AM, CR4 PAE, EFER LME|SCE|LMA."""
        if build:
            self.build_identity_paging(unmapped=unmapped, large=large)
        v = vcpu or self.vcpu
        v.getstate(C.NVMM_X64_STATE_ALL)
        s = v.state
        for i in (C.NVMM_X64_SEG_ES, C.NVMM_X64_SEG_SS, C.NVMM_X64_SEG_DS, C.NVMM_X64_SEG_FS, C.NVMM_X64_SEG_GS):
            s.segs[i].set(0x10, ATTR_DATA32, 0xFFFFFFFF, 0)
        s.segs[C.NVMM_X64_SEG_CS].set(0x08, ATTR_CODE64, 0xFFFFFFFF, 0)
        s.segs[C.NVMM_X64_SEG_TR].set(0x18, ATTR_TSS64, 0x67, 0)
        s.crs[C.NVMM_X64_CR_CR0] = (C.CR0_PG | C.CR0_PE | C.CR0_NE | C.CR0_TS | C.CR0_MP | C.CR0_WP |
                                    C.CR0_AM | C.CR0_ET)
        s.crs[C.NVMM_X64_CR_CR3] = PML4
        s.crs[C.NVMM_X64_CR_CR4] = C.CR4_PAE
        s.msrs[C.NVMM_X64_MSR_EFER] = C.EFER_LME | C.EFER_SCE | C.EFER_LMA
        s.gprs[C.NVMM_X64_GPR_RIP] = rip
        s.gprs[C.NVMM_X64_GPR_RSP] = 0x1F0000
        s.gprs[C.NVMM_X64_GPR_RFLAGS] = C.RFLAGS_RESERVED1
        v.setstate(C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_CRS |
                   C.NVMM_X64_STATE_MSRS)

    def setup_idt64(self, handlers, vcpu=None):
        """A GDT at 0x7000 (null, 64-bit code 0x08, data 0x10) and a 64-bit IDT at 0x8000 whose gates for the
        ``{vector: handler address}`` given are present interrupt gates; GDTR and IDTR are loaded."""
        for i, d in enumerate(GDT_ENTRIES):
            struct.pack_into("<Q", self.mem.view, GDT + 8 * i, d)
        for vec in range(256):
            struct.pack_into("<QQ", self.mem.view, IDT + 16 * vec, 0, 0)
        for vec, addr in handlers.items():
            lo = (addr & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((addr >> 16) & 0xFFFF) << 48
            struct.pack_into("<QQ", self.mem.view, IDT + 16 * vec, lo, addr >> 32)
        v = vcpu or self.vcpu
        v.getstate(C.NVMM_X64_STATE_SEGS)
        v.state.segs[C.NVMM_X64_SEG_GDT].set(0, 0, 8 * len(GDT_ENTRIES) - 1, GDT)
        v.state.segs[C.NVMM_X64_SEG_IDT].set(0, 0, 16 * 256 - 1, IDT)
        v.setstate(C.NVMM_X64_STATE_SEGS)

    # -- running -----------------------------------------------------------------------------------------------
    def run(self, until=(C.NVMM_VCPU_EXIT_HALTED,), max_exits=10000, vcpu=None):
        """Runs, completing IO and MEMORY exits through the assists, until an exit in ``until`` (returned) or
        any exit the harness does not complete (returned too)."""
        v = vcpu or self.vcpu
        for _ in range(max_exits):
            ex = v.run()
            r = ex.reason
            if r in until:
                return ex
            if r == C.NVMM_VCPU_EXIT_IO:
                v.assist_io()
            elif r == C.NVMM_VCPU_EXIT_MEMORY:
                v.assist_mem()
            else:
                return ex
        raise AssertionError(f"guest still running after {max_exits} exits")

    def gpr(self, idx, vcpu=None):
        v = vcpu or self.vcpu
        v.getstate(C.NVMM_X64_STATE_GPRS)
        return v.state.gprs[idx]
