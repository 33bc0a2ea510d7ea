"""A test device compatible with QEMU's ``isa-debug-exit`` (``hw/misc/debugexit.c``): a guest write of ``value``
to its port (default 0xF4, one to four bytes wide) ends the VM with exit status ``(value << 1) | 1``, so guest
test suites written for QEMU (kvm-unit-tests' ``exit(code)``) report their result to vmmshim's exit status.
Reads return all-ones, as from an empty ISA port.

Snapshots (``snapshot.py``): the value written (None until the guest writes; once it has, the VM is ending).

Not supported: QEMU's ``iosize`` other than its four-byte default window.
"""

from .snapshot import SnapshotError, check, header, int_in

DEFAULT_PORT = 0xF4
PORT_SIZE = 4


def exit_status(value):
    """The process exit status QEMU reports for a write of ``value`` (truncated to 8 bits by the OS)."""
    return ((value << 1) | 1) & 0xFF


class DebugExit:
    def __init__(self, on_exit):
        """``on_exit(status)`` ends the VM."""
        self._on_exit = on_exit
        self.value = None

    def read(self, offset, size):
        return (1 << (8 * size)) - 1

    def write(self, offset, size, value):
        if self.value is None:
            self.value = value
            self._on_exit(exit_status(value))

    snapshot_version = 1

    def snapshot(self):
        return {**header(self), "value": self.value}

    def restore(self, state, shift_ns):
        check(self, state, ("value",))
        v = state["value"]
        if v is not None and not int_in(v, 0, (1 << 32) - 1):
            raise SnapshotError(f"DebugExit: value {v!r} is not a 32-bit value")
        self.value = v
