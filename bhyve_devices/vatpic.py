"""A virtual 8259A pair (bhyve's vatpic): master at ports 0x20/0x21, slave at 0xA0/0xA1 cascaded on IRQ2, and
the ELCR (edge/level control) at 0x4D0/0x4D1.

Intel 8259A Programmable Interrupt Controller datasheet: "Initialization Command Words" (ICW1 with bit 4 set on
the command port starts the sequence, clears IMR and ISR, resets the edge sense and priorities; ICW2 gives the
vector base (bits 7:3); ICW3 the cascade wiring; ICW4 if ICW1 bit 0: bit 1 AEOI, bit 4 special fully nested),
"Operation Command Words" (OCW1 = IMR on the data port; OCW2 bits 7:5: 001 non-specific EOI, 011 specific EOI,
101 rotate on non-specific EOI, 111 rotate on specific EOI, 100/000 set/clear rotate in AEOI mode, 110 set
priority; OCW3: bit 2 poll, bits 1:0 read IRR/ISR, bits 6:5 special mask mode), "Interrupt Sequence" (INTA: the
highest-priority unmasked request above the in-service ones moves IRR -> ISR; with no request left the 8259
answers IR7, a spurious interrupt that does not set ISR) and "Edge and Level Triggered Modes". The ELCR
(PIIX/ICH datasheets) selects level per IRQ; IRQ0-2 and 8, 13 are always edge (masks 0xF8 / 0xDE, as bhyve).

The pair is driven by :meth:`Vatpic.set_irq_level` / :meth:`Vatpic.pulse_irq` (IRQ 0-15); its INT output goes
to the injected ``intr_line(level)`` (the BSP's LINT0, :meth:`Vlapic.set_lint0_level`: in ExtINT mode, or as the
plain INTR pin while that local APIC is not enabled, as for a ``nolapic`` guest). The VM runs the INTA cycle with
:meth:`Vatpic.intr_accepted` when it injects the ExtINT, and wakes a vCPU halted with interrupts enabled for it.
As in bhyve, a PIC produces no output until its ICW sequence has completed.

Not supported: ICW1 LTIM (level mode for all pins; the ELCR is used instead) and 8080 mode (ICW4 bit 0 = 0 is
treated as 8086); buffered mode and ICW3 wiring other than slave-on-IRQ2; a poll command on the master does not
reach into the slave; the master's IRQ2 input follows the slave's INT output as a level.
"""

import threading

from construct import BitsInteger, BitStruct, Const, Flag

from .snapshot import SnapshotError, check, header, load_fields, save_fields

ELCR_MASKS = (0xF8, 0xDE)

# Command-word layouts (datasheet figures "Initialization Command Word Format" and "Operation Command Word
# Format"), most significant bit first; used for documentation and tests, the ports decode with plain ints.
ICW1 = BitStruct("a7_5" / BitsInteger(3), Const(1, BitsInteger(1)), "ltim" / Flag, "adi" / Flag,
                 "single" / Flag, "icw4" / Flag)
ICW4 = BitStruct(Const(0, BitsInteger(3)), "sfnm" / Flag, "buf" / Flag, "ms" / Flag, "aeoi" / Flag, "upm" / Flag)
OCW2 = BitStruct("rotate" / Flag, "specific" / Flag, "eoi" / Flag, Const(0, BitsInteger(2)), "level" / BitsInteger(3))
OCW3 = BitStruct(Const(0, BitsInteger(1)), "esmm" / Flag, "smm" / Flag, Const(1, BitsInteger(2)), "poll" / Flag,
                 "rr" / Flag, "ris" / Flag)


class Pic8259:
    """One 8259A: a Device with offset 0 (command / IRR / ISR / poll) and offset 1 (data / IMR)."""

    def __init__(self, owner, master):
        self._owner = owner
        self.master = master
        self.elcr = 0
        self.lines = 0
        self.imr = 0
        self._init_reset()
        self.ready = False

    def _init_reset(self):
        self.irr = self.lines & self.elcr    # edge latches are reset; level requests follow their lines
        self.isr = 0
        self.imr = 0
        self.base = 0
        self.init_state = 0
        self.icw4 = False
        self.single = False
        self.aeoi = False
        self.rotate_aeoi = False
        self.sfnm = False
        self.priority_add = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False

    # -- snapshot (issue 23; through Vatpic.snapshot / restore) ---------------------------------------------
    _BYTES = ("elcr", "lines", "imr", "irr", "isr", "base")
    _FLAGS = ("ready", "icw4", "single", "aeoi", "rotate_aeoi", "sfnm", "read_isr", "poll", "special_mask")
    _STATE = (*_BYTES, "init_state", "priority_add", *_FLAGS)

    def _save(self):
        return save_fields(self, self._STATE)

    def _load(self, d):
        which = "master" if self.master else "slave"
        if not isinstance(d, dict) or any(k not in d for k in self._STATE):
            raise SnapshotError(f"Vatpic: the {which} 8259's state is missing or incomplete")
        ok = (all(type(d[k]) is int and 0 <= d[k] <= 0xFF for k in self._BYTES)
              and all(type(d[k]) is bool for k in self._FLAGS)
              and d["init_state"] in (0, 1, 2, 3) and type(d["priority_add"]) is int and 0 <= d["priority_add"] < 8
              and not d["elcr"] & ~ELCR_MASKS[0 if self.master else 1] and not d["base"] & 7)
        if not ok:
            raise SnapshotError(f"Vatpic: a value of the {which} 8259 is out of range")
        return lambda: load_fields(self, d, self._STATE)

    # -- priority logic -------------------------------------------------------------------------------------
    def _priority(self, mask):
        if not mask & 0xFF:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def get_irq(self):
        """The IRQ (0-7) this PIC would raise INT for, or -1."""
        if not self.ready:
            return -1
        pr = self._priority(self.irr & ~self.imr)
        if pr == 8:
            return -1
        inservice = self.isr
        if self.special_mask:
            inservice &= ~self.imr
        if self.sfnm and self.master:
            inservice &= ~(1 << 2)
        return (pr + self.priority_add) & 7 if pr < self._priority(inservice) else -1

    def intack(self, irq):
        bit = 1 << irq
        if self.aeoi:
            if self.rotate_aeoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= bit
        if not self.elcr & bit:
            self.irr &= ~bit

    def set_input(self, irq, level):
        bit = 1 << irq
        if self.elcr & bit:
            self.irr = self.irr | bit if level else self.irr & ~bit
        elif level and not self.lines & bit:
            self.irr |= bit
        self.lines = self.lines | bit if level else self.lines & ~bit

    def set_cascade(self, level):
        """The slave's INT output on the master's IR2 (followed as a level)."""
        self.irr = self.irr | 4 if level else self.irr & ~4
        self.lines = self.irr & 4 | self.lines & ~4

    def set_elcr(self, value):
        self.elcr = value & ELCR_MASKS[0 if self.master else 1]
        self.irr = (self.irr & ~self.elcr) | (self.lines & self.elcr)

    # -- ports ----------------------------------------------------------------------------------------------
    def _eoi(self, cmd, val):
        if cmd in (1, 5):
            pr = self._priority(self.isr)
            if pr == 8:
                return
            irq = (pr + self.priority_add) & 7
        else:
            irq = val & 7
        self.isr &= ~(1 << irq)
        if cmd in (5, 7):
            self.priority_add = (irq + 1) & 7

    def _write8(self, port, val):
        if port == 0:
            if val & 0x10:                                   # ICW1
                self._init_reset()
                self.ready = False
                self.init_state = 1
                self.icw4 = bool(val & 1)
                self.single = bool(val & 2)
            elif val & 0x08:                                 # OCW3
                if val & 0x04:
                    self.poll = True
                if val & 0x02:
                    self.read_isr = bool(val & 1)
                if val & 0x40:
                    self.special_mask = bool(val & 0x20)
            else:                                            # OCW2
                cmd = val >> 5
                if cmd in (1, 3, 5, 7):
                    self._eoi(cmd, val)
                elif cmd in (0, 4):
                    self.rotate_aeoi = cmd == 4
                elif cmd == 6:
                    self.priority_add = (val + 1) & 7
            return
        if self.init_state == 1:                             # ICW2
            self.base = val & 0xF8
            self.init_state = 2 if not self.single else (3 if self.icw4 else 0)
        elif self.init_state == 2:                           # ICW3
            self.init_state = 3 if self.icw4 else 0
        elif self.init_state == 3:                           # ICW4
            self.aeoi = bool(val & 2)
            self.sfnm = bool(val & 0x10)
            self.init_state = 0
        else:                                                # OCW1
            self.imr = val
            return
        if self.init_state == 0:
            self.ready = True

    def _read8(self, port):
        if port == 1:
            return self.imr
        if self.poll:
            self.poll = False
            irq = self.get_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            return 0x80 | irq
        return self.isr if self.read_isr else self.irr

    def read(self, offset, size):
        with self._owner._lock:
            val = 0
            for i in range(size):
                port = offset + i
                val |= (self._read8(port) if port in (0, 1) else 0xFF) << (8 * i)
            self._owner._update()
            return val

    def write(self, offset, size, value):
        with self._owner._lock:
            for i in range(size):
                if offset + i in (0, 1):
                    self._write8(offset + i, (value >> (8 * i)) & 0xFF)
            self._owner._update()


class Elcr:
    """The edge/level control registers: a Device with offset 0 (IRQ0-7) and 1 (IRQ8-15)."""

    def __init__(self, owner):
        self._owner = owner

    def read(self, offset, size):
        pics = (self._owner.master, self._owner.slave)
        val = 0
        for i in range(size):
            port = offset + i
            val |= (pics[port].elcr if port in (0, 1) else 0xFF) << (8 * i)
        return val

    def write(self, offset, size, value):
        with self._owner._lock:
            pics = (self._owner.master, self._owner.slave)
            for i in range(size):
                if offset + i in (0, 1):
                    pics[offset + i].set_elcr((value >> (8 * i)) & 0xFF)
            self._owner._update()


class Vatpic:
    """The PIC pair: ``master`` (ports 0x20-0x21), ``slave`` (0xA0-0xA1) and ``elcr`` (0x4D0-0x4D1) Devices."""

    snapshot_version = 1

    def __init__(self, intr_line=None):
        self._lock = threading.RLock()
        self._intr_line = intr_line
        self._out = False
        self.master = Pic8259(self, True)
        self.slave = Pic8259(self, False)
        self.elcr = Elcr(self)

    def _update(self):
        if not self.master.single:
            self.master.set_cascade(self.slave.get_irq() >= 0)
        out = self.master.get_irq() >= 0
        if out != self._out:
            self._out = out
            if self._intr_line is not None:
                self._intr_line(out)

    def snapshot(self):
        """Each 8259's ICW sequence state, IRR / ISR / IMR, priority rotation, OCW3 selections (read ISR, poll,
        special mask), AEOI and rotate-in-AEOI, its ELCR half and input levels; and the INT output level."""
        with self._lock:
            d = header(self)
            d.update(master=self.master._save(), slave=self.slave._save(), intr=self._out)
            return d

    def restore(self, state, shift_ns):
        """Takes :meth:`snapshot`'s state (no times). The INT output level is restored as saved without calling
        ``intr_line``: the local APIC restores its own LINT0 level."""
        check(self, state, ("master", "slave", "intr"))
        if type(state["intr"]) is not bool:
            raise SnapshotError("Vatpic: the INT level is not a bool")
        loads = self.master._load(state["master"]), self.slave._load(state["slave"])
        with self._lock:
            for load in loads:
                load()
            self._out = state["intr"]

    @property
    def intr_level(self):
        return self._out

    def set_irq_level(self, irq, level):
        """Drives ISA IRQ ``irq`` (0-15; 2 is the cascade and is ignored); others are ignored too."""
        if not 0 <= irq < 16 or irq == 2:
            return
        with self._lock:
            (self.master if irq < 8 else self.slave).set_input(irq & 7, bool(level))
            self._update()

    def pulse_irq(self, irq):
        """An edge on ISA IRQ ``irq`` (raise, then lower). Returns whether it merged with a request still
        pending: True when the IRQ is edge-triggered and its IRR bit was already set (latched by an earlier
        edge, not yet acknowledged by an INTA), so the 8259 keeps one request for both; False otherwise, and
        also while the IRQ cannot reach INT (its PIC not initialized, or masked in the IMR, the slave's also by
        the master's IR2 bit): the edge is then held back, as one to a masked IOAPIC pin is lost, not merged."""
        if not 0 <= irq < 16 or irq == 2:
            return False
        with self._lock:
            pic, bit = (self.master if irq < 8 else self.slave), 1 << (irq & 7)
            routed = pic.ready and not pic.imr & bit
            if irq >= 8:
                routed = routed and self.master.ready and not self.master.imr & 4
            merged = bool(routed and pic.irr & bit and not pic.elcr & bit)
            self.set_irq_level(irq, True)
            self.set_irq_level(irq, False)
            return merged

    def set_irq_trigger(self, irq, level_triggered):
        """bhyve's ``vatpic_set_irq_trigger``: the ELCR bit of ISA IRQ ``irq`` (as a guest write of the ELCR)."""
        if not 0 <= irq < 16:
            return
        reg, bit = (0, irq) if irq < 8 else (1, irq - 8)
        old = self.elcr.read(reg, 1)
        self.elcr.write(reg, 1, old | (1 << bit) if level_triggered else old & ~(1 << bit))

    def pending(self):
        """The vector an INTA would return now, or None when INT is low."""
        with self._lock:
            irq = self.master.get_irq()
            if irq < 0:
                return None
            if irq == 2 and not self.master.single:
                sirq = self.slave.get_irq()
                return self.slave.base + (sirq if sirq >= 0 else 7)
            return self.master.base + irq

    def intr_accepted(self):
        """The INTA cycle: acknowledges the highest request and returns its vector; with none left, the
        spurious IR7 vector of the master (or of the slave, if the master chose the cascade)."""
        with self._lock:
            m = self.master
            irq = m.get_irq()
            if irq < 0:
                vector = m.base + 7
            else:
                m.intack(irq)
                if irq == 2 and not m.single:
                    s = self.slave
                    sirq = s.get_irq()
                    if sirq >= 0:
                        s.intack(sirq)
                        vector = s.base + sirq
                    else:
                        vector = s.base + 7
                else:
                    vector = m.base + irq
            self._update()
            return vector
