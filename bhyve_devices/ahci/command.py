"""One issued command slot as the HBA fetches it (AHCI 1.3.1 section 4.2.2 the command header, 4.2.3 the command
table, 5.6 the data transfers), and the result a device gives back.

:meth:`Command.fetch` reads slot ``n``'s header from the command list, then the command FIS and the ATAPI command
from its command table (copied: the guest may change the table while the command runs), and keeps a view of the
PRDT. A device moves data with :meth:`Command.buffers` (views into guest RAM covering exactly the bytes asked for:
a disk's ``preadv``/``pwritev`` go straight to them), :meth:`Command.data_in` (a small reply copied out: IDENTIFY,
INQUIRY...) and :meth:`Command.data_out` (a small payload copied in: TRIM ranges).

Every guest address goes through the device's ``GuestMemory`` (bounds-checked views); a header, table or PRDT
entry outside guest RAM raises :class:`HostBusFault`, which the port reports as AHCI's host bus fatal error
(PxIS.HBFS, "a bad software pointer") without the command having moved any data: :meth:`buffers` builds every
view before the device starts a transfer. A PRDT that holds fewer bytes than a transfer needs raises
:class:`PrdtShort` (the device aborts the command).

Not supported: the PRD interrupt bit (the command's end interrupts), a PRDT entry's odd byte counts are taken as
given (bit 0 of DBC "shall be 1" is not enforced), port multiplier fields.
"""

import operator
from bisect import bisect_left
from itertools import accumulate

from .layouts import (ACMD_OFFSET, ACMD_SIZE, COMMAND_HEADER_SIZE, CTBA_ALIGN, HDR_ATAPI, HDR_PRDBC_OFFSET,
                      HDR_WRITE, HEADER, PRD, PRD_DBA_MASK, PRD_DBC_MASK, PRDT_ENTRY_SIZE, PRDT_OFFSET, STS_ERR,
                      STS_OK, U32)

CFIS_BYTES = 20             #: a Register H2D FIS


class HostBusFault(Exception):
    """A guest address outside RAM: the HBA's host bus fatal error."""


class PrdtShort(Exception):
    """The PRDT describes fewer bytes than the transfer."""


class Result:
    """How a command ended: ATA ``status`` and ``error``, the bytes moved (PxPRDBC), ``pio`` (a PIO data-in
    command: a PIO Setup FIS goes first), ``tf`` (the 7 taskfile bytes 4-10 of the D2H FIS; None: the command's
    own) and ``count`` (bytes 12-13; None: the command's own)."""

    __slots__ = ("status", "error", "transferred", "pio", "tf", "count")

    def __init__(self, status=STS_OK, error=0, transferred=0, pio=False, tf=None, count=None):
        self.status, self.error, self.transferred, self.pio, self.tf, self.count = (
            status, error, transferred, pio, tf, count)

    @property
    def failed(self):
        return bool(self.status & STS_ERR)

    def __repr__(self):
        return (f"Result(status={self.status:#x}, error={self.error:#x}, transferred={self.transferred}, "
                f"pio={self.pio})")


def ok(transferred=0, pio=False, tf=None, count=None):
    return Result(STS_OK, 0, transferred, pio, tf, count)


def failed(error, tf=None, count=None, pio=False):
    return Result(STS_OK | STS_ERR, error, 0, pio, tf, count)


class Command:
    """Slot ``slot``'s command as fetched (see the module docstring)."""

    __slots__ = ("mem", "slot", "flags", "prdtl", "cfis", "acmd", "_prdt", "_header_gpa")

    def __init__(self, mem, slot, flags, prdtl, cfis, acmd, prdt, header_gpa):
        self.mem, self.slot, self.flags, self.prdtl = mem, slot, flags, prdtl
        self.cfis, self.acmd, self._prdt, self._header_gpa = cfis, acmd, prdt, header_gpa

    @classmethod
    def fetch(cls, mem, cmdlist, slot):
        """Reads slot ``slot`` of the command list at ``cmdlist``; HostBusFault where it leaves guest RAM."""
        gpa = cmdlist + slot * COMMAND_HEADER_SIZE
        try:
            flags, prdtl, _, ctba = HEADER.unpack(mem.view(gpa, HEADER.size))
            table = mem.view(ctba & ~CTBA_ALIGN, PRDT_OFFSET + prdtl * PRDT_ENTRY_SIZE)
        except OSError as exc:
            raise HostBusFault(str(exc)) from None
        return cls(mem, slot, flags, prdtl, bytes(table[:CFIS_BYTES]),
                   bytes(table[ACMD_OFFSET:ACMD_OFFSET + ACMD_SIZE]), table[PRDT_OFFSET:], gpa)

    @property
    def writes(self):
        """The header's W bit (data goes to the device)."""
        return bool(self.flags & HDR_WRITE)

    @property
    def atapi(self):
        return bool(self.flags & HDR_ATAPI)

    def _views(self, length, partial):
        fast = self._ram_views(length)
        if fast is not None:
            return fast
        segs, left = [], length
        try:
            for dba, _, dbc in PRD.iter_unpack(self._prdt):
                if not left:
                    break
                n = min((dbc & PRD_DBC_MASK) + 1, left)
                segs.append(self.mem.view(dba & PRD_DBA_MASK, n))
                left -= n
        except OSError as exc:
            raise HostBusFault(str(exc)) from None
        if left and not partial:
            raise PrdtShort(f"the PRDT holds {length - left} of {length} bytes")
        return segs

    def _ram_views(self, length):
        """The views of :meth:`_views` with whole-list operations (a 1 MiB request is 256 entries; a Python step
        each cost more than the transfer in the nested lab), where the memory has a ``ram`` view holding every
        entry and the PRDT covers ``length``; None otherwise (the entry-by-entry path then decides)."""
        ram = getattr(self.mem, "ram", None)
        n = len(self._prdt) // PRDT_ENTRY_SIZE
        if ram is None or not n or length <= 0:
            return None
        table = self._prdt[:n * PRDT_ENTRY_SIZE]
        counts = [(c & PRD_DBC_MASK) + 1 for c in table.cast("I")[3::4].tolist()]
        ends = list(accumulate(counts))
        i = bisect_left(ends, length)          # the entry holding the last byte asked for
        if i == n:
            return None
        addrs = list(map(PRD_DBA_MASK.__and__, table.cast("Q")[0:2 * (i + 1):2].tolist()))
        counts = counts[:i + 1]
        counts[-1] -= ends[i] - length
        stops = list(map(operator.add, addrs, counts))
        if max(stops) > len(ram):
            return None
        return [ram[a:e] for a, e in zip(addrs, stops)]

    def buffers(self, length):
        """Writable views of guest RAM covering the PRDT's first ``length`` bytes (PrdtShort if it holds fewer;
        HostBusFault if an entry leaves RAM: then no view was handed out)."""
        return self._views(length, False)

    def data_in(self, data):
        """Copies ``data`` (to the host's memory, a device's reply) into the PRDT; returns the bytes copied (fewer
        when the PRDT is shorter)."""
        done = 0
        for m in self._views(len(data), True):
            m[:] = data[done:done + len(m)]
            done += len(m)
        return done

    def data_out(self, length):
        """Up to ``length`` bytes from the PRDT (fewer when it holds fewer)."""
        return b"".join(bytes(m) for m in self._views(length, True))

    def set_prdbc(self, n):
        """Writes the header's PRD byte count (what the HBA reports moved)."""
        try:
            self.mem.view(self._header_gpa + HDR_PRDBC_OFFSET, 4)[:] = U32.pack(n & 0xFFFFFFFF)
        except OSError as exc:
            raise HostBusFault(str(exc)) from None
