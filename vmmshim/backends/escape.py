"""The console escape keys of a tty on the ``stdio`` backend, QEMU's ``-serial mon:stdio`` keys: ``Ctrl-A``
followed by a key is a command for the VMM, not input for the guest (the terminal is raw, so Ctrl-C and Ctrl-Z
reach the guest and cannot end the VMM). What each key does is :class:`vmmshim.shutdown.Shutdown`'s business.

Not supported: changing the escape character, QEMU's monitor and its other keys (``c``, ``s``, ``t``).
"""

ESCAPE_CHAR = 0x01          # Ctrl-A
KEY_POWEROFF = ord("x")
KEY_BUTTON = ord("b")
KEY_HELP = ord("h")
ESCAPE_HELP = (b"\r\nvmmshim console keys: Ctrl-A x power off now, Ctrl-A b ACPI power button, "
               b"Ctrl-A Ctrl-A send Ctrl-A, Ctrl-A h this help\r\n")


class EscapeFilter:
    """Takes ``Ctrl-A KEY`` pairs out of console input (the state carries across reads: a Ctrl-A may end one
    read and its key start the next). :meth:`feed` returns ``(bytes for the guest, [keys])``; ``Ctrl-A Ctrl-A``
    is one Ctrl-A for the guest, and an unknown key is dropped with its Ctrl-A, as QEMU does."""

    def __init__(self, keys=(KEY_POWEROFF, KEY_BUTTON, KEY_HELP)):
        self._keys = frozenset(keys)
        self._pending = False

    def feed(self, data):
        if not self._pending and ESCAPE_CHAR not in data:
            return data, []
        out, keys = bytearray(), []
        for b in data:
            if self._pending:
                self._pending = False
                if b == ESCAPE_CHAR:
                    out.append(b)
                elif b in self._keys:
                    keys.append(b)
            elif b == ESCAPE_CHAR:
                self._pending = True
            else:
                out.append(b)
        return bytes(out), keys
