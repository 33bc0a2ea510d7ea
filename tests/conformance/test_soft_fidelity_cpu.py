"""The soft CPU as the regression baseline (issue 24), instruction set: a CPU emulates what its CPUID offers or
does not offer it, on every provider. SYSCALL/SYSRET and SYSENTER through their MSRs (Intel SDM vol. 2B), RDTSCP
and IA32_TSC_AUX, the XSAVE state components and AVX (vol. 1 13.2), and one instruction for each feature flag of
CPUID leaves 1, 7 and 0x80000001 that a guest can test from ring 3. The rest is in ``test_soft_fidelity.py``.

kvm_pvm runs guest supervisor code in an instruction emulator of its own and takes SYSCALL for its switcher, so
the tests that need those in ring 0 say so and are skipped there."""

import struct

import pytest

from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT

RESULT = 0x8800
UD, GP = 6, 13
FAULT_SLOT = RESULT + 0x7C       # the vector of an unexpected exception
USER_STACK, KERNEL_STACK = 0x9800, 0xA800


def results(vm, n):
    return struct.unpack_from(f"<{n}I", vm.view(RESULT, 4 * n))


def needs_ring0(provider, what):
    if getattr(provider, "kind", None) == "kvm_pvm":
        pytest.skip(f"kvm_pvm's supervisor-mode emulator has no {what}")


def unexpected(vectors):
    """Gates for ``vectors`` whose handlers record the vector at FAULT_SLOT and halt."""
    gates = "".join(gate(v, f"unexpected{v}") for v in vectors)
    handlers = "".join(f"unexpected{v}:\n  movl ${v}, {FAULT_SLOT}\n  cli\n  hlt\n" for v in vectors)
    return gates, handlers


# Ring 3 on boot64's tables: user pages (U in the PML4, PDPT and the first GiB's PDEs), user segments, a 64-bit
# TSS whose RSP0 takes exceptions from ring 3, and an IRETQ to label ``user``.
RING3_GDT = """
.align 16
gdt:
  .quad 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF  # 0x08 kernel code, 0x10 kernel data
  .quad 0x00CFFA000000FFFF, 0x00CFF2000000FFFF      # 0x18 user code32, 0x20 user data
  .quad 0x00AFFA000000FFFF                           # 0x28 user code64
  .quad 0x0000890000000067, 0                        # 0x30 TSS
gdtr:
  .word 63
  .quad gdt
.align 16
tss:
  .skip 104
"""
TO_RING3 = f"""
  lgdt gdtr
  orq $4, 0x1000
  orq $4, 0x2000
  mov $0x3000, %edi
  mov $512, %ecx
1: orq $4, (%rdi)
  add $8, %rdi
  loop 1b
  mov %cr3, %rax
  mov %rax, %cr3
  mov $tss, %eax
  mov %ax, gdt + 0x32
  shr $16, %eax
  mov %al, gdt + 0x34
  mov $0x30, %ax
  ltr %ax
  movq ${KERNEL_STACK}, tss + 4
  pushq $0x23
  pushq ${USER_STACK}
  pushq $0x202
  pushq $0x2b
  pushq $user
  iretq
"""

MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_FMASK = 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000084
MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP = 0x174, 0x175, 0x176
SYSENTER_STACK = 0xB000


def wrmsr(msr, value):
    return f"  mov ${msr}, %ecx\n  mov ${value & 0xFFFFFFFF}, %eax\n  mov ${value >> 32}, %edx\n  wrmsr\n"


def test_syscall_sysret_and_sysenter(provider, make_vm):
    needs_ring0(provider, "SYSCALL/SYSRET of its own (PVM uses SYSCALL for its world switch)")
    vm = make_vm()
    gates, handlers = unexpected(range(32))
    sym = boot64(vm, gates + "  lidt idtr\n" + f"""
  mov ${MSR_EFER}, %ecx
  rdmsr
  or $1, %eax                    # EFER.SCE
  wrmsr
""" + wrmsr(MSR_STAR, (0x18 << 48) | (0x08 << 32)) + wrmsr(MSR_LSTAR, 0) + wrmsr(MSR_FMASK, 0x200) +
        wrmsr(MSR_SYSENTER_CS, 0x08) + wrmsr(MSR_SYSENTER_ESP, SYSENTER_STACK) + wrmsr(MSR_SYSENTER_EIP, 0) + f"""
  mov $syscall_entry, %eax
  mov ${MSR_LSTAR}, %ecx
  xor %edx, %edx
  wrmsr
  mov $sysenter_entry, %eax
  mov ${MSR_SYSENTER_EIP}, %ecx
  wrmsr
""" + TO_RING3 + f"""
.globl user, after_syscall
user:
  mov %cs, %eax
  mov %eax, {RESULT}
  syscall
after_syscall:
  mov %cs, %eax                  # back from SYSRETQ
  mov %eax, {RESULT + 20}
  mov %ss, %eax
  mov %eax, {RESULT + 24}
  sysenter
syscall_entry:
  mov %cs, %eax
  mov %eax, {RESULT + 4}
  mov %ss, %eax
  mov %eax, {RESULT + 8}
  mov %ecx, {RESULT + 12}
  pushfq
  pop %rax
  mov %eax, {RESULT + 16}        # RFLAGS here: IF masked by IA32_FMASK
  mov %r11d, {RESULT + 28}       # the user's RFLAGS
  sysretq
sysenter_entry:
  mov %cs, %eax
  mov %eax, {RESULT + 32}
  mov %ss, %eax
  mov %eax, {RESULT + 36}
  mov %esp, {RESULT + 40}
  movl $1, {RESULT + 44}
  cli
  hlt
""" + handlers + idt(32) + RING3_GDT)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    r = results(vm, 12)
    fault = results(vm, 32)[31]
    assert fault == 0, f"exception {fault}"
    user_cs, k_cs, k_ss, rcx, k_flags, back_cs, back_ss, r11, se_cs, se_ss, se_esp, done = r
    assert user_cs == 0x2B
    assert (k_cs, k_ss, rcx) == (0x08, 0x10, sym["after_syscall"])
    assert not k_flags & 0x200 and r11 & 0x200
    assert (back_cs, back_ss) == (0x2B, 0x23)
    assert (se_cs, se_ss, se_esp, done) == (0x08, 0x10, SYSENTER_STACK, 1)


MSR_TSC_AUX = 0xC0000103
CPUID_RDTSCP = 1 << 27           # CPUID.80000001H:EDX


def test_tsc_aux_follows_rdtscp_in_cpuid(make_vm):
    """Offered RDTSCP: IA32_TSC_AUX is writable and RDTSCP returns it in ECX. Not offered: the WRMSR is #GP."""
    vm = make_vm()
    gates, handlers = unexpected([v for v in range(32) if v != GP])
    boot64(vm, gates + gate(GP, "gp") + "  lidt idtr\n" + f"""
  mov $0x80000001, %eax
  cpuid
  mov %edx, {RESULT}
  mov ${MSR_TSC_AUX}, %ecx
  mov $0x2a5, %eax
  xor %edx, %edx
  wrmsr
  movl $1, {RESULT + 4}          # the write was taken
  mov ${MSR_TSC_AUX}, %ecx
  rdmsr
  mov %eax, {RESULT + 8}
  testl ${CPUID_RDTSCP}, {RESULT}
  jz done
  xor %ecx, %ecx
  rdtscp
  mov %ecx, {RESULT + 12}
done:
  cli
  hlt
gp:
  movl $2, {RESULT + 4}
  cli
  hlt
""" + handlers + idt(32))
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    edx, written, readback, rdtscp_ecx = results(vm, 4)
    assert results(vm, 32)[31] == 0
    if edx & CPUID_RDTSCP:
        assert written == 1, "CPUID offers RDTSCP but IA32_TSC_AUX cannot be written"
        assert (readback, rdtscp_ecx) == (0x2A5, 0x2A5)
    else:
        assert written == 2, "IA32_TSC_AUX is writable but CPUID does not offer RDTSCP"


XCR0_X87, XCR0_SSE, XCR0_YMM = 1, 2, 4
CPUID_1_XSAVE, CPUID_1_AVX = 1 << 26, 1 << 28
CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_OSXSAVE = 1 << 9, 1 << 10, 1 << 18


def test_xsave_components_and_avx_agree_with_cpuid(provider, make_vm):
    """Every XCR0 bit CPUID.(EAX=0DH,ECX=0):EAX offers can be set with XSETBV; the AVX state is offered with AVX;
    with AVX a VEX.128 VPXOR computes its three-operand result, without AVX it is #UD (vol. 2A 2.3.12)."""
    needs_ring0(provider, "XSETBV")
    vm = make_vm()
    gates, handlers = unexpected([v for v in range(32) if v not in (UD, GP)])
    boot64(vm, gates + gate(UD, "ud") + gate(GP, "gp") + "  lidt idtr\n" + f"""
  mov $1, %eax
  cpuid
  mov %ecx, {RESULT}
  test ${CPUID_1_XSAVE}, %ecx
  jz done
  mov $0xd, %eax
  xor %ecx, %ecx
  cpuid
  mov %eax, {RESULT + 4}
  mov %cr4, %rcx
  or ${CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE}, %ecx
  mov %rcx, %cr4
  and ${XCR0_X87 | XCR0_SSE | XCR0_YMM}, %eax
  xor %edx, %edx
  xor %ecx, %ecx
  xsetbv
  movl $1, {RESULT + 8}          # XSETBV took what CPUID offers
  mov $0x0f0f0f0f, %eax
  movd %eax, %xmm0
  mov $0x00ff00ff, %eax
  movd %eax, %xmm1
  pxor %xmm2, %xmm2
  movl $1, {RESULT + 12}         # 1: VEX executed, 2: #UD
  vpxor %xmm0, %xmm1, %xmm2
  movd %xmm2, {RESULT + 16}
done:
  cli
  hlt
ud:
  movl $2, {RESULT + 12}
  cli
  hlt
gp:
  movl $2, {RESULT + 8}
  cli
  hlt
""" + handlers + idt(32))
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    ecx1, xcr0_offered, xsetbv, vex, xmm2 = results(vm, 5)
    assert results(vm, 32)[31] == 0
    if not ecx1 & CPUID_1_XSAVE:
        return
    assert xsetbv == 1, f"XSETBV refused the XCR0 bits CPUID offers ({xcr0_offered:#x})"
    assert bool(xcr0_offered & XCR0_YMM) == bool(ecx1 & CPUID_1_AVX), \
        f"CPUID.1:ECX.AVX={bool(ecx1 & CPUID_1_AVX)} but CPUID.0DH offers XCR0 {xcr0_offered:#x}"
    if ecx1 & CPUID_1_AVX:
        assert (vex, xmm2) == (1, 0x0FF00FF0), "CPUID offers AVX but VPXOR does not compute"
    else:
        assert vex == 2, "VEX-encoded VPXOR ran although CPUID does not offer AVX"


#: (leaf, register index in EAX EBX ECX EDX, bit, an instruction of the feature that ring 3 may run); features
#: that need XCR0 state (AVX and its family) are the test above's.
FEATURES = (
    (1, 3, 4, "rdtsc"), (1, 3, 8, "cmpxchg8b (%rsp)"), (1, 3, 15, "cmovz %eax, %ebx"),
    (1, 3, 19, "clflush (%rsp)"), (1, 3, 23, "pxor %mm0, %mm1\n  emms"), (1, 3, 25, "xorps %xmm0, %xmm1"),
    (1, 3, 26, "paddq %xmm0, %xmm1"), (1, 2, 0, "addsubpd %xmm0, %xmm1"),
    (1, 2, 1, "pclmulqdq $0, %xmm0, %xmm1"), (1, 2, 9, "pshufb %xmm0, %xmm1"),
    (1, 2, 13, "cmpxchg16b (%rsp)"), (1, 2, 19, "pblendw $1, %xmm0, %xmm1"), (1, 2, 20, "crc32l %eax, %ebx"),
    (1, 2, 22, "movbe (%rsp), %eax"), (1, 2, 23, "popcnt %eax, %ebx"), (1, 2, 25, "aesenc %xmm0, %xmm1"),
    (1, 2, 26, "xor %ecx, %ecx\n  xgetbv"), (1, 2, 30, "rdrand %eax"),
    (7, 1, 0, "rdfsbase %rax"), (7, 1, 3, "andn %eax, %ebx, %ecx"), (7, 1, 8, "shlx %eax, %ebx, %ecx"),
    (7, 1, 18, "rdseed %eax"), (7, 1, 19, "adcx %eax, %ebx"), (7, 1, 23, "clflushopt (%rsp)"),
    (7, 1, 24, "clwb (%rsp)"), (7, 1, 29, "sha1nexte %xmm0, %xmm1"), (7, 2, 22, "rdpid %rax"),
    (0x80000001, 2, 0, "lahf"), (0x80000001, 2, 5, "lzcnt %eax, %ebx"), (0x80000001, 2, 8, "prefetchw (%rsp)"),
    (0x80000001, 3, 27, "rdtscp"),
)
CR4_FSGSBASE = 1 << 16
CPUID_7_FSGSBASE = 1


def test_offered_features_execute_in_ring3(make_vm):
    """For each feature flag in FEATURES that CPUID sets, its instruction runs in ring 3 without #UD."""
    vm = make_vm()
    gates, handlers = unexpected([v for v in range(32) if v not in (UD, GP)])
    checks = []
    for i, (leaf, reg, bit, insn) in enumerate(FEATURES):
        checks.append(f"""
  movl $0, {RESULT + 8}
  mov ${leaf}, %eax
  xor %ecx, %ecx
  cpuid
  mov {"%eax %ebx %ecx %edx".split()[reg]}, %eax
  test ${1 << bit}, %eax
  jz 2f
  orl ${1 << (i % 32)}, {RESULT + 0x10 + 4 * (i // 32)}   # offered
  movq $1f, {RESULT + 0x20}
  lea -64(%rsp), %rsp
  and $-16, %rsp
  {insn}
1: mov ${USER_STACK}, %rsp
  cmpl $0, {RESULT + 8}
  je 2f
  orl ${1 << (i % 32)}, {RESULT + 0x18 + 4 * (i // 32)}   # #UD
2:""")
    boot64(vm, gates + gate(UD, "ud") + gate(GP, "gp") + "  lidt idtr\n" + f"""
  mov $1, %eax
  cpuid
  mov %cr4, %rsi
  or ${CR4_OSFXSR | CR4_OSXMMEXCPT}, %esi
  test ${CPUID_1_XSAVE}, %ecx
  jz 3f
  or ${CR4_OSXSAVE}, %esi
3: mov $7, %eax
  xor %ecx, %ecx
  cpuid
  test ${CPUID_7_FSGSBASE}, %ebx
  jz 4f
  or ${CR4_FSGSBASE}, %esi
4: mov %rsi, %cr4
""" + TO_RING3 + "user:\n" + "".join(checks) + f"""
  movl $1, {RESULT + 4}
  hlt                            # #GP in ring 3: the end
ud:
  movl $1, {RESULT + 8}
  mov {RESULT + 0x20}, %rax
  mov %rax, (%rsp)               # resume at the check's label
  iretq
gp:
  cmpl $1, {RESULT + 4}
  je 6f
  movl ${GP}, {FAULT_SLOT}
6: cli
  hlt
""" + handlers + idt(32) + RING3_GDT)
    assert vm.run(timeout=120) == EXIT_HALT, vm.error
    r = results(vm, 8)
    assert r[1] == 1, f"the checks did not finish (exception {results(vm, 32)[31]})"
    offered = r[4] | r[5] << 32
    failed = r[6] | r[7] << 32
    names = [insn.split()[0] for *_, insn in FEATURES]
    assert not failed, "offered but #UD: " + ", ".join(n for i, n in enumerate(names) if failed >> i & 1)
    assert offered, "CPUID offers none of the features"
