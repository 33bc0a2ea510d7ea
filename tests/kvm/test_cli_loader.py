"""Issue 19 item 13 from the command line: an image the loaders cannot boot ends in one line on stderr and
status 4 with no traceback, and ``-f multiboot`` is split as hyperkit splits it (kernel, module list, command
line): a multiboot guest prints what it received, the command line with its commas and the modules.

The refusals need no hypervisor (the image is refused before the guest runs); the guests need KVM."""

import subprocess
import sys

import pytest

from tests.guests.asm import multiboot_elf
from tests.kvm.test_cli import ROOT
from tests.unit.multiboot_rig import elf_with_segment
from tests.unit.test_loader_bzimage import make_bzimage

TIMEOUT_S = 60
EXIT_ERROR = 4
EXIT_HALT = 2


def vmmshim(*args):
    return subprocess.run([sys.executable, "-m", "vmmshim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)


BAD_IMAGES = {
    "outside-ram.elf": (elf_with_segment(0x1000, 0x100, 0x180, paddr=0x8000000, entry=0x8000000),
                        "ELF segment 0 at 0x8000000-0x8000180 is outside guest RAM (0x0-0x9fc00 and "
                        "0x100000-0x4000000)"),
    "bad-entry.elf": (elf_with_segment(0x1000, 0x100, 0x180, entry=0x200000),
                      "entry point 0x200000 is outside every loaded segment (0x100000-0x100180)"),
    "memsz.elf": (elf_with_segment(0x1000, 0x800, 0x400), "segment 0 has p_memsz 0x400 smaller than p_filesz 0x800"),
    "filesz.elf": (elf_with_segment(0x1000, 0x5000, 0x5000),
                   "segment 0's file bytes 0x1000-0x6000 (p_offset 0x1000 + p_filesz 0x5000) run past the end of "
                   "the file (8192 bytes)"),
    "overflow.elf": (elf_with_segment(0x1000, 0x100, 0x180, paddr=0xFFFFFF00, entry=0xFFFFFF00),
                     "segment 0 at physical 0xffffff00 + p_memsz 0x180 ends at 0x100000080, past 4 GiB"),
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_bad_multiboot_image_is_one_line_and_status_4(tmp_path, name):
    data, needle = BAD_IMAGES[name]
    kernel = tmp_path / name
    kernel.write_bytes(data)
    p = vmmshim("-m", "64M", "-f", f"multiboot,{kernel},,console=ttyS0,115200")
    _one_line_status_4(p, f"vmmshim: {kernel}: ", needle)


@pytest.mark.parametrize("kw,needle", [
    (dict(payload=b""), "has no protected-mode code after its 4 setup sectors"),
    (dict(relocatable=0, pref_address=0x40000000), "runs at 0x40000000 (pref_address 0x40000000, not relocatable), "
                                                   "above the end of guest RAM"),
])
def test_bad_bzimage_is_one_line_and_status_4(tmp_path, kw, needle):
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(make_bzimage(**kw))
    p = vmmshim("-m", "64M", "-f", f"kexec,{kernel},,console=ttyS0,115200")
    _one_line_status_4(p, f"vmmshim: {kernel} ", needle)


def test_a_command_line_in_the_module_field_is_explained(tmp_path):
    kernel = tmp_path / "kernel.elf"
    kernel.write_bytes(elf_with_segment(0x1000, 0x100, 0x180))
    p = vmmshim("-m", "64M", "-f", f"multiboot,{kernel},console=ttyS0")
    _one_line_status_4(p, "vmmshim: cannot read module0 console=ttyS0: ", "multiboot,KERNEL,,CMDLINE")


def _one_line_status_4(p, prefix, needle):
    assert p.returncode == EXIT_ERROR, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(prefix) and needle in lines[0], p.stderr
    assert "Traceback" not in p.stderr


# A multiboot 1 kernel that prints the multiboot information it was given on COM1, then halts with IF clear
# (status 2): "cmdline=<the command line>", "mods=<count>", then "mod=<string> data=<bytes>" for each module.
INFO_KERNEL = r"""
.code32
.globl _start
.align 4
  .long 0x1BADB002, 0x0, -0x1BADB002
_start:
  cli
  mov $0x200000, %esp
  mov %ebx, %ebp                # the multiboot information
  mov $s_cmd, %esi
  call puts
  mov 16(%ebp), %esi            # cmdline
  call puts
  mov $s_mods, %esi
  call puts
  mov 20(%ebp), %eax            # mods_count (fewer than 10 here)
  add $'0', %al
  call putc
  mov $'\n', %al
  call putc
  mov 20(%ebp), %ecx
  mov 24(%ebp), %edi            # mods_addr
next_mod:
  test %ecx, %ecx
  jz done
  mov $s_mod, %esi
  call puts
  mov 8(%edi), %esi             # the module's string
  call puts
  mov $s_data, %esi
  call puts
  mov (%edi), %esi              # mod_start
  mov 4(%edi), %ebx             # mod_end
1: cmp %ebx, %esi
  jae 2f
  lodsb
  call putc
  jmp 1b
2: mov $'\n', %al
  call putc
  add $16, %edi
  dec %ecx
  jmp next_mod
done:
  hlt
  jmp done

putc:                           # AL to COM1 once the transmitter is empty (LSR.THRE)
  push %edx
  push %eax
  mov $0x3fd, %dx
3: in %dx, %al
  test $0x20, %al
  jz 3b
  pop %eax
  mov $0x3f8, %dx
  out %al, %dx
  pop %edx
  ret

puts:                           # the NUL-terminated string at ESI
  push %eax
4: lodsb
  test %al, %al
  jz 5f
  call putc
  jmp 4b
5: pop %eax
  ret

s_cmd: .asciz "cmdline="
s_mods: .asciz "\nmods="
s_mod: .asciz "mod="
s_data: .asciz " data="
"""


@pytest.fixture
def guest(tmp_path):
    kernel = multiboot_elf(INFO_KERNEL, str(tmp_path))
    mod, mod2 = tmp_path / "mod.bin", tmp_path / "mod2.bin"
    mod.write_bytes(b"first module")
    mod2.write_bytes(b"second")
    return kernel, str(mod), str(mod2)


def _run_guest(spec):
    p = vmmshim("-m", "64M", "-l", "com1,stdio", "-f", spec)
    assert p.returncode == EXIT_HALT, p.stderr
    assert "Traceback" not in p.stderr
    return p.stdout.splitlines()


@pytest.mark.parametrize("fields,cmdline,mods", [
    ("{m},console=ttyS0,115200", " console=ttyS0,115200", ["{m} data=first module"]),
    (",console=ttyS0,115200", " console=ttyS0,115200", []),
    ("{m}", "", ["{m} data=first module"]),
    ("{m};root=/dev/x debug:{m2},\"-v,-x\"", " -v,-x", ["{m} root=/dev/x debug data=first module",
                                                         "{m2} data=second"]),
])
def test_guest_receives_the_command_line_and_modules(kvm_provider, guest, fields, cmdline, mods):
    kernel, m, m2 = guest
    out = _run_guest(f"multiboot,{kernel}," + fields.format(m=m, m2=m2))
    assert out == [f"cmdline={kernel}{cmdline}", f"mods={len(mods)}",
                   *(f"mod={x.format(m=m, m2=m2)}" for x in mods)]
