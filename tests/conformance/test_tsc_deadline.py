"""The LAPIC timer's TSC-deadline mode on every provider, where the VM offers it (``x86.tsc_deadline``, the CLI's
default; ``VmConfig(tsc_deadline=True)`` here): Intel SDM vol. 3A 10.5.4.1 "TSC-Deadline Mode". CPUID.1:ECX[24]
is set; the LVT timer takes mode 10b; a deadline written to IA32_TSC_DEADLINE (0x6E0) reads back and fires when the
guest's TSC reaches it, not before; the MSR reads 0 once it fired; a deadline already past fires at once; writing 0
disarms it, and so does leaving TSC-deadline mode. Linux takes this timer where CPUID offers it and then skips the
LAPIC timer's calibration against the PIT (the MP-table boot under load, issue 24 item 5). On KVM the compiled
run loop serves the writes whose deadline lies ahead (``ops/nvmm/kvm/tscdeadline.py``): the same checks hold, and
it is checked that it served them.

Without the option (bhyve's and NVMM's CPUID) the mode is absent: ``test_apic_modes.py``."""

import struct

from tests.conformance.test_apic_modes import GPF, MSR_TSC_DEADLINE, TICKS, TIMER_TSC_DEADLINE_MODE, V_TIMER, \
    CPUID_ECX_TSC_DEADLINE, Program
from ops.nvmm.capability import LIMIT_TSC_RATE
from tests.conftest import requires
from tests.guests.vmboot import boot64
from vmmshim.vm import EXIT_HALT

DEADLINE_S = 0.005          # how far ahead the guest arms its deadline
LVT_TIMER_MODE = 3 << 17


def rdtsc_into(reg):
    """The 64-bit TSC into ``reg`` (RDTSC's EDX:EAX joined)."""
    return f"""
  rdtsc
  shl $32, %rdx
  or %rax, %rdx
  mov %rdx, {reg}"""


def wrmsr_deadline(expr):
    """IA32_TSC_DEADLINE = ``expr`` (a register, computed into %rax first)."""
    return f"""
  mov {expr}, %rax
  mov %rax, %rdx
  shr $32, %rdx
  mov ${MSR_TSC_DEADLINE:#x}, %ecx
  wrmsr"""


def spin(ticks):
    """Busy-waits ``ticks`` TSC ticks with interrupts on (a timer that should not fire has the chance to)."""
    return rdtsc_into("%r9") + """
  sti
1:""" + rdtsc_into("%r10") + f"""
  sub %r9, %r10
  cmp ${ticks}, %r10
  jb 1b
  cli"""


def program(delta):
    p = Program()
    p.cpuid1("cpuid-ecx", "%ecx")
    p.code(f"""
  movl $0x1ff, 0xF0(%rsi)      # software enable
  movl ${TIMER_TSC_DEADLINE_MODE | V_TIMER:#x}, 0x320(%rsi)""")
    p.mmio("lvt-timer", 0x320)
    # a deadline delta ahead: fires when the TSC reaches it, not before
    p.code(rdtsc_into("%r8") + "\n  lea " + f"{delta}(%r8), %r11" + wrmsr_deadline("%r11"))
    p.store("armed-matches", "\n  mov %r11d, %ebx" + "\n".join(["", f"  mov ${MSR_TSC_DEADLINE:#x}, %ecx",
                                                                  "  rdmsr", "  xor %ebx, %eax"]))
    p.wait(TICKS, 1)
    p.store("elapsed-ok", rdtsc_into("%r10") + f"""
  sub %r8, %r10
  xor %eax, %eax
  cmp ${delta}, %r10
  setae %al""")
    p.rdmsr("after-fire", MSR_TSC_DEADLINE)
    # a deadline already past fires at once
    p.code(rdtsc_into("%r11") + "\n  sub $1000, %r11" + wrmsr_deadline("%r11"))
    p.wait(TICKS, 2)
    # armed, then 0 written: disarmed
    p.code(rdtsc_into("%r11") + f"\n  add ${delta}, %r11" + wrmsr_deadline("%r11") + wrmsr_deadline("$0"))
    p.code(spin(3 * delta))
    p.store("ticks-after-zero", f"\n  mov {TICKS}, %eax")
    # armed, then the LVT leaves TSC-deadline mode: disarmed, and the MSR reads 0 outside the mode
    p.code(rdtsc_into("%r11") + f"\n  add ${delta}, %r11" + wrmsr_deadline("%r11"))
    p.code(f"  movl ${V_TIMER:#x}, 0x320(%rsi)          # one-shot, no count written")
    p.rdmsr("one-shot-mode-reads", MSR_TSC_DEADLINE)
    p.code(spin(3 * delta))
    p.store("ticks-after-mode-change", f"\n  mov {TICKS}, %eax")
    p.store("gp", f"\n  mov {GPF}, %eax")
    return p


def test_tsc_deadline_timer(make_vm, provider):
    requires(provider, LIMIT_TSC_RATE)
    vm = make_vm(tsc_deadline=True)
    hz = vm.vmi.vcpus[0].vlapic.timer.tsc_hz
    assert hz, f"{provider.name} declares no {LIMIT_TSC_RATE} limit but tells no TSC rate"
    delta = int(hz * DEADLINE_S)
    p = program(delta)
    boot64(vm, p.source())
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    r = p.results(vm)
    assert r["cpuid-ecx"] & CPUID_ECX_TSC_DEADLINE, r
    assert r["lvt-timer"] & LVT_TIMER_MODE == TIMER_TSC_DEADLINE_MODE, r
    assert r["armed-matches"] == 0, f"IA32_TSC_DEADLINE did not read back what was written: {r}"
    assert r["elapsed-ok"] == 1, f"the deadline fired before the TSC reached it: {r}"
    assert r["after-fire"] == 0 and r["after-fire-gp"] == 0, r
    assert r["ticks-after-zero"] == 2, f"a deadline written 0 still fired: {r}"
    assert r["one-shot-mode-reads"] == 0 and r["ticks-after-mode-change"] == 2, r
    assert r["gp"] == 0, r
    assert struct.unpack_from("<I", vm.view(TICKS, 4))[0] == 2
    dl = vm.vmi.vcpus[0].tsc_deadline       # the KVM run loop's (ops/nvmm/kvm/tscdeadline.py), where built
    if dl is not None:
        assert dl.served >= 2, f"the run loop served {dl.served} IA32_TSC_DEADLINE writes"
