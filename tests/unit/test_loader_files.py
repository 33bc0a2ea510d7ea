"""Only regular files are read (issue 19): a kernel, initrd, multiboot module or ``-k`` file that is a FIFO must not
block, a device must not be read until memory runs out, and a file larger than guest memory is refused unread
(``vmmshim/loader/common.py``'s ``read_regular_file``)."""

import os
import threading

import pytest

from vmmshim.loader import LoaderError, load_kexec, load_multiboot
from vmmshim.loader.common import InputFileError, read_regular_file

from .test_loader_bzimage import LOWMEM, make_bzimage
from .multiboot_rig import LOWMEM as MB_LOWMEM, elf_with_segment



def without_blocking(fn, fifo=None, seconds=10):
    """``fn()``'s exception, run in a thread; a call still blocked after ``seconds`` fails the test (and a
    writer is opened on ``fifo`` to let it go)."""
    box = {}

    def body():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["exc"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"blocked for more than {seconds} s")
    return box


def test_read_regular_file_reads_a_regular_file(tmp_path):
    f = tmp_path / "k"
    f.write_bytes(b"abc" * 1000)
    assert read_regular_file(f, "kernel") == b"abc" * 1000
    assert read_regular_file(str(f), "kernel", limit=3000) == b"abc" * 1000


def test_read_regular_file_refuses_a_fifowithout_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    box = without_blocking(lambda: read_regular_file(fifo, "kernel"), fifo)
    assert isinstance(box.get("exc"), InputFileError), box
    assert str(box["exc"]) == f"kernel {fifo} is not a regular file (a FIFO)"


def test_read_regular_file_refuses_dev_zero():
    box = without_blocking(lambda: read_regular_file("/dev/zero", "initrd"))
    assert isinstance(box.get("exc"), InputFileError), box
    assert str(box["exc"]) == "initrd /dev/zero is not a regular file (a character device)"


def test_read_regular_file_refuses_a_directory(tmp_path):
    with pytest.raises(InputFileError, match=r"^module0 .* is not a regular file \(a directory\)$"):
        read_regular_file(tmp_path, "module0")


def test_read_regular_file_refuses_more_than_the_limit_unread(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 40)                 # sparse: 1 TiB that must not be read
    with pytest.raises(InputFileError, match=r"\(1099511627776 bytes\) does not fit in 4096 bytes of guest memory"):
        read_regular_file(big, "initrd", limit=4096)


@pytest.mark.parametrize("which", ["kernel", "initrd"])
def test_kexec_refuses_a_fifo_or_device(tmp_path, which):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    k = tmp_path / "vmlinuz"
    k.write_bytes(make_bzimage())
    for bad, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        args = (bad, None) if which == "kernel" else (k, bad)
        box = without_blocking(lambda: load_kexec(*args, "", LOWMEM), fifo)
        assert isinstance(box.get("exc"), LoaderError), box
        assert str(box["exc"]) == f"{which} {bad} is not a regular file ({kind})"


def test_kexec_initrd_larger_than_memory_is_refused_unread(tmp_path):
    k = tmp_path / "vmlinuz"
    k.write_bytes(make_bzimage())
    rd = tmp_path / "initrd"
    with open(rd, "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(LoaderError, match="bytes of guest memory"):
        load_kexec(k, rd, "", LOWMEM)


def test_module_fifo_or_device_refused_without_blocking(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device")):
        box = without_blocking(lambda: load_multiboot(elf_with_segment(0x1000, 0x100, 0x180), [(bad, "")], "",
                                                      MB_LOWMEM), fifo)
        assert isinstance(box.get("exc"), LoaderError), box
        assert str(box["exc"]) == f"module0 {bad} is not a regular file ({kind})"


def test_module_larger_than_memory_refused_unread(tmp_path):
    big = tmp_path / "big.mod"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(LoaderError, match="bytes of guest memory"):
        load_multiboot(elf_with_segment(0x1000, 0x100, 0x180), [(big, "")], "", MB_LOWMEM)
