"""POST (power-on self-test) code ports: 0x80 (the diagnostic port every PC BIOS writes) and 0x84 (bhyve's
``post.c``).

Spec: none beyond the IBM PC convention; a write stores the code, a read returns the last value written
(``initial`` before any write). bhyve's own 0x84 answers 0xFF to every read and takes no writes; this model
stores and reads back on both, which is a superset. An optional ``on_code(value)`` callback sees every write
(for logging boot progress).

Snapshots (``snapshot.py``): the last value written.

Not supported: port-80 delay semantics (a write costs what any exit costs), LED displays.
"""

from .snapshot import SnapshotError, check, header, int_in


class PostPort:
    def __init__(self, on_code=None, initial=0xFF):
        self._on_code = on_code
        self.value = initial

    def read(self, offset, size):
        if offset != 0:
            return (1 << (8 * size)) - 1
        return (self.value | ~0xFF) & ((1 << (8 * size)) - 1)

    def write(self, offset, size, value):
        if offset != 0:
            return
        self.value = value & 0xFF
        if self._on_code is not None:
            self._on_code(self.value)

    snapshot_version = 1

    def snapshot(self):
        return {**header(self), "value": self.value}

    def restore(self, state, shift_ns):
        check(self, state, ("value",))
        v = state["value"]
        if not int_in(v, 0, 0xFF):
            raise SnapshotError(f"PostPort: value {v!r} is not a byte")
        self.value = v
