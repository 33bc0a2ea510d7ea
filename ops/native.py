"""Building vmmshim's small C libraries once, with the host's C compiler, for cffi to load in ABI mode.

A library is cached under ``$VMMSHIM_CACHE`` (else ``~/.cache/vmmshim``, else a temporary directory) by the hash
of its source as ``<stem>-<hash>.so``, built to a temporary name and renamed, so concurrent first runs never see
half a file. Used by the KVM provider's run loop (``ops/nvmm/kvm/fastrun.py``), the devices' compiled data paths
(``vmmshim/backends/``: ``blkfast.py``, ``nvmefast.py``, ``ahcifast.py``, ``p9fast.py``, ``netfast.py``) and the
slirp loop (``slirp_fast.py``).

Not supported: other compilers than ``$CC`` (default ``cc``), flags other than ``-O2 -shared -fPIC``.
"""

import hashlib
import os
import pathlib
import subprocess
import tempfile
import threading


def cache_dirs():
    env = os.environ.get("VMMSHIM_CACHE")
    if env:
        yield pathlib.Path(env)
    yield pathlib.Path.home() / ".cache" / "vmmshim"
    yield pathlib.Path(tempfile.gettempdir()) / f"vmmshim-{os.getuid()}"


def build(source, stem):
    """The path of the shared library built from ``source``: a path, or a tuple of paths (the C files compiled
    together and the headers they include, which count in the hash only). Raises OSError with a one-line reason
    when it cannot be built."""
    files = tuple(source) if isinstance(source, (tuple, list)) else (source,)
    tag = hashlib.sha256(b"".join(pathlib.Path(f).read_bytes() for f in files)).hexdigest()[:16]
    units = [str(f) for f in files if not str(f).endswith(".h")]
    last = None
    for d in cache_dirs():
        lib = d / f"{stem}-{tag}.so"
        if lib.exists():
            return lib
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{stem}-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as exc:
            last = f"{d}: {exc.strerror}"
            continue
        cmd = [os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", tmp, *units]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            os.unlink(tmp)
            raise OSError(f"cannot run {cmd[0]}: {exc}") from None
        if proc.returncode != 0:
            os.unlink(tmp)
            err = (proc.stderr.strip().splitlines() or ["no message"])[-1]
            raise OSError(f"{cmd[0]} failed on {', '.join(pathlib.Path(u).name for u in units)}: {err}")
        os.replace(tmp, lib)
        return lib
    raise OSError(f"no writable cache directory ({last})")


def open_library(source, stem, cdef):
    """``(ffi, lib, path)``: the library built from ``source`` (:func:`build`) opened with cffi in ABI mode with the
    declarations ``cdef``. Raises ImportError without cffi, OSError when it cannot be built or loaded."""
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(cdef)
    path = build(source, stem)
    return ffi, ffi.dlopen(str(path)), path


_OFF = ("0", "false", "no", "off")


class LazyLibrary:
    """A library opened with :func:`open_library` on first use, once, from any thread: :meth:`get` returns
    ``(ffi, lib)`` or None, and then ``why`` says why not and ``path`` where it was built. ``env_off``: an
    environment variable that turns it off (``0``, ``false``, ``no``, ``off``)."""

    def __init__(self, source, stem, cdef, env_off=None):
        self.source, self.stem, self.cdef, self.env_off = source, stem, cdef, env_off
        self._lock = threading.Lock()
        self._loaded = None         # (ffi, lib) once loaded, False once it failed
        self.why = None
        self.path = None

    def get(self):
        with self._lock:
            if self._loaded is None:
                off = os.environ.get(self.env_off, "1") if self.env_off else "1"
                if off in _OFF:
                    self._loaded, self.why = False, f"{self.env_off}={off}"
                else:
                    try:
                        ffi, lib, self.path = open_library(self.source, self.stem, self.cdef)
                        self._loaded = (ffi, lib)
                    except (ImportError, OSError) as exc:
                        self._loaded, self.why = False, str(exc)
            return self._loaded or None
