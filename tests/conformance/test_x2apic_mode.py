"""bhyve's ``-x`` (``x86.x2apic``, ``X2APIC_ENABLED``) seen from a real guest: every vlapic starts in x2APIC mode
(IA32_APIC_BASE bit 10 set, CPUID.1:ECX bit 21 offered, the x2APIC MSRs answer) and the xAPIC MMIO page is off;
without it the vlapic is an xAPIC at 0xFEE00000 and CPUID does not offer x2APIC."""

import struct

from tests.guests.vmboot import boot64
from vmmshim.vm import EXIT_HALT

RESULT = 0x8000
MSR_APIC_BASE, MSR_X2APIC_VERSION = 0x1B, 0x803
APICBASE_ENABLED, APICBASE_X2APIC = 1 << 11, 1 << 10
CPUID_ECX_X2APIC = 1 << 21
XAPIC_VERSION_MMIO = 0xFEE00030
LAPIC_VERSION_MASK = 0xFF          # the version field of the LAPIC version register (Intel SDM 10.4.8)

GUEST = f"""
  mov ${MSR_APIC_BASE}, %ecx
  rdmsr
  mov %eax, {RESULT}
  mov $1, %eax
  cpuid
  mov %ecx, {RESULT + 4}
  mov ${XAPIC_VERSION_MMIO}, %esi
  mov (%rsi), %eax             # xAPIC MMIO: the version register, or nothing in x2APIC mode
  mov %eax, {RESULT + 8}
  cli
  hlt
"""

X2_GUEST = GUEST.replace("  cli\n  hlt\n", f"""  mov ${MSR_X2APIC_VERSION}, %ecx
  rdmsr                        # #GP unless x2APIC mode
  mov %eax, {RESULT + 12}
  cli
  hlt
""")


def _results(vm, n):
    return struct.unpack_from(f"<{n}I", vm.view(RESULT, 4 * n))


def test_x2apic_enabled_starts_every_vlapic_in_x2apic_mode(make_vm):
    vm = make_vm(x2apic=True)
    boot64(vm, X2_GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    apicbase, ecx, mmio_version, x2_version = _results(vm, 4)
    assert apicbase & (APICBASE_ENABLED | APICBASE_X2APIC) == APICBASE_ENABLED | APICBASE_X2APIC, hex(apicbase)
    assert ecx & CPUID_ECX_X2APIC
    assert x2_version & LAPIC_VERSION_MASK, "the x2APIC version MSR did not answer"
    assert mmio_version & LAPIC_VERSION_MASK != x2_version & LAPIC_VERSION_MASK or mmio_version == 0xFFFFFFFF, \
        f"the xAPIC MMIO page still answers in x2APIC mode: {mmio_version:#x}"


def test_without_x2apic_the_vlapic_is_an_xapic(make_vm):
    vm = make_vm(x2apic=False)
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    apicbase, ecx, mmio_version = _results(vm, 3)
    assert apicbase & (APICBASE_ENABLED | APICBASE_X2APIC) == APICBASE_ENABLED, hex(apicbase)
    assert not ecx & CPUID_ECX_X2APIC
    assert mmio_version & LAPIC_VERSION_MASK, "the xAPIC version register did not answer"
