"""Published port reads on every provider: a device may publish what a one-byte read of one of its ports returns
(``publish_reads``), and a provider that can answer such reads itself (KVM's compiled loop, the soft CPU's
instruction hook) lets them run without an exit. The guest must not be able to tell, short of timing: the same
guest on every provider reads the published value, then a new value the device published while handling an
exit, then, once the device withdrew it, what its ``read`` returns; posted writes still arrive in order before the
next exit; where the provider answers, the device's ``read`` sees the withdrawn port's read and at most a couple
of the published ones."""

import pytest

from ops.nvmm.api import FEATURE_ANSWERED_IO
from tests.guests.vmboot import boot64
from vmmshim.vm import EXIT_HALT

N = 300
PORT = 0x510
FIRST, SECOND, WITHDRAWN = 0x60, 0x61, 0x77
REG_DATA, REG_STATUS, REG_CTL, REG_SUM, REG_SEEN = 0, 1, 3, 4, 5


class StatusDevice:
    """Offset 1 is a status register the device publishes; a write to offset 3 publishes its value there (0:
    withdraws it); offsets 4 and 5 record what the guest reports; offset 0 may be posted."""
    posted_writes = ((REG_DATA, 1),)

    def __init__(self):
        self.log = []
        self.status = FIRST
        self.publish = None

    def publish_reads(self, fn):
        self.publish = fn
        fn(REG_STATUS, self.status)

    def read(self, offset, size):
        self.log.append(("r", offset))
        return self.status if self.status is not None else WITHDRAWN

    def write(self, offset, size, value):
        self.log.append(("w", offset, value))
        if offset == REG_CTL:
            self.status = value or None
            if self.publish is not None:
                self.publish(REG_STATUS, self.status)

    def posted_run(self, offset, data):         # bhyve_devices.base.PostedWrites: a run, one write per byte
        for b in data:
            self.write(offset, 1, b)


GUEST = f"""
  mov ${PORT + REG_STATUS}, %dx
  xor %ebx, %ebx
  mov ${N}, %ecx
1:inb %dx, %al              # answered where the provider can
  movzbl %al, %eax
  add %eax, %ebx
  mov ${PORT + REG_DATA}, %dx
  out %al, %dx              # posted where the provider can
  mov ${PORT + REG_STATUS}, %dx
  dec %ecx
  jnz 1b
  mov %ebx, %eax
  mov ${PORT + REG_SUM}, %dx
  outl %eax, %dx            # exits: every posted write must have arrived before it
  mov ${PORT + REG_CTL}, %dx
  mov ${SECOND}, %al
  out %al, %dx              # the device publishes a new value while handling this exit
  mov ${PORT + REG_STATUS}, %dx
  inb %dx, %al
  mov ${PORT + REG_SEEN}, %dx
  out %al, %dx
  mov ${PORT + REG_CTL}, %dx
  xor %eax, %eax
  out %al, %dx              # ... and withdraws it: the next read exits to the device
  mov ${PORT + REG_STATUS}, %dx
  inb %dx, %al
  mov ${PORT + REG_SEEN}, %dx
  out %al, %dx
  cli
  hlt
"""


@pytest.mark.parametrize("answer_io", [True, False], ids=["answered", "off"])
def test_published_reads_read_the_same_on_every_provider(make_vm, provider, answer_io):
    vm = make_vm(answer_io=answer_io)
    dev = StatusDevice()
    vm.add_port_device(PORT, 8, dev, "status")
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    writes = [e for e in dev.log if e[0] == "w"]
    assert writes == ([("w", REG_DATA, FIRST)] * N + [("w", REG_SUM, FIRST * N), ("w", REG_CTL, SECOND),
                                                        ("w", REG_SEEN, SECOND), ("w", REG_CTL, 0),
                                                        ("w", REG_SEEN, WITHDRAWN)])
    reads = [i for i, e in enumerate(dev.log) if e[0] == "r"]
    answered = vm.ops.vcpu_stats(vm.vmi, 0)["answered_io"]
    can = answer_io and FEATURE_ANSWERED_IO in vm.ops.vm_features(vm.vmi)
    if provider.name in ("kvm", "soft") and answer_io:
        assert can, "this provider answers published reads"
    assert answered + len(reads) == N + 2        # every IN was answered or reached the device, none twice
    if can:
        # a provider may let a published read exit now and then (KVM enters its compiled loop after a port
        # exit, so the loop's first read exits); the rest are answered
        assert answered >= N - 1 and len(reads) <= 3
        assert dev.log.index(("w", REG_CTL, 0)) < reads[-1]          # the withdrawn read exits, after the write
    else:
        assert answered == 0
    # every IN counts as a port access, answered or not
    assert vm.io_exits(0)[0] >= N + 2 + (0 if vm.posted_ports else N)
