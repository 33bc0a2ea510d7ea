"""A virtual I/O APIC (bhyve's vioapic): an 82093AA-style IOAPIC with 24 pins at 0xFEC00000.

Intel 82093AA I/O Advanced Programmable Interrupt Controller datasheet, section 3.0 "Register Description":
IOREGSEL at 0x00 (index), IOWIN at 0x10 (data); indirect registers 0x00 IOAPICID (bits 27:24), 0x01 IOAPICVER
(max redirection entry in bits 23:16, version in 7:0), 0x02 IOAPICARB, 0x10 + 2n / 0x11 + 2n IOREDTBL[n] low/high
(vector 7:0, delivery mode 10:8, destination mode 11, delivery status 12 (RO), polarity 13, remote IRR 14 (RO),
trigger mode 15, mask 16, destination 63:56). Version 0x20 adds the directed-EOI register at 0x40 (as in the
ICH/PCH IOxAPIC and QEMU/KVM): writing a vector there acts as the vlapic's EOI broadcast for that vector.

Behaviour: an edge-triggered pin delivers on each rising edge while unmasked (an edge while masked is lost;
:meth:`Vioapic.pulse_pin` tells an edge that merged at the local APIC with one still requested, from the
``merged`` of what ``deliver`` returns); a
level-triggered pin delivers while asserted, unmasked and remote IRR clear, and sets remote IRR; :meth:`eoi`
(from the vlapic's ``eoi_level`` or the EOI register) clears remote IRR and re-delivers a pin still asserted.
Unmasking an asserted level pin delivers; switching a pin to edge clears its remote IRR (Linux's way of clearing
it on IOAPICs older than version 0x20). Delivery goes through the injected
``deliver(dest, phys, delmode, vector, level_trigger)`` (:meth:`bhyve_devices.apicbus.ApicBus.deliver_intr`).

:data:`IOAPIC_MMIO` and :data:`REDIR_ENTRY` are the construct layouts of the window and of one table entry.

Not supported: the polarity bit is stored but pins carry the logical asserted state (as bhyve, QEMU and KVM do,
the device models raise a line to assert it); delivery status always reads 0; the extended destination ID bits;
undefined indirect registers read 0; sub-dword writes to IOWIN are dropped.
"""

import threading

from construct import BitsInteger, BitStruct, ByteSwapped, Flag, Int32ul, Padding, Struct

from .snapshot import SnapshotError, check, header, load_fields, save_fields

#: Where the I/O APIC's window sits and its size (bhyve's ``VIOAPIC_BASE`` and ``VIOAPIC_SIZE``): the one
#: definition, which the MP table, the MADT and the ops layer import.
VIOAPIC_BASE = 0xFEC00000
VIOAPIC_SIZE = 0x1000
NPINS = 24
VERSION = 0x20

IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40

REG_ID = 0x00
REG_VER = 0x01
REG_ARB = 0x02
REG_REDTBL = 0x10

RTE_VECTOR = 0xFF
RTE_DESTMODE = 1 << 11
RTE_DELIVS = 1 << 12
RTE_POLARITY = 1 << 13
RTE_REMOTE_IRR = 1 << 14
RTE_TRIGGER_LEVEL = 1 << 15
RTE_MASKED = 1 << 16
RTE_LO_WRITABLE = 0x0001AFFF          # all but delivery status and remote IRR
RTE_HI_WRITABLE = 0xFF000000
_RTE_BITS = (RTE_HI_WRITABLE << 32) | RTE_LO_WRITABLE | RTE_DELIVS | RTE_REMOTE_IRR

IOAPIC_MMIO = Struct(
    "ioregsel" / Int32ul, Padding(12),
    "iowin" / Int32ul, Padding(44),
    "eoi" / Int32ul, Padding(12),
)
"""The IOAPIC's directly addressed registers (0x50 bytes at the base)."""

REDIR_ENTRY = ByteSwapped(BitStruct(
    "dest" / BitsInteger(8),
    Padding(39),
    "masked" / Flag,
    "trigger_level" / Flag,
    "remote_irr" / Flag,
    "active_low" / Flag,
    "delivs" / Flag,
    "logical" / Flag,
    "delmode" / BitsInteger(3),
    "vector" / BitsInteger(8),
))
"""One 64-bit redirection table entry, little-endian (parse ``entry.to_bytes(8, 'little')``)."""


class Vioapic:
    snapshot_version = 1
    _STATE = ("id", "regsel", "levels", "redir")

    def __init__(self, deliver, pins=NPINS, ioapic_id=0):
        self._deliver = deliver
        self.pins = pins
        self._lock = threading.RLock()
        self.id = (ioapic_id & 0xF) << 24
        self.regsel = 0
        self.levels = 0                      # asserted pins (bitmask)
        self.redir = [RTE_MASKED] * pins

    # -- pins -----------------------------------------------------------------------------------------------
    def _service(self, pin):
        e = self.redir[pin]
        if e & RTE_MASKED:
            return
        if e & RTE_TRIGGER_LEVEL:
            if e & RTE_REMOTE_IRR or not (self.levels >> pin) & 1:
                return
            self.redir[pin] = e | RTE_REMOTE_IRR
        done = self._deliver(e >> 56, not e & RTE_DESTMODE, (e >> 8) & 7, e & RTE_VECTOR,
                             bool(e & RTE_TRIGGER_LEVEL))
        return getattr(done, "merged", False) is True

    def set_pin_level(self, pin, level):
        """Asserts (True) or de-asserts a pin; pins outside the table are ignored."""
        if not 0 <= pin < self.pins:
            return
        with self._lock:
            bit = 1 << pin
            was = self.levels & bit
            if level:
                self.levels |= bit
                if not was or self.redir[pin] & RTE_TRIGGER_LEVEL:
                    self._service(pin)
            else:
                self.levels &= ~bit

    def pulse_pin(self, pin):
        """An edge on ``pin`` (raise, then lower). Returns None when the edge goes to no local APIC (the pin is
        masked or outside the table), else whether it merged with an interrupt still requested: True when
        every vlapic it reached already had the vector in its IRR (the delivery's ``merged``), False otherwise
        (also for a level-triggered pin whose remote IRR holds it back)."""
        if not 0 <= pin < self.pins:
            return None
        with self._lock:
            if self.redir[pin] & RTE_MASKED:
                self.levels &= ~(1 << pin)
                return None
            bit = 1 << pin
            merged = False
            if not self.levels & bit or self.redir[pin] & RTE_TRIGGER_LEVEL:
                self.levels |= bit
                merged = bool(self._service(pin))
            self.levels &= ~bit
            return merged

    def eoi(self, vector):
        """End of a level-triggered interrupt with ``vector``: clears remote IRR on the matching pins and
        delivers again those still asserted."""
        with self._lock:
            vector &= 0xFF
            for pin, e in enumerate(self.redir):
                if (e & RTE_VECTOR) == vector and e & RTE_REMOTE_IRR:
                    self.redir[pin] = e & ~RTE_REMOTE_IRR
                    self._service(pin)

    def remote_irr(self, pin):
        return bool(self.redir[pin] & RTE_REMOTE_IRR)

    # -- snapshot (issue 23) --------------------------------------------------------------------------------
    def snapshot(self):
        """The ID register, IOREGSEL, the asserted pins and the redirection table (remote IRR in its entries);
        the pin count is configuration and must match on restore."""
        with self._lock:
            d = header(self)
            d.update(save_fields(self, self._STATE))
            d["redir"] = list(self.redir)
            return d

    def restore(self, state, shift_ns):
        """Takes :meth:`snapshot`'s state as it is (it holds no times) and delivers nothing."""
        check(self, state, self._STATE)
        r, vals = state["redir"], [state[k] for k in self._STATE[:3]]
        ok = (isinstance(r, list) and len(r) == self.pins
              and all(isinstance(x, int) and not isinstance(x, bool) for x in r + vals)
              and not state["id"] & ~0x0F000000 and 0 <= state["regsel"] <= 0xFF
              and 0 <= state["levels"] < 1 << self.pins and all(e >= 0 and not e & ~_RTE_BITS for e in r))
        if not ok:
            raise SnapshotError(f"Vioapic: the state does not fit a {self.pins}-pin IOAPIC")
        with self._lock:
            load_fields(self, state, self._STATE)
            self.redir = list(r)

    # -- indirect registers ---------------------------------------------------------------------------------
    def read_reg(self, index):
        index &= 0xFF
        if index == REG_ID or index == REG_ARB:
            return self.id
        if index == REG_VER:
            return ((self.pins - 1) << 16) | VERSION
        if REG_REDTBL <= index < REG_REDTBL + 2 * self.pins:
            e = self.redir[(index - REG_REDTBL) >> 1]
            return (e >> 32) if index & 1 else e & 0xFFFFFFFF
        return 0

    def write_reg(self, index, value):
        index &= 0xFF
        value &= 0xFFFFFFFF
        if index == REG_ID:
            self.id = value & 0x0F000000
        elif REG_REDTBL <= index < REG_REDTBL + 2 * self.pins:
            pin = (index - REG_REDTBL) >> 1
            e = self.redir[pin]
            if index & 1:
                self.redir[pin] = (e & 0xFFFFFFFF) | ((value & RTE_HI_WRITABLE) << 32)
                return
            lo = (e & (RTE_DELIVS | RTE_REMOTE_IRR)) | (value & RTE_LO_WRITABLE)
            if not lo & RTE_TRIGGER_LEVEL:
                lo &= ~RTE_REMOTE_IRR
            self.redir[pin] = (e & ~0xFFFFFFFF) | lo
            if lo & RTE_TRIGGER_LEVEL:
                self._service(pin)

    # -- MMIO (Device) --------------------------------------------------------------------------------------
    def read(self, offset, size):
        mask = (1 << (8 * size)) - 1
        with self._lock:
            slot, byte = offset & ~0xF, offset & 0xF
            if byte >= 4:
                return 0
            if slot == IOREGSEL:
                val = self.regsel
            elif slot == IOWIN:
                val = self.read_reg(self.regsel)
            else:
                val = 0                       # EOI is write-only; the rest of the page is empty
            return (val >> (8 * byte)) & mask

    def write(self, offset, size, value):
        with self._lock:
            if offset == IOREGSEL:
                self.regsel = value & 0xFF
            elif offset == IOWIN and size >= 4:
                self.write_reg(self.regsel, value)
            elif offset == IOEOI:
                self.eoi(value & 0xFF)
