"""Device snapshots (issue 23; bhyve's ``BHYVE_SNAPSHOT`` work, where each device has a ``snapshot`` callback
that saves and restores its ``struct``; rust-vmm's vm-superio keeps a device's state in a plain ``State`` value).

A device that can be checkpointed is :class:`Snapshottable`:

- ``snapshot_version``: an int, raised whenever the meaning of the state changes;
- ``snapshot() -> dict``: the device's whole guest-visible state as JSON values (ints, bools, strs, None, lists,
  dicts with str keys; bytes through :func:`b2s`), called with every vCPU paused and the device's own threads
  quiet, so nothing moves while it is read. Times from the timer service (``TimerService.now_ns``) are stored as
  they are, absolute; an armed timer is stored as its deadline;
- ``restore(state, shift_ns)``: puts that state into a device built from the same configuration (a fresh one,
  never run), adding ``shift_ns`` to every stored time before it re-arms the timers that were armed. The VM
  passes ``shift_ns = now - snapshot time`` on its new timer service, so the guest's virtual time stands still
  while the snapshot sits on disk and goes on from there. A state it cannot take (another version, a field
  missing or out of range) raises :class:`SnapshotError`; the VM then refuses the restore with the device's name.

A device whose own thread may write guest memory (virtio-net's receive path) is also :class:`Quiescent`.

A device that cannot be checkpointed (a host resource that does not survive, a request in flight it cannot
finish) raises :class:`SnapshotError` from ``snapshot()``, saying why; the checkpoint is then refused.

Not here: the vCPU state (``ops/``), guest memory and the files (``vmmshim/snapshot/``), the quiet point.
"""

from typing import Protocol, runtime_checkable


class SnapshotError(Exception):
    """A device cannot save its state now, or cannot take the state it is given."""


@runtime_checkable
class Snapshottable(Protocol):
    snapshot_version: int

    def snapshot(self) -> dict: ...

    def restore(self, state: dict, shift_ns: int) -> None: ...


@runtime_checkable
class Quiescent(Protocol):
    """A device with a thread of its own that may touch guest memory or its queues at any time (virtio-net's
    receive thread): ``quiesced()`` is a context manager inside which that thread does nothing. A checkpoint holds
    it from before the states are read until guest memory is written."""

    def quiesced(self): ...


def b2s(data):
    """Bytes as a JSON string (hex)."""
    return bytes(data).hex()


def s2b(text, size=None):
    """:func:`b2s`'s string back to bytes; SnapshotError if it is not hex or not ``size`` bytes."""
    try:
        data = bytes.fromhex(text)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"not a hex string: {text!r:.40}") from exc
    if size is not None and len(data) != size:
        raise SnapshotError(f"{len(data)} bytes where {size} were saved")
    return data


def header(device):
    """The fields every device state starts with: its class and version."""
    return {"device": type(device).__name__, "version": device.snapshot_version}


def check(device, state, keys=()):
    """SnapshotError unless ``state`` is a dict saved by this kind of device at its version with every one of
    ``keys``."""
    if not isinstance(state, dict):
        raise SnapshotError(f"{type(device).__name__}: the state is not a mapping")
    want = header(device)
    got = {k: state.get(k) for k in want}
    if got != want:
        raise SnapshotError(f"{want['device']}: state saved by {got['device']} version {got['version']}, this is "
                            f"version {want['version']}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise SnapshotError(f"{want['device']}: the state has no {', '.join(missing)}")


def save_fields(obj, names):
    """``{name: getattr(obj, name)}`` for plain JSON-valued attributes."""
    return {n: getattr(obj, n) for n in names}


def load_fields(obj, state, names, types=(int, bool, type(None), str, list)):
    """Sets the attributes ``names`` from ``state``, each checked to have one of ``types``."""
    for n in names:
        v = state.get(n)
        if not isinstance(v, types):
            raise SnapshotError(f"{type(obj).__name__}.{n}: {type(v).__name__} is not a saved value")
        setattr(obj, n, v)


def int_in(v, lo, hi):
    """Whether ``v`` is an int (a bool is not one) in ``lo``..``hi``, both included."""
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def int_fits(v, mask):
    """Whether ``v`` is a non-negative int (not a bool) with no bit outside ``mask``."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0 and not v & ~mask


def want_bool(device, where, v):
    """``v`` if it is a bool, else SnapshotError naming ``device`` and ``where``."""
    if not isinstance(v, bool):
        raise SnapshotError(f"{device}: {where} = {v!r:.40} is not a bool")
    return v


def want_dict(device, where, v, keys):
    """``v`` if it is a mapping with every one of ``keys``, else SnapshotError naming ``device`` and ``where``."""
    if not isinstance(v, dict):
        raise SnapshotError(f"{device}: {where} is not a mapping")
    missing = [k for k in keys if k not in v]
    if missing:
        raise SnapshotError(f"{device}: {where} has no {', '.join(missing)}")
    return v


def shifted(t, shift_ns):
    """An absolute time moved by ``shift_ns`` (None stays None)."""
    return None if t is None else t + shift_ns
