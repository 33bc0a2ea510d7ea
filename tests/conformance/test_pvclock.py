"""The paravirtual clock (``ops/pvclock.py``) on every provider, through the ops table and a real guest: the KVM
signature and features at CPUID 0x40000100, the time record and wall clock the guest asks for with the kvmclock
MSRs, and the guest's own reading of the clock (``ns = system_time + scaled (TSC - tsc_timestamp)``) against the
host's monotonic clock. On KVM the record is KVM's own kvmclock's (``Machine.kernel_pvclock``; with the stable
bit offered, as QEMU does); elsewhere the ops layer writes it. A provider that does not know its TSC rate and has
no clock of its own offers no paravirtual clock: the feature bit is clear and the MSRs #GP, as any unknown MSR.
With ``kvm_pv`` off the leaves read zero."""

import struct
import time

import pytest

from ops import kvm_para, pvclock
from tests.guests.vmboot import CODE, boot64, gate, idt
from vmmshim.vm import EXIT_HALT

OUT, RECORD, WALL = 0x8000, 0x8100, 0x8200
BAD_RECORD = 0x7FFF0000          # far beyond the 16 MiB of RAM: taken, nothing written

GUEST = gate(13, "gp_handler") + f"""
  lidt idtr
  mov ${kvm_para.KVM_CPUID_SIGNATURE:#x}, %eax
  cpuid
  mov %eax, {OUT}
  mov %ebx, {OUT + 4}
  mov %ecx, {OUT + 8}
  mov %edx, {OUT + 12}
  mov ${kvm_para.KVM_CPUID_FEATURES:#x}, %eax
  cpuid
  mov %eax, {OUT + 16}
  mov ${pvclock.MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
  mov ${BAD_RECORD | 1:#x}, %eax
  xor %edx, %edx
  wrmsr
  mov ${RECORD | 1:#x}, %eax
  wrmsr
  mov ${pvclock.MSR_KVM_WALL_CLOCK_NEW:#x}, %ecx
  mov ${WALL:#x}, %eax
  wrmsr
  mov ${pvclock.MSR_KVM_SYSTEM_TIME_NEW:#x}, %ecx
  rdmsr
  mov %eax, {OUT + 20}
  rdtsc
  mov %eax, {OUT + 24}
  mov %edx, {OUT + 28}
  movl $1, {OUT + 32}
  cli
  hlt
gp_handler:
  movl $0xbad6, {OUT + 32}
  cli
  hlt
""" + idt(14)


def _freq(vm):
    return vm.vmi.vcpus[0].nv.tsc_frequency()


def test_kvmclock_record_tracks_the_host_clock(make_vm):
    vm = make_vm(kvm_pv=True)
    boot64(vm, GUEST)
    t_start = time.monotonic_ns()
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    t_end = time.monotonic_ns()
    out = bytes(vm.view(OUT, 36))
    eax, ebx, ecx, edx, features, msr_lo, tsc_lo, tsc_hi, done = struct.unpack("<9I", out)
    hz = _freq(vm)
    assert struct.pack("<3I", ebx, ecx, edx) == kvm_para.KVM_SIGNATURE
    assert eax == kvm_para.KVM_CPUID_FEATURES
    base = kvm_para.KVM_FEATURE_NOP_IO_DELAY            # PV EOI only when asked for (test_kvm_para.py)
    if not hz:
        assert features == base
        assert done == 0xBAD6, "without a paravirtual clock its MSRs are unknown: #GP"
        return
    kernel = vm.vmi.kernel_clock
    stable = kvm_para.KVM_FEATURE_CLOCKSOURCE_STABLE_BIT if kernel else 0
    assert features == base | kvm_para.KVM_FEATURE_CLOCKSOURCE2 | stable
    assert done == 1, "the clock MSRs must not fault"
    assert msr_lo == RECORD | 1, "RDMSR returns what the guest wrote"

    version, _, tsc_ts, system_time, mul, shift, flags = struct.unpack_from("<IIQQIbB", vm.view(RECORD, 30))
    assert version and version % 2 == 0, "the record is complete (even version)"
    if kernel:      # KVM's scale from its own TSC rate, and its stable bit where it has a master clock
        assert abs(pvclock.ticks_to_ns(hz, mul, shift) - 1e9) < 1e7 and flags & ~1 == 0
    else:
        assert (mul, shift) == pvclock.time_scale(hz) and flags == 0
    guest_tsc = tsc_hi << 32 | tsc_lo
    assert tsc_ts <= guest_tsc
    # the guest's reading of the clock just after the MSR write, on the host's monotonic scale
    guest_ns = system_time + pvclock.ticks_to_ns(guest_tsc - tsc_ts, mul, shift)
    epoch = vm.vmi.clock_epoch_ns
    assert t_start - epoch - 5_000_000 <= guest_ns <= t_end - epoch + 5_000_000

    wversion, sec, nsec = struct.unpack_from("<3I", vm.view(WALL, 12))
    assert wversion % 2 == 0 and nsec < 1_000_000_000
    boot_wall = sec + nsec / 1e9
    assert abs(boot_wall + (t_end - epoch) / 1e9 - time.time()) < 2.0, "wall clock at system time zero"


@pytest.mark.parametrize("setting", [False])
def test_kvm_pv_interface_can_be_turned_off(make_vm, setting):
    vm = make_vm(kvm_pv=setting)
    boot64(vm, GUEST)
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    eax, ebx, ecx, edx, features = struct.unpack_from("<5I", vm.view(OUT, 20))
    assert (eax, ebx, ecx, edx, features) == (0, 0, 0, 0, 0)
    assert struct.unpack_from("<I", vm.view(OUT + 32, 4))[0] == 0xBAD6
