"""An idle guest costs almost no host CPU: a 64-bit guest with a 100 Hz LAPIC periodic timer sleeping in HLT
between ticks. The VMM's CPU time (user + system, all threads) over the run is measured and printed; the test
fails only on busy polling (well above the 2% target, which the note on the issue reports as measured)."""

import resource
import struct
import time

from ops.nvmm_ops import VmmOpsNvmm
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT, VM, VmConfig

TICKS = 200        # 2 s at 100 Hz
BUS_HZ = 128 * 1024 * 1024


def test_idle_guest_with_periodic_timer_leaves_the_host_idle(kvm_provider, capsys):
    vm = VM(VmmOpsNvmm(kvm_provider), VmConfig(memsize=16 << 20), log=lambda m: None)
    try:
        boot64(vm, gate(0x40, "timer") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)
  movl $0x0b, 0x3E0(%rsi)        # divide by 1
  movl $0x20040, 0x320(%rsi)     # LVT timer: periodic, vector 0x40
  movl ${BUS_HZ // 100}, 0x380(%rsi)   # 100 Hz
1:sti
  hlt
  cmpl ${TICKS}, 0x8000
  jb 1b
  cli
  hlt
timer:
  incl 0x8000
  movl $0, 0xB0(%rsi)
  iretq
""" + idt(0x41))
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        assert vm.run(timeout=60) == EXIT_HALT, vm.error
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        ticks = struct.unpack_from("<I", vm.view(0x8000, 4))[0]
    finally:
        vm.close()
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    wall = t1 - t0
    with capsys.disabled():
        print(f"\nidle guest, 100 Hz LAPIC timer: {ticks} ticks in {wall:.2f} s wall, {cpu:.3f} s CPU "
              f"= {100 * cpu / wall:.1f}% of a host core")
    assert ticks == TICKS
    assert wall >= 0.95 * TICKS / 100, "the timer ran fast"
    assert cpu / wall < 0.25, f"busy polling: {100 * cpu / wall:.0f}% of a core while the guest is idle"
