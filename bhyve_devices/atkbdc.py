"""A minimal 8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command): enough for reset and for
Linux's i8042 probe, with no keyboard and no mouse behind it.

Spec: IBM PC/AT Technical Reference, "Keyboard Controller" (the 8042 command set); Linux
``drivers/input/serio/i8042.c`` for what a guest actually sends.

What it does:
- Status (0x64 read): OBF (bit 0) when a byte waits, IBF (bit 1) always 0 (commands complete at once),
  SYS (bit 2, as after POST), CMD/DATA (bit 3), keyboard not inhibited (bit 4), AUX data (bit 5), TIMEOUT (bit 6).
- Commands: 0x20 read CTR, 0x60 write CTR, 0xAA self-test (answers 0x55), 0xAB keyboard interface test (0x00,
  OK: the port exists), 0xA9 aux interface test (0x01, clock stuck low; Linux asks it only when the 0xD3
  loop test fails, and 0xD3 echoes, so Linux registers an AUX port whose psmouse probe then fails fast),
  0xA7/0xA8 aux disable/enable, 0xAD/0xAE keyboard disable/enable, 0xC0 read input port, 0xD0 read output port,
  0xD1 write output port (bit 0 clear resets), 0xD2/0xD3 echo to the keyboard/aux buffer, 0xD4 write to aux,
  0xF0-0xFF pulse output lines: bit 0 clear (0xFE is the classic one) calls ``on_reset()``.
- A byte written to 0x60 for a device (keyboard, or aux after 0xD4) has no device to answer it: the controller
  answers 0xFE with TIMEOUT set in the status, and pulses ``irq1`` (``irq12`` for aux) when the CTR enables it,
  so Linux's atkbd/psmouse probes fail at once instead of waiting for their command timeouts.

Snapshots (``snapshot.py``): the command byte (CTR), the output port, the status bits it keeps (SYS, CMD/DATA),
the byte in the output buffer with its AUX and TIMEOUT flags, and the command waiting for its data byte.

Not supported: a keyboard or mouse (no scancodes, no input), A20 gating (0xD1 bit 1 is stored only), password
and vendor commands (ignored, no answer), output-buffer-full interrupts other than the ones above.
"""

import threading

from .snapshot import SnapshotError, check, header, int_in

STS_OBF, STS_IBF, STS_SYS, STS_CMD, STS_UNLOCKED, STS_AUXDATA, STS_TIMEOUT = 1, 2, 4, 8, 0x10, 0x20, 0x40
CTR_KBDINT, CTR_AUXINT, CTR_SYS, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 1, 2, 4, 0x10, 0x20, 0x40


class _Port:
    def __init__(self, read8, write8):
        self._r, self._w = read8, write8

    def read(self, offset, size):
        v = self._r() if offset == 0 else 0xFF
        return v | (((1 << (8 * size)) - 1) & ~0xFF)

    def write(self, offset, size, value):
        if offset == 0:
            self._w(value & 0xFF)


class KeyboardController:
    """``data_port`` (0x60) and ``cmd_port`` (0x64) are the two :class:`Device` objects; see :meth:`ranges`."""

    def __init__(self, on_reset=None, irq1=None, irq12=None):
        self._on_reset = on_reset
        self._irq1, self._irq12 = irq1, irq12
        self._lock = threading.RLock()
        self.ctr = CTR_KBDINT | CTR_SYS | CTR_XLATE
        self.output_port = 0x03        # bit 0: reset line released, bit 1: A20 enabled
        self._status = STS_SYS | STS_UNLOCKED
        self._out = None                # (byte, aux, timeout)
        self._pending = None            # the command whose data byte comes next on 0x60
        self.data_port = _Port(self._read_data, self._write_data)
        self.cmd_port = _Port(self._read_status, self._write_cmd)

    def ranges(self):
        return [(0x60, 1, self.data_port), (0x64, 1, self.cmd_port)]

    def _read_status(self):
        with self._lock:
            s = self._status & ~(STS_OBF | STS_AUXDATA | STS_TIMEOUT)
            if self._out is not None:
                byte, aux, timeout = self._out
                s |= STS_OBF | (STS_AUXDATA if aux else 0) | (STS_TIMEOUT if timeout else 0)
            return s

    def _read_data(self):
        with self._lock:
            if self._out is None:
                return 0x00
            byte, self._out = self._out[0], None
            return byte

    def _put(self, byte, aux=False, timeout=False, interrupt=False):
        self._out = (byte & 0xFF, aux, timeout)
        if interrupt:
            line, bit = (self._irq12, CTR_AUXINT) if aux else (self._irq1, CTR_KBDINT)
            if line is not None and self.ctr & bit:
                line.pulse()

    def _write_cmd(self, cmd):
        reset = False
        with self._lock:
            self._status |= STS_CMD
            self._pending = None
            if cmd == 0x20:
                self._put(self.ctr)
            elif cmd in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
                self._pending = cmd
            elif cmd == 0xAA:
                self._status |= STS_SYS
                self._put(0x55)
            elif cmd == 0xAB:
                self._put(0x00)
            elif cmd == 0xA9:
                self._put(0x01)
            elif cmd == 0xA7:
                self.ctr |= CTR_AUXDIS
            elif cmd == 0xA8:
                self.ctr &= ~CTR_AUXDIS
            elif cmd == 0xAD:
                self.ctr |= CTR_KBDDIS
            elif cmd == 0xAE:
                self.ctr &= ~CTR_KBDDIS
            elif cmd == 0xC0:
                self._put(0x80)         # keyboard not inhibited
            elif cmd == 0xD0:
                self._put(self.output_port)
            elif cmd >= 0xF0:
                reset = not cmd & 1
        if reset and self._on_reset is not None:
            self._on_reset()

    def _write_data(self, byte):
        reset = False
        with self._lock:
            self._status &= ~STS_CMD
            cmd, self._pending = self._pending, None
            if cmd == 0x60:
                self.ctr = byte
                self._status = (self._status & ~STS_SYS) | (STS_SYS if byte & CTR_SYS else 0)
            elif cmd == 0xD1:
                self.output_port = byte
                reset = not byte & 1
            elif cmd == 0xD2:
                self._put(byte, interrupt=True)
            elif cmd == 0xD3:
                self._put(byte, aux=True, interrupt=True)
            elif cmd == 0xD4:
                self._put(0xFE, aux=True, timeout=True, interrupt=True)
            else:
                self._put(0xFE, timeout=True, interrupt=True)
        if reset and self._on_reset is not None:
            self._on_reset()

    # -- snapshot (bhyve_devices/snapshot.py) --------------------------------------------------------------
    snapshot_version = 1

    def snapshot(self):
        with self._lock:
            return {**header(self), "ctr": self.ctr, "output_port": self.output_port, "status": self._status,
                    "out": None if self._out is None else list(self._out), "pending": self._pending}

    def restore(self, state, shift_ns):
        check(self, state, ("ctr", "output_port", "status", "out", "pending"))

        def byte(v):
            return int_in(v, 0, 0xFF)
        out, pending = state["out"], state["pending"]
        if not (byte(state["ctr"]) and byte(state["output_port"]) and byte(state["status"])
                and (pending is None or byte(pending))
                and (out is None or isinstance(out, list) and len(out) == 3 and byte(out[0])
                     and all(isinstance(f, bool) for f in out[1:]))):
            raise SnapshotError("KeyboardController: a field is of the wrong type or out of range")
        with self._lock:
            self.ctr, self.output_port, self._status = state["ctr"], state["output_port"], state["status"]
            self._out, self._pending = None if out is None else tuple(out), pending
