"""The guest as gdb sees it, through the ops API only (``ops/vmm_api.py``): registers in the order of the target
description this module serves (GDB manual, appendix G "Target Descriptions", and gdb's
``features/i386/64bit-core.xml``, ``64bit-sse.xml``, ``64bit-segments.xml`` for the standard feature and register
names), guest virtual memory through the vCPU's page tables (``vm_gla2gpa``), software breakpoints (int3 bytes in
guest memory, hidden from reads) and debug-register breakpoints and watchpoints (``vm_debug_hw``).

Not supported: the x87 and SSE registers' values (described so gdb accepts the i386:x86-64 description, reported
unavailable, writes ignored), CR8, writing segment selectors (their descriptors are not reloaded: refused), AVX.
"""

import errno

from ops.vmm_ops import VmRegName as R

PAGE = 4096
INT3 = b"\xcc"
MAX_HW_SLOTS = 4
HW_EXEC, HW_WRITE, HW_ACCESS = 0, 1, 3
# gdb's Z types: 0 software breakpoint, 1 hardware breakpoint, 2 write, 3 read, 4 access watchpoint
Z_SOFT, Z_HARD, Z_WRITE, Z_READ, Z_ACCESS = range(5)
HW_TYPE_OF_Z = {Z_HARD: HW_EXEC, Z_WRITE: HW_WRITE, Z_READ: HW_ACCESS, Z_ACCESS: HW_ACCESS}
HW_LENGTHS = (1, 2, 4, 8)

_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
         "r15")
_SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
_FPU_CTL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")
#: (name, bits, gdb type, feature, how to read it): ("reg", VmRegName), ("base", segment) or None (unavailable)
REGISTERS = (
    [(n, 64, "int64", "core", ("reg", R[f"VM_REG_GUEST_{n.upper()}"])) for n in _GPRS] +
    [("rip", 64, "code_ptr", "core", ("reg", R.VM_REG_GUEST_RIP)),
     ("eflags", 32, "int32", "core", ("reg", R.VM_REG_GUEST_RFLAGS))] +
    [(n, 32, "int32", "core", ("reg", R[f"VM_REG_GUEST_{n.upper()}"])) for n in _SEGS] +
    [(f"st{i}", 80, "i387_ext", "core", None) for i in range(8)] +
    [(n, 32, "int", "core", None) for n in _FPU_CTL] +
    [(f"xmm{i}", 128, "vec128", "sse", None) for i in range(16)] +
    [("mxcsr", 32, "int", "sse", None),
     ("fs_base", 64, "int", "segments", ("base", R.VM_REG_GUEST_FS)),
     ("gs_base", 64, "int", "segments", ("base", R.VM_REG_GUEST_GS))] +
    [(n, 64, "int", "sys", ("reg", R[f"VM_REG_GUEST_{n.upper()}"])) for n in ("cr0", "cr2", "cr3", "cr4", "efer")])
FEATURES = (("core", "org.gnu.gdb.i386.core"), ("sse", "org.gnu.gdb.i386.sse"),
            ("segments", "org.gnu.gdb.i386.segments"), ("sys", "org.vmmshim.gdb.i386.sys"))


def target_xml():
    """The target description: i386:x86-64 with the registers of :data:`REGISTERS`, in their order."""
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>"]
    num = 0
    for key, name in FEATURES:
        parts.append(f'<feature name="{name}">')
        if key == "sse":
            parts.append('<vector id="v4f" type="ieee_single" count="4"/>'
                         '<union id="vec128"><field name="v4_float" type="v4f"/>'
                         '<field name="uint128" type="uint128"/></union>')
        for reg, bits, type_, feat, _ in REGISTERS:
            if feat == key:
                group = ' group="system"' if key == "sys" else ""
                parts.append(f'<reg name="{reg}" bitsize="{bits}" type="{type_}" regnum="{num}"{group}/>')
            num += feat == key
        parts.append("</feature>")
    parts.append("</target>")
    return "".join(parts).encode()


class Target:
    """Registers, memory and breakpoints of one VM (``vm``: its ``ops`` and ``vmi``)."""

    def __init__(self, ops, vmi):
        self.ops, self.vmi = ops, vmi
        self.features = ops.vm_features(vmi)
        self.breakpoints = {}        # gpa -> (original byte, linear address)
        self.hw = []                 # (addr, hw type, len, z type)

    # -- registers ------------------------------------------------------------------------------------------
    def read_register(self, vcpu, num):
        """Hex of register ``num`` in target byte order, ``x``s when unavailable."""
        _, bits, _, _, how = REGISTERS[num]
        if how is None:
            return "xx" * (bits // 8)
        kind, reg = how
        value = self.ops.vmgetdesc(self.vmi, vcpu, reg).base if kind == "base" else \
            self.ops.vmgetreg(self.vmi, vcpu, reg)
        return (value & ((1 << bits) - 1)).to_bytes(bits // 8, "little").hex()

    def read_registers(self, vcpu):
        return "".join(self.read_register(vcpu, n) for n in range(len(REGISTERS)))

    def write_register(self, vcpu, num, data):
        _, bits, _, feat, how = REGISTERS[num]
        if len(data) != bits // 8:
            raise OSError(errno.EINVAL, f"register {num} takes {bits // 8} bytes")
        if how is None:
            return                              # x87/SSE: not kept, the write is dropped
        kind, reg = how
        value = int.from_bytes(data, "little")
        if kind == "base":
            desc = self.ops.vmgetdesc(self.vmi, vcpu, reg)
            desc.base = value
            self.ops.vmsetdesc(self.vmi, vcpu, reg, desc)
        elif REGISTERS[num][0] in _SEGS:
            if value != self.ops.vmgetreg(self.vmi, vcpu, reg):
                raise OSError(errno.EPERM, "segment selectors cannot be written")
        else:
            self.ops.vmsetreg(self.vmi, vcpu, reg, value)

    def write_registers(self, vcpu, data):
        off = 0
        for num, (_, bits, _, _, how) in enumerate(REGISTERS):
            chunk = data[off:off + bits // 8]
            off += bits // 8
            if how is not None and len(chunk) == bits // 8 and REGISTERS[num][0] not in _SEGS:
                self.write_register(vcpu, num, chunk)

    # -- memory ---------------------------------------------------------------------------------------------
    def _pages(self, vcpu, addr, length):
        """``(linear, gpa, n)`` pieces of ``[addr, addr+length)`` that do not cross a page."""
        while length > 0:
            n = min(length, PAGE - (addr & (PAGE - 1)))
            yield addr, self.ops.vm_gla2gpa(self.vmi, vcpu, addr), n
            addr, length = addr + n, length - n

    def read_memory(self, vcpu, addr, length):
        """Guest virtual memory as the guest had it before the breakpoints went in; ``EFAULT`` if unmapped."""
        out = bytearray()
        for _, gpa, n in self._pages(vcpu, addr, length):
            chunk = bytearray(self.ops.vm_gpa_view(self.vmi, gpa, n))
            for bp, (orig, _) in self.breakpoints.items():
                if gpa <= bp < gpa + n:
                    chunk[bp - gpa] = orig
            out += chunk
        return bytes(out)

    def write_memory(self, vcpu, addr, data):
        pieces = list(self._pages(vcpu, addr, len(data)))      # every page mapped before a byte is written
        off = 0
        for _, gpa, n in pieces:
            chunk = bytearray(data[off:off + n])
            off += n
            for bp, (orig, lin) in list(self.breakpoints.items()):
                if gpa <= bp < gpa + n:                         # the breakpoint stays; its saved byte changes
                    self.breakpoints[bp] = (chunk[bp - gpa], lin)
                    chunk[bp - gpa] = INT3[0]
            self.ops.vm_gpa_view(self.vmi, gpa, n)[:] = chunk

    # -- breakpoints ----------------------------------------------------------------------------------------
    def insert_soft(self, vcpu, addr):
        gpa = self.ops.vm_gla2gpa(self.vmi, vcpu, addr)
        if gpa in self.breakpoints:
            return
        view = self.ops.vm_gpa_view(self.vmi, gpa, 1)
        self.breakpoints[gpa] = (view[0], addr)
        view[0] = INT3[0]

    def remove_soft(self, vcpu, addr):
        gpa = self.ops.vm_gla2gpa(self.vmi, vcpu, addr)
        entry = self.breakpoints.pop(gpa, None)
        if entry is not None:
            self.ops.vm_gpa_view(self.vmi, gpa, 1)[0] = entry[0]

    def is_breakpoint(self, vcpu, addr):
        try:
            return self.ops.vm_gla2gpa(self.vmi, vcpu, addr) in self.breakpoints
        except OSError:
            return False

    def clear(self, vcpus):
        """Every breakpoint and watchpoint out (a detach)."""
        for gpa, (orig, _) in list(self.breakpoints.items()):
            self.ops.vm_gpa_view(self.vmi, gpa, 1)[0] = orig
        self.breakpoints.clear()
        if self.hw:
            self.hw = []
            self._apply_hw(vcpus)

    def insert_hw(self, vcpus, ztype, addr, length):
        """A Z1-Z4 in a debug register (a Z0 too, where the provider traps no int3: type execute)."""
        if ztype == Z_SOFT:
            length = 1
        if length not in HW_LENGTHS or addr % length or (ztype == Z_HARD and length != 1 and length != 0):
            raise OSError(errno.EINVAL, f"a debug register cannot watch {length} bytes at {addr:#x}")
        if len(self.hw) >= MAX_HW_SLOTS:
            raise OSError(errno.ENOSPC, "all four debug registers are in use")
        self.hw.append((addr, HW_TYPE_OF_Z.get(ztype, HW_EXEC), length, ztype))
        try:
            self._apply_hw(vcpus)
        except OSError:
            self.hw.pop()
            raise

    def remove_hw(self, vcpus, ztype, addr, length):
        for slot in self.hw:
            if slot[0] == addr and slot[3] == ztype:
                self.hw.remove(slot)
                self._apply_hw(vcpus)
                return

    def _apply_hw(self, vcpus):
        slots = tuple((a, t, n) for a, t, n, _ in self.hw)
        for v in vcpus:
            self.ops.vm_debug_hw(self.vmi, v, slots)

    def hw_hit(self, dr6):
        """``(z type, addr)`` of the debug register DR6 says matched, or None."""
        for i, slot in enumerate(self.hw):
            if dr6 & (1 << i):
                return slot[3], slot[0]
        return None
