"""The GDB stub (``-G``, ``vmmshim/gdb/``) driven by a real gdb in batch mode, on KVM and on the soft CPU, with a
multiboot guest built here with symbols: breakpoints on a symbol and on a port-I/O instruction, registers the
guest set, ``stepi``, ``x/2gx``, ``set var`` seen in the guest's output, threads with ``-c 2``, ``detach`` (the
guest ends with its own status), ``-G w`` holding the guest until gdb continues, watchpoints and ``hbreak`` where the
provider has debug registers, two vCPUs at one breakpoint (two stops, neither lost); and bad input over a raw socket
(a bad checksum, a malformed packet, unmapped memory, a port in use) answered without the VM dying."""

import os
import re
import select
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import open_or_skip
from tests.guests.asm import multiboot_elf
from tests.kvm.test_cli import SPIN_KERNEL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GDB = shutil.which("gdb")
HALT_STATUS = 2
QUIET_S = 1.0

KERNEL = r"""
.code32
.globl _start, target, print, counter, value
.text
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov $0x12345678, %ebx
  mov $0x0abcdef1, %esi
target:
  nop
  incl counter
  incl counter
  mov value, %eax
  mov $0x3f8, %dx
print:
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
  cli
  hlt
.data
.align 8
counter: .long 0, 0
value: .long 'A', 0
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(params=["kvm", "soft"])
def guest(request, tmp_path):
    prov = open_or_skip(request.param)
    if GDB is None:
        pytest.skip("gdb is not installed")
    elf = multiboot_elf(KERNEL, str(tmp_path))
    elf64 = str(tmp_path / "kernel64.elf")           # gdb reads the symbols as x86-64, as the stub describes it
    subprocess.run(["objcopy", "-O", "elf64-x86-64", elf, elf64], check=True, capture_output=True)
    return request.param, prov.capability().features, elf, elf64


def start(provider, elf, *args):
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "vmmshim", "-m", "32M", "-c", "2", "-l", "com1,stdio",
                          "-o", f"vmmshim.provider={provider}", "-G", f"w{port}", *args, "-f", f"multiboot,{elf}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    line = p.stderr.readline().decode()          # the stub says it listens (before the guest runs)
    assert f"listening on 127.0.0.1:{port}" in line, line + p.stderr.read().decode()
    return p, port


def gdb(port, elf64, commands):
    script = ["set pagination off", "set confirm off", f"file {elf64}", f"target remote 127.0.0.1:{port}",
              *commands]
    args = [GDB, "-batch", "-nx"]
    for c in script:
        args += ["-ex", c]
    return subprocess.run(args, capture_output=True, text=True, timeout=60).stdout


def finish(p):
    try:
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    return p.returncode, out.decode(), err.decode()


def test_gdb_session_on_a_multiboot_guest(guest):
    provider, features, elf, elf64 = guest
    p, port = start(provider, elf)
    try:
        r, _, _ = select.select([p.stdout], [], [], QUIET_S)
        assert not r, "-G w: the guest ran before gdb attached"
        watch, hw = "debug-watch" in features, "debug-hw" in features
        out = gdb(port, elf64, [
            "info threads", "thread 2", "thread 1", "break target", "continue",
            "info registers rip rbx rsi eflags cs fs_base cr0", "stepi", "stepi", "info registers rip",
            "x/2gx &counter", "set var *(int*)&value = 'B'",
            *(["watch *(int*)&counter", "continue", "delete 2", "awatch *(int*)&value", "continue", "delete 3"]
              if watch else []),
            "hbreak print" if hw else "break print", "continue", "info registers rip rax", "detach"])
    finally:
        status, stdout, stderr = finish(p)
    assert "Thread 1" in out and "Thread 2" in out, out
    assert "Switching to thread 2" in out, out
    assert "Breakpoint 1, 0x0000000000100016 in target" in out, out
    assert "rbx            0x12345678" in out and "rsi            0xabcdef1" in out, out
    assert "rip            0x10001d" in out, out            # two steps: nop, incl (6 bytes)
    assert "0x0000000000000001\t0x0000000000000041" in out, out
    if watch:                                           # stops after the write (a trap), after the read
        assert "Old value = 1\nNew value = 2\n0x0000000000100023 in target" in out, out
        assert "access (read/write) watchpoint 3: *(int*)&value\n\nValue = 66\n0x0000000000100028" in out, out
    if hw:
        assert "Hardware assisted breakpoint" in out, out
    assert "in print ()" in out and "rax            0x42" in out, out
    assert "detached" in out, out
    assert status == HALT_STATUS, stderr
    assert stdout == "B\n", stderr


def test_bad_input_gets_error_replies_and_the_vm_lives_on(guest):
    provider, _, elf, _ = guest
    p, port = start(provider, elf)
    try:
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(10)

            def ask(raw):
                """Sends ``raw``; returns the NAK, or the ACK and the reply packet."""
                s.sendall(raw)
                data = b""
                while data != b"-" and not (b"#" in data and len(data) >= data.index(b"#") + 3):
                    chunk = s.recv(4096)
                    assert chunk, f"the stub closed the connection after {raw!r}"
                    data += chunk
                return data

            def packet(body):
                return b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)

            assert ask(b"$g#00") == b"-"                                     # a bad checksum: NAK
            assert ask(packet(b"mzz,4")) == b"+" + packet(b"E16")            # malformed
            assert ask(packet(b"m7fff0000000,4")) == b"+" + packet(b"E14")    # not guest memory
            assert ask(packet(b"Z9,0,1")) == b"+" + packet(b"")               # unknown type: unsupported
            assert ask(packet(b"m100016,1")) == b"+" + packet(b"90")          # the nop, readable
            busy = subprocess.run([sys.executable, "-m", "vmmshim", "-m", "32M", "-l", "com1,stdio", "-o",
                                   f"vmmshim.provider={provider}", "-G", str(port), "-f", f"multiboot,{elf}"],
                                  cwd=ROOT, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
            assert busy.returncode == 4 and len(busy.stderr.strip().splitlines()) == 1, busy.stderr
            assert f"gdb.port 127.0.0.1:{port}" in busy.stderr, busy.stderr
            assert ask(packet(b"D")) == b"+" + packet(b"OK")
    finally:
        status, stdout, stderr = finish(p)
    assert status == HALT_STATUS and stdout == "A\n", stderr


OWN_INT3_KERNEL = r"""
.code32
.globl _start, done
.text
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov $stack_top, %esp
  mov $on_bp, %eax
  mov %ax, idt + 3 * 8
  shr $16, %eax
  mov %ax, idt + 3 * 8 + 6
  movw $0x10, idt + 3 * 8 + 2
  movw $0x8E00, idt + 3 * 8 + 4
  lidt idtr
  mov $0x3f8, %dx
  int3
  mov $'Z', %al
  out %al, %dx
done:
  mov $'\n', %al
  out %al, %dx
  cli
  hlt
on_bp:
  mov $'I', %al
  out %al, %dx
  iret
.data
.align 8
idtr: .word 4 * 8 - 1
  .long idt
idt: .fill 4, 8, 0
.fill 256, 4, 0
stack_top:
"""


def test_the_guests_own_int3_still_gets_its_bp(guest, tmp_path):
    provider, features, _, _ = guest
    if "debug-bp" not in features:
        pytest.skip(f"provider {provider} traps no int3 (limit guest-debug-int3)")
    elf = multiboot_elf(OWN_INT3_KERNEL, str(tmp_path), "own")
    elf64 = str(tmp_path / "own64.elf")
    subprocess.run(["objcopy", "-O", "elf64-x86-64", elf, elf64], check=True, capture_output=True)
    p, port = start(provider, elf)
    try:
        out = gdb(port, elf64, ["break done", "continue", "info registers rip", "detach"])
    finally:
        status, stdout, stderr = finish(p)
    assert "in done ()" in out, out
    assert status == HALT_STATUS and stdout == "IZ\n", stderr


# The two halves of starting an AP in a multiboot guest (``.set TRAMPOLINE`` and ``LAPIC`` before them): START_AP,
# in the BSP, copies the real-mode trampoline to TRAMPOLINE and sends INIT-SIPI (``%esi`` is left at the LAPIC);
# AP_TRAMPOLINE, in ``.text``, enters flat protected mode and jumps to the guest's ``ap32``.
START_AP = r"""
  mov $ap, %esi
  mov $TRAMPOLINE, %edi
  mov $(ap_end - ap), %ecx
  cld
  rep movsb
  mov $LAPIC, %esi
  movl $0x01000000, 0x310(%esi)
  movl $0x4500, 0x300(%esi)
  movl $(0x4600 | TRAMPOLINE >> 12), 0x300(%esi)
"""
AP_TRAMPOLINE = r"""
ap:
.code16
  cli
  xor %ax, %ax
  mov %ax, %ds
  lgdtl TRAMPOLINE + (gdtr - ap)
  mov %cr0, %eax
  or $1, %eax
  mov %eax, %cr0
  ljmpl $0x08, $ap32
.align 8
gdt: .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtr: .word 3 * 8 - 1
  .long TRAMPOLINE + (gdt - ap)
ap_end:
"""


# Two vCPUs in one function at about the same time: the BSP starts the AP with INIT-SIPI (a real-mode trampoline
# that enters flat protected mode), waits until it is ready, and both call f; the BSP prints the count of calls
# once both returned. Each halts in a loop (a debugger's hold may end a HLT early).
SMP_BP_KERNEL = rf"""
.code32
.globl _start, f, ap32, hits
.set TRAMPOLINE, 0x8000
.set LAPIC, 0xFEE00000
.text
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov $bsp_stack, %esp
{START_AP}1: pause
  cmpl $0, ready
  je 1b
  call f
2: pause
  cmpl $2, hits
  jne 2b
  mov hits, %eax
  add $'0', %al
  mov $0x3f8, %dx
  out %al, %dx
  mov $'\n', %al
  out %al, %dx
3: cli
  hlt
  jmp 3b                         # a debugger's hold may end a HLT early
f:
  lock incl hits
  ret
ap32:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $ap_stack, %esp
  movl $1, ready
  call f
4: cli
  hlt
  jmp 4b
{AP_TRAMPOLINE}.data
.align 8
ready: .long 0
hits: .long 0
.fill 256, 4, 0
ap_stack:
.fill 256, 4, 0
bsp_stack:
"""


@pytest.mark.parametrize("how,feature", [("break", "debug-bp"), ("hbreak", "debug-hw")])
def test_two_vcpus_at_one_breakpoint_give_two_stops(guest, tmp_path, how, feature):
    """All-stop with two vCPUs at ``f`` together: gdb reports the breakpoint once in each thread (a stop that came
    while the first was reported is kept and given at the next ``continue``), then the guest ends as it would
    without gdb."""
    provider, features, _, _ = guest
    if feature not in features:
        pytest.skip(f"provider {provider} has no {feature}")
    elf = multiboot_elf(SMP_BP_KERNEL, str(tmp_path), "smp")
    elf64 = str(tmp_path / "smp64.elf")
    subprocess.run(["objcopy", "-O", "elf64-x86-64", elf, elf64], check=True, capture_output=True)
    p, port = start(provider, elf)
    try:
        out = gdb(port, elf64, [f"{how} f", "continue", "continue", "info threads", "continue"])
    finally:
        status, stdout, stderr = finish(p)
    hits = re.findall(r"Thread (\d) hit Breakpoint 1, 0x[0-9a-f]+ in f \(\)", out)
    assert sorted(hits) == ["1", "2"], out
    assert status == HALT_STATUS and stdout == "2\n", stderr


def test_ctrl_c_stops_a_running_guest_and_detach_lets_it_run_on(guest, tmp_path):
    """Attached without ``w``: the connection holds the guest, ``c`` runs it, Ctrl-C (0x03) stops it (T02), ``D``
    lets it run on; SIGTERM then ends it as always (power off)."""
    import signal
    provider = guest[0]
    elf = multiboot_elf(SPIN_KERNEL, str(tmp_path), "spin")
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "vmmshim", "-m", "32M", "-l", "com1,stdio", "-o",
                          f"vmmshim.provider={provider}", "-G", str(port), "-f", f"multiboot,{elf}"],
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert "listening on" in p.stderr.readline().decode()
        assert p.stdout.read(1) == b"R", "the guest did not run before gdb attached"
        with socket.create_connection(("127.0.0.1", port), 5) as s:
            s.settimeout(10)

            def reply():
                data = b""
                while not (b"#" in data and len(data) >= data.index(b"#") + 3):
                    chunk = s.recv(4096)
                    assert chunk, "the stub closed the connection"
                    data += chunk
                return data[data.index(b"$") + 1:data.index(b"#")]

            def packet(body):
                return b"$" + body + b"#" + b"%02x" % (sum(body) & 0xFF)

            s.sendall(packet(b"?"))
            assert reply().startswith(b"T05thread:1;")
            s.sendall(packet(b"c"))
            time.sleep(0.3)
            s.sendall(b"\x03")
            assert reply() == b"T02thread:1;"
            s.sendall(packet(b"D"))
            assert reply() == b"OK"
        time.sleep(0.3)
        assert p.poll() is None, "the guest stopped after detach"
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
