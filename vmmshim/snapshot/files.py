"""A checkpoint's files, laid out as bhyve's (``bhyvectl --checkpoint=FILE``): ``FILE`` is guest memory, ``FILE.kern``
the kernel side (vCPUs and the interrupt controllers, ``ops/vmm_snapshot.py``), ``FILE.meta`` a JSON document
with the configuration the VM was built from, every device's state, and what restore checks before it trusts the
rest. bhyve's ``.kern`` is binary and its ``.meta`` names each device's buffer in the ``.kern``; here both are JSON
(the ``.kern`` is kept apart so that a tool can read the devices without the vCPUs).

- Memory: the host buffer behind guest RAM, lowmem then highmem (``vmmshim/vm.py``'s layout), written page by
  page where a page is not all zeros; the file is truncated to the full size first, so untouched pages stay holes
  (a sparse file). Written to ``FILE.tmp`` files and renamed at the end: a checkpoint that fails leaves no file
  that looks complete.
- ``.meta``: ``format`` (:data:`FORMAT`), ``version`` (:data:`VERSION`), ``memory`` (size and the SHA-256 of the
  first :data:`DIGEST_SPAN` bytes, to catch a memory file that is not this checkpoint's), ``kern_sha256``,
  ``config`` (every key the VM was built from), ``disks`` (path, size and mtime of each image), ``devices``,
  ``taken`` (the wall clock), ``timer_ns`` (the timer service's clock when the states were read), ``provider``.

Reading checks all of it and raises :class:`CheckpointError` with one line saying what is wrong; nothing is
written by a read.

Not supported: compression, incremental checkpoints, migration over a socket.
"""

import hashlib
import json
import os

FORMAT = "vmmshim-checkpoint"
VERSION = 1
PAGE = 4096
CHUNK = 2 << 20
DIGEST_SPAN = 1 << 20
ZERO_CHUNK = bytes(CHUNK)
ZERO_PAGE = bytes(PAGE)


class CheckpointError(Exception):
    """A checkpoint that cannot be written or read; the message is one line."""


def paths(base):
    return base, base + ".kern", base + ".meta"


def write_memory(path, buf):
    """Writes ``buf`` (a memoryview of guest RAM) to ``path`` as a sparse file; returns the SHA-256 of its first
    :data:`DIGEST_SPAN` bytes."""
    size = len(buf)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off in range(0, size, CHUNK):
            chunk = buf[off:off + CHUNK]
            if chunk == memoryview(ZERO_CHUNK)[:len(chunk)]:
                continue
            start = None
            for p in range(0, len(chunk), PAGE):
                page = chunk[p:p + PAGE]
                zero = page == memoryview(ZERO_PAGE)[:len(page)]
                if not zero and start is None:
                    start = p
                elif zero and start is not None:
                    os.pwrite(fd, chunk[start:p], off + start)
                    start = None
            if start is not None:
                os.pwrite(fd, chunk[start:], off + start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return hashlib.sha256(buf[:DIGEST_SPAN]).hexdigest()


def write(base, memory, kern, meta):
    """Writes the three files of checkpoint ``base`` (see the module docstring); ``memory`` is guest RAM."""
    mem_path, kern_path, meta_path = paths(base)
    tmp = [p + ".tmp" for p in (mem_path, kern_path, meta_path)]
    try:
        digest = write_memory(tmp[0], memory)
        kern_text = json.dumps(kern, sort_keys=True)
        _write_text(tmp[1], kern_text)
        meta = dict(meta, format=FORMAT, version=VERSION,
                    memory={"size": len(memory), "sha256_head": digest},
                    kern_sha256=hashlib.sha256(kern_text.encode()).hexdigest())
        _write_text(tmp[2], json.dumps(meta, indent=1, sort_keys=True))
        for t, p in zip(tmp, (mem_path, kern_path, meta_path)):
            os.replace(t, p)
    except OSError as exc:
        for t in tmp:
            try:
                os.unlink(t)
            except OSError:
                pass
        raise CheckpointError(f"{exc.filename or base}: {exc.strerror}") from None


def _write_text(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read(base):
    """``(meta, kern)`` of checkpoint ``base``, checked against each other and the memory file; CheckpointError
    names the first thing wrong."""
    mem_path, kern_path, meta_path = paths(base)
    meta = _read_json(meta_path, "metadata")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a vmmshim checkpoint")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{meta_path}: checkpoint version {meta.get('version')!r}, this vmmshim reads "
                              f"version {VERSION}")
    for key in ("memory", "config", "devices", "kern_sha256", "timer_ns"):
        if key not in meta:
            raise CheckpointError(f"{meta_path}: no {key!r} in the metadata")
    try:
        with open(kern_path, "rb") as f:
            kern_bytes = f.read()
    except OSError as exc:
        raise CheckpointError(f"{kern_path}: {exc.strerror}") from None
    if hashlib.sha256(kern_bytes).hexdigest() != meta["kern_sha256"]:
        raise CheckpointError(f"{kern_path}: does not match the metadata (changed or truncated)")
    try:
        kern = json.loads(kern_bytes)
    except ValueError:
        raise CheckpointError(f"{kern_path}: not JSON") from None
    size = meta["memory"].get("size") if isinstance(meta["memory"], dict) else None
    try:
        st = os.stat(mem_path)
        with open(mem_path, "rb") as f:
            head = f.read(min(DIGEST_SPAN, size or 0))
    except OSError as exc:
        raise CheckpointError(f"{mem_path}: {exc.strerror}") from None
    if not isinstance(size, int) or st.st_size != size or \
            hashlib.sha256(head).hexdigest() != meta["memory"].get("sha256_head"):
        raise CheckpointError(f"{mem_path}: the memory file is not this checkpoint's (size {st.st_size}, "
                              f"expected {size})")
    return meta, kern


def _read_json(path, what):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as exc:
        raise CheckpointError(f"{path}: {exc.strerror}") from None
    except ValueError:
        raise CheckpointError(f"{path}: the {what} is not JSON (truncated or corrupted)") from None


def disk_paths(cfg):
    """The disk images of a configuration: each PCI function's ``path`` that names a regular file (a 9p share's
    directory is not one)."""
    return [opts["path"] for _, _, _, opts in cfg.pci_slots()
            if isinstance(opts.get("path"), str) and os.path.isfile(opts["path"])]


def disk_facts(path):
    """What restore checks of a disk image: ``{"path", "size", "mtime_ns"}``."""
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
