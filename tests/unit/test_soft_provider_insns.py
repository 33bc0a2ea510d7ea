"""The soft provider's instruction handling that issue 24 fixed, pinned where the conformance guests cannot see it:
the decoder's new kinds, the CPUID cut of the XSAVE leaf, exits from a code segment whose base is not 0, the
single-step trap after an OUT the VMM completes, CR8 with and without NVMM_VCPU_CONF_TPR, XCR0 in the NVMM
state, and the checks for instructions the code hook takes from unicorn at CPL 3 (HLT, RDMSR, I/O with the
TSS's I/O permission bitmap)."""

import struct

import pytest

from ops.nvmm import api
from ops.nvmm import constants as C
from tests.guests.asm import assemble

pytest.importorskip("unicorn")

from ops.nvmm.soft import cpuid as SC  # noqa: E402
from ops.nvmm.soft import hooks as H  # noqa: E402

RIP, RSP, RFLAGS = C.NVMM_X64_GPR_RIP, C.NVMM_X64_GPR_RSP, C.NVMM_X64_GPR_RFLAGS
CODE, HANDLER, TSS = 0x2000, 0x9000, 0xA000
STACK0 = 0x1F0000
DR6_BS = 1 << 14
PTE_U = 4



@pytest.mark.parametrize("code, mode64, kind, extra", [
    ("440f22c0", True, H.MOV_CR8, {"in_": False, "reg": 0}),          # mov %rax, %cr8
    ("440f20c3", True, H.MOV_CR8, {"in_": True, "reg": 3}),           # mov %cr8, %rbx
    ("450f22c1", True, H.MOV_CR8, {"in_": False, "reg": 9}),          # mov %r9, %cr8
    ("0f22c0", True, None, {}),                                       # mov %rax, %cr0: unicorn's
    ("0f05", True, H.SYSCALL, {}), ("0f34", False, H.SYSENTER, {}), ("0f01d1", True, H.XSETBV, {}),
    ("c5f1efd0", True, H.VEX, {}),                                    # vpxor %xmm0, %xmm1, %xmm2
    ("c4e278f2c8", True, None, {}),                                   # andn (BMI1): emulated
    ("c4e279f7c3", True, None, {}),                                   # shlx (BMI2)
    ("c406", False, None, {}),                                        # les (%esi), %eax
])
def test_decode_kinds(code, mode64, kind, extra):
    insn = H.decode(bytes.fromhex(code), mode64, True)
    if kind is None:
        assert insn is None
    else:
        assert insn.kind == kind and all(getattr(insn, k) == v for k, v in extra.items())


def test_xsave_leaf_offers_only_x87_and_sse():
    a, b, c, d = SC.filter_cpuid(0xD, [0x7, 0x340, 0x340, 0], 0, {}, subleaf=0)
    assert (a, b, c, d) == (SC.XCR0_SUPPORTED, SC.XSAVE_LEGACY_SIZE, SC.XSAVE_LEGACY_SIZE, 0)
    assert SC.filter_cpuid(0xD, [0x100, 0x240, 0, 0], 0, {}, subleaf=2) == [0, 0, 0, 0]


def test_exits_from_a_code_segment_based_above_zero(soft_guest):
    """A real-mode CS of 0800h (an AP after its SIPI): npc and the RIP after HLT are offsets from CS.base."""
    g = soft_guest()
    g.load(0x8000, assemble(".code16\nnop\nout %al, $0x80\nhlt\n", 0))
    g.setup_real(0, cs_base=0x8000)
    v = g.vcpu
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.npc == 3
    v.assist_io()
    assert v.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.gpr(RIP) == 4


def _long_with_handler(g, code, vector, handler):
    g.load(CODE, assemble(".code64\n" + code, CODE))
    g.load(HANDLER, assemble(".code64\n" + handler, HANDLER))
    g.setup_long64(CODE)
    g.setup_idt64({vector: HANDLER})


def test_single_step_trap_after_an_out_the_vmm_completed(soft_guest):
    g = soft_guest()
    _long_with_handler(g, "out %al, $0x80\nnop\nhlt\n", C.X86_EXC_DB, "mov %dr6, %rax\nout %al, $0x81\nhlt\n")
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[RFLAGS] |= C.RFLAGS_TF
    v.setstate(C.NVMM_X64_STATE_GPRS)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x80
    v.assist_io()
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x81, "no #DB after the OUT"
    rip, _, rflags = struct.unpack("<3Q", g.read(STACK0 - 40, 24))
    assert rip == CODE + 2 and rflags & C.RFLAGS_TF
    assert g.gpr(C.NVMM_X64_GPR_RAX) & DR6_BS


def test_cr8_is_kept_and_tpr_changed_exits_when_configured(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(".code64\nmov %cr8, %rbx\nmov $9, %eax\nmov %rax, %cr8\nmov $2, %eax\n"
                          "mov %rax, %cr8\nhlt\n", CODE))
    g.setup_long64(CODE)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_CRS)
    v.state.crs[C.NVMM_X64_CR_CR8] = 5
    v.setstate(C.NVMM_X64_STATE_CRS)
    v.configure(C.NVMM_VCPU_CONF_TPR, api.ConfTpr(exit_changed=True))
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_TPR_CHANGED and ex.exitstate.cr8 == 9
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 5
    v.configure(C.NVMM_VCPU_CONF_TPR, api.ConfTpr(exit_changed=False))
    assert v.run().reason == C.NVMM_VCPU_EXIT_HALTED
    v.getstate(C.NVMM_X64_STATE_CRS)
    assert v.state.crs[C.NVMM_X64_CR_CR8] == 2


def test_xcr0_follows_the_state_and_xsetbv_refuses_avx(soft_guest):
    g = soft_guest()
    _long_with_handler(g, "xor %ecx, %ecx\nxgetbv\nmov %eax, %ebx\nmov $7, %eax\nxor %edx, %edx\nxsetbv\nhlt\n",
                       C.X86_EXC_GP, "out %al, $0x82\nhlt\n")
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_CRS)
    v.state.crs[C.NVMM_X64_CR_CR4] |= 1 << 18         # OSXSAVE
    v.state.crs[C.NVMM_X64_CR_XCR0] = 3
    v.setstate(C.NVMM_X64_STATE_CRS)
    ex = v.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x82, "XSETBV took the AVX state"
    assert g.gpr(C.NVMM_X64_GPR_RBX) == 3
    v.getstate(C.NVMM_X64_STATE_CRS)
    assert v.state.crs[C.NVMM_X64_CR_XCR0] == 3


def _ring3(g, code, iopl=0, iomap=None):
    """Long mode at CPL 3 (user pages, user CS/SS in the state), #GP to an OUT to port 0x93 in ring 0, and a
    TSS whose RSP0 is the kernel stack; ``iomap``: the I/O permission bitmap's bytes for ports 0-63."""
    _long_with_handler(g, code, C.X86_EXC_GP, "out %al, $0x93\nhlt\n")
    for off in (0x3000, 0x4000, 0x5000):                # PML4, PDPT, PD
        g.load(off, struct.pack("<Q", g.u64(off) | PTE_U))
    for i in range(512):
        g.load(0x6000 + 8 * i, struct.pack("<Q", g.u64(0x6000 + 8 * i) | PTE_U))
    g.load(TSS + 4, struct.pack("<Q", STACK0))
    g.load(TSS + 0x66, struct.pack("<H", 0x68))        # the bitmap after the TSS, inside its limit or not
    limit = 0x67
    if iomap is not None:
        g.load(TSS + 0x68, bytes(iomap) + b"\xff")
        limit = 0x68 + len(iomap)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_ALL)
    s = v.state
    s.segs[C.NVMM_X64_SEG_CS].set(0x2B, 0xB | 0x10 | 0x60 | 0x80 | 0x200 | 0x800, 0xFFFFFFFF, 0)
    s.segs[C.NVMM_X64_SEG_SS].set(0x23, 0x3 | 0x10 | 0x60 | 0x80 | 0x400 | 0x800, 0xFFFFFFFF, 0)
    s.segs[C.NVMM_X64_SEG_TR].set(0x30, 0x8B, limit, TSS)
    s.gprs[RFLAGS] = C.RFLAGS_RESERVED1 | iopl << 12
    s.gprs[RSP] = 0x100000
    v.setstate(C.NVMM_X64_STATE_ALL)


@pytest.mark.parametrize("insn", ["hlt", "mov $0x10, %ecx\nrdmsr", "mov $0x1b, %ecx\nrdmsr", "in $0x60, %al",
                                  "mov %rax, %cr8"])
def test_ring3_privileged_instructions_are_gp(soft_guest, insn):
    g = soft_guest()
    _ring3(g, insn + "\nhlt\n")
    ex = g.vcpu.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO and ex.io.port == 0x93, C.EXIT_NAMES.get(ex.reason)


@pytest.mark.parametrize("iopl, iomap, allowed", [(3, None, True), (0, [0] * 8, True), (0, [0] * 7 + [1], False),
                                                  (0, [0] * 4, False)])
def test_ring3_io_follows_iopl_and_the_io_bitmap(soft_guest, iopl, iomap, allowed):
    g = soft_guest()
    _ring3(g, "in $0x38, %al\nhlt\n", iopl, iomap)
    ex = g.vcpu.run()
    assert ex.reason == C.NVMM_VCPU_EXIT_IO
    assert ex.io.port == (0x38 if allowed else 0x93)
