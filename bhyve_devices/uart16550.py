"""A National Semiconductor / TI PC16550D UART with 16-byte FIFOs (bhyve's ``uart_emul.c``), 8 registers.

Spec: TI "PC16550D Universal Asynchronous Receiver/Transmitter with FIFOs" (SNLS378). Offsets: 0 RBR/THR (DLL when
LCR.DLAB), 1 IER (DLM when DLAB), 2 IIR (read) / FCR (write), 3 LCR, 4 MCR, 5 LSR, 6 MSR, 7 SCR.

Behaviour the guest can rely on (all of what Linux's 8250 ``autoconfig``/``serial8250_do_startup`` checks):
- IER keeps its low nibble only; SCR is a plain scratch register; DLL/DLM are behind DLAB.
- FCR bit 0 enables the FIFOs and IIR bits 7-6 then read 0b11 (a 16550A); FCR bits 1/2 clear them; bits 7-6 set
  the RX trigger level (1, 4, 8, 14). IIR bits 5-4 read 0 (no 64-byte FIFO, no EFR).
- Interrupt priorities as table 4 of the datasheet: line status (0x6) > RX data at the trigger level (0x4) >
  character timeout (0xC) > THR empty (0x2) > modem status (0x0). Reading IIR while it reports THRE clears it;
  THRE is raised again when ETBEI goes 0 -> 1 and after every THR write (transmission is instantaneous, so LSR
  THRE and TEMT always read 1 except in loopback with an overrun pending).
- MCR loopback: THR goes to the receiver, and MSR reads CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2 with the delta bits
  (TERI on RI's trailing edge). Out of loopback MSR reads DCD, DSR and CTS asserted (bhyve asserts DCD and DSR
  so that an open without CLOCAL does not block; CTS too here so that CRTSCTS does not stall output).
- The interrupt output is a level on the injected :class:`IrqLine`: asserted while an enabled interrupt is
  pending and MCR.OUT2 is set (the PC's IRQ enable) and not in loopback; ``out2_gates_irq=False`` drops the OUT2
  condition as bhyve does.
- Writes to THR (offset 0, also DLL under DLAB) may be *posted* (``posted_writes``): a VMM that can buffer
  them (KVM's coalesced PIO) delivers them in order before the guest's next exit, so a polling console costs one
  exit per character (the LSR read) instead of two. What the guest sees does not change: LSR, IIR and RBR reads
  exit and see every earlier write; only the THRE interrupt of a posted write comes at that next exit.
- LSR may be *published* (:meth:`publish_reads`): the UART tells the VMM the value an LSR read returns whenever
  it changes, and a VMM that can answer such reads itself (vmmshim's KVM provider) lets the polling console run
  with no exit at all between its posted THR writes. LSR is withdrawn (its reads exit) while an error bit is set
  (the read clears it) and in loopback (a posted THR write would change DR). The guest sees the same values.
- Output goes to ``sink.write(bytes)``; input arrives with :meth:`enqueue_input`, which fills the RX FIFO (16
  bytes, or the 1-byte holding register with FIFOs off) and keeps up to ``backlog`` further bytes (64 KiB)
  that move into the FIFO as the guest reads: input is never overrun, :meth:`enqueue_input` returns how many
  bytes it took and a backend retries the rest.

Snapshots (``snapshot.py``): DLL/DLM, IER, LCR, MCR (loopback included), SCR, FCR (FIFO enable and trigger
level), the LSR error bits, MSR with its delta bits, whether a THR-empty interrupt is pending (the rest of IIR
follows from these), the RX FIFO's bytes and the bytes accepted from the backend that wait behind it. Restored,
the interrupt line is driven again from that state. The backend, the sink and publish_reads' function are the
host's side and not saved.

Not supported: real baud-rate timing (the divisor is stored; output is as fast as the sink), parity, framing and
break errors on input (only loopback overrun sets a line-status error), the character timeout's 4-character
delay (it is reported as soon as the FIFO holds fewer bytes than the trigger level), DMA mode signalling (FCR bit
3 stored), the 16750/16650 extensions (EFR, 64-byte FIFOs).
"""

import collections
import threading

from construct import BitsInteger, BitStruct, Flag

from .snapshot import SnapshotError, b2s, check, header, s2b, save_fields

REG_DATA, REG_IER, REG_IIR, REG_LCR, REG_MCR, REG_LSR, REG_MSR, REG_SCR = range(8)

IER_ERBFI, IER_ETBEI, IER_ELSI, IER_EDSSI = 1, 2, 4, 8
IIR_NOPEND, IIR_MLSC, IIR_TXRDY, IIR_RXRDY, IIR_RLS, IIR_RXTOUT = 0x1, 0x0, 0x2, 0x4, 0x6, 0xC
IIR_FIFO = 0xC0
FCR_ENABLE, FCR_RCV_RST, FCR_XMT_RST, FCR_DMA = 1, 2, 4, 8
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 0x10
LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_RXFIFO_ERR = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80
MSR_DCTS, MSR_DDSR, MSR_TERI, MSR_DDCD, MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 1, 2, 4, 8, 0x10, 0x20, 0x40, 0x80
FIFO_SIZE = 16
TRIGGER_LEVELS = (1, 4, 8, 14)

# Register layouts (MSB first), for documentation and tests.
IER = BitStruct("reserved" / BitsInteger(4), "edssi" / Flag, "elsi" / Flag, "etbei" / Flag, "erbfi" / Flag)
IIR = BitStruct("fifos" / BitsInteger(2), "reserved" / BitsInteger(2), "id" / BitsInteger(3), "no_int" / Flag)
FCR = BitStruct("rx_trigger" / BitsInteger(2), "reserved" / BitsInteger(2), "dma" / Flag, "xmit_reset" / Flag,
                "rcvr_reset" / Flag, "enable" / Flag)
LCR = BitStruct("dlab" / Flag, "brk" / Flag, "stick" / Flag, "eps" / Flag, "pen" / Flag, "stb" / Flag,
                "wls" / BitsInteger(2))
MCR = BitStruct("reserved" / BitsInteger(3), "loop" / Flag, "out2" / Flag, "out1" / Flag, "rts" / Flag,
                "dtr" / Flag)
LSR = BitStruct("rxfifo_err" / Flag, "temt" / Flag, "thre" / Flag, "bi" / Flag, "fe" / Flag, "pe" / Flag,
                "oe" / Flag, "dr" / Flag)
MSR = BitStruct("dcd" / Flag, "ri" / Flag, "dsr" / Flag, "cts" / Flag, "ddcd" / Flag, "teri" / Flag,
                "ddsr" / Flag, "dcts" / Flag)


class UART16550:
    """One PC16550D; map it at 0x3F8 (COM1, IRQ4) or 0x2F8 (COM2, IRQ3) with length 8."""

    posted_writes = ((REG_DATA, 1),)

    def __init__(self, irq, sink=None, *, backlog=64 * 1024, out2_gates_irq=True):
        self._irq = irq
        self.sink = sink
        self._backlog_max = backlog
        self._out2_gates = out2_gates_irq
        self._lock = threading.RLock()
        self._rx = collections.deque()
        self._backlog = collections.deque()
        self._irq_level = False
        self._publish = None            # publish_reads' fn(offset, value or None)
        self._published = None          # the LSR value last published (None: withdrawn)
        self.reset()

    def reset(self):
        with self._lock:
            self.dll, self.dlm = 12, 0      # 9600 baud at 1.8432 MHz
            self.ier = self.lcr = self.mcr = self.scr = self.fcr = 0
            self.lsr_errors = 0
            self._thre_pending = False
            self._rx.clear()
            self.msr = self._modem_lines(0)
            self._update_irq()

    # -- host side -----------------------------------------------------------------------------------------
    def enqueue_input(self, data):
        """Offer received bytes; returns how many were taken (the rest: try again later)."""
        with self._lock:
            room = self._backlog_max - len(self._backlog) + self._fifo_room()
            taken = bytes(data[:max(room, 0)])
            self._backlog.extend(taken)
            self._refill()
            self._update_irq()
            return len(taken)

    def publish_reads(self, fn):
        """Publishes LSR: ``fn(REG_LSR, value)`` now and whenever the value a read returns changes, and
        ``fn(REG_LSR, None)`` while a read would have a side effect (see the module's docstring)."""
        with self._lock:
            self._publish, self._published = fn, None
            self._publish_lsr()

    def rx_space(self):
        with self._lock:
            return self._backlog_max - len(self._backlog) + self._fifo_room()

    # -- bus interface -------------------------------------------------------------------------------------
    def read(self, offset, size):
        if size == 1:                   # the guest's only access size, in practice
            return self._read8(offset) if 0 <= offset < 8 else 0xFF
        v = 0
        for i in range(size):
            o = offset + i
            v |= (self._read8(o) if 0 <= o < 8 else 0xFF) << (8 * i)
        return v

    def posted_run(self, offset, data):
        """Posted one-byte writes to ``offset``, in order (a VMM's batch of THR writes): one sink write and one
        interrupt update for the run where THR transmits, else :meth:`write` byte by byte."""
        with self._lock:
            if offset != REG_DATA or self.lcr & LCR_DLAB or self.mcr & MCR_LOOP:
                for b in data:
                    self.write(offset, 1, b)
                return
            if self.sink is not None:
                self.sink.write(bytes(data))
            self._thre_pending = True
            self._update_irq()

    def write(self, offset, size, value):
        if size == 1:
            if 0 <= offset < 8:
                self._write8(offset, value & 0xFF)
            return
        for i in range(size):
            if 0 <= offset + i < 8:
                self._write8(offset + i, (value >> (8 * i)) & 0xFF)

    # -- internals -----------------------------------------------------------------------------------------
    def _fifo_cap(self):
        return FIFO_SIZE if self.fcr & FCR_ENABLE else 1

    def _fifo_room(self):
        return self._fifo_cap() - len(self._rx)

    def _refill(self):
        while self._backlog and len(self._rx) < self._fifo_cap():
            self._rx.append(self._backlog.popleft())

    def _modem_lines(self, mcr):
        if mcr & MCR_LOOP:
            msr = 0
            if mcr & MCR_RTS:
                msr |= MSR_CTS
            if mcr & MCR_DTR:
                msr |= MSR_DSR
            if mcr & MCR_OUT1:
                msr |= MSR_RI
            if mcr & MCR_OUT2:
                msr |= MSR_DCD
            return msr
        return MSR_DCD | MSR_DSR | MSR_CTS

    def _reason(self):
        if self.ier & IER_ELSI and self.lsr_errors:
            return IIR_RLS
        if self.ier & IER_ERBFI and self._rx:
            trig = TRIGGER_LEVELS[self.fcr >> 6] if self.fcr & FCR_ENABLE else 1
            return IIR_RXRDY if len(self._rx) >= trig else IIR_RXTOUT
        if self.ier & IER_ETBEI and self._thre_pending:
            return IIR_TXRDY
        if self.ier & IER_EDSSI and self.msr & 0x0F:
            return IIR_MLSC
        return IIR_NOPEND

    def _update_irq(self):
        level = self._reason() != IIR_NOPEND and not self.mcr & MCR_LOOP
        if self._out2_gates and not self.mcr & MCR_OUT2:
            level = False
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
        if self._publish is not None:       # every state change ends here
            self._publish_lsr()

    def _lsr(self):
        """LSR as a read returns it (transmission is instantaneous: THRE and TEMT always set)."""
        return LSR_THRE | LSR_TEMT | self.lsr_errors | (LSR_DR if self._rx else 0)

    def _publish_lsr(self):
        v = None if self.lsr_errors or self.mcr & MCR_LOOP else self._lsr()
        if v != self._published:
            self._published = v
            self._publish(REG_LSR, v)

    def _transmit(self, byte):
        if self.mcr & MCR_LOOP:
            if len(self._rx) < self._fifo_cap():
                self._rx.append(byte)
            else:
                self.lsr_errors |= LSR_OE
        elif self.sink is not None:
            self.sink.write(bytes([byte]))
        self._thre_pending = True

    def _read8(self, off):
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if off == REG_DATA:
                if dlab:
                    return self.dll
                v = self._rx.popleft() if self._rx else 0
                self._refill()
            elif off == REG_IER:
                return self.dlm if dlab else self.ier
            elif off == REG_IIR:
                v = self._reason()
                if v == IIR_TXRDY:
                    self._thre_pending = False
                if self.fcr & FCR_ENABLE:
                    v |= IIR_FIFO
            elif off == REG_LCR:
                return self.lcr
            elif off == REG_MCR:
                return self.mcr
            elif off == REG_LSR:            # a polling console reads this once per character
                v = self._lsr()
                if not self.lsr_errors:
                    return v                # nothing cleared: the interrupt line cannot change
                self.lsr_errors = 0
            elif off == REG_MSR:
                v = self.msr
                self.msr &= 0xF0
            else:
                return self.scr
            self._update_irq()
            return v

    def _write8(self, off, val):
        with self._lock:
            dlab = self.lcr & LCR_DLAB
            if off == REG_DATA:
                if dlab:
                    self.dll = val
                else:
                    self._transmit(val)
            elif off == REG_IER:
                if dlab:
                    self.dlm = val
                else:
                    if not self.ier & IER_ETBEI and val & IER_ETBEI:
                        self._thre_pending = True
                    self.ier = val & 0x0F
            elif off == REG_IIR:
                self._write_fcr(val)
            elif off == REG_LCR:
                self.lcr = val
            elif off == REG_MCR:
                self._write_mcr(val & 0x1F)
            elif off == REG_SCR:
                self.scr = val
            # LSR and MSR writes are ignored (factory test only).
            self._update_irq()

    def _write_fcr(self, val):
        enabling = bool(val & FCR_ENABLE)
        if enabling != bool(self.fcr & FCR_ENABLE) or val & FCR_RCV_RST:
            self._rx.clear()            # toggling FIFO mode clears both FIFOs
            self.lsr_errors = 0
        self.fcr = val & 0xC9 if enabling else 0
        self._refill()

    def _write_mcr(self, val):
        old = self.msr
        self.mcr = val
        new = self._modem_lines(val)
        delta = old & 0x0F
        if (new ^ old) & MSR_CTS:
            delta |= MSR_DCTS
        if (new ^ old) & MSR_DSR:
            delta |= MSR_DDSR
        if (new ^ old) & MSR_DCD:
            delta |= MSR_DDCD
        if old & MSR_RI and not new & MSR_RI:
            delta |= MSR_TERI
        self.msr = new | delta

    # -- snapshot (bhyve_devices/snapshot.py) --------------------------------------------------------------
    snapshot_version = 1
    _REGS = ("dll", "dlm", "ier", "lcr", "mcr", "scr", "fcr", "lsr_errors", "msr")

    def snapshot(self):
        with self._lock:
            return {**header(self), **save_fields(self, self._REGS), "thre_pending": self._thre_pending,
                    "rx": b2s(self._rx), "backlog": b2s(self._backlog)}

    def restore(self, state, shift_ns):
        check(self, state, self._REGS + ("thre_pending", "rx", "backlog"))
        if not all(isinstance(state[k], int) and not isinstance(state[k], bool) and 0 <= state[k] <= 0xFF
                   for k in self._REGS) or not isinstance(state["thre_pending"], bool):
            raise SnapshotError("UART16550: a register is not a byte")
        rx, backlog = s2b(state["rx"]), s2b(state["backlog"])
        cap = FIFO_SIZE if state["fcr"] & FCR_ENABLE else 1
        if len(rx) > cap or state["ier"] > 0x0F or state["mcr"] > 0x1F or len(backlog) > self._backlog_max:
            raise SnapshotError("UART16550: the RX FIFO, IER, MCR or the backlog is over its size")
        with self._lock:
            for k in self._REGS:
                setattr(self, k, state[k])
            self._thre_pending = state["thre_pending"]
            self._rx.clear()
            self._rx.extend(rx)
            self._backlog.clear()
            self._backlog.extend(backlog)
            self._update_irq()
