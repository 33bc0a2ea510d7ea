"""Guest memory, the page walk from a live vCPU, and bad calls: each a clear ``OSError`` with NVMM's errno, and
the machine still usable afterwards."""

import errno
import struct

import pytest

from ops.nvmm import constants as C
from tests.guests.asm import assemble
from tests.guests.harness import CODE, PAGE, HostMemory

RO = 0x100000    # a read-only page


def test_write_to_readonly_mapping_exits_and_leaves_memory(guest_factory):
    g = guest_factory(readonly=[(RO, RO + PAGE)])
    g.load(RO, b"\x5a" * 8)
    g.load(CODE, assemble(f".code64\nmov ${RO:#x}, %rbx\nmov (%rbx), %rax\nout %eax, $0x98\n"
                          "movq $0x1122334455667788, %rcx\nmov %rcx, (%rbx)\nhlt\n", CODE))
    g.setup_long64(CODE, large=True)
    v = g.vcpu
    ex = g.run(until=(C.NVMM_VCPU_EXIT_MEMORY,))
    assert ex.reason == C.NVMM_VCPU_EXIT_MEMORY
    assert ex.mem.gpa == RO and ex.mem.prot & C.NVMM_PROT_WRITE
    assert g.io_log == [(0x98, False, b"\x5a" * 4)], "reads of a read-only page are plain memory reads"
    v.assist_mem()
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.read(RO, 8) == b"\x5a" * 8, "a read-only page was written"
    assert g.mem_log[-1] == (RO, True, struct.pack("<Q", 0x1122334455667788))


def test_gpa_to_hva_and_unmapped_gpa(guest_factory):
    g = guest_factory(holes=[(0x1000, 0x2000)])
    hva, prot = g.machine.gpa_to_hva(0x2010)
    assert hva == g.mem.addr + 0x2010 and prot == C.NVMM_PROT_ALL
    with pytest.raises(OSError) as err:
        g.machine.gpa_to_hva(0x1000)
    assert err.value.errno == errno.ENOENT
    with pytest.raises(OSError) as err:
        g.machine.gpa_view(0xF00, 0x200)    # straddles RAM and the hole
    assert err.value.errno == errno.EFAULT


def test_overlapping_gpa_map_refused_and_machine_usable(guest_factory):
    g = guest_factory()
    extra = HostMemory(2 * PAGE)
    g.machine.hva_map(extra.addr, 2 * PAGE)
    with pytest.raises(OSError) as err:
        g.machine.gpa_map(extra.addr, 0x10000, 2 * PAGE, C.NVMM_PROT_ALL)   # inside RAM at [0, 2 MiB)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(OSError) as err:
        g.machine.gpa_map(extra.addr + 1, 0x40000000, PAGE, C.NVMM_PROT_ALL)  # not page aligned
    assert err.value.errno == errno.EINVAL
    with pytest.raises(OSError) as err:
        g.machine.gpa_map(0x1000, 0x40000000, PAGE, C.NVMM_PROT_ALL)          # hva never hva_mapped
    assert err.value.errno == errno.EINVAL
    g.machine.gpa_map(extra.addr, 0x40000000, 2 * PAGE, C.NVMM_PROT_ALL)     # a free range works
    extra.view[0:4] = b"\x01\x02\x03\x04"
    g.load(CODE, assemble(".code64\nmov $0x40000000, %rbx\nmov (%rbx), %eax\nout %eax, $0x98\nhlt\n", CODE))
    g.build_identity_paging(large=True)
    struct.pack_into("<Q", g.mem.view, 0x4000 + 8, 0x9000 | 0x3)             # PDPT[1] -> a PD at 0x9000
    struct.pack_into("<Q", g.mem.view, 0x9000, 0x40000000 | 0x83)            # a 2 MiB page at 1 GiB
    g.setup_long64(CODE, build=False)
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.io_log == [(0x98, False, b"\x01\x02\x03\x04")]
    g.machine.gpa_unmap(extra.addr, 0x40000000, 2 * PAGE)
    with pytest.raises(OSError):
        g.machine.gpa_to_hva(0x40000000)


def test_second_vcpu_with_same_id_refused(guest_factory):
    g = guest_factory()
    with pytest.raises(OSError) as err:
        g.machine.vcpu_create(0)
    assert err.value.errno == errno.EEXIST
    v1 = g.machine.vcpu_create(1)
    assert v1.cpuid == 1


@pytest.mark.parametrize("type_,vector", [(C.NVMM_VCPU_EVENT_EXCP, 2), (C.NVMM_VCPU_EVENT_EXCP, 3),
                                          (C.NVMM_VCPU_EVENT_EXCP, 40), (7, 0x20)])
def test_refused_event_and_vcpu_still_runs(guest_factory, type_, vector):
    g = guest_factory()
    g.load(CODE, assemble(".code64\nout %al, $0x98\nhlt\n", CODE))
    g.setup_long64(CODE, large=True)
    g.vcpu.event.set(type_, vector, 0)
    with pytest.raises(OSError) as err:
        g.vcpu.inject()
    assert err.value.errno == errno.EINVAL
    assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.io_log == [(0x98, False, b"\x00")]


def test_assist_on_wrong_exit_refused(guest_factory):
    g = guest_factory()
    g.load(CODE, assemble(".code64\nhlt\n", CODE))
    g.setup_long64(CODE, large=True)
    assert g.vcpu.run().reason == C.NVMM_VCPU_EXIT_HALTED
    for assist in (g.vcpu.assist_io, g.vcpu.assist_mem):
        with pytest.raises(OSError) as err:
            assist()
        assert err.value.errno == errno.EINVAL


def test_gva_to_gpa_from_live_vcpu(guest_factory):
    """4-level paging with 4 KiB pages, one page remapped and one left out, walked from the vCPU's own CR3."""
    g = guest_factory()
    g.build_identity_paging(unmapped=(0x9000,))
    struct.pack_into("<Q", g.mem.view, 0x6000 + 8 * 0xA, 0x15000 | 0x1)      # 0xA000 -> 0x15000, read-only
    g.load(CODE, assemble(".code64\nhlt\n", CODE))
    g.setup_long64(CODE, build=False)
    assert g.vcpu.run().reason == C.NVMM_VCPU_EXIT_HALTED
    assert g.vcpu.gva_to_gpa(0x2345) == (0x2345, C.NVMM_PROT_ALL & ~C.NVMM_PROT_USER)
    gpa, prot = g.vcpu.gva_to_gpa(0xA123)
    assert gpa == 0x15123 and not prot & C.NVMM_PROT_WRITE
    for bad in (0x9000, 0x800000000000, 0x40000000):
        with pytest.raises(OSError) as err:
            g.vcpu.gva_to_gpa(bad)
        assert err.value.errno == errno.EFAULT


def test_guest_cannot_reach_outside_ram_through_gpa_view(guest_factory):
    g = guest_factory(ram=1 << 20)
    for gpa, size in ((1 << 20, 1), ((1 << 20) - 4, 8), (-1 & 0xFFFFFFFFFFFFFFFF, 2), (0, -1)):
        with pytest.raises(OSError) as err:
            g.machine.gpa_view(gpa, size)
        assert err.value.errno == errno.EFAULT
