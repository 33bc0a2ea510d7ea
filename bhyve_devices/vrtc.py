"""The MC146818 real-time clock and 128-byte CMOS (bhyve's ``vrtc``) at ports 0x70 (index) / 0x71 (data).

Spec: Motorola MC146818A datasheet: time registers 0x00-0x09 (seconds, alarm seconds, minutes, alarm minutes,
hours, alarm hours, day of week 1=Sunday, date, month, year) in BCD or binary per register B's DM bit, 12-hour
mode with bit 7 = PM; register A (UIP, DV2-0, RS3-0), B (SET, PIE, AIE, UIE, SQWE, DM, 24/12, DSE),
C (IRQF, PF, AF, UF; read-only, cleared by reading), D (VRT). The century lives at 0x32 as in bhyve and the
FADT's CENTURY field.

Time: the guest's clock is the injected wall clock (``clock()``, default ``time.time``) in UTC, or in the
host's local time with ``utc=False`` (xhyve without ``-u``), plus an offset that changes when the guest sets the
time. While SET is 1 or the divider is held in reset (DV = 11x, as Linux's ``mc146818_set_time`` does), the
time registers are frozen and writable; when both are released the written time becomes the clock (only if
something was written). Writing a time register with SET 0 changes the time at once.

Interrupts go to the injected IRQ8 :class:`IrqLine` as a pulse when IRQF rises (as bhyve's vrtc does; the guest
reads register C to re-arm it): periodic at the register-A rate (32768 >> (RS-1) Hz, RS 1 and 2 as 256 and
128 Hz) while PIE is set; update-ended at each second boundary and alarm (0xC0-0xFF is "don't care") while UIE
or AIE is set. UIP reads 1 during the last 244 us before each second boundary. Bit 7 of the index port
(NMI disable) is stored in :attr:`RTC.nmi_disabled` and otherwise ignored; the index port reads 0xFF.

CMOS memory size bytes as a PC BIOS and bhyve's ``rtc.c`` fill them, from ``memsize``: an int (total bytes,
split at a 3 GiB lowmem limit) or ``(lowmem, highmem)``: 0x15/0x16 base memory in KiB (640), 0x17/0x18 and
0x30/0x31 extended memory above 1 MiB in KiB (at most 0xFFFF), 0x34/0x35 64-KiB blocks between 16 MiB and
lowmem, 0x5B-0x5D 64-KiB blocks above 4 GiB; the standard checksum of 0x10-0x2D at 0x2E/0x2F.

Snapshots (``snapshot.py``): the 128 CMOS bytes (registers A-D and the frozen or written time registers among
them), the index register and NMI bit, register C's flags, the SET/divider freeze state, the last second
evaluated for the update and alarm flags, the periodic timer (its start, period and count: its next deadline is
start + count * period) and the update timer's deadline. The clock is saved as the guest's calendar time at the
snapshot's timer-service time, and restored to go on from there: at the restore's time the guest reads the time
it read when the snapshot was taken (``offset`` is recomputed against the new host clock), so the RTC stands
still while the snapshot is on disk, like every other guest clock, and a guest that wants the host's time again
must be told (NTP, or a guest agent). The timers are re-armed at their shifted deadlines.

Not supported: the square-wave output (SQWE stored), daylight-saving (DSE stored, ignored), divider time bases
other than 32.768 kHz (DV stored; only 010 runs the periodic interrupt), the 500 ms first-update delay after a
divider reset, PF/AF/UF being set while the corresponding enable bit is clear (UF and the alarm are evaluated
when register C is read; PF is not), the reserved bits of register D.
"""

import calendar
import math
import threading
import time

from construct import BitsInteger, BitStruct, Flag

from .snapshot import SnapshotError, b2s, check, header, s2b

RTC_SEC, RTC_SEC_ALARM, RTC_MIN, RTC_MIN_ALARM, RTC_HRS, RTC_HRS_ALARM = 0, 1, 2, 3, 4, 5
RTC_WDAY, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_STATUSA, RTC_STATUSB, RTC_INTR, RTC_STATUSD = range(6, 14)
RTC_CENTURY = 0x32

SA_UIP = 0x80
SB_SET, SB_PIE, SB_AIE, SB_UIE, SB_SQWE, SB_BIN, SB_24HR, SB_DSE = 0x80, 0x40, 0x20, 0x10, 8, 4, 2, 1
SC_IRQF, SC_PF, SC_AF, SC_UF = 0x80, 0x40, 0x20, 0x10
SD_VRT = 0x80
UIP_NS = 244_000
NS = 1_000_000_000

REG_A = BitStruct("uip" / Flag, "dv" / BitsInteger(3), "rs" / BitsInteger(4))
REG_B = BitStruct("set" / Flag, "pie" / Flag, "aie" / Flag, "uie" / Flag, "sqwe" / Flag, "dm_binary" / Flag,
                  "hour24" / Flag, "dse" / Flag)
REG_C = BitStruct("irqf" / Flag, "pf" / Flag, "af" / Flag, "uf" / Flag, "reserved" / BitsInteger(4))

_TIME_REGS = (RTC_SEC, RTC_MIN, RTC_HRS, RTC_WDAY, RTC_DAY, RTC_MONTH, RTC_YEAR, RTC_CENTURY)


def _tobcd(v):
    return (v // 10) << 4 | v % 10


def _frombcd(v):
    hi, lo = v >> 4, v & 0xF
    if hi > 9 or lo > 9:
        raise ValueError(v)
    return hi * 10 + lo


class RTC:
    """Ports 0x70-0x71: offset 0 index (bit 7 NMI disable), offset 1 data."""

    def __init__(self, timers, irq8, *, clock=time.time, utc=True, memsize=None):
        self._timers = timers
        self._irq = irq8
        self._clock = clock
        self._utc = utc
        self._lock = threading.RLock()
        self.cmos = bytearray(128)
        self.index = 0
        self.nmi_disabled = False
        self.cmos[RTC_STATUSA] = 0x26
        self.cmos[RTC_STATUSB] = SB_24HR
        self.offset = 0.0               # guest seconds minus host (UTC or local) seconds
        self._frozen = False
        self._written = False
        self._reg_c = 0
        self._periodic = None           # (handle, start_ns, period_ns, n)
        self._update = None
        self._update_ns = None          # the update timer's deadline
        self._last_sec = self._now_int()
        if memsize is not None:
            self._fill_memsize(memsize)

    # -- bus interface -------------------------------------------------------------------------------------
    def read(self, offset, size):
        v = 0
        for i in range(size):
            o = offset + i
            v |= (self._data_read() if o == 1 else 0xFF) << (8 * i)
        return v

    def write(self, offset, size, value):
        for i in range(size):
            o, b = offset + i, (value >> (8 * i)) & 0xFF
            if o == 0:
                self.index, self.nmi_disabled = b & 0x7F, bool(b & 0x80)
            elif o == 1:
                self._data_write(b)

    # -- time ----------------------------------------------------------------------------------------------
    def _host_secs(self):
        t = self._clock()
        if self._utc:
            return t
        return t + time.localtime(t).tm_gmtoff

    def guest_time(self):
        """The guest's calendar time in seconds since 1970-01-01 in its own zone (a float)."""
        return self._host_secs() + self.offset

    def _now_int(self):
        return math.floor(self.guest_time())

    def _enc(self, v):
        return v if self.cmos[RTC_STATUSB] & SB_BIN else _tobcd(v)

    def _dec(self, v):
        return v if self.cmos[RTC_STATUSB] & SB_BIN else _frombcd(v)

    def _encode_time(self, secs):
        tm = time.gmtime(secs)
        c = self.cmos
        c[RTC_SEC], c[RTC_MIN] = self._enc(tm.tm_sec), self._enc(tm.tm_min)
        if c[RTC_STATUSB] & SB_24HR:
            c[RTC_HRS] = self._enc(tm.tm_hour)
        else:
            c[RTC_HRS] = self._enc(tm.tm_hour % 12 or 12) | (0x80 if tm.tm_hour >= 12 else 0)
        c[RTC_WDAY] = self._enc((tm.tm_wday + 1) % 7 + 1)
        c[RTC_DAY], c[RTC_MONTH] = self._enc(tm.tm_mday), self._enc(tm.tm_mon)
        c[RTC_YEAR], c[RTC_CENTURY] = self._enc(tm.tm_year % 100), self._enc(tm.tm_year // 100 % 100)

    def _decode_time(self):
        """The time in the registers, or None when they do not hold a valid date."""
        c = self.cmos
        try:
            sec, mn = self._dec(c[RTC_SEC]), self._dec(c[RTC_MIN])
            if c[RTC_STATUSB] & SB_24HR:
                hour = self._dec(c[RTC_HRS])
            else:
                h12 = self._dec(c[RTC_HRS] & 0x7F)
                if not 1 <= h12 <= 12:
                    return None
                hour = h12 % 12 + (12 if c[RTC_HRS] & 0x80 else 0)
            day, mon = self._dec(c[RTC_DAY]), self._dec(c[RTC_MONTH])
            year = self._dec(c[RTC_CENTURY]) * 100 + self._dec(c[RTC_YEAR])
        except ValueError:
            return None
        if not (sec < 60 and mn < 60 and hour < 24 and 1 <= mon <= 12
                and 1 <= day <= calendar.monthrange(year, mon)[1]):
            return None
        return calendar.timegm((year, mon, day, hour, mn, sec, 0, 0, 0))

    def _should_freeze(self):
        return bool(self.cmos[RTC_STATUSB] & SB_SET) or (self.cmos[RTC_STATUSA] >> 4) & 7 >= 6

    def _refreeze(self):
        freeze = self._should_freeze()
        if freeze and not self._frozen:
            self._encode_time(self._now_int())
            self._frozen, self._written = True, False
        elif not freeze and self._frozen:
            self._frozen = False
            if self._written:
                secs = self._decode_time()
                if secs is not None:
                    self.offset = secs - self._host_secs()
                    self._last_sec = self._now_int()
        self._arm()

    # -- data port -----------------------------------------------------------------------------------------
    def _data_read(self):
        with self._lock:
            i = self.index
            if i in _TIME_REGS:
                if not self._frozen:
                    self._encode_time(self._now_int())
                return self.cmos[i]
            if i == RTC_STATUSA:
                v = self.cmos[i] & 0x7F
                if not self._frozen and self.guest_time() % 1 >= 1 - UIP_NS / NS:
                    v |= SA_UIP
                return v
            if i == RTC_INTR:
                self._catch_up()
                v, self._reg_c = self._reg_c, 0
                return v
            if i == RTC_STATUSD:
                return SD_VRT
            return self.cmos[i]

    def _data_write(self, b):
        with self._lock:
            i = self.index
            if i in _TIME_REGS:
                if not self._frozen:
                    self._encode_time(self._now_int())
                    self.cmos[i] = b
                    secs = self._decode_time()
                    if secs is not None:
                        frac = self.guest_time() % 1
                        self.offset = secs + frac - self._host_secs()
                        self._last_sec = self._now_int()
                    self._arm()
                else:
                    self.cmos[i] = b
                    self._written = True
            elif i == RTC_STATUSA:
                self.cmos[i] = b & 0x7F
                self._refreeze()
            elif i == RTC_STATUSB:
                if b & SB_SET:
                    b &= ~SB_UIE
                if not self._frozen:
                    self._encode_time(self._now_int())
                self.cmos[i] = b
                self._set_c(self._reg_c)
                self._refreeze()
            elif i in (RTC_INTR, RTC_STATUSD):
                pass
            else:
                self.cmos[i] = b

    # -- interrupts ----------------------------------------------------------------------------------------
    def _set_c(self, flags):
        old = self._reg_c & SC_IRQF
        flags &= SC_PF | SC_AF | SC_UF
        if flags & self.cmos[RTC_STATUSB] & (SB_PIE | SB_AIE | SB_UIE):
            flags |= SC_IRQF
        self._reg_c = flags
        if flags & SC_IRQF and not old:
            self._irq.pulse()

    def _alarm_matches(self):
        for reg, alarm in ((RTC_SEC, RTC_SEC_ALARM), (RTC_MIN, RTC_MIN_ALARM), (RTC_HRS, RTC_HRS_ALARM)):
            a = self.cmos[alarm]
            if a & 0xC0 != 0xC0 and a != self.cmos[reg]:
                return False
        return True

    def _catch_up(self):
        """Evaluate the update/alarm flags for the seconds that passed since the last evaluation."""
        if self._frozen:
            return
        now = self._now_int()
        if now > self._last_sec:
            self._last_sec = now
            self._encode_time(now)
            flags = self._reg_c | SC_UF
            if self._alarm_matches():
                flags |= SC_AF
            self._set_c(flags)

    def _period_ns(self):
        rs = self.cmos[RTC_STATUSA] & 0xF
        if rs == 0 or (self.cmos[RTC_STATUSA] >> 4) & 7 != 2:
            return None
        if rs <= 2:
            rs += 7
        return NS * (1 << (rs - 1)) // 32768

    def _arm(self):
        period = self._period_ns() if self.cmos[RTC_STATUSB] & SB_PIE else None
        if self._periodic is not None and (period is None or self._periodic[2] != period):
            self._timers.cancel(self._periodic[0])
            self._periodic = None
        if period is not None and self._periodic is None:
            start = self._timers.now_ns()
            self._periodic = (self._timers.arm(start + period, self._on_periodic), start, period, 1)
        want_update = not self._frozen and self.cmos[RTC_STATUSB] & (SB_UIE | SB_AIE)
        if self._update is not None:
            self._timers.cancel(self._update)
            self._update = None
        if want_update:
            frac = self.guest_time() % 1
            delay = max(1, math.ceil((1 - frac) * NS))
            self._update_ns = self._timers.now_ns() + delay
            self._update = self._timers.arm(self._update_ns, self._on_update)

    def _on_periodic(self):
        with self._lock:
            if self._periodic is None:
                return
            _, start, period, n = self._periodic
            self._set_c(self._reg_c | SC_PF)
            now = self._timers.now_ns()
            n = max(n + 1, (now - start) // period + 1)
            self._periodic = (self._timers.arm(start + n * period, self._on_periodic), start, period, n)

    def _on_update(self):
        with self._lock:
            if self._update is None:
                return
            self._update = None
            self._catch_up()
            self._arm()

    # -- snapshot (bhyve_devices/snapshot.py) --------------------------------------------------------------
    snapshot_version = 1
    _KEYS = ("cmos", "index", "nmi_disabled", "frozen", "written", "reg_c", "last_sec", "time_ns", "guest_time",
             "periodic", "update_ns")

    def snapshot(self):
        with self._lock:
            p = self._periodic
            return {**header(self), "cmos": b2s(self.cmos), "index": self.index, "nmi_disabled": self.nmi_disabled,
                    "frozen": self._frozen, "written": self._written, "reg_c": self._reg_c,
                    "last_sec": self._last_sec, "time_ns": self._timers.now_ns(), "guest_time": self.guest_time(),
                    "periodic": None if p is None else {"start_ns": p[1], "period_ns": p[2], "n": p[3]},
                    "update_ns": self._update_ns if self._update is not None else None}

    def restore(self, state, shift_ns):
        check(self, state, self._KEYS)
        ints = ("index", "reg_c", "last_sec", "time_ns")
        p, upd, gt = state["periodic"], state["update_ns"], state["guest_time"]
        ok = (all(isinstance(state[k], int) for k in ints) and 0 <= state["index"] < 0x80
              and 0 <= state["reg_c"] <= 0xFF and isinstance(gt, (int, float)) and not isinstance(gt, bool)
              and all(isinstance(state[k], bool) for k in ("nmi_disabled", "frozen", "written"))
              and (upd is None or isinstance(upd, int))
              and (p is None or isinstance(p, dict) and all(isinstance(p.get(k), int) for k in
                                                            ("start_ns", "period_ns", "n"))
                   and p["period_ns"] > 0 and p["n"] >= 1))
        if not ok:
            raise SnapshotError("RTC: a field is missing, of the wrong type or out of range")
        cmos = s2b(state["cmos"], 128)
        with self._lock:
            for h in (self._update, self._periodic and self._periodic[0]):
                if h is not None:
                    self._timers.cancel(h)
            self._update = self._periodic = None
            self.cmos[:] = cmos
            self.index, self.nmi_disabled, self._reg_c = state["index"], state["nmi_disabled"], state["reg_c"]
            self._frozen, self._written, self._last_sec = state["frozen"], state["written"], state["last_sec"]
            elapsed = self._timers.now_ns() - (state["time_ns"] + shift_ns)    # 0 when restored at the shift
            self.offset = gt + elapsed / NS - self._host_secs()
            if p is not None:
                start = p["start_ns"] + shift_ns
                self._periodic = (self._timers.arm(start + p["n"] * p["period_ns"], self._on_periodic), start,
                                  p["period_ns"], p["n"])
            if upd is not None:
                self._update_ns = upd + shift_ns
                self._update = self._timers.arm(self._update_ns, self._on_update)

    # -- memory size ---------------------------------------------------------------------------------------
    def _fill_memsize(self, memsize):
        if isinstance(memsize, int):
            low_limit = 3 << 30
            lowmem, highmem = min(memsize, low_limit), max(memsize - low_limit, 0)
        else:
            lowmem, highmem = memsize
        c = self.cmos
        c[0x15], c[0x16] = 640 & 0xFF, 640 >> 8
        ext = min(max(lowmem - (1 << 20), 0) // 1024, 0xFFFF)
        c[0x17], c[0x18] = ext & 0xFF, ext >> 8
        c[0x30], c[0x31] = ext & 0xFF, ext >> 8
        lo64 = min(max(lowmem - (16 << 20), 0) // (64 << 10), 0xFFFF)
        c[0x34], c[0x35] = lo64 & 0xFF, lo64 >> 8
        hi64 = min(highmem // (64 << 10), 0xFFFFFF)
        c[0x5B], c[0x5C], c[0x5D] = hi64 & 0xFF, (hi64 >> 8) & 0xFF, hi64 >> 16
        csum = sum(c[0x10:0x2E]) & 0xFFFF
        c[0x2E], c[0x2F] = csum >> 8, csum & 0xFF
