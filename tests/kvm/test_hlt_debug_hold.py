"""A debugger's hold does not end a HLT (as on hardware and in KVM's in-kernel HLT): a 2-vCPU multiboot guest whose
AP halts (``cli; hlt``, or ``sti; hlt`` waiting for an IPI) while the BSP keeps working; the gdb stub holds and
releases the VM many times over its RSP socket (Ctrl-C, ``c``). The AP's code after the HLT must not run because
of a hold: with ``cli; hlt`` never (the VM then ends halted, status 2, as every vCPU halted with interrupts off);
with ``sti; hlt`` only after the BSP's IPI, whose handler runs first. While held, the AP's ``$pc`` reads as the
instruction after the HLT (where a wake resumes, as KVM reports it)."""

import os
import select
import socket
import subprocess
import time

import pytest

from tests.guests.asm import multiboot_elf
from tests.kvm.test_gdb import (AP_TRAMPOLINE, HALT_STATUS, START_AP, finish, guest,  # noqa: F401 (guest: the fixture)
                                 start)

HOLDS = 20
RIP_REGNO = 16                       # gdb's x86-64 register numbering (vmmshim/gdb/target.py)

# The BSP starts the AP with INIT-SIPI (a real-mode trampoline into flat protected mode); the AP sets ``ready`` and
# halts; the BSP prints R and counts ``work`` until the test sets ``go``, then (STI_MODE) sends the AP vector VEC
# and waits for the AP's code after its HLT, and prints K. The AP, after its HLT: X (cli mode: must never run) or
# A (sti mode: after the IPI handler's W, which goes on there), then halts with interrupts off for good.
KERNEL = r"""
.code32
.globl _start, ap32, after_hlt, ready, go, after, work
.set TRAMPOLINE, 0x8000
.set LAPIC, 0xFEE00000
.set VEC, 0x40
.set STI_MODE, {sti}
.text
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov $bsp_stack, %esp
{start_ap}1: pause
  cmpl $0, ready
  je 1b
  mov $0x3f8, %dx
  mov $'R', %al
  out %al, %dx
2: incl work
  cmpl $0, go
  je 2b
.if STI_MODE
  movl $0x01000000, 0x310(%esi)
  movl $VEC, 0x300(%esi)
3: pause
  cmpl $0, after
  je 3b
.endif
  mov $0x3f8, %dx
  mov $'K', %al
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
4: cli
  hlt
  jmp 4b
ap32:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $ap_stack, %esp
.if STI_MODE
  mov $on_ipi, %eax
  mov %ax, idt + VEC * 8
  shr $16, %eax
  mov %ax, idt + VEC * 8 + 6
  movw $0x08, idt + VEC * 8 + 2
  movw $0x8E00, idt + VEC * 8 + 4
  lidt idtr
  movl $0x1FF, LAPIC + 0xF0
.endif
  movl $1, ready
.if STI_MODE
  sti
.else
  cli
.endif
  hlt
after_hlt:
  mov $0x3f8, %dx
.if STI_MODE
  mov $'A', %al
.else
  mov $'X', %al
.endif
  out %al, %dx
  movl $1, after
5: cli
  hlt
  jmp 5b
on_ipi:                          # no iret back (KVM under nested SVM here fails one): on to after_hlt
  mov $0x3f8, %dx
  mov $'W', %al
  out %al, %dx
  movl $0, LAPIC + 0xB0
  add $12, %esp
  jmp after_hlt
{ap_trampoline}.data
.align 8
ready: .long 0
go: .long 0
after: .long 0
work: .long 0
idtr: .word (VEC + 1) * 8 - 1
  .long idt
.align 8
idt: .fill VEC + 1, 8, 0
.fill 256, 4, 0
ap_stack:
.fill 256, 4, 0
bsp_stack:
"""


def _symbols(elf):
    out = subprocess.run(["nm", elf], capture_output=True, text=True, check=True).stdout
    return {p[2]: int(p[0], 16) for p in (line.split() for line in out.splitlines()) if len(p) == 3}


class Rsp:
    """The stub's remote protocol over a raw socket (acks skipped)."""

    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port), 5)
        self.s.settimeout(10)
        self.buf = b""

    def reply(self):
        while True:
            start = self.buf.find(b"$")
            if start >= 0:
                end = self.buf.find(b"#", start)
                if end >= 0 and len(self.buf) >= end + 3:
                    body, self.buf = self.buf[start + 1:end], self.buf[end + 3:]
                    return body
            chunk = self.s.recv(4096)
            assert chunk, "the stub closed the connection"
            self.buf += chunk

    def ask(self, body):
        self.s.sendall(b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF))
        return self.reply()

    def close(self):
        self.s.close()


def _read_until(stream, text, timeout):
    """What the guest wrote to COM1 up to ``text`` (unbuffered: ``finish`` reads the rest)."""
    got, end = b"", time.monotonic() + timeout
    while not got.endswith(text) and time.monotonic() < end:
        if select.select([stream], [], [], 0.1)[0]:
            c = os.read(stream.fileno(), 1)
            if not c:
                break
            got += c
    return got


@pytest.mark.parametrize("mode", ["cli", "sti"])
def test_a_debug_hold_does_not_end_a_halt(guest, tmp_path, mode):
    provider = guest[0]
    sti = mode == "sti"
    source = KERNEL.format(sti=int(sti), start_ap=START_AP, ap_trampoline=AP_TRAMPOLINE)
    elf = multiboot_elf(source, str(tmp_path), f"hlt_{mode}")
    sym = _symbols(elf)
    p, port = start(provider, elf)
    rsp, done, early = None, False, b""
    try:
        rsp = Rsp(port)
        assert rsp.ask(b"?").startswith(b"T05")
        rsp.s.sendall(b"$c#63")                      # let it run: the AP halts, the BSP says R and works
        early = _read_until(p.stdout, b"R", 30)
        assert early == b"R", "the guest did not start its AP"
        time.sleep(0.2)                              # the AP is in its HLT by now
        work = []
        for i in range(HOLDS):
            rsp.s.sendall(b"\x03")
            assert rsp.reply().startswith(b"T02"), f"hold {i}"
            if i in (0, HOLDS - 1):
                assert rsp.ask(b"Hg2") == b"OK"
                rip = int.from_bytes(bytes.fromhex(rsp.ask(b"p%x" % RIP_REGNO).decode()), "little")
                assert rip == sym["after_hlt"], f"AP pc {rip:#x} while held (the HLT ends at {sym['after_hlt']:#x})"
                w = rsp.ask(b"m%x,4" % sym["work"])
                work.append(int.from_bytes(bytes.fromhex(w.decode()), "little"))
            assert rsp.ask(b"m%x,4" % sym["after"]) == b"00000000", f"the AP ran past its HLT at hold {i}"
            rsp.s.sendall(b"$c#63")
            time.sleep(0.02 + 0.01 * (i % 4))
        rsp.s.sendall(b"\x03")
        assert rsp.reply().startswith(b"T02")
        assert work[1] > work[0], "the BSP did not run between the holds"
        assert rsp.ask(b"M%x,4:01000000" % sym["go"]) == b"OK"
        assert rsp.ask(b"D") == b"OK"                 # the guest runs on and ends by itself
        done = True
    finally:
        if rsp is not None:
            rsp.close()
        if not done:
            p.kill()                                 # its BSP waits for ``go``: it would not end by itself
        status, stdout, stderr = finish(p)
    assert early.decode() + stdout == ("RWAK\n" if sti else "RK\n"), stderr
    assert status == HALT_STATUS, stderr
