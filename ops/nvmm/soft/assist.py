"""``nvmm_assist_io`` and ``nvmm_assist_mem`` for the software CPU.

``assist_io`` follows libnvmm's ``nvmm_assist_io`` (``libnvmm_x86.c``, anchors (c)) on the vCPU's NVMM state:
OUT copies AL/AX/EAX into the data, IN merges the data into RAX (a 4-byte IN zero-extends); INS/OUTS take the
GVA from RDI/RSI under the address-size mask and the exit's segment (ES for INS, DS or the override for OUTS;
only FS/GS bases in long mode), REP with DF=0 moves up to ``NVMM_IO_BATCH_SIZE`` bytes per exit and one element
with DF=1, RSI/RDI and RCX move, and RIP becomes ``npc`` only when the count reaches 0. Guest memory is reached
through the page walk; a piece that is not RAM goes to the ``mem`` callback, as libnvmm does.

``assist_mem`` lets unicorn complete the instruction (one iteration of a REP form): the page of the exit, and
any other non-RAM page the instruction touches, is mapped for that one step over a scratch host page with memory
hooks; a read hook fills the bytes from the ``mem`` callback before unicorn reads them, a write hook hands the
written value to it, so the device sees the guest-physical address and the full access size (8-byte accesses
stay one call). A read-only RAM page's scratch copy holds its RAM: reads are plain, writes go to the callback.

Not supported: instruction fetches from MMIO (``ENODEV``), segment limit checks beyond libnvmm's (limit and
present bit), expand-down segments.
"""

import ctypes
import errno
import mmap

from unicorn import UcError, UC_HOOK_MEM_READ, UC_HOOK_MEM_WRITE, UC_PROT_READ, UC_PROT_WRITE
from unicorn import x86_const as X

from .. import api
from .. import constants as C
from ..x86 import mmu
from .ucstate import uc_prot

_MASK = {2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


def _guest_rw(vcpu, gva, data, write):
    """libnvmm's read_guest_memory/write_guest_memory: per page, RAM is copied and MMIO goes to the callback."""
    regs = vcpu.paging_regs()
    pos = 0
    while pos < len(data):
        gpa, prot = mmu.gva_to_gpa(vcpu.machine.read_phys, *regs, gva + pos)
        if write and not prot & C.NVMM_PROT_WRITE:
            raise api.nvmm_error(errno.EFAULT, f"gva {gva + pos:#x} is not writable")
        k = min(len(data) - pos, 4096 - (gpa & 0xFFF))
        chunk = data[pos:pos + k]
        area = vcpu.machine._area(gpa)
        if area is None:
            vcpu.cbs.mem(gpa, write, chunk)
        elif write:
            vcpu.machine.gpa_view(gpa, k)[:] = chunk
        else:
            chunk[:] = vcpu.machine.gpa_view(gpa, k)
        pos += k


def assist_io(vcpu):
    ex = vcpu.exit
    if ex.reason != C.NVMM_VCPU_EXIT_IO:
        raise api.nvmm_error(errno.EINVAL, "assist_io after a non-IO exit")
    io = ex.io
    vcpu.getstate(C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_CRS | C.NVMM_X64_STATE_MSRS)
    st = vcpu.state
    gprs = st.gprs
    size, cb = io.operand_size, vcpu.cbs.io
    amask = _MASK[io.address_size]
    cnt = gprs[C.NVMM_X64_GPR_RCX] & amask if io.rep else 1
    if io.rep and cnt == 0:
        gprs[C.NVMM_X64_GPR_RIP] = io.npc
        vcpu.setstate(C.NVMM_X64_STATE_GPRS)
        return
    if not io.str_:
        data = bytearray(size)
        if not io.in_:
            data[:] = (gprs[C.NVMM_X64_GPR_RAX] & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        cb(io.port, io.in_, memoryview(data))
        if io.in_:
            val = int.from_bytes(data, "little")
            if size == 4:
                gprs[C.NVMM_X64_GPR_RAX] = val
            else:
                m = (1 << (8 * size)) - 1
                gprs[C.NVMM_X64_GPR_RAX] = (gprs[C.NVMM_X64_GPR_RAX] & ~m) | val
        gprs[C.NVMM_X64_GPR_RIP] = io.npc
        vcpu.setstate(C.NVMM_X64_STATE_GPRS)
        return
    reg = C.NVMM_X64_GPR_RDI if io.in_ else C.NVMM_X64_GPR_RSI
    gva = gprs[reg] & amask
    seg = io.seg if io.seg != -1 else C.NVMM_X64_SEG_DS
    long_mode = bool(st.msrs[C.NVMM_X64_MSR_EFER] & C.EFER_LMA)
    sel, attrib, limit, base = st.segs[seg].get()
    if long_mode:
        if seg in (C.NVMM_X64_SEG_FS, C.NVMM_X64_SEG_GS):
            gva += base
    else:
        if not attrib & 0x80 or gva + size - 1 > limit:
            raise api.nvmm_error(errno.EFAULT, f"string I/O at {gva:#x} outside its segment")
        gva = (gva + base) & 0xFFFFFFFF
    down = bool(gprs[C.NVMM_X64_GPR_RFLAGS] & C.RFLAGS_DF)
    n = 1 if (down or not io.rep) else max(1, min(cnt * size, C.NVMM_IO_BATCH_SIZE) // size)
    buf = bytearray(n * size)
    mv = memoryview(buf)
    if not io.in_:
        _guest_rw(vcpu, gva, mv, False)
    for i in range(n):
        cb(io.port, io.in_, mv[i * size:(i + 1) * size])
    if io.in_:
        _guest_rw(vcpu, gva, mv, True)
    delta = n * size
    gprs[reg] = (gprs[reg] - delta if down else gprs[reg] + delta) & 0xFFFFFFFFFFFFFFFF
    if io.rep:
        cnt -= n
        gprs[C.NVMM_X64_GPR_RCX] = (gprs[C.NVMM_X64_GPR_RCX] & ~amask) | (cnt & amask)
        if cnt == 0:
            gprs[C.NVMM_X64_GPR_RIP] = io.npc
    else:
        gprs[C.NVMM_X64_GPR_RIP] = io.npc
    vcpu.setstate(C.NVMM_X64_STATE_GPRS)


# -- assist_mem -----------------------------------------------------------------------------------------------------
class _Scratch:
    """Host pages that stand in for MMIO (or read-only RAM) pages during one assisted instruction."""

    def __init__(self):
        self.mm = mmap.mmap(-1, 4096 * SCRATCH_PAGES)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        self.view = memoryview(self.mm)


SCRATCH_PAGES = 4


def map_mmio_page(vcpu, gpa):
    """Maps the page of ``gpa`` over a scratch page whose accesses the assist's memory hooks send to the
    ``mem`` callback, for the single step; True when done."""
    page = gpa & ~0xFFF
    pages = vcpu._assisting
    if page in pages or len(pages) >= SCRATCH_PAGES:
        return False
    area = vcpu.machine._area(page)
    if area is not None and area.prot & C.NVMM_PROT_WRITE:
        return False
    if vcpu._scratch is None:
        vcpu._scratch = _Scratch()
    slot = len(pages)
    view = vcpu._scratch.view[slot * 4096:(slot + 1) * 4096]
    view[:] = vcpu.machine.gpa_view(page, 4096) if area is not None else bytes(4096)
    if area is not None:
        vcpu.uc.mem_unmap(page, 4096)
    vcpu.uc.mem_map_ptr(page, 4096, UC_PROT_READ | UC_PROT_WRITE, vcpu._scratch.addr + slot * 4096)
    pages[page] = (area, view)
    return True


def _read_hook(vcpu):
    def hook(uc, access, address, size, value, _):
        entry = vcpu._assisting.get(address & ~0xFFF)
        if entry is not None and entry[0] is None:
            off = address & 0xFFF
            vcpu.cbs.mem(address, False, entry[1][off:off + size])
    return hook


def _write_hook(vcpu):
    def hook(uc, access, address, size, value, _):
        if (address & ~0xFFF) in vcpu._assisting:
            data = bytearray((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            vcpu.cbs.mem(address, True, memoryview(data))
    return hook


def assist_mem(vcpu):
    ex = vcpu.exit
    if ex.reason != C.NVMM_VCPU_EXIT_MEMORY:
        raise api.nvmm_error(errno.EINVAL, "assist_mem after a non-MEMORY exit")
    _, gpa, prot, _ = vcpu._mem_access
    if prot == C.NVMM_PROT_EXEC:
        raise api.nvmm_error(errno.ENODEV, f"cannot execute from MMIO at gpa {gpa:#x}")
    if vcpu.cbs.mem is None:
        raise api.nvmm_error(errno.EINVAL, "no mem callback configured")
    if vcpu._commit:
        vcpu._commit_state()
    uc = vcpu.uc
    vcpu._assisting = {}
    vcpu._why = None
    hooks = [uc.hook_add(UC_HOOK_MEM_READ, _read_hook(vcpu)), uc.hook_add(UC_HOOK_MEM_WRITE, _write_hook(vcpu))]
    try:
        map_mmio_page(vcpu, gpa)
        try:
            vcpu.step()
        except UcError as exc:
            if vcpu._why is None or vcpu._why[0] != "exc":
                raise api.nvmm_error(errno.ENODEV, f"the instruction at the MEMORY exit failed: {exc}") from None
    finally:
        for h in hooks:
            uc.hook_del(h)
        for page, (area, _) in vcpu._assisting.items():
            uc.mem_unmap(page, 4096)
            if area is not None:
                uc.mem_map_ptr(page, 4096, uc_prot(area.prot), area.hva + (page - area.start))
        vcpu._assisting = None
        vcpu._cached = 0
    why = vcpu._why
    if why is not None and why[0] == "exc":
        _, vector, error, soft, rip = why
        uc.reg_write(X.UC_X86_REG_RIP, rip)
        if not vcpu._deliver(vector, error if vector in C.X86_EXC_HAS_ERROR and not soft else None, soft):
            raise api.nvmm_error(errno.EFAULT, "triple fault while completing the MEMORY exit")
