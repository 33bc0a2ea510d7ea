"""Published MMIO reads on every provider (``Machine.answer_mmio``): a device may publish what a read of one of its
aligned 32-bit registers returns, and a provider that can answer such reads itself (KVM's compiled loop) lets them
run without an exit. The guest must not be able to tell, short of timing: the same guest on every provider reads
the published value in dwords, bytes and words, then a new value the device published while handling an exit,
then, once the device withdrew it, what its ``read`` returns; a register next to the published one still reaches
the device. Where the provider answers, the device's ``read`` sees only the reads that could not be answered."""

import pytest

from ops.nvmm.api import FEATURE_ANSWERED_MMIO
from tests.guests.vmboot import boot64
from vmmshim.vm import EXIT_HALT

N = 300
MMIO = 0xD0000000
REG_STATUS, REG_OTHER, REG_CTL, REG_SUM, REG_SEEN = 0x10, 0x14, 0x20, 0x30, 0x38
FIRST, SECOND, WITHDRAWN, OTHER = 0x8765_4321, 0x0BAD_F00D, 0x1234_5678, 0x55
MASK32 = 0xFFFFFFFF


class StatusDevice:
    """REG_STATUS is a status register the device publishes; a write to REG_CTL publishes its value there (0:
    withdraws it); REG_SUM and REG_SEEN record what the guest reports; REG_OTHER is never published."""

    def __init__(self, vm, answer):
        self.vm, self.log, self.status, self.answer = vm, [], FIRST, answer
        self.answered = self.publish()

    def publish(self):
        return self.answer and self.vm.ops.vm_answer_mmio(self.vm.vmi, MMIO + REG_STATUS, self.status)

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        if offset == REG_OTHER:
            return OTHER
        v = self.status if self.status is not None else WITHDRAWN
        return (v >> (8 * (offset - REG_STATUS))) & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        self.log.append(("w", offset, value))
        if offset == REG_CTL:
            self.status = value or None
            self.publish()


GUEST = f"""
  mov ${MMIO}, %rbx
  xor %r8d, %r8d
  mov ${N}, %ecx
1:mov {REG_STATUS}(%rbx), %eax      # answered where the provider can
  add %eax, %r8d
  dec %ecx
  jnz 1b
  mov %r8d, {REG_SUM}(%rbx)         # exits
  movzbl {REG_STATUS + 1}(%rbx), %eax
  mov %eax, {REG_SEEN}(%rbx)        # a byte of it
  movzwl {REG_STATUS + 2}(%rbx), %eax
  mov %eax, {REG_SEEN}(%rbx)        # ... and its upper word
  mov {REG_OTHER}(%rbx), %eax
  mov %eax, {REG_SEEN}(%rbx)        # the register next to it is not published: the device answers
  movl ${SECOND}, {REG_CTL}(%rbx)   # the device publishes a new value while handling this exit
  mov {REG_STATUS}(%rbx), %eax
  mov %eax, {REG_SEEN}(%rbx)
  movl $0, {REG_CTL}(%rbx)          # ... and withdraws it: the next read exits to the device
  mov {REG_STATUS}(%rbx), %eax
  mov %eax, {REG_SEEN}(%rbx)
  cli
  hlt
"""


@pytest.mark.parametrize("answer", [True, False], ids=["answered", "off"])
def test_published_mmio_reads_read_the_same_on_every_provider(make_vm, provider, answer):
    vm = make_vm()
    dev = StatusDevice(vm, answer)
    vm.add_mmio_device(MMIO, 0x1000, dev, "status-mmio")
    boot64(vm, GUEST)
    assert vm.run(timeout=60) == EXIT_HALT, vm.error
    writes = [e for e in dev.log if e[0] == "w"]
    assert writes == [("w", REG_SUM, (FIRST * N) & MASK32), ("w", REG_SEEN, (FIRST >> 8) & 0xFF),
                      ("w", REG_SEEN, FIRST >> 16), ("w", REG_SEEN, OTHER), ("w", REG_CTL, SECOND),
                      ("w", REG_SEEN, SECOND), ("w", REG_CTL, 0), ("w", REG_SEEN, WITHDRAWN)]
    reads = [e for e in dev.log if e[0] == "r"]
    answered = vm.ops.vcpu_stats(vm.vmi, 0)["answered_mmio"]
    can = FEATURE_ANSWERED_MMIO in vm.ops.vm_features(vm.vmi)
    if provider.name == "kvm":
        assert can, "this provider answers published MMIO reads"
    assert dev.answered == (answer and can)
    assert answered + len(reads) == N + 5            # every read was answered or reached the device, none twice
    assert ("r", REG_OTHER, 4) in reads and reads[-1] == ("r", REG_STATUS, 4)     # the withdrawn one exits
    if answer and can:
        # the loop is entered after an MMIO exit where it injects no interrupts, so the first read may exit
        assert answered >= N + 2 and len(reads) <= 4, reads
    else:
        assert answered == 0
