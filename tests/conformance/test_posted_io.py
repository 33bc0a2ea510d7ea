"""Posted port writes on every provider: a device's ``posted_writes`` registers may be buffered by the provider
(KVM's coalesced PIO) instead of exiting, and the guest must not be able to tell, short of timing. The same
guest on every provider: the device sees every write, in guest order, before the access that exits next, and
the last writes before a HLT are delivered too; where the provider posts them (KVM) they cost almost no exits,
elsewhere one each."""

from tests.guests.vmboot import boot64
from vmmshim.vm import EXIT_HALT

N = 500          # more than the 169 writes KVM's ring holds: a full ring exits, and order must survive that
PORT = 0x510


class PostedRecorder:
    """A 4-port device whose offset 0 may be posted; it logs every access in arrival order."""
    posted_writes = ((0, 1),)

    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset))
        return 0x5A

    def write(self, offset, size, value):
        self.log.append(("w", offset, value))

    def posted_run(self, offset, data):         # bhyve_devices.base.PostedWrites: a run, one write per byte
        for b in data:
            self.write(offset, 1, b)


GUEST = f"""
  mov ${PORT}, %dx
  xor %ecx, %ecx
1:mov %cl, %al
  out %al, %dx            # posted
  inc %ecx
  cmp ${N}, %ecx
  jne 1b
  inc %dx
  inb %dx, %al            # offset 1 exits: it must come after all {N} writes
  dec %dx
  mov $0xE1, %al
  out %al, %dx            # three more posted writes, then HLT
  mov $0xE2, %al
  out %al, %dx
  mov $0xE3, %al
  out %al, %dx
  cli
  hlt
"""


def test_posted_writes_arrive_in_order_before_the_next_exit(make_vm, provider):
    vm = make_vm()
    dev = PostedRecorder()
    vm.add_port_device(PORT, 4, dev, "posted")
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    expected = [("w", 0, i & 0xFF) for i in range(N)] + [("r", 1)] + [("w", 0, v) for v in (0xE1, 0xE2, 0xE3)]
    assert dev.log == expected
    inout = vm.io_exits(0)[0]
    if provider.name == "kvm":
        assert vm.posted_ports == [(PORT, 1)], "this KVM has coalesced PIO: the port should be posted"
    if vm.posted_ports:
        assert inout <= N // 100, f"{inout} INOUT exits for {N + 4} accesses, most of them posted"
    else:
        assert inout == N + 4


def test_posting_can_be_turned_off(make_vm):
    vm = make_vm(posted_io=False)
    dev = PostedRecorder()
    vm.add_port_device(PORT, 4, dev, "posted")
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    assert vm.posted_ports == [] and vm.io_exits(0)[0] == N + 4
    assert len(dev.log) == N + 4


def test_a_guest_that_spins_after_writing_still_gets_its_bytes_out(make_vm):
    """No exit follows these writes (a panic's busy loop with interrupts off): the VM's periodic flush hands
    them over all the same, within a fraction of a second."""
    import time
    vm = make_vm()
    dev = PostedRecorder()
    vm.add_port_device(PORT, 4, dev, "posted")
    boot64(vm, f"""
  mov ${PORT}, %dx
  mov $0x41, %al
  out %al, %dx
  mov $0x42, %al
  out %al, %dx
1:jmp 1b
""")
    import threading
    t = threading.Thread(target=vm.run, kwargs=dict(timeout=10), daemon=True)
    t.start()
    deadline = time.monotonic() + 2
    while len(dev.log) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    seen = list(dev.log)               # before the stop below, whose exit would hand them over anyway
    vm.stop(1)
    t.join(10)
    assert seen == [("w", 0, 0x41), ("w", 0, 0x42)]


def test_the_flush_sleeps_while_the_guest_halts_and_wakes_with_it(make_vm):
    """The flush runs only while a vCPU may run without exiting: a guest asleep in HLT drained the buffer at its
    HLT exit, and a flush every 50 ms would keep an idle guest's host core busy for nothing. Once an interrupt
    wakes the vCPU, the flush is back: the bytes written before the spin arrive without an exit."""
    import threading
    import time

    import pytest

    from tests.guests.vmboot import gate, idt
    vm = make_vm()
    dev = PostedRecorder()
    vm.add_port_device(PORT, 4, dev, "posted")
    if not vm.posted_ports:
        pytest.skip("the provider posts no port writes")
    boot64(vm, gate(0x40, "h40") + f"""
  lidt idtr
  mov $0xFEE00000, %esi
  movl $0x1ff, 0xF0(%rsi)       # SVR: APIC software enabled
  mov ${PORT}, %dx
  mov $0x41, %al
  out %al, %dx                  # posted; the HLT exit hands it over
  sti
  hlt
  mov $0x42, %al
  out %al, %dx                  # posted; only the flush hands it over
1:jmp 1b
h40:
  movl $0, 0xB0(%rsi)
  iretq
""" + idt(0x41))
    drains = []
    real = vm.ops.vm_drain_posted
    vm.ops.vm_drain_posted = lambda vmi: (drains.append(time.monotonic()), real(vmi))[1]
    t = threading.Thread(target=vm.run, kwargs=dict(timeout=20), daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not dev.log and time.monotonic() < deadline:
            time.sleep(0.01)
        assert dev.log == [("w", 0, 0x41)], vm.error
        time.sleep(0.2)                          # the flush that was armed finds the vCPU asleep and stops
        asleep = len(drains)
        time.sleep(0.5)                          # ten flush periods
        assert len(drains) == asleep, f"{len(drains) - asleep} flushes while the only vCPU slept in HLT"
        vm.ops.vm_lapic_msi(vm.vmi, 0xFEE00000, 0x40)
        deadline = time.monotonic() + 2
        while len(dev.log) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = list(dev.log)
    finally:
        vm.stop(1)
        t.join(10)
    assert seen == [("w", 0, 0x41), ("w", 0, 0x42)]
    assert len(drains) > asleep
