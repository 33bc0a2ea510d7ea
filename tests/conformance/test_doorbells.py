"""Doorbells on every provider (vmmshim/doorbells.py): a device's notify registers may signal an eventfd
instead of exiting (KVM's ioeventfd); the guest must not be able to tell, short of timing. The guest rings a
port doorbell (a 16-bit write of the matched value, as virtio's legacy QUEUE_NOTIFY) and an MMIO one (any
size, as the modern notify address) and each time spins until the device has written its count into guest
memory, as a driver waits for its used ring; a write of another value goes through the bus. Where the provider
takes them (KVM) the rings cost no exits; elsewhere each one exits and reaches the device through the bus."""

import struct
import threading

import pytest

from tests.guests.vmboot import boot64, gate, idt
from vmmshim.doorbells import HOST_HAS_EVENTFD
from vmmshim.vm import EXIT_HALT

N = 40
PORT = 0x520
MMIO = 0xD0000000
FLAG = 0x8000           # guest RAM the device writes its count to
RING_VALUE = 1


class NotifyDevice:
    """A notify register in a port range and an MMIO page; every notification bumps the count in guest RAM."""

    def __init__(self, vm):
        self.vm, self.count, self.other = vm, 0, []

    def notify(self):
        self.count += 1
        self.vm.load(FLAG, struct.pack("<I", self.count))

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        if offset in (0, 0x10) and (offset == 0x10 or value == RING_VALUE):
            self.notify()
        else:
            self.other.append((offset, value))
            self.vm.load(FLAG, struct.pack("<I", self.count + 1000))

    def bells(self, pio):
        return [(0, 2, RING_VALUE, self.notify)] if pio else [(0x10, 0, None, self.notify)]


GUEST = f"""
  xor %ecx, %ecx
  mov ${PORT}, %dx
1:inc %ecx
  mov ${RING_VALUE}, %ax
  out %ax, %dx
2:cmp {FLAG}, %ecx
  jne 2b
  cmp ${N}, %ecx
  jne 1b
3:inc %ecx
  mov ${MMIO + 0x10}, %rbx
  movw %cx, (%rbx)
4:cmp {FLAG}, %ecx
  jne 4b
  cmp ${2 * N}, %ecx
  jne 3b
  mov $7, %ax
  out %ax, %dx            # not the doorbell's value: an exit to the device
  add $1000, %ecx
5:cmp {FLAG}, %ecx
  jne 5b
  cli
  hlt
"""


def test_doorbells_reach_the_device_without_exits_where_the_provider_has_them(make_vm, provider):
    vm = make_vm()
    dev = NotifyDevice(vm)
    vm.add_port_device(PORT, 4, dev, "notify-port")
    vm.add_mmio_device(MMIO, 0x1000, dev, "notify-mmio")
    keys = vm.add_doorbells(PORT, True, dev.bells(True)) + vm.add_doorbells(MMIO, False, dev.bells(False))
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert dev.count == 2 * N and dev.other == [(0, 7)]
    port_exits, mmio_exits = vm.io_exits(0)
    if provider.name == "kvm":
        assert len(keys) == 2, "this KVM has ioeventfd: both doorbells should be taken"
    if keys:
        assert port_exits == 1 and mmio_exits == 0, (port_exits, mmio_exits)
        assert vm.doorbells.rings == 2 * N
    else:
        assert port_exits == N + 1 and mmio_exits == N


def test_doorbells_can_be_turned_off(make_vm):
    vm = make_vm(doorbells=False)
    dev = NotifyDevice(vm)
    assert vm.add_doorbells(PORT, True, dev.bells(True)) == [] and vm.doorbells.active == 0


IRQS = FLAG + 4
HALT_GUEST = gate(0x40, "h40") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)       # SVR: APIC software enabled
  xor %ecx, %ecx
  mov ${PORT}, %dx
1:inc %ecx
  mov ${RING_VALUE}, %ax
  cli
  out %ax, %dx                  # ring, then sleep until the device's interrupt
2:sti
  hlt
  cli
  cmp {IRQS}, %ecx
  jne 2b
  cmp ${N}, %ecx
  jne 1b
  hlt
h40:
  incl {IRQS}
  movl $0, 0xB0(%rsi)
  iretq
""" + idt(0x41)


def test_a_halting_vcpu_serves_the_doorbell_that_rang(make_vm, monkeypatch):
    """A driver that rings and then idles (a block request at queue depth 1): the vCPU about to sleep in HLT
    serves the ring itself (the VM's idle hook, ``Doorbells.poll_idle``), so the device's interrupt is pending
    before it would sleep. The doorbell threads are kept from running here: every one of the N rings must be
    served by the halting vCPU, on its own thread, or the guest waits for ever."""
    from vmmshim import doorbells
    monkeypatch.setattr(doorbells._Group, "_loop", lambda self: None)
    vm = make_vm()
    dev = NotifyDevice(vm)
    threads = set()

    def notify():
        threads.add(doorbells.threading.current_thread().name)
        dev.notify()
        vm.ops.vm_lapic_msi(vm.vmi, 0xFEE00000, 0x40)
    vm.add_port_device(PORT, 4, dev, "notify-port")
    if not vm.add_doorbells(PORT, True, [(0, 2, RING_VALUE, notify)]):
        pytest.skip("the provider has no doorbells")
    boot64(vm, HALT_GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert dev.count == N and struct.unpack_from("<I", vm.view(IRQS, 4))[0] == N
    assert vm.doorbells.idle_served == N and len(threads) == 1
    assert not any(t.startswith("vmmshim-doorbells") for t in threads)


class RingingDevice(NotifyDevice):
    """A ``bhyve_devices.base.Doorbells`` device (as the virtio transport): BAR 0 is the port doorbell, BAR 1 the
    MMIO one; a doorbell write that reaches it through the bus rings the VM's ring (``ring_with``)."""

    def __init__(self, vm):
        super().__init__(vm)
        self.ring = None
        self.threads = set()

    def notify(self):
        self.threads.add(threading.current_thread().name)
        super().notify()

    def doorbells(self, bar):
        return self.bells(bar == 0)

    def ring_with(self, ring):
        self.ring = ring

    def write(self, offset, size, value):
        if self.ring is not None and (offset == 0x10 or (offset == 0 and value == RING_VALUE)):
            self.ring(0 if offset == 0 else 1, 0)
        else:
            super().write(offset, size, value)


@pytest.mark.skipif(not HOST_HAS_EVENTFD, reason="doorbell threads need eventfd and epoll")
@pytest.mark.parametrize("hardware", [True, False], ids=["provider-doorbells", "doorbells-off"])
def test_a_notification_is_served_on_the_device_thread_whichever_way_it_came(make_vm, provider, hardware):
    """One route for a notification: on every provider, with the provider's doorbells or without (the write exits
    and the device rings the same eventfd), the device's work runs on its doorbell thread, never on the vCPU that
    wrote."""
    vm = make_vm(doorbells=hardware)
    dev = RingingDevice(vm)
    vm.add_port_device(PORT, 4, dev, "notify-port")
    vm.add_mmio_device(MMIO, 0x1000, dev, "notify-mmio")
    vm.bar_mapped(object(), dev, 0, PORT, True, "ringer")
    vm.bar_mapped(object(), dev, 1, MMIO, False, "ringer")
    assert dev.ring is not None
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert dev.count == 2 * N and dev.other == [(0, 7)]
    assert dev.threads == {"vmmshim-doorbells ringer"}
    taken = vm.doorbells.hardware
    if provider.name == "kvm" and hardware:
        assert taken == 2, "this KVM has ioeventfd: both doorbells should be the provider's"
    port_exits, mmio_exits = vm.io_exits(0)
    assert (port_exits, mmio_exits) == ((1, 0) if taken == 2 else (N + 1, N))
