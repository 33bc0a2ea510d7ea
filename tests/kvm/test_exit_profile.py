"""bench/exit_profile.py on a real KVM: a multiboot guest makes 500 port writes to 0x80 and halts; the profile
counts them under their port and accounts the run's time."""

import re
import subprocess
import sys
from pathlib import Path

from tests.guests.asm import multiboot_elf

ROOT = Path(__file__).resolve().parents[2]
N = 500
KERNEL = rf"""
.code32
.globl _start
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  mov ${N}, %ecx
  mov $0x80, %dx
1: out %al, %dx
  dec %ecx
  jnz 1b
  cli
  hlt
"""


def test_profile_counts_the_port_exits(kvm_provider, tmp_path):
    elf, out = multiboot_elf(KERNEL, str(tmp_path)), tmp_path / "profile.txt"
    p = subprocess.run([sys.executable, "-m", "bench.exit_profile", "--out", str(out), "--", "-m", "32M",
                        "-f", f"multiboot,{elf}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr          # halted with interrupts off: bhyve's status 2
    text = out.read_text()
    m = re.search(r"^IO 0x80\s+(\d+)\s+([\d.]+)", text, re.M)
    assert m and int(m.group(1)) >= N and float(m.group(2)) > 0, text     # count, user space us per exit
    head = re.match(r"(\d+) KVM_RUNs: ([\d.]+) s inside", text)
    assert head and int(head.group(1)) > N, text
