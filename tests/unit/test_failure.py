"""``ops/failure.py``'s pieces (pure logic): the mode names, the opcode past the prefixes, and which declared
limits a failed guest's state runs into."""

from ops.failure import CR0_PE, CR0_PG, EFER_LMA, cpu_mode, first_opcode, matching_limits, paging_mode
from ops.nvmm.capability import LIMIT_PAGING32, LIMIT_SOFT_INT

CR4_PAE = 1 << 5
LIMITS = frozenset({LIMIT_PAGING32, LIMIT_SOFT_INT})


def test_modes():
    assert cpu_mode(0, 0, False) == "real mode"
    assert cpu_mode(CR0_PE, 0, False) == "protected mode"
    assert cpu_mode(CR0_PE | CR0_PG, EFER_LMA, True) == "64-bit mode"
    assert cpu_mode(CR0_PE | CR0_PG, EFER_LMA, False) == "compatibility mode"
    assert paging_mode(CR0_PE, 0, 0) == "no paging"
    assert paging_mode(CR0_PE | CR0_PG, 0, 0) == "32-bit paging"
    assert paging_mode(CR0_PE | CR0_PG, CR4_PAE, 0) == "PAE paging"
    assert paging_mode(CR0_PE | CR0_PG, CR4_PAE, EFER_LMA) == "4-level paging"


def test_first_opcode_skips_prefixes():
    assert first_opcode(bytes([0x66, 0xCD, 0x80]), False) == 0xCD
    assert first_opcode(bytes([0x48, 0xCC]), True) == 0xCC          # REX in 64-bit mode
    assert first_opcode(bytes([0x48, 0xCC]), False) == 0x48         # dec %eax outside it
    assert first_opcode(b"", True) is None


def test_limits_that_match():
    paging32 = matching_limits(LIMITS, CR0_PE | CR0_PG, 0, 0, 0x90)
    assert paging32 == [f"{LIMIT_PAGING32} (32-bit paging)"]
    assert matching_limits(LIMITS, CR0_PE | CR0_PG, CR4_PAE, EFER_LMA, 0xCC) == \
        [f"{LIMIT_SOFT_INT} (the instruction is int3)"]
    assert matching_limits(frozenset(), CR0_PE | CR0_PG, 0, 0, 0xCD) == []
    assert matching_limits(LIMITS, CR0_PE | CR0_PG, CR4_PAE, EFER_LMA, 0x90) == []
