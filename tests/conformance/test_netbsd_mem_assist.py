"""NetBSD ``tests/lib/libnvmm/h_mem_assist`` as provider-parametrized tests: the 64-bit cases 1-17 and the
16-bit (real mode) cases, each with NetBSD's expected value.

64-bit set-up (NetBSD's ``reset_machine64``/``map_pages64``): long mode (CR0 PG|PE|NE|TS|MP|WP|AM, CR4 PAE,
EFER LME|SCE|LMA), 4 KiB identity paging with L4..L1 at 0x3000..0x6000, code at 0x2000 mapped read+execute,
RIP 0x2000, and GPA 0x1000 an **unmapped MMIO page** backed by the callback's buffer (here ``Guest.mmio``). The
16-bit set-up (``reset_machine16``): real mode, CS base 0, RIP 0x2000, the same MMIO page, no paging.

Each program ends with ``mov $-1,%rcx; rdmsr``; the run completes MEMORY exits with the mem assist and stops at
the RDMSR exit. As NetBSD's ``run_test``, the verdict is the u64 in the (zeroed) MMIO buffer at the case's offset,
and, as its ``mem_callback``, every access must lie inside the MMIO page.

The programs are ours (GNU as, AT&T syntax), with the encoding of each instruction that touches MMIO in a
comment. They use the instruction forms of NetBSD's cases; where a case self-checks (registers that XCHG, LODS,
STOS or MOVS leave, flags after CMP/SUB/TEST) a failed check stores ``0xBAD00 + n`` instead of the expected value,
so a failure names the check that failed.
"""

import pytest

from ops.nvmm import constants as C
from tests.guests.asm import assemble
from tests.guests.harness import CODE, PAGE

MMIO = 0x1000
END64 = """
    movq    $-1,%rcx
    rdmsr
"""
END16 = """
    movl    $-1,%ecx
    rdmsr
"""


def _fail64(n):
    return f"""
.Lfail{n}:
    movq    $0x1000,%rdi
    movq    ${0xBAD00 + n:#x},(%rdi)
""" + END64


# --- 64-bit cases ------------------------------------------------------------------------------------------------

T1_MOV = """
    movq    $0x1000,%rsi
    movq    $0x1000,%rdx
    movq    %rdx,(%rsi)                 # 48 89 16            MOV r->m
    movq    $1,%r11
    movq    $0x2000,(%rsi,%r11,8)       # 4a c7 04 de imm32   MOV imm->m, SIB with REX.X index
    movq    (%rsi),%r9                  # 4c 8b 0e            MOV m->r, REX.R
    movq    8(%rsi),%r10                # 4c 8b 56 08         disp8
    addq    %r10,%r9
    movq    %r9,(%rsi)                  # 4c 89 0e
    movb    $4,(%rsi)                   # c6 06 04            MOV imm8->m8
""" + END64

T2_OR = """
    movq    $0x1000,%rdi
    movq    $0x1000,(%rdi)              # 48 c7 07 imm32
    movb    $0xF0,%dl
    orb     %dl,(%rdi)                  # 08 17               OR r8->m8     0x10F0
    orb     $0x0F,(%rdi)                # 80 0f 0f            OR imm8->m8   0x10FF
    movw    $0x0400,%cx
    orw     %cx,(%rdi)                  # 66 09 0f            OR r16->m16   0x14FF
    movq    $0x0200,%r8
    orq     (%rdi),%r8                  # 4c 0b 07            OR m64->r64   0x16FF
    movq    %r8,(%rdi)
""" + END64

T3_AND = """
    movq    $0x1000,%rdi
    movq    $0x1FFF,(%rdi)
    movq    $-16,%rbx
    andq    %rbx,(%rdi)                 # 48 21 1f            AND r64->m64  0x1FF0
    movb    $0xCF,%cl
    andb    %cl,(%rdi)                  # 20 0f               AND r8->m8    0x1FC0
    andw    $0x1FCF,(%rdi)              # 66 81 27 cf 1f      AND imm16->m16
    movq    $-1,%rax
    andq    (%rdi),%rax                 # 48 23 07            AND m64->r64
    movq    %rax,(%rdi)
""" + END64

T4_XOR = """
    movq    $0x1000,%rdi
    movq    $0x1FFF,(%rdi)
    movq    $0x0FF0,%rbx
    xorq    %rbx,(%rdi)                 # 48 31 1f            XOR r64->m64  0x100F
    xorb    $0xC0,(%rdi)                # 80 37 c0            XOR imm8->m8  0x10CF
    xorl    %eax,%eax
    xorq    (%rdi),%rax                 # 48 33 07            XOR m64->r64
    movq    %rax,(%rdi)
""" + END64

T5_ADDRESS_SIZES = """
    movq    $0xFFFFFFFF00001000,%rax    # only EAX counts with a 0x67 prefix
    movq    $0xFFFFFFFF00000000,%rbx
    movq    $0x1FFF,(%eax)              # 67 48 c7 00 ff 1f 00 00
    movb    $0,(%eax,%ebx,1)            # 67 c6 04 18 00      32-bit SIB
""" + END64

T6_DMO = """
    movq    $0xFFA0,%rax
    movabs  %rax,0x1000                 # 48 a3 <moffs64>     MOV RAX->moffs
    xorl    %eax,%eax
    movabs  0x1000,%al                  # a0 <moffs64>        MOV moffs->AL
    orb     $0x0B,%al
    movabs  %al,0x1000                  # a2 <moffs64>        MOV AL->moffs
    movabs  0x1000,%rax                 # 48 a1 <moffs64>     MOV moffs->RAX
    cmpq    $0xFFAB,%rax
    jne     .Lfail1
""" + END64 + _fail64(1)

T7_STOS = """
    movq    $0x1000,%rdi
    movq    $0x56,%rax
    movq    $1,%rcx
    rep stosb                           # f3 aa
    movq    $0x1234,%rax
    stosw                               # 66 ab
    testq   %rcx,%rcx
    jnz     .Lfail1
    cmpq    $0x1003,%rdi
    jne     .Lfail2
""" + END64 + _fail64(1) + _fail64(2)

T8_LODS = """
    movq    $0x1008,%rsi
    movl    $0x12345678,(%rsi)          # c7 06 imm32
    movq    $0x1000,%rdi
    lodsb                               # ac                  0x78
    movb    %al,(%rdi)
    lodsb                               # ac                  0x56
    movb    %al,1(%rdi)
    lodsw                               # 66 ad               0x1234
    movw    %ax,2(%rdi)                 # 66 89 47 02
    cmpq    $0x100C,%rsi
    jne     .Lfail1
""" + END64 + _fail64(1)

T9_MOVS = """
    movq    $0x1000,%rdx
    movl    $-1,4(%rdx)                 # bytes 4-7 must be overwritten by the MOVSW
    movq    $0x12345678,8(%rdx)
    movq    $0x1008,%rsi
    movq    $0x1000,%rdi
    movq    $4,%rcx
    rep movsb                           # f3 a4               MMIO -> MMIO, x4
    movq    $2,%rcx
    rep movsw                           # 66 f3 a5            x2 (zeros)
    cmpq    $0x1010,%rsi
    jne     .Lfail1
    cmpq    $0x1008,%rdi
    jne     .Lfail2
""" + END64 + _fail64(1) + _fail64(2)

T10_MOVZXB = """
    movq    $0x1000,%rdi
    movq    $0x12345678,(%rdi)
    movq    $-1,%r9
    movzbl  (%rdi),%r9d                 # 44 0f b6 0f
    movq    %r9,(%rdi)
""" + END64

T11_MOVZXW = """
    movq    $0x1000,%rdi
    movq    $0x12345678,(%rdi)
    movq    $-1,%r10
    movzwq  (%rdi),%r10                 # 4c 0f b7 17
    movq    %r10,(%rdi)
""" + END64

T12_CMP = """
    movq    $0x1000,%rdi
    movq    $0xFFFFFFFF8D3CA5F0,(%rdi)  # 48 c7 07 f0 a5 3c 8d

    cmpb    $0xF0,(%rdi)                # 80 3f f0            CMP imm8,m8
    jne     .Lfail1
    cmpb    $0xEF,(%rdi)
    jl      .Lfail2
    cmpb    $0xF1,(%rdi)
    jg      .Lfail3
    cmpb    $0x10,(%rdi)                # signed -16 < 16, unsigned 0xF0 > 0x10
    jge     .Lfail4
    jbe     .Lfail4

    cmpw    $0xA5F0,(%rdi)              # 66 81 3f f0 a5      CMP imm16,m16
    jne     .Lfail5
    cmpw    $0xA5EF,(%rdi)
    jl      .Lfail6
    cmpw    $0xA5F1,(%rdi)
    jg      .Lfail7

    cmpl    $0x8D3CA5F0,(%rdi)          # 81 3f f0 a5 3c 8d   CMP imm32,m32
    jne     .Lfail8
    cmpl    $0x8D3CA5EF,(%rdi)
    jl      .Lfail9
    cmpl    $0x8D3CA5F1,(%rdi)
    jg      .Lfail10

    cmpq    $0xFFFFFFFF8D3CA5F0,(%rdi)  # 48 81 3f f0 a5 3c 8d  CMP simm32,m64
    jne     .Lfail11
    cmpq    $0xFFFFFFFF8D3CA5EF,(%rdi)
    jl      .Lfail12
    cmpq    $0xFFFFFFFF8D3CA5F1,(%rdi)
    jg      .Lfail13
    cmpq    $-1,(%rdi)                  # 48 83 3f ff         CMP simm8,m64
    jge     .Lfail14

    movq    $1,(%rdi)
""" + END64 + "".join(_fail64(n) for n in range(1, 15))

T13_SUB = """
    movq    $0x1000,%rdi
    movq    $0x3000C1FF,(%rdi)
    movb    $0xFF,%dl
    subb    %dl,(%rdi)                  # 28 17               SUB r8->m8    0x3000C100
    jnz     .Lfail1
    movw    $0x2100,%r8w
    subw    %r8w,(%rdi)                 # 66 44 29 07         SUB r16->m16  0x3000A000
    jc      .Lfail2
    movq    $0xF300140FF,%r9
    subq    (%rdi),%r9                  # 4c 2b 0f            SUB m64->r64  0xF0000A0FF
    movq    %r9,(%rdi)
""" + END64 + _fail64(1) + _fail64(2)

T14_TEST = """
    movq    $0x1000,%rdi
    movl    $0x8000C30F,(%rdi)
    movl    $0,4(%rdi)
    testb   $0x0F,(%rdi)                # f6 07 0f            TEST imm8,m8
    jz      .Lfail1
    testb   $0xF0,(%rdi)
    jnz     .Lfail2
    testw   $0x3C00,(%rdi)              # 66 f7 07 00 3c      TEST imm16,m16
    jnz     .Lfail3
    testw   $0x8000,(%rdi)
    jns     .Lfail4
    testl   $0x80000000,(%rdi)          # f7 07 00 00 00 80   TEST imm32,m32
    jns     .Lfail5
    testq   $-1,(%rdi)                  # 48 f7 07 ff ff ff ff
    jz      .Lfail6
    js      .Lfail6
    movq    $1,(%rdi)
""" + END64 + "".join(_fail64(n) for n in range(1, 7))

T15_XCHG = """
    movq    $0x1000,%rdi
    movq    $0x11,(%rdi)
    movq    $0x120099,%rcx
    xchgq   %rcx,(%rdi)                 # 48 87 0f            0x120099, RCX = 0x11
    movw    $0x3499,%dx
    xchgw   %dx,(%rdi)                  # 66 87 17            0x123499, DX = 0x0099
    movw    $0x5600,%bx
    xchgb   %bh,(%rdi)                  # 86 3f               0x123456, BH = 0x99
    cmpq    $0x11,%rcx
    jne     .Lfail1
    cmpw    $0x0099,%dx
    jne     .Lfail2
    cmpw    $0x9900,%bx
    jne     .Lfail3
""" + END64 + "".join(_fail64(n) for n in range(1, 4))

T16_XCHG_ADDR32 = """
    movl    $0x1000,%edi
    movq    $0xAA,(%rdi)
    movq    $0xFFFFFFFF00001000,%rax    # only EAX counts with a 0x67 prefix
    movq    $0x123456,%rcx
    xchgq   %rcx,(%eax)                 # 67 48 87 08
    cmpq    $0xAA,%rcx
    jne     .Lfail1
""" + END64 + _fail64(1)

T17_CMPS = """
    movq    $0x1000,%rbx
    movq    $0x8877665544332211,%rax
    movq    %rax,0x10(%rbx)
    movq    %rax,0x20(%rbx)
    movq    $0x1010,%rsi
    movq    $0x1020,%rdi
    cmpsq                               # 48 a7               MMIO vs MMIO
    jne     .Lfail1
    movq    $0x1010,%rsi
    movq    $0x1020,%rdi
    cmpsb                               # a6
    jne     .Lfail2
    cmpsw                               # 66 a7
    jne     .Lfail3
    cmpsl                               # a7
    jne     .Lfail4
    movb    $0x99,0x21(%rbx)
    movq    $0x1010,%rsi
    movq    $0x1020,%rdi
    cmpsw                               # 0x2211 - 0x9911: not equal, borrow
    je      .Lfail5
    jae     .Lfail5
    cmpq    $0x1012,%rsi
    jne     .Lfail6
    cmpq    $0x1022,%rdi
    jne     .Lfail6
    movq    $1,(%rbx)
""" + END64 + "".join(_fail64(n) for n in range(1, 7))

CASES64 = [
    ("test1-MOV", T1_MOV, 0x3004),
    ("test2-OR", T2_OR, 0x16FF),
    ("test3-AND", T3_AND, 0x1FC0),
    ("test4-XOR", T4_XOR, 0x10CF),
    ("test5-address-sizes", T5_ADDRESS_SIZES, 0x1F00),
    ("test6-DMO", T6_DMO, 0xFFAB),
    ("test7-STOS", T7_STOS, 0x00123456),
    ("test8-LODS", T8_LODS, 0x12345678),
    ("test9-MOVS", T9_MOVS, 0x12345678),
    ("test10-MOVZXB", T10_MOVZXB, 0x78),
    ("test11-MOVZXW", T11_MOVZXW, 0x5678),
    ("test12-CMP", T12_CMP, 0x1),
    ("test13-SUB", T13_SUB, 0x0000000F0000A0FF),
    ("test14-TEST", T14_TEST, 0x1),
    ("test15-XCHG", T15_XCHG, 0x123456),
    ("test16-XCHG-addr32", T16_XCHG_ADDR32, 0x123456),
    ("test17-CMPS", T17_CMPS, 0x1),     # NetBSD-current's h_mem_assist.c (2020-12); not in NetBSD 9
]

# --- 16-bit (real mode) cases: (name, program, expected, GPA checked) --------------------------------------------

T16_1_MOV_SINGLE = """
    movw    $0x10F1,%bx
    movb    $0x23,%dl
    movb    %dl,(%bx)                   # 88 17               [BX]
""" + END16

T16_2_MOV_DUAL = """
    movw    $0x1000,%bx
    movw    $0xF3,%di
    movw    $0x123,%cx
    movw    %cx,(%bx,%di)               # 89 09               [BX+DI]
""" + END16

T16_3_MOV_DUAL_DISP = """
    movw    $0x1000,%bp
    movw    $0xF3,%si
    movw    $0x678,%ax
    movw    %ax,-2(%bp,%si)             # 89 42 fe            [BP+SI+disp8], SS segment
""" + END16

T16_4_MIXED = """
    movl    $0x10F6,%ebx
    movl    $0xAABBCCDD,%ecx
    movl    %ecx,(%bx)                  # 66 89 0f            32-bit operand, 16-bit address
    movw    $0x1011,%ax
    movw    %ax,(%ebx)                  # 67 89 03            16-bit operand, 32-bit address  0xAABB1011
    movl    (%ebx),%edx                 # 67 66 8b 13         32-bit operand, 32-bit address
    andl    $0xFFFF,%edx
    movl    %edx,(%ebx)                 # 67 66 89 13                                         0x00001011
""" + END16

T16_5_DISP16 = """
    movb    $0x12,%cl
    movb    %cl,0x1234                  # 88 0e 34 12         mod 00 r/m 110: disp16 only
""" + END16

T16_6_XCHG = """
    movw    $0x1234,%si
    movw    $0xBEEF,%ax
    movw    %ax,(%si)
    movw    $0x1234,%dx
    xchgw   %dx,(%si)                   # 87 14
    cmpw    $0xBEEF,%dx
    je      .Lok
    movw    $0x0BAD,(%si)
.Lok:
""" + END16

CASES16 = [
    ("16bit-test1-MOV-single", T16_1_MOV_SINGLE, 0x023, 0x10F1),
    ("16bit-test2-MOV-dual", T16_2_MOV_DUAL, 0x123, 0x10F3),
    ("16bit-test3-MOV-dual+disp", T16_3_MOV_DUAL_DISP, 0x678, 0x10F1),
    ("16bit-test4-mixed", T16_4_MIXED, 0x1011, 0x10F6),
    ("16bit-test5-disp16-only", T16_5_DISP16, 0x12, 0x1234),
    ("16bit-test6-XCHG", T16_6_XCHG, 0x1234, 0x1234),
]


def _guest(guest_factory):
    # RAM everywhere but the MMIO page; the code page is read+execute only, as NetBSD maps it.
    return guest_factory(holes=[(MMIO, MMIO + PAGE)], readonly=[(CODE, CODE + PAGE)])


def _run_and_check(g, expected, gpa):
    ex = g.run(until=(C.NVMM_VCPU_EXIT_RDMSR,))
    assert ex.reason == C.NVMM_VCPU_EXIT_RDMSR, \
        f"stopped on exit {C.EXIT_NAMES.get(ex.reason, ex.reason)} instead of the final RDMSR; mem_log={g.mem_log}"
    assert g.mem_log, "no MEMORY exit: the MMIO page was not treated as MMIO"
    # NetBSD's mem_callback: "Out of page" for any access outside [0x1000, 0x2000).
    for a, _, data in g.mem_log:
        assert MMIO <= a and a + len(data) <= MMIO + PAGE, f"MMIO access outside the page: {a:#x}+{len(data)}"
    off = gpa - MMIO
    got = int.from_bytes(g.mmio[off:off + 8], "little")
    assert got == expected, f"wanted {expected:#x} at {gpa:#x}, got {got:#x}; mem_log={g.mem_log}"


@pytest.mark.parametrize("name,source,expected", CASES64, ids=[c[0] for c in CASES64])
def test_mem_assist_64bit(guest_factory, name, source, expected):
    g = _guest(guest_factory)
    g.load(CODE, assemble(".code64\n" + source, CODE))
    g.setup_long64(CODE)          # 4 KiB identity paging, the MMIO page mapped in the guest's page tables
    _run_and_check(g, expected, MMIO)


@pytest.mark.parametrize("name,source,expected,gpa", CASES16, ids=[c[0] for c in CASES16])
def test_mem_assist_16bit(guest_factory, name, source, expected, gpa):
    g = _guest(guest_factory)
    g.load(CODE, assemble(".code16\n" + source, CODE))
    g.setup_real(CODE)            # CS base 0, RIP 0x2000, no paging
    _run_and_check(g, expected, gpa)
