"""``vmm_ops_nvmm`` on every provider: register and descriptor round trips for every ``vm_reg_name``, and small
real guests driven through the ops table and the VM (port I/O and MMIO devices on the buses, unknown MSRs with
and without ``-w``, HLT woken by the LAPIC timer, a triple fault, INIT/SIPI start-up of a second vCPU)."""

import errno
import struct
import time

import pytest

from ops.nvmm import constants as C
from ops.nvmm_ops import VmmOpsNvmm
from ops.vmm_ops import SEG_ACCESS_UNUSABLE, SegDesc, VmCapType, VmRegName as R, missing_members
from tests.guests.asm import assemble
from tests.guests.vmboot import CODE, PML4, boot64, gate, idt
from vmmshim.vm import EXIT_HALT, EXIT_TRIPLEFAULT

class Recorder:
    """A device recording accesses; reads answer ``value``."""

    def __init__(self, value=0):
        self.value, self.log = value, []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def test_table_is_complete(provider):
    assert missing_members(VmmOpsNvmm(provider)) == []


def test_every_register_round_trips(make_vm):
    vm = make_vm()
    ops, vmi = vm.ops, vm.vmi
    values = {r: 0x1000 + 0x111 * i for i, r in enumerate(R) if r <= R.VM_REG_GUEST_R15}
    values.update({R.VM_REG_GUEST_RSP: 0x8FF0, R.VM_REG_GUEST_RFLAGS: 0x2 | 0x1 | 0x40,
                   R.VM_REG_GUEST_CR2: 0xDEAD000, R.VM_REG_GUEST_CR3: PML4, R.VM_REG_GUEST_CR4: 0x220,
                   R.VM_REG_GUEST_DR0: 0x1000, R.VM_REG_GUEST_DR1: 0x2000, R.VM_REG_GUEST_DR2: 0x3000,
                   R.VM_REG_GUEST_DR3: 0x4000, R.VM_REG_GUEST_DR7: 0x400, R.VM_REG_GUEST_TPR: 3,
                   R.VM_REG_GUEST_FS_BASE: 0x7000, R.VM_REG_GUEST_GS_BASE: 0x7100,
                   R.VM_REG_GUEST_KGS_BASE: 0xFFFF800000000000, R.VM_REG_GUEST_ENTRY_INST_LENGTH: 2,
                   R.VM_REG_GUEST_EFER: 0xD01, R.VM_REG_GUEST_CR0: 0x80050033})
    boot64(vm, "hlt\n")
    for r, v in values.items():
        ops.vmsetreg(vmi, 0, r, v)
    ops.vmsetreg(vmi, 0, R.VM_REG_GUEST_RIP, CODE)
    ops.vmrun(vmi, 0)            # hlt with IF=0 on the only vCPU: suspends (halt)
    for r, v in values.items():
        got = ops.vmgetreg(vmi, 0, r)
        if r == R.VM_REG_GUEST_CR0:
            assert got & 0xFFFF == v & 0xFFFF, r.name
        elif r == R.VM_REG_GUEST_RFLAGS:
            assert got & 0xFF == v & 0xFF, r.name
        else:
            assert got == v, r.name
    assert ops.vmgetreg(vmi, 0, R.VM_REG_GUEST_RIP) == CODE + 1
    assert ops.vmgetreg(vmi, 0, R.VM_REG_GUEST_PDPTE0) == 0, "no PAE paging: PDPTEs read as 0"
    with pytest.raises(OSError) as err:
        ops.vmsetreg(vmi, 0, R.VM_REG_GUEST_PDPTE1, 1)
    assert err.value.errno == errno.EINVAL and "PDPTE" in str(err.value)
    with pytest.raises(OSError):
        ops.vmgetreg(vmi, 0, R.VM_REG_LAST)


def test_every_segment_round_trips(make_vm):
    vm = make_vm()
    ops, vmi = vm.ops, vm.vmi
    boot64(vm, "hlt\n")
    descs = {R.VM_REG_GUEST_DS: SegDesc(0x1000, 0xFFFFF, 0xC093), R.VM_REG_GUEST_ES: SegDesc(0, 0xFFFF, 0x93),
             R.VM_REG_GUEST_FS: SegDesc(0x2000, 0xFFF, 0x4093), R.VM_REG_GUEST_GS: SegDesc(0, 0, SEG_ACCESS_UNUSABLE),
             R.VM_REG_GUEST_SS: SegDesc(0, 0xFFFFFFFF, 0xC093), R.VM_REG_GUEST_TR: SegDesc(0x3000, 0x67, 0x8B),
             R.VM_REG_GUEST_LDTR: SegDesc(0x4000, 0xFF, 0x82), R.VM_REG_GUEST_GDTR: SegDesc(0x5000, 0x3F, 0),
             R.VM_REG_GUEST_IDTR: SegDesc(0x6000, 0x7FF, 0)}
    for r, d in descs.items():
        ops.vmsetdesc(vmi, 0, r, d)
    ops.vmsetreg(vmi, 0, R.VM_REG_GUEST_FS, 0x10)
    ops.vmrun(vmi, 0)
    for r, d in descs.items():
        got = ops.vmgetdesc(vmi, 0, r)
        assert (got.base, got.limit) == (d.base, d.limit), r.name
        if d.access & SEG_ACCESS_UNUSABLE:
            assert got.access & SEG_ACCESS_UNUSABLE, r.name
        else:
            assert got.access == d.access, f"{r.name}: {got.access:#x} != {d.access:#x}"
    assert ops.vmgetreg(vmi, 0, R.VM_REG_GUEST_FS) == 0x10
    assert ops.vmgetdesc(vmi, 0, R.VM_REG_GUEST_CS).access == 0xA09B


def test_capabilities(make_vm):
    vm = make_vm()
    ops, vmi = vm.ops, vm.vmi
    ops.vmsetcap(vmi, 0, VmCapType.VM_CAP_HALT_EXIT, 1)
    assert ops.vmgetcap(vmi, 0, VmCapType.VM_CAP_HALT_EXIT) == 1
    assert ops.vmgetcap(vmi, 0, VmCapType.VM_CAP_UNRESTRICTED_GUEST) == 1
    with pytest.raises(OSError) as err:
        ops.vmgetcap(vmi, 0, VmCapType.VM_CAP_ENABLE_INVPCID)
    assert err.value.errno == errno.ENOENT


def test_port_io_and_mmio_reach_devices_on_the_buses(make_vm):
    vm = make_vm()
    port, mmio = Recorder(0x5A), Recorder(0x11223344)
    vm.add_port_device(0x510, 4, port, "counter")
    vm.add_mmio_device(0xD0000000, 0x1000, mmio, "mmio")
    boot64(vm, """
  mov $0x510, %dx
  mov $0x77, %al
  out %al, %dx          # port write
  inb %dx, %al          # port read
  mov %eax, 0x8000
  mov $0xD0000000, %esi  # (zero-extends into %rsi)
  movl 0x10(%rsi), %ebx  # MMIO read (INST_EMUL to the VM)
  mov %ebx, 0x8004
  movw $0xBEEF, 0x20(%rsi)
  cli
  hlt
""")
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert port.log == [("w", 0, 1, 0x77), ("r", 0, 1)]
    assert mmio.log == [("r", 0x10, 4), ("w", 0x20, 2, 0xBEEF)]
    assert struct.unpack_from("<BxxxI", vm.view(0x8000, 8)) == (0x5A, 0x11223344)


@pytest.mark.parametrize("ignore", [False, True])
def test_unknown_msr_gp_or_ignored(make_vm, ignore):
    vm = make_vm(ignore_msrs=ignore)
    sym = boot64(vm, gate(13, "gp_handler") + """
  lidt idtr
  mov $0x12345678, %eax
  mov $0x4b564d99, %ecx
  rdmsr
  mov %eax, 0x8000      # reached only when the MSR is ignored (-w): 0
  cli
  hlt
gp_handler:
  movl $0xbad6, 0x8000
  cli
  hlt
""" + idt(14))
    assert sym["gp_handler"] < CODE + 0x1000
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert struct.unpack_from("<I", vm.view(0x8000, 4))[0] == (0 if ignore else 0xBAD6)


def test_hlt_woken_by_lapic_timer_interrupt(make_vm):
    vm = make_vm()
    boot64(vm, gate(0x40, "timer_handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)       # SVR: APIC software enabled, spurious vector 0xff
  movl $0x0b, 0x3E0(%rsi)       # divide by 1
  movl $0x40, 0x320(%rsi)       # LVT timer: one-shot, vector 0x40
  movl $0x100000, 0x380(%rsi)   # initial count: about 8 ms at 128 MHz
  sti
  hlt                           # woken by the timer interrupt
  cli
  hlt
timer_handler:
  incl 0x8000
  movl $0, 0xB0(%rsi)           # EOI
  iretq
""" + idt(0x41))
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert struct.unpack_from("<I", vm.view(0x8000, 4))[0] == 1
    stopped = vm.vmi.vcpus[0].exits[C.NVMM_VCPU_EXIT_STOPPED & 0xFFFF]
    assert stopped == 0, "the timer's kick found the vCPU asleep in HLT: no nvmm_vcpu_stop, no STOPPED exit"


def test_triple_fault_ends_with_status_3(make_vm):
    vm = make_vm()
    boot64(vm, """
  lidt idtr
  ud2                           # #UD with an empty IDT: #GP, #DF, then shutdown
idtr:
  .word 0
  .quad 0
""")
    assert vm.run(timeout=30) == EXIT_TRIPLEFAULT, vm.error


def test_init_sipi_starts_the_second_vcpu(make_vm):
    vm = make_vm(ncpus=2)
    ap = assemble(".code16\nmovb $0x41, %al\nmovb %al, 0x8100\ncli\nhlt\n", 0x8000)
    vm.load(0x8000, ap)
    boot64(vm, """
  mov $0xFEE00000, %esi
  movl $0x01000000, 0x310(%rsi) # ICR high: destination APIC id 1
  movl $0x00004500, 0x300(%rsi) # INIT
  movl $0x00004608, 0x300(%rsi) # SIPI, vector 0x08: the AP starts at 0x8000 in real mode
  cli
  hlt
""")
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert vm.view(0x8100, 1)[0] == 0x41, "the AP did not run"
    assert set(vm.threads) == {0, 1}


def test_halting_bsp_waits_for_an_ap_whose_thread_starts_late(make_vm):
    """The VM halts when every active vCPU has halted with IF clear; an AP is active from its SIPI on, not from
    when its thread first runs (a loaded host once started the thread after the BSP had halted)."""
    vm = make_vm(ncpus=2)
    loop = vm._vcpu_loop

    def late(vcpu, rip):
        if vcpu:
            time.sleep(0.3)
        loop(vcpu, rip)
    vm._vcpu_loop = late
    ap = assemble(".code16\nmovb $0x41, %al\nmovb %al, 0x8100\ncli\nhlt\n", 0x8000)
    vm.load(0x8000, ap)
    boot64(vm, """
  mov $0xFEE00000, %esi
  movl $0x01000000, 0x310(%rsi)
  movl $0x00004500, 0x300(%rsi)
  movl $0x00004608, 0x300(%rsi)
  cli
  hlt
""")
    assert vm.run(timeout=30) == EXIT_HALT, vm.error
    assert vm.view(0x8100, 1)[0] == 0x41, "the VM halted before the AP ran"


def test_inout_exit_completed_by_the_ops_layer(make_vm):
    """A port IN is completed where it is decoded (the provider's assist calls the VM's port bus, as bhyve's kernel
    and QEMU's NVMM accelerator do): ``vmrun`` returns only when the guest halts, with the device's value in AL."""
    vm = make_vm()
    dev = Recorder(0x42)
    vm.add_port_device(0x70, 2, dev, "rtc-like")
    boot64(vm, "mov $0x1234abcd, %eax\nin $0x71, %al\ncli\nhlt\n")
    ops, vmi = vm.ops, vm.vmi
    vmexit = ops.vmrun(vmi, 0, CODE)
    assert vmexit.exitcode == 14                     # VM_EXITCODE_SUSPENDED (halt): the IN did not come up
    assert dev.log == [("r", 1, 1)]
    assert ops.vmgetreg(vmi, 0, R.VM_REG_GUEST_RAX) == 0x1234AB42
    assert vm.io_exits(0) == (1, 0)