"""A multiboot test kernel built here with GNU as and ld boots through ``vmmshim -f multiboot``, checks the
loader's hand-off (EAX magic, the info structure's command line), prints over COM1 and ends the VM through the
isa-debug-exit device with the status it chose, on every provider present."""

import os
import subprocess
import sys

import pytest

from tests.guests.asm import multiboot_elf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A multiboot 1 kernel: header (magic, flags = 0x3: page-align modules, memory info; checksum), then
# 32-bit code entered in flat protected mode with EAX = 0x2BADB002 and EBX = the info structure.
KERNEL = r"""
.code32
.section .text
.globl _start
.align 4
mb_header:
  .long 0x1BADB002
  .long 0x3
  .long -(0x1BADB002 + 0x3)
_start:
  mov $0x200000, %esp
  cmp $0x2BADB002, %eax        # loader magic
  jne fail
  mov 16(%ebx), %esi            # info->cmdline: "<kernel path> hello-mb", as GRUB passes it
3: cmpl $0x626d2d6f, (%esi)     # look for "o-mb"
  je 4f
  cmpb $0, (%esi)
  je fail
  inc %esi
  jmp 3b
4:
  mov $msg, %esi
1: lodsb
  test %al, %al
  jz done
  mov %al, %cl
  mov $0x3fd, %dx
2: in %dx, %al                  # wait for the transmitter (LSR.THRE)
  test $0x20, %al
  jz 2b
  mov $0x3f8, %dx
  mov %cl, %al
  out %al, %dx
  jmp 1b
done:
  mov $0x2a, %eax               # "test passed" code 42: exit status (42 << 1) | 1 = 85
  out %eax, $0xf4
  hlt
fail:
  mov $0x7, %eax                # failure code 7: exit status 15
  out %eax, $0xf4
  hlt
msg: .asciz "multiboot guest: magic and command line ok\n"
"""


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    return multiboot_elf(KERNEL, str(tmp_path_factory.mktemp("mb")))


def test_multiboot_kernel_exits_through_debug_exit(provider, kernel):
    p = subprocess.run([sys.executable, "-m", "vmmshim", "-o", f"vmmshim.provider={provider.name}", "-m", "64M",
                        "-l", "com1,stdio", "-l", "debug-exit", "-f", f"multiboot,{kernel},,hello-mb"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.stdout.splitlines() == ["multiboot guest: magic and command line ok"], p.stderr
    assert p.returncode == (0x2A << 1) | 1, p.stderr
