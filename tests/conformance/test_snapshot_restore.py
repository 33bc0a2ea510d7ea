"""Checkpoint and restore across providers (issue 23): a multiboot guest counts LAPIC timer ticks (periodic, 1 ms)
and prints a numbered line with a running checksum every 100 ticks on COM1, then a checksum of its data and ends
through isa-debug-exit. It is run once without a break; then on provider A it is suspended mid-run with
``vmmshim ctl --suspend``, and the checkpoint is restored with ``vmmshim -r`` on provider B, where it runs to its
end. The two consoles put together must be the uninterrupted run's console (so the counter, the checksums in
memory and the timer went on where they stood) and the exit status the same. Every pair of kvm and soft.

Also: a second restore of the same checkpoint gives the same output (the memory file is mapped copy-on-write and
never written), ``--checkpoint`` leaves the VM running to its normal end, and bad checkpoints are refused with one
line and status 4."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import SELECTED, open_or_skip
from tests.guests.asm import multiboot_elf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LINES = 40
TICKS_PER_LINE = 100            # 4 s in all: vmmshim ctl (a Python start-up) must reach the VM before it ends
DONE_CODE = 0x2A                 # debug-exit status (code << 1) | 1
STATUS_DONE = (DONE_CODE << 1) | 1

KERNEL = r"""
.code32
.section .text
.globl _start
.align 4
  .long 0x1BADB002, 0x3, -(0x1BADB002 + 0x3)
_start:                            # multiboot: 32-bit protected mode; on to long mode (kvm_pvm has no 32-bit iret)
  mov $0x200000, %esp
  lgdt gdtr
  ljmp $0x18, $1f
1:mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $pdpt + 3, %eax              # PML4[0] -> PDPT; PDPT[0..3] -> four PDs of 2 MiB pages: 4 GiB identity
  mov %eax, pml4
  mov $pd + 3, %eax
  mov $pdpt, %edi
  mov $4, %ecx
2:mov %eax, (%edi)
  add $4096, %eax
  add $8, %edi
  loop 2b
  xor %ecx, %ecx
3:mov %ecx, %eax
  shl $21, %eax
  or $0x83, %eax                   # present, writable, 2 MiB
  mov %eax, pd(,%ecx,8)
  inc %ecx
  cmp $2048, %ecx
  jne 3b
  mov $pml4, %eax
  mov %eax, %cr3
  mov %cr4, %eax
  or $0x20, %eax                   # PAE
  mov %eax, %cr4
  mov $0xC0000080, %ecx            # EFER.LME
  rdmsr
  or $0x100, %eax
  wrmsr
  mov %cr0, %eax
  or $0x80000000, %eax             # PG: long mode
  mov %eax, %cr0
  ljmp $0x08, $long
.code64
long:
  mov $0x10, %ax
  mov %ax, %ds
  mov %ax, %es
  mov %ax, %ss
  mov $0x200000, %rsp
  lea timer(%rip), %rax            # IDT entry 0x40: a 64-bit interrupt gate to timer (RIP-relative: as --32
  lea idt + 0x40 * 16(%rip), %rdi  # has no 64-bit absolute relocations)
  mov %ax, (%rdi)
  movw $0x08, 2(%rdi)
  movw $0x8E00, 4(%rdi)
  shr $16, %rax
  mov %ax, 6(%rdi)
  movl $0, 8(%rdi)
  lidt idtr(%rip)
  mov $0xFEE00000, %esi
  movl $0x1FF, 0xF0(%rsi)          # SVR: APIC on, spurious vector 0xFF
  movl $0xB, 0x3E0(%rsi)           # divide by 1
  movl $0x20040, 0x320(%rsi)       # LVT timer: periodic, vector 0x40
  movl $134218, 0x380(%rsi)        # 1 ms at the vlapic's 128 MiHz
  sti
  xor %ebx, %ebx                   # the line number
next:
  lea 1(%ebx), %eax
  imul $TICKS, %eax
4:cli
  cmp ticks(%rip), %eax
  jbe 5f                           # ticks >= (line + 1) * TICKS
  sti
  hlt
  jmp 4b
5:sti
  mov sum(%rip), %eax              # sum = sum * 31 + line, kept in memory
  imul $31, %eax
  add %ebx, %eax
  mov %eax, sum(%rip)
  mov %ebx, %eax
  call hex
  mov $' ', %al
  call putc
  mov sum(%rip), %eax
  call hex
  mov $'\n', %al
  call putc
  inc %ebx
  cmp $LINES, %ebx
  jne next
  xor %eax, %eax                   # a checksum of the data area: every word added
  lea data(%rip), %rsi
  lea data_end(%rip), %rdi
6:add (%rsi), %eax
  add $4, %rsi
  cmp %rdi, %rsi
  jne 6b
  call hex
  mov $'\n', %al
  call putc
  mov $DONE, %eax
  out %eax, $0xf4
  hlt
hex:                               # %eax as 8 hex digits
  push %rcx
  push %rdx
  mov %eax, %edx
  mov $8, %ecx
7:rol $4, %edx
  mov %dl, %al
  and $0xF, %al
  add $'0', %al
  cmp $'9', %al
  jbe 8f
  add $7, %al
8:call putc
  loop 7b
  pop %rdx
  pop %rcx
  ret
putc:
  push %rdx
  push %rax
  mov $0x3fd, %dx
9:in %dx, %al
  test $0x20, %al
  jz 9b
  pop %rax
  mov $0x3f8, %dx
  out %al, %dx
  pop %rdx
  ret
timer:
  push %rax
  incl ticks(%rip)
  mov $0xFEE000B0, %eax            # EOI (an absolute 0xFEE000B0 would sign-extend)
  movl $0, (%rax)
  pop %rax
  iretq
.align 8
gdt:
  .quad 0
  .quad 0x00AF9A000000FFFF         # 0x08: 64-bit code
  .quad 0x00CF92000000FFFF         # 0x10: flat data
  .quad 0x00CF9A000000FFFF         # 0x18: flat 32-bit code
gdtr:
  .word 4 * 8 - 1
  .long gdt
idtr:
  .word 256 * 16 - 1
  .long idt, 0
.align 8
ticks: .long 0                     # not in the checksum: how far it ran past the last line depends on timing
data:
sum: .long 7
filler: .fill 64, 4, 0x01020304
data_end:
.align 16
idt: .fill 256 * 16, 1, 0
.align 4096
pml4: .fill 4096, 1, 0
pdpt: .fill 4096, 1, 0
pd: .fill 4 * 4096, 1, 0
""".replace("TICKS", str(TICKS_PER_LINE)).replace("LINES", str(LINES)).replace("DONE", str(DONE_CODE))

PAIRS = [(a, b) for a in ("kvm", "soft") for b in ("kvm", "soft") if a in SELECTED and b in SELECTED]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return multiboot_elf(KERNEL, str(tmp_path_factory.mktemp("snap")))


def _vmmshim(*args):
    return [sys.executable, "-m", "vmmshim", *args]


def _start(kernel, provider, console, name, extra=()):
    return subprocess.Popen(_vmmshim("-o", f"vmmshim.provider={provider}", "-m", "32M", "-l", f"com1,file:{console}",
                                     "-l", "debug-exit", *extra, "-f", f"multiboot,{kernel}", name),
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _text(path):
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def _lines(path):
    return _text(path).splitlines()


def _ctl(*args, timeout=120):
    return subprocess.run(_vmmshim("ctl", *args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _wait_lines(path, n, proc, timeout=60):
    end = time.monotonic() + timeout
    while len(_lines(path)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, f"the guest printed {len(_lines(path))} lines in {timeout} s"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(kernel, tmp_path_factory):
    d = tmp_path_factory.mktemp("whole")
    console = str(d / "console")
    p = _start(kernel, "kvm" if "kvm" in SELECTED else "soft", console, f"snapwhole{os.getpid()}")
    out, err = p.communicate(timeout=120)
    assert p.returncode == STATUS_DONE, err
    lines = _lines(console)
    assert len(lines) == LINES + 1, lines
    return lines


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
def test_suspended_on_one_provider_the_guest_ends_on_the_other(kernel, uninterrupted, tmp_path, a, b):
    for name in {a, b}:
        open_or_skip(name)
    name = f"snap{a}{b}{os.getpid()}"
    c1, snap = str(tmp_path / "c1"), str(tmp_path / "ckp")
    p = _start(kernel, a, c1, name)
    _wait_lines(c1, 4, p)
    r = _ctl(f"--vm={name}", f"--suspend={snap}")
    out, err = p.communicate(timeout=60)
    assert r.returncode == 0, r.stderr + err
    assert p.returncode == 1, err
    first = _text(c1)
    assert 4 <= first.count("\n") < LINES, first
    meta = json.load(open(snap + ".meta"))
    assert meta["provider"] == a and meta["ncpus"] == 1
    assert os.stat(snap).st_blocks * 512 < os.stat(snap).st_size // 2       # untouched pages are holes
    for attempt in range(2):                       # the same checkpoint restores twice
        c2 = str(tmp_path / f"c2-{attempt}")
        q = subprocess.run(_vmmshim("-r", snap, "-o", f"vmmshim.provider={b}", "-l", f"com1,file:{c2}"),
                           cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert q.returncode == STATUS_DONE, q.stderr
        assert (first + _text(c2)).splitlines() == uninterrupted, (attempt, first, _text(c2))


def test_checkpoint_keeps_the_vm_running_and_status_reports(kernel, uninterrupted, tmp_path):
    prov = "kvm" if "kvm" in SELECTED else "soft"
    name = f"snapck{os.getpid()}"
    c1, snap = str(tmp_path / "c1"), str(tmp_path / "ckp")
    p = _start(kernel, prov, c1, name)
    _wait_lines(c1, 3, p)
    st = _ctl(f"--vm={name}", "--status")
    assert st.returncode == 0 and json.loads(st.stdout)["state"] == "running", st.stderr
    assert _ctl(f"--vm={name}", "--pause").returncode == 0
    assert json.loads(_ctl(f"--vm={name}", "--status").stdout)["state"] == "paused"
    assert _ctl(f"--vm={name}", f"--checkpoint={snap}").returncode == 4       # paused: resume first
    assert _ctl(f"--vm={name}", "--resume").returncode == 0
    r = _ctl(f"--vm={name}", f"--checkpoint={snap}")
    assert r.returncode == 0, r.stderr
    out, err = p.communicate(timeout=120)
    assert p.returncode == STATUS_DONE and _lines(c1) == uninterrupted, err
    assert os.path.exists(snap + ".kern") and os.path.exists(snap + ".meta")


def test_bad_checkpoints_are_refused_with_one_line(kernel, tmp_path):
    prov = "kvm" if "kvm" in SELECTED else "soft"
    name = f"snapbad{os.getpid()}"
    c1, snap = str(tmp_path / "c1"), str(tmp_path / "ckp")
    p = _start(kernel, prov, c1, name)
    _wait_lines(c1, 2, p)
    assert _ctl(f"--vm={name}", f"--suspend={snap}").returncode == 0
    p.communicate(timeout=60)

    def restore(*extra):
        return subprocess.run(_vmmshim("-r", snap, "-l", f"com1,file:{tmp_path / 'c2'}", *extra), cwd=ROOT,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    meta = open(snap + ".meta").read()
    cases = {
        "truncated memory": lambda: os.truncate(snap, 4096),
        "corrupted kern": lambda: open(snap + ".kern", "a").write(" "),
        "wrong version": lambda: open(snap + ".meta", "w").write(meta.replace('"version": 1', '"version": 99')),
        "unknown device": lambda: open(snap + ".meta", "w").write(meta.replace('"rtc"', '"no-such-device"')),
        "missing memory": lambda: os.unlink(snap),
    }
    pristine = {p_: open(p_, "rb").read() for p_ in (snap, snap + ".kern", snap + ".meta")}
    for what, damage in cases.items():
        for p_, data in pristine.items():
            open(p_, "wb").write(data)
        damage()
        q = restore()
        assert q.returncode == 4, (what, q.stderr)
        lines = q.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vmmshim: "), (what, q.stderr)
        assert not os.path.exists(tmp_path / "c2") or os.path.getsize(tmp_path / "c2") == 0, what
    assert _ctl("--vm=no-such-vm", "--status").returncode == 4
