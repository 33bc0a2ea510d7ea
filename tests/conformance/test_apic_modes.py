"""The local APIC's modes and CR8 seen from a real guest (issue 24, item 3), on every provider.

Intel SDM vol. 3A 10.4.3 "Enabling or Disabling the Local APIC" (IA32_APIC_BASE.EN clear: CPUID.1:EDX.APIC reads
0 and the APIC page is no device), 10.12.5 "x2APIC State Transitions" (figure 10-27: xAPIC -> x2APIC ->
disabled -> xAPIC are valid, x2APIC -> xAPIC, disabled -> x2APIC and EXTD without EN raise #GP; re-enabling
gives the APIC in its reset state, in xAPIC mode), 10.8.6.1 (CR8 and TPR are one value). After the transitions
the guest sends itself an IPI and runs the one-shot timer in each mode, and looks at TSC-deadline, which this
VM does not offer (as bhyve): CPUID.1:ECX[24] clear, IA32_TSC_DEADLINE #GP and the LVT timer's TSC-deadline mode
not writable, in each mode. The sequence follows kvm-unit-tests' ``apic`` test."""

import struct

import pytest

from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT

RESULT = 0x8000
GPF, TICKS, IPIS, MODE = 0x8800, 0x8804, 0x8808, 0x880C
MSR_APIC_BASE, MSR_TSC_DEADLINE = 0x1B, 0x6E0
X2_ID, X2_VER, X2_TPR, X2_PPR, X2_EOI, X2_LDR, X2_SVR = 0x802, 0x803, 0x808, 0x80A, 0x80B, 0x80D, 0x80F
X2_LVT_TIMER, X2_TIMER_ICR, X2_TIMER_DCR, X2_SELF_IPI = 0x832, 0x838, 0x83E, 0x83F
BASE = 0xFEE00000 | 1 << 8          # the BSP's page address and BSP flag
EN, EXTD = 1 << 11, 1 << 10
XAPIC, X2APIC, DISABLED, INVALID = BASE | EN, BASE | EN | EXTD, BASE, BASE | EXTD
CPUID_EDX_APIC, CPUID_ECX_TSC_DEADLINE = 1 << 9, 1 << 24
V_IPI, V_TIMER = 0x40, 0x41
LVT_MASKED, TIMER_TSC_DEADLINE_MODE = 1 << 16, 2 << 17
NO_DEVICE = 0xFFFFFFFF
LAPIC_VERSION = 0x14                 # bhyve's vlapic version, the MP table's too
ONE_SHOT_COUNT = 200000              # about 1.5 ms at bhyve's 128 MiHz bus clock, divide by 1


class Program:
    """A guest program that stores one 32-bit result per named check (``RESULT`` + 4 * index)."""

    def __init__(self):
        self.names, self.asm = [], []

    def _slot(self, name):
        self.names.append(name)
        return RESULT + 4 * (len(self.names) - 1)

    def code(self, text):
        self.asm.append(text)

    def store(self, name, text, reg="%eax"):
        self.asm.append(f"{text}\n  mov {reg}, {self._slot(name)}")

    def wrmsr(self, name, msr, value):
        """WRMSR; the result is 1 if it raised #GP."""
        self.store(name, f"""
  movl $0, {GPF}
  mov ${msr:#x}, %ecx
  mov ${value & 0xFFFFFFFF:#x}, %eax
  mov ${value >> 32:#x}, %edx
  wrmsr
  mov {GPF}, %eax""")

    def rdmsr(self, name, msr):
        """RDMSR: ``name`` the low word (0 after a #GP), ``name``-gp 1 if it raised #GP."""
        self.store(name, f"""
  movl $0, {GPF}
  mov ${msr:#x}, %ecx
  xor %eax, %eax
  xor %edx, %edx
  rdmsr""")
        self.store(name + "-gp", f"\n  mov {GPF}, %eax")

    def cpuid1(self, name, reg):
        self.store(name, "\n  mov $1, %eax\n  cpuid", reg)

    def mmio(self, name, off):
        self.store(name, f"\n  mov {off:#x}(%rsi), %eax")

    def wait(self, counter, want):
        self.code(f"""
1:cli
  cmpl ${want}, {counter}
  jae 2f
  sti
  hlt
  jmp 1b
2:""")

    def source(self):
        return gate(13, "gp_handler") + gate(V_IPI, "ipi_handler") + gate(V_TIMER, "timer_handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
""" + "\n".join(self.asm) + f"""
  cli
  hlt
gp_handler:                    # rdmsr/wrmsr faulted: count it and skip the 2-byte instruction
  incl {GPF}
  add $8, %rsp
  addq $2, (%rsp)
  iretq
ipi_handler:
  incl {IPIS}
  jmp eoi
timer_handler:
  incl {TICKS}
eoi:
  cmpl $1, {MODE}
  je 1f
  movl $0, 0xB0(%rsi)
  iretq
1:push %rax
  push %rcx
  push %rdx
  mov ${X2_EOI:#x}, %ecx
  xor %eax, %eax
  xor %edx, %edx
  wrmsr
  pop %rdx
  pop %rcx
  pop %rax
  iretq
""" + idt(0x50)

    def results(self, vm):
        vals = struct.unpack_from(f"<{len(self.names)}I", vm.view(RESULT, 4 * len(self.names)))
        return dict(zip(self.names, vals))


def xapic_checks(p, tag, ipis, ticks):
    """In xAPIC mode: a self-IPI and the one-shot timer through the page, and no TSC-deadline."""
    p.code(f"""
  movl $0, {MODE}
  movl $0x1ff, 0xF0(%rsi)      # software enable
  movl ${0x44000 | V_IPI:#x}, 0x300(%rsi)   # fixed, self""")
    p.wait(IPIS, ipis)
    p.code(f"""
  movl $0xB, 0x3E0(%rsi)       # divide by 1
  movl ${V_TIMER:#x}, 0x320(%rsi)           # one-shot
  movl ${ONE_SHOT_COUNT}, 0x380(%rsi)""")
    p.wait(TICKS, ticks)
    p.cpuid1(f"{tag}-cpuid-ecx", "%ecx")
    p.wrmsr(f"{tag}-tsc-deadline-gp", MSR_TSC_DEADLINE, 1)
    p.code(f"  movl ${TIMER_TSC_DEADLINE_MODE | LVT_MASKED | V_TIMER:#x}, 0x320(%rsi)")
    p.mmio(f"{tag}-lvt-timer", 0x320)


def x2apic_checks(p, tag, ipis, ticks):
    """The same in x2APIC mode, through the MSRs."""
    p.code(f"  movl $1, {MODE}")
    p.wrmsr(f"{tag}-svr-gp", X2_SVR, 0x1FF)
    p.wrmsr(f"{tag}-self-ipi-gp", X2_SELF_IPI, V_IPI)
    p.wait(IPIS, ipis)
    p.wrmsr(f"{tag}-dcr-gp", X2_TIMER_DCR, 0xB)
    p.wrmsr(f"{tag}-lvt-gp", X2_LVT_TIMER, V_TIMER)
    p.wrmsr(f"{tag}-icr-gp", X2_TIMER_ICR, ONE_SHOT_COUNT)
    p.wait(TICKS, ticks)
    p.cpuid1(f"{tag}-cpuid-ecx", "%ecx")
    p.wrmsr(f"{tag}-tsc-deadline-gp", MSR_TSC_DEADLINE, 1)
    p.wrmsr(f"{tag}-lvt-tsc-gp", X2_LVT_TIMER, TIMER_TSC_DEADLINE_MODE | LVT_MASKED | V_TIMER)
    p.rdmsr(f"{tag}-lvt-timer", X2_LVT_TIMER)


def test_apic_state_transitions(make_vm):
    vm = make_vm(x2apic=True)                  # -x: x2APIC offered, every vlapic starts in it
    p = Program()
    p.rdmsr("x2-version", X2_VER)
    x2apic_checks(p, "x2", 1, 1)
    p.wrmsr("x2-to-xapic-gp", MSR_APIC_BASE, XAPIC)
    p.wrmsr("x2-to-invalid-gp", MSR_APIC_BASE, INVALID)
    p.wrmsr("x2-to-disabled-gp", MSR_APIC_BASE, DISABLED)
    p.rdmsr("off-apic-base", MSR_APIC_BASE)
    p.cpuid1("off-cpuid-edx", "%edx")
    p.code("  movl $0xFFFFFFFF, 0x80(%rsi)\n  movl $0x1ff, 0xF0(%rsi)")    # the page is no device: dropped
    p.mmio("off-tpr", 0x80)
    p.mmio("off-version", 0x30)
    p.rdmsr("off-x2-version", X2_VER)
    p.wrmsr("off-to-invalid-gp", MSR_APIC_BASE, INVALID)
    p.wrmsr("off-to-x2-gp", MSR_APIC_BASE, X2APIC)
    p.wrmsr("off-to-xapic-gp", MSR_APIC_BASE, XAPIC)
    p.cpuid1("xapic-cpuid-edx", "%edx")
    p.mmio("xapic-svr", 0xF0)                  # reset: software-disabled, spurious vector 0xFF
    p.mmio("xapic-lvt-reset", 0x320)
    p.mmio("xapic-id", 0x20)
    p.mmio("xapic-version", 0x30)
    xapic_checks(p, "xapic", 2, 2)
    p.wrmsr("xapic-to-invalid-gp", MSR_APIC_BASE, INVALID)
    p.wrmsr("xapic-to-x2-gp", MSR_APIC_BASE, X2APIC)
    p.rdmsr("x2-again-ldr", X2_LDR)
    p.rdmsr("x2-again-svr", X2_SVR)            # the x2APIC keeps the xAPIC's state (10.12.5.1)
    x2apic_checks(p, "x2-again", 3, 3)
    boot64(vm, p.source())
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    r = p.results(vm)
    gp = {k: v for k, v in r.items() if k.endswith("-gp")}
    assert gp == {k: int(k in ("x2-to-xapic-gp", "x2-to-invalid-gp", "off-to-invalid-gp", "off-to-x2-gp",
                                "xapic-to-invalid-gp", "off-x2-version-gp", "x2-tsc-deadline-gp",
                                "xapic-tsc-deadline-gp", "x2-again-tsc-deadline-gp")) for k in gp}, gp
    assert r["off-apic-base"] == DISABLED
    assert not r["off-cpuid-edx"] & CPUID_EDX_APIC, "CPUID.1:EDX.APIC set with the APIC disabled"
    assert r["off-tpr"] == NO_DEVICE and r["off-version"] == NO_DEVICE, "the disabled APIC's page answers"
    assert r["xapic-cpuid-edx"] & CPUID_EDX_APIC
    assert (r["xapic-svr"], r["xapic-lvt-reset"], r["xapic-id"]) == (0xFF, LVT_MASKED, 0), "not reset"
    assert r["xapic-version"] == r["x2-version"] and r["x2-version"] & 0xFF == LAPIC_VERSION
    assert r["x2-again-ldr"] == 1 and r["x2-again-svr"] == 0x1FF
    for tag in ("x2", "xapic", "x2-again"):
        assert not r[f"{tag}-cpuid-ecx"] & CPUID_ECX_TSC_DEADLINE
        assert r[f"{tag}-lvt-timer"] == LVT_MASKED | V_TIMER, f"{tag}: TSC-deadline mode written"


@pytest.mark.parametrize("mode", ["xapic", "x2apic"])
def test_cr8_is_the_tpr(make_vm, mode):
    """CR8 writes show in the TPR and PPR (the page, or the x2APIC MSRs) and a TPR write in CR8, and a CR8 of 15
    holds back a fixed interrupt until it is lowered."""
    x2 = mode == "x2apic"
    vm = make_vm(x2apic=x2)
    p = Program()
    if x2:
        p.code(f"  movl $1, {MODE}")
        p.wrmsr("svr-gp", X2_SVR, 0x1FF)
        p.code("  mov $0xf, %eax\n  mov %rax, %cr8")
        p.rdmsr("tpr", X2_TPR)
        p.rdmsr("ppr", X2_PPR)
        p.wrmsr("tpr-write-gp", X2_TPR, 0x50)
    else:
        p.code("  movl $0x1ff, 0xF0(%rsi)\n  mov $0xf, %eax\n  mov %rax, %cr8")
        p.mmio("tpr", 0x80)
        p.mmio("ppr", 0xA0)
        p.code("  movl $0x50, 0x80(%rsi)")
    p.store("cr8", "\n  mov %cr8, %rax")
    p.code("  mov $0xf, %eax\n  mov %rax, %cr8")
    if x2:
        p.wrmsr("self-ipi-gp", X2_SELF_IPI, V_IPI)          # held back by CR8
    else:
        p.code(f"  movl ${0x44000 | V_IPI:#x}, 0x300(%rsi)")  # fixed, self: held back by CR8
    p.code("""
  sti
  mov $20, %ecx
3:nop
  loop 3b
  cli""")
    p.store("held", f"\n  mov {IPIS}, %eax")
    p.code("  sti\n  xor %eax, %eax\n  mov %rax, %cr8")
    p.wait(IPIS, 1)
    if x2:
        p.rdmsr("tpr-after", X2_TPR)
    else:
        p.mmio("tpr-after", 0x80)
    boot64(vm, p.source())
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    r = p.results(vm)
    assert (r["tpr"], r["ppr"], r["cr8"]) == (0xF0, 0xF0, 5), r
    assert r["held"] == 0, "an interrupt CR8 masks was delivered"
    assert r["tpr-after"] == 0
    assert not any(v for k, v in r.items() if k.endswith("-gp")), r
