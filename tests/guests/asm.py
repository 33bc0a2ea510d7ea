"""Guest programs for the tests, assembled with GNU ``as`` at test time and linked flat at their load address."""

import functools
import os
import subprocess
import tempfile


class AssemblerMissing(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def assemble(source, base=0):
    """Flat binary of GNU-as ``source`` (AT&T syntax, with its own ``.code16/.code32/.code64``) linked at
    ``base``. Symbols are available through :func:`symbols`."""
    return _build(source, base)[0]


@functools.lru_cache(maxsize=None)
def symbols(source, base=0):
    """``{name: address}`` of the global labels of ``source`` as linked at ``base``."""
    return _build(source, base)[1]


@functools.lru_cache(maxsize=None)
def _build(source, base):
    with tempfile.TemporaryDirectory(prefix="vmmshim-asm-") as d:
        src, obj, elf, out = (os.path.join(d, n) for n in ("g.S", "g.o", "g.elf", "g.bin"))
        with open(src, "w") as f:
            f.write(source + "\n")
        try:
            _run(["as", "--64", "-o", obj, src])
            _run(["ld", "-m", "elf_x86_64", "-N", "-Ttext", hex(base), "-e", hex(base), "-o", elf, obj])
            _run(["objcopy", "-O", "binary", "-j", ".text", elf, out])
            nm = subprocess.run(["nm", elf], capture_output=True, text=True, check=True).stdout
        except FileNotFoundError as exc:
            raise AssemblerMissing(f"GNU binutils are needed to build guest programs: {exc}") from None
        syms = {}
        for line in nm.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1] in "tTdDbBaA":
                syms[parts[2]] = int(parts[0], 16)
        with open(out, "rb") as f:
            return f.read(), syms


def multiboot_elf(source, directory, name="kernel"):
    """Links the 32-bit multiboot kernel ``source`` (its own header, entry ``_start``) at 1 MiB in
    ``directory``; returns the ELF's path."""
    src, obj, elf = (os.path.join(directory, f"{name}{ext}") for ext in (".S", ".o", ".elf"))
    with open(src, "w") as f:
        f.write(source)
    try:
        _run(["as", "--32", "-o", obj, src])
        _run(["ld", "-m", "elf_i386", "-Ttext", "0x100000", "-e", "_start", "-o", elf, obj])
    except FileNotFoundError as exc:
        raise AssemblerMissing(f"GNU binutils are needed to build guest programs: {exc}") from None
    return elf


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr}")
