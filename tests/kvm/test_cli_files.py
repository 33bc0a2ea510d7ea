"""Issue 19: a FIFO or a character device given as a kernel, an initrd, a multiboot module or a ``-k`` file is
refused in one line with status 4: no hang on a FIFO without a writer, no MemoryError reading ``/dev/zero``.

None of these needs a hypervisor: the files are refused before a VM is made."""

import os
import subprocess
import sys

import pytest

from tests.unit.multiboot_rig import elf_with_segment
from tests.unit.test_loader_bzimage import make_bzimage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def vmmshim(*args):
    return subprocess.run([sys.executable, "-m", "vmmshim", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)


@pytest.fixture
def files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(make_bzimage())
    mbkernel = tmp_path / "kernel.elf"
    mbkernel.write_bytes(elf_with_segment(0x1000, 0x100, 0x180))
    return {"FIFO": str(fifo), "KERNEL": str(kernel), "MBKERNEL": str(mbkernel)}


@pytest.mark.parametrize("args,bad,kind", [
    (("-f", "kexec,/dev/zero"), "/dev/zero", "a character device"),
    (("-f", "kexec,FIFO"), "FIFO", "a FIFO"),
    (("-f", "kexec,KERNEL,FIFO,console=ttyS0"), "FIFO", "a FIFO"),
    (("-f", "kexec,KERNEL,/dev/zero,console=ttyS0"), "/dev/zero", "a character device"),
    (("-f", "multiboot,MBKERNEL,FIFO,x"), "FIFO", "a FIFO"),
    (("-f", "multiboot,MBKERNEL,/dev/zero,x"), "/dev/zero", "a character device"),
    (("-k", "FIFO", "-f", "hello"), "FIFO", "a FIFO"),
    (("-k", "/dev/zero", "-f", "hello"), "/dev/zero", "a character device"),
])
def test_not_a_regular_file_is_one_line_and_status_4(files, args, bad, kind):
    args = [",".join(files.get(p, p) for p in a.split(",")) for a in args]
    bad = files.get(bad, bad)
    p = vmmshim("-m", "64M", *args)       # subprocess.TimeoutExpired: it hung
    assert p.returncode == 4, p.stderr
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("vmmshim: ") and bad in lines[0], p.stderr
    assert f"is not a regular file ({kind})" in lines[0], p.stderr
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr
