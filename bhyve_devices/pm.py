"""bhyve's ``pm.c``: the reset control register, the ACPI PM1 event and control blocks, SMI_CMD and the power
button.

Spec: ACPI 6.x, section 4.8 "ACPI Hardware Specification": PM1 status (PM1_STS, write 1 to clear) and enable
(PM1_EN) registers of the PM1a event block, the PM1a control block (SCI_EN, SLP_TYPx, SLP_EN), the SMI command
port with the FADT's ACPI_ENABLE/ACPI_DISABLE values; the reset register of the FADT (RESET_REG) is the Intel
PIIX/ICH Reset Control Register at 0xCF9.

Ports as bhyve's FADT describes them: SMI_CMD 0xB2 (ACPI_ENABLE 0xA0, ACPI_DISABLE 0xA1), PM1a_EVT_BLK 0x400
(4 bytes: PM1_STS at +0, PM1_EN at +2), PM1a_CNT_BLK 0x404 (2 bytes), PM_TMR_BLK 0x408 (``vpmtmr``), reset 0xCF9.
:meth:`PowerManagement.ranges` lists them with their :class:`Device`.

Behaviour (as bhyve's): a write to 0xCF9 with bit 2 (RST_CPU) set, e.g. 0x6 or 0xE, calls ``on_reset()``; the
value written reads back. SCI_EN cannot be changed through PM1_CNT: ACPI_ENABLE written to SMI_CMD sets it,
ACPI_DISABLE clears it. A PM1_CNT write with SLP_EN and SLP_TYP 5 (bhyve's ``_S5_``) calls ``on_poweroff()``.
The SCI (IRQ9, level) is asserted while any enabled status bit is set (PWRBTN, GBL, RTC, TMR).
:meth:`PowerManagement.press_power_button` is what the VM calls on SIGTERM: when the guest has enabled ACPI it
sets PWRBTN_STS, raises the SCI and returns True; otherwise it returns False (bhyve then lets SIGTERM kill the
VM: the caller should power off).

Snapshots (``snapshot.py``): the reset control register, PM1_STS, PM1_EN and PM1_CNT (SCI_EN included, which is
all SMI_CMD leaves behind: the port itself holds nothing). Restored, the SCI is asserted again when an enabled
status bit is set.

Not supported: sleep states other than S5 (S1-S4 writes are stored and ignored), PM1b blocks, GPE blocks,
TMR_STS (the PM timer carry), wake events, the global lock (GBL_STS is never set by this model).
"""

import threading

from construct import BitsInteger, BitStruct, ByteSwapped, Flag, Padding

from .snapshot import SnapshotError, check, header, int_fits, save_fields

SMI_CMD_PORT = 0xB2
PM1A_EVT_PORT = 0x400
PM1A_CNT_PORT = 0x404
RESET_PORT = 0xCF9
ACPI_ENABLE = 0xA0
ACPI_DISABLE = 0xA1
SCI_IRQ = 9

PM1_TMR_STS = 1 << 0
PM1_BM_STS = 1 << 4
PM1_GBL_STS = 1 << 5
PM1_PWRBTN_STS = 1 << 8
PM1_SLPBTN_STS = 1 << 9
PM1_RTC_STS = 1 << 10
PM1_WAK_STS = 1 << 15
PM1_ALL_STS = (PM1_TMR_STS | PM1_BM_STS | PM1_GBL_STS | PM1_PWRBTN_STS | PM1_SLPBTN_STS | PM1_RTC_STS
               | PM1_WAK_STS)

PM1_TMR_EN = 1 << 0
PM1_GBL_EN = 1 << 5
PM1_PWRBTN_EN = 1 << 8
PM1_SLPBTN_EN = 1 << 9
PM1_RTC_EN = 1 << 10
PM1_ALL_EN = PM1_TMR_EN | PM1_GBL_EN | PM1_PWRBTN_EN | PM1_SLPBTN_EN | PM1_RTC_EN

PM1_SCI_EN = 1 << 0
PM1_SLP_TYP_SHIFT = 10
PM1_SLP_TYP = 7 << PM1_SLP_TYP_SHIFT
PM1_SLP_EN = 1 << 13
PM1_ALWAYS_ZERO = 0xC003        # bhyve: SCI_EN, BM_RLD and the reserved top bits cannot be written
SLP_TYP_S5 = 5

# 16-bit little-endian registers as bit fields (MSB first inside ByteSwapped), for documentation and tests.
PM1_STS = ByteSwapped(BitStruct(
    "wak_sts" / Flag, Padding(4), "rtc_sts" / Flag, "slpbtn_sts" / Flag, "pwrbtn_sts" / Flag,
    Padding(2), "gbl_sts" / Flag, "bm_sts" / Flag, Padding(3), "tmr_sts" / Flag))
PM1_EN = ByteSwapped(BitStruct(
    Padding(5), "rtc_en" / Flag, "slpbtn_en" / Flag, "pwrbtn_en" / Flag,
    Padding(2), "gbl_en" / Flag, Padding(4), "tmr_en" / Flag))
PM1_CNT = ByteSwapped(BitStruct(
    "reserved" / BitsInteger(2), "slp_en" / Flag, "slp_typ" / BitsInteger(3), "reserved2" / BitsInteger(7),
    "gbl_rls" / Flag, "bm_rld" / Flag, "sci_en" / Flag))


def _mask(size):
    return (1 << (8 * size)) - 1


class _Port:
    """A :class:`Device` over a little-endian register block of ``length`` bytes read by ``get()`` and
    written byte-lane-wise by ``put(value, byte_mask)``."""

    def __init__(self, length, get, put):
        self._len, self._get, self._put = length, get, put

    def read(self, offset, size):
        v = 0
        for i in range(size):
            o = offset + i
            b = (self._get() >> (8 * o)) & 0xFF if 0 <= o < self._len else 0xFF
            v |= b << (8 * i)
        return v

    def write(self, offset, size, value):
        if offset < 0 or offset >= self._len:
            return
        lanes = 0
        for i in range(size):
            if offset + i < self._len:
                lanes |= 0xFF << (8 * (offset + i))
        self._put((value << (8 * offset)) & lanes, lanes)


class PowerManagement:
    """All of ``pm.c``. ``sci`` is the IRQ9 :class:`IrqLine` (level)."""

    def __init__(self, sci, on_reset=None, on_poweroff=None):
        self._sci = sci
        self._on_reset = on_reset
        self._on_poweroff = on_poweroff
        self._lock = threading.RLock()
        self.reset_control = 0
        self.pm1_status = 0
        self.pm1_enable = 0
        self.pm1_control = 0
        self._sci_level = False
        self.reset_device = _Port(1, lambda: self.reset_control, self._put_reset)
        self.evt_device = _Port(4, lambda: self.pm1_status | self.pm1_enable << 16, self._put_evt)
        self.cnt_device = _Port(2, lambda: self.pm1_control, self._put_cnt)
        self.smi_device = _Port(1, lambda: 0, self._put_smi)

    def ranges(self):
        """``[(port, length, device)]`` for the port bus."""
        return [(SMI_CMD_PORT, 1, self.smi_device), (PM1A_EVT_PORT, 4, self.evt_device),
                (PM1A_CNT_PORT, 2, self.cnt_device), (RESET_PORT, 1, self.reset_device)]

    @property
    def acpi_enabled(self):
        return bool(self.pm1_control & PM1_SCI_EN)

    def press_power_button(self):
        with self._lock:
            if not self.acpi_enabled:
                return False
            if not self.pm1_status & PM1_PWRBTN_STS:
                self.pm1_status |= PM1_PWRBTN_STS
                self._sci_update()
            return True

    def _sci_update(self):
        need = bool(self.pm1_status & self.pm1_enable & PM1_ALL_EN)
        if need != self._sci_level:
            self._sci_level = need
            self._sci.set_level(need)

    def _put_reset(self, value, lanes):
        self.reset_control = value & 0xFF
        if value & 0x4 and self._on_reset is not None:
            self._on_reset()

    def _put_evt(self, value, lanes):
        with self._lock:
            sts = value & lanes & 0xFFFF
            self.pm1_status &= ~(sts & PM1_ALL_STS)
            if lanes >> 16:
                en_lanes = lanes >> 16
                self.pm1_enable = (self.pm1_enable & ~en_lanes) | (value >> 16 & en_lanes & PM1_ALL_EN)
            self._sci_update()

    def _put_cnt(self, value, lanes):
        with self._lock:
            keep = self.pm1_control & (~lanes | PM1_SCI_EN)
            self.pm1_control = (keep | (value & lanes & ~(PM1_SLP_EN | PM1_ALWAYS_ZERO))) & 0xFFFF
            poweroff = (value & lanes & PM1_SLP_EN
                        and (self.pm1_control & PM1_SLP_TYP) >> PM1_SLP_TYP_SHIFT == SLP_TYP_S5)
        if poweroff and self._on_poweroff is not None:
            self._on_poweroff()

    def _put_smi(self, value, lanes):
        with self._lock:
            if value == ACPI_ENABLE:
                self.pm1_control |= PM1_SCI_EN
            elif value == ACPI_DISABLE:
                self.pm1_control &= ~PM1_SCI_EN

    # -- snapshot (bhyve_devices/snapshot.py) --------------------------------------------------------------
    snapshot_version = 1
    _FIELDS = {"reset_control": 0xFF, "pm1_status": PM1_ALL_STS, "pm1_enable": PM1_ALL_EN, "pm1_control": 0xFFFF}

    def snapshot(self):
        with self._lock:
            return {**header(self), **save_fields(self, self._FIELDS)}

    def restore(self, state, shift_ns):
        check(self, state, self._FIELDS)
        for name, mask in self._FIELDS.items():
            v = state[name]
            if not int_fits(v, mask):
                raise SnapshotError(f"PowerManagement.{name}: {v!r} is not a value it can hold")
        with self._lock:
            for name in self._FIELDS:
                setattr(self, name, state[name])
            self._sci_update()
