"""Debug-register breakpoints and watchpoints on the soft CPU (``ops/nvmm/soft/debug.py``): an execute match stops
before its instruction and the next run goes past it (RFLAGS.RF), a data match stops after the accessing
instruction (a trap) with DR6.Bn of its slot, an access overlapping the watched bytes matches, a read never matches
a write watchpoint, and slots the debug registers cannot hold are refused."""

import errno

import pytest

from ops.nvmm import api
from ops.nvmm import constants as C
from tests.guests.asm import assemble, symbols

pytest.importorskip("unicorn")

CODE, DATA = 0x2000, 0x3000
HW_EXEC, HW_WRITE, HW_ACCESS = 0, 1, 3
DR6_BS = 1 << 14
PROGRAM = f""".code32
.globl bp, after_write, after_byte, after_read
  nop
bp:
  movl $1, {DATA:#x}
after_write:
  movb $2, {DATA + 5:#x}
after_byte:
  mov {DATA + 0x10:#x}, %eax
after_read:
  hlt
"""
SYM = symbols(PROGRAM, CODE)


@pytest.fixture
def guest(soft_guest):
    g = soft_guest()
    g.load(CODE, assemble(PROGRAM, CODE))
    g.setup_prot32(CODE)
    return g


def debug_exit(g):
    ex = g.run()
    assert ex.reason == api.NVMM_VCPU_EXIT_DEBUG, ex.reason
    return g.vcpu.debug_exit


def test_the_soft_provider_lists_debug_registers(guest):
    features = guest.vcpu.machine.provider.capability().features
    assert {api.FEATURE_DEBUG_HW, api.FEATURE_DEBUG_WATCH} <= features


def test_execute_breakpoint_stops_before_and_the_next_run_goes_past(guest):
    guest.vcpu.set_guest_debug(hw=[(DATA, HW_WRITE, 8), (SYM["bp"], HW_EXEC, 1)])
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_HW, SYM["bp"], 1 << 1)
    assert guest.u64(DATA) == 0                          # the instruction did not run
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_HW, SYM["after_write"], 1 << 0)   # ran, then the write
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_HW, SYM["after_byte"], 1 << 0)    # the byte at DATA + 5
    assert guest.run().reason == C.NVMM_VCPU_EXIT_HALTED


@pytest.mark.parametrize("slot,stop", [
    ((DATA, HW_WRITE, 4), "after_write"),
    ((DATA + 2, HW_WRITE, 2), "after_write"),            # inside the 4-byte write
    ((DATA + 4, HW_WRITE, 4), "after_byte"),             # the byte write at DATA + 5, not the dword at DATA
    ((DATA + 5, HW_ACCESS, 1), "after_byte"),
    ((DATA + 0x10, HW_ACCESS, 8), "after_read"),         # a read matches read/write
    ((DATA + 0x12, HW_ACCESS, 2), "after_read"),
])
def test_watchpoint_stops_after_the_access(guest, slot, stop):
    guest.vcpu.set_guest_debug(hw=[slot])
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_HW, SYM[stop], 1)
    assert guest.run().reason == C.NVMM_VCPU_EXIT_HALTED


def test_an_unaligned_wide_access_matches_from_below(guest):
    guest.load(CODE, assemble(f".code32\nmovl $-1, {DATA + 6:#x}\nhlt\n", CODE))
    guest.vcpu.set_guest_debug(hw=[(DATA + 8, HW_WRITE, 1)])
    assert debug_exit(guest).dr6 == 1


def test_reads_and_untouched_bytes_never_match_a_write_watchpoint(guest):
    guest.vcpu.set_guest_debug(hw=[(DATA + 0x10, HW_WRITE, 8), (DATA + 4, HW_WRITE, 1), (DATA + 6, HW_ACCESS, 2)])
    assert guest.run().reason == C.NVMM_VCPU_EXIT_HALTED


def test_a_step_onto_a_watched_write_reports_both(guest):
    v = guest.vcpu
    v.set_guest_debug(step=True, hw=[(DATA, HW_WRITE, 4)])
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_STEP, SYM["bp"])
    assert debug_exit(guest) == api.ExitDebug(api.DEBUG_HW, SYM["after_write"], 1 | DR6_BS)


def test_removed_slots_stop_nothing(guest):
    v = guest.vcpu
    v.set_guest_debug(hw=[(SYM["bp"], HW_EXEC, 1), (DATA, HW_WRITE, 4)])
    v.set_guest_debug()
    assert guest.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert guest.read(DATA, 4) == (1).to_bytes(4, "little")


@pytest.mark.parametrize("hw,err", [
    ([(DATA, 2, 1)], errno.EINVAL),                     # I/O breakpoints
    ([(DATA + 1, HW_WRITE, 2)], errno.EINVAL),          # unaligned
    ([(DATA, HW_WRITE, 3)], errno.EINVAL),
    ([(CODE, HW_EXEC, 4)], errno.EINVAL),               # execute breakpoints are one byte
    ([(DATA, HW_WRITE, 1)] * 5, errno.ENOSPC),
])
def test_slots_no_debug_register_holds_are_refused(guest, hw, err):
    with pytest.raises(OSError) as info:
        guest.vcpu.set_guest_debug(hw=hw)
    assert info.value.errno == err
