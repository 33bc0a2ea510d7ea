"""A checkpoint taken while an interrupt is injected but not yet delivered, on every provider (issue 23's CI
failure of 2026-12-07): a kick that stops a run after the ops layer (or the KVM run loop) injected an interrupt
and before the guest entered leaves the vector accepted in the vlapic's ISR and queued in the provider. The
checkpoint must carry it (``Vcpu.queued_event``), and the restore inject it again, or the restored guest never
sees it, never ends it, and sleeps behind its ISR bit for good.

The state is made by hand here (accept and inject as the ops layer does, then no run), since the race that makes
it in a running VM is rare."""

import struct

from ops.nvmm import constants as C
from ops.vmm_snapshot import restore_vm, snapshot_vm
from tests.guests.vmboot import boot64, gate, idt
from vmmshim.vm import EXIT_HALT, EXIT_POWEROFF

VECTOR = 0x40
STOP_PORT = 0x510
MEM = 16 << 20

GUEST = gate(VECTOR, "handler") + """
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)       # SVR: APIC software enabled
  mov $0x510, %dx
  inb %dx, %al                  # the test stops the VM here (a read: never posted) and takes the checkpoint
  incl 0x8004                   # after the restore: the handler ran first
  cli
  hlt
handler:
  incl 0x8000
  movl $0, 0xB0(%rsi)           # EOI
  iretq
""" + idt(VECTOR + 1)


class Stopper:
    def __init__(self, vm):
        self.vm = vm

    def read(self, offset, size):
        self.vm.stop(EXIT_POWEROFF)
        return 0

    def write(self, offset, size, value):
        pass


def _counts(vm):
    return struct.unpack_from("<II", vm.view(0x8000, 8))


def test_an_interrupt_injected_before_the_checkpoint_reaches_the_restored_guest(make_vm):
    vm = make_vm(memsize=MEM)
    vm.add_port_device(STOP_PORT, 1, Stopper(vm), "stop")
    boot64(vm, GUEST)
    assert vm.run(timeout=30) == EXIT_POWEROFF, vm.error
    ctx = vm.vmi.vcpus[0]
    vl = ctx.vlapic
    vl.set_intr_ready(VECTOR, False)                 # what a device raised, accepted and injected for the entry a
    vl.intr_accepted(VECTOR)                         # kick then stopped
    ctx.nv.event.set(C.NVMM_VCPU_EVENT_INTR, VECTOR)
    ctx.nv.inject()
    state = snapshot_vm(vm.vmi)
    assert state["vcpus"]["0"]["event"] == [C.NVMM_VCPU_EVENT_INTR, VECTOR, None]

    again = make_vm(memsize=MEM)
    again.add_port_device(STOP_PORT, 1, Stopper(again), "stop")
    again.load(0, bytes(vm.view(0, MEM)))
    restore_vm(again.vmi, state, 0)
    assert again.run(timeout=30, vcpus=(0,)) == EXIT_HALT, again.error
    assert _counts(again) == (1, 1), "the handler ran once, then the code after the stop"
    assert again.vmi.vcpus[0].vlapic.pending_intr() is None


def test_no_event_queued_saves_none(make_vm):
    vm = make_vm(memsize=MEM)
    vm.add_port_device(STOP_PORT, 1, Stopper(vm), "stop")
    boot64(vm, GUEST)
    assert vm.run(timeout=30) == EXIT_POWEROFF, vm.error
    assert snapshot_vm(vm.vmi)["vcpus"]["0"]["event"] is None
