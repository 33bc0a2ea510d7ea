"""MSRs follow CPUID (issue 24 items 6 and 7), on every provider: a guest reads its CPUID, then accesses the
architectural MSRs whose existence a CPUID bit announces (Intel SDM vol. 4 table 2-2; AMD APM vol. 2 appendix A).
Where the guest was not offered the feature the access must raise #GP, with ``-w`` too (``-w`` makes only
unknown MSRs read 0); where it was, the access goes through. IA32_TSC_ADJUST, where offered, moves the TSC and a
TSC write moves it (SDM vol. 3A 17.17.3)."""

import pytest

from ops.nvmm.capability import LIMIT_TSC_WRITE
from ops.nvmm.x86.cpuid_bits import offers, offers_any
from tests.conftest import requires
from tests.conformance.cpuid_guest import (GP, HANDLER_CODE, HANDLERS, RESULTS_AT, attempt, clear_results,
                                           dump_cpuid, guest_table, result)
from tests.guests.vmboot import boot64, idt
from vmmshim.vm import EXIT_HALT

SPEC_CTRL = ("ibrs_ibpb", "stibp", "ssbd", "amd_ibrs", "amd_stibp", "amd_ssbd")
IBPB = ("ibrs_ibpb", "amd_ibpb")
NEVER = ()
UNKNOWN_MSR = 0x12345
RD, WR = "rdmsr", "wrmsr"

#: (what, instruction, MSR, value written, features any of which make the access legal)
CASES = (
    ("IA32_SPEC_CTRL read", RD, 0x48, 0, SPEC_CTRL),
    ("IA32_SPEC_CTRL write 0", WR, 0x48, 0, SPEC_CTRL),
    ("IA32_PRED_CMD write IBPB", WR, 0x49, 1, IBPB),
    ("IA32_PRED_CMD read (write-only)", RD, 0x49, 0, NEVER),
    ("IA32_FLUSH_CMD write L1D_FLUSH", WR, 0x10B, 1, ("l1d_flush",)),
    ("IA32_FLUSH_CMD read (write-only)", RD, 0x10B, 0, NEVER),
    ("IA32_ARCH_CAPABILITIES read", RD, 0x10A, 0, ("arch_capabilities",)),
    ("IA32_ARCH_CAPABILITIES write (read-only)", WR, 0x10A, 0, NEVER),
    ("IA32_TSC_ADJUST read", RD, 0x3B, 0, ("tsc_adjust",)),
    ("IA32_MTRRCAP read", RD, 0xFE, 0, ("mtrr",)),
    ("IA32_MCG_CAP read", RD, 0x179, 0, ("mca",)),
    ("IA32_XSS read", RD, 0xDA0, 0, ("xsaves",)),
    ("VIRT_SPEC_CTRL read", RD, 0xC001011F, 0, ("virt_ssbd",)),
    ("VM_HSAVE_PA read", RD, 0xC0010117, 0, ("svm",)),
)


def msr_code(insn, msr, value):
    return f"  mov ${msr:#x}, %ecx\n  mov ${value & 0xFFFFFFFF:#x}, %eax\n  mov ${value >> 32:#x}, %edx\n  {insn}\n"


def run_guest(make_vm, body, ignore=False, slots=16):
    vm = make_vm(ignore_msrs=ignore)
    boot64(vm, HANDLERS + "  lidt idtr\n" + dump_cpuid() + body + "  cli\n  hlt\n" + HANDLER_CODE + idt(14))
    clear_results(vm, slots)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    return vm


@pytest.mark.parametrize("ignore", [False, True], ids=["strict", "w"])
def test_msrs_exist_only_with_their_cpuid_feature(make_vm, ignore):
    body = "".join(attempt(msr_code(insn, msr, value), i) for i, (_, insn, msr, value, _) in enumerate(CASES))
    body += attempt(msr_code(RD, UNKNOWN_MSR, 0), len(CASES))
    vm = run_guest(make_vm, body, ignore, len(CASES) + 1)
    cpuid = guest_table(vm)
    wrong = []
    for i, (what, _, msr, _, features) in enumerate(CASES):
        legal = offers_any(cpuid, features)
        vector = result(vm, i)[0]
        if legal != (vector == 0) or vector not in (0, GP):
            wrong.append(f"{what} ({msr:#x}): offered={legal}, vector {vector}")
    assert not wrong, "; ".join(wrong)
    vector, _, rax = result(vm, len(CASES))
    assert (vector, rax & 0xFFFFFFFF) == ((0, 0) if ignore else (GP, rax & 0xFFFFFFFF)), \
        "an unknown MSR reads 0 with -w and raises #GP without"


TSC_STEP = 1 << 40                # what the guest adds to IA32_TSC_ADJUST
TSC_TARGET = 1 << 52              # what it writes to IA32_TSC
SLACK = 1 << 36                   # cycles the guest may spend between two reads (ring 0 may be emulated)


def rdtsc_to(slot):
    return attempt("  rdtsc\n  shl $32, %rdx\n  or %rdx, %rax\n", slot)


def rdmsr_to(msr, slot):
    return attempt(f"  mov ${msr:#x}, %ecx\n  rdmsr\n  shl $32, %rdx\n  or %rdx, %rax\n", slot)


@pytest.mark.parametrize("ignore", [False, True], ids=["strict", "w"])
def test_tsc_adjust_moves_the_tsc_and_a_tsc_write_moves_it(make_vm, provider, ignore):
    """SDM vol. 3A 17.17.3, on one vCPU: writing IA32_TSC_ADJUST adds the difference to the TSC; writing the
    TSC adds its difference to IA32_TSC_ADJUST. Without the feature both accesses raise #GP (``-w`` or not)."""
    requires(provider, LIMIT_TSC_WRITE)
    body = rdtsc_to(0) + rdmsr_to(0x3B, 1) + attempt(f"""
  mov $0x3b, %ecx
  mov {RESULTS_AT + 16 + 8}, %rax           # IA32_TSC_ADJUST as slot 1 read it
  mov $0x{TSC_STEP:x}, %rdx
  add %rdx, %rax
  mov %rax, %rdx
  shr $32, %rdx
  wrmsr
""", 2) + rdtsc_to(3) + rdmsr_to(0x3B, 4) + rdtsc_to(5) + attempt(msr_code(WR, 0x10, TSC_TARGET), 6) + \
        rdtsc_to(7) + rdmsr_to(0x3B, 8)
    vm = run_guest(make_vm, body, ignore, 9)
    if not offers(guest_table(vm), "tsc_adjust"):
        assert [result(vm, s)[0] for s in (1, 2, 4, 8)] == [GP] * 4, "IA32_TSC_ADJUST without the feature"
        return
    t0, a0, t1, a1, t2, t3, a2 = (result(vm, s)[2] for s in (0, 1, 3, 4, 5, 7, 8))
    assert all(result(vm, s)[0] == 0 for s in range(9))
    assert a1 == a0 + TSC_STEP
    assert TSC_STEP <= t1 - t0 < TSC_STEP + SLACK, "a write to IA32_TSC_ADJUST moves the TSC by the difference"
    assert TSC_TARGET <= t3 < TSC_TARGET + SLACK
    late = (TSC_TARGET - t2 - (a2 - a1)) % (1 << 64)       # the TSC at the write, less t2
    assert late < SLACK, "a write to IA32_TSC moves IA32_TSC_ADJUST by the difference"
