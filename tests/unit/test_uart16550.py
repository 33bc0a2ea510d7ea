"""The 16550 as Linux's 8250 driver probes and uses it, and the host backends."""

import os
import socket
import time

from hypothesis import given, settings, strategies as st

from bhyve_devices.base import RecordingLine
from bhyve_devices import uart16550 as U
from bhyve_devices.uart16550 import UART16550
from vmmshim.backends.uart import FileBackend, PtyBackend, UnixSocketBackend, open_backend


class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b


def make(**kw):
    irq, sink = RecordingLine(), Sink()
    return UART16550(irq, sink, **kw), irq, sink


def test_layouts_round_trip():
    for layout in (U.IER, U.IIR, U.FCR, U.LCR, U.MCR, U.LSR, U.MSR):
        for v in range(256):
            assert layout.build(layout.parse(bytes([v]))) == bytes([v])
    assert U.IIR.parse(b"\xc1").fifos == 3 and U.IIR.parse(b"\xc1").no_int


def test_linux_8250_autoconfig_detects_16550a():
    u, irq, _ = make()
    inb = lambda r: u.read(r, 1)  # noqa: E731
    outb = lambda r, v: u.write(r, 1, v)  # noqa: E731
    # scratch/IER test
    scratch = inb(U.REG_IER)
    outb(U.REG_IER, 0)
    scratch2 = inb(U.REG_IER) & 0x0F
    outb(U.REG_IER, 0x0F)
    scratch3 = inb(U.REG_IER) & 0x0F
    outb(U.REG_IER, scratch)
    assert (scratch2, scratch3) == (0, 0x0F)
    # scratch register
    outb(U.REG_SCR, 0xA5)
    assert inb(U.REG_SCR) == 0xA5
    # loopback MSR test
    save_mcr = inb(U.REG_MCR)
    outb(U.REG_MCR, U.MCR_LOOP | 0x0A)
    assert inb(U.REG_MSR) & 0xF0 == 0x90
    outb(U.REG_MCR, save_mcr)
    # EFR probe (LCR 0xBF) then FIFO detection
    outb(U.REG_LCR, 0xBF)
    outb(2, 0)
    outb(U.REG_LCR, 0)
    outb(2, U.FCR_ENABLE)
    assert inb(U.REG_IIR) >> 6 == 3
    # autoconfig_16550a: EFR read at LCR 0xBF is the IIR, not 0
    outb(U.REG_LCR, 0xBF)
    assert inb(2) != 0
    # NS SuperIO check: EXCR1 at LCR 0xE0 must not follow MCR.LOOP
    outb(U.REG_LCR, 0)
    status1 = inb(U.REG_MCR)
    outb(U.REG_LCR, 0xE0)
    s2a = inb(2)
    outb(U.REG_LCR, 0)
    outb(U.REG_MCR, status1 ^ U.MCR_LOOP)
    outb(U.REG_LCR, 0xE0)
    s2b = inb(2)
    outb(U.REG_LCR, 0)
    outb(U.REG_MCR, status1)
    assert not (s2a ^ s2b) & U.MCR_LOOP
    # 16750 check: IIR bit 5 never set
    outb(2, U.FCR_ENABLE | 0x20)
    st1 = inb(U.REG_IIR) >> 5
    outb(U.REG_LCR, 0x80)
    outb(2, U.FCR_ENABLE | 0x20)
    st2 = inb(U.REG_IIR) >> 5
    outb(U.REG_LCR, 0)
    assert (st1, st2) == (6, 6)
    # IER UUE bit (XScale) reads 0
    outb(U.REG_IER, 0x40)
    assert inb(U.REG_IER) & 0x40 == 0
    # divisor latch
    outb(U.REG_LCR, 0x83)
    outb(0, 0x01)
    outb(1, 0x00)
    assert (inb(0), inb(1)) == (1, 0)
    outb(U.REG_LCR, 0x03)
    assert inb(U.REG_LSR) & 0x60 == 0x60
    assert not irq.level


def test_thre_interrupt_and_txen_bug_tests():
    u, irq, sink = make()
    u.write(U.REG_MCR, 1, U.MCR_OUT2 | U.MCR_DTR | U.MCR_RTS)
    u.write(2, 1, 0xC7)  # FIFO on, clear, trigger 14
    # UART_BUG_THRE test
    u.write(U.REG_IER, 1, U.IER_ETBEI)
    iir1 = u.read(U.REG_IIR, 1)
    u.write(U.REG_IER, 1, 0)
    u.write(U.REG_IER, 1, U.IER_ETBEI)
    iir = u.read(U.REG_IIR, 1)
    u.write(U.REG_IER, 1, 0)
    assert iir1 == 0xC2 and iir == 0xC2
    # transmit with THRE interrupts
    u.write(U.REG_IER, 1, U.IER_ETBEI)
    assert irq.level
    assert u.read(U.REG_IIR, 1) == 0xC2
    assert not irq.level  # reading IIR cleared THRE
    for b in b"hello":
        assert u.read(U.REG_LSR, 1) & U.LSR_THRE
        u.write(0, 1, b)
    assert sink.data == b"hello"
    assert irq.level
    u.write(U.REG_IER, 1, 0)
    assert not irq.level


def test_out2_gates_irq_and_loopback_masks_it():
    u, irq, _ = make()
    u.write(U.REG_IER, 1, U.IER_ETBEI)
    assert not irq.level
    u.write(U.REG_MCR, 1, U.MCR_OUT2)
    assert irq.level
    u.write(U.REG_MCR, 1, U.MCR_OUT2 | U.MCR_LOOP)
    assert not irq.level
    u2, irq2, _ = make(out2_gates_irq=False)
    u2.write(U.REG_IER, 1, U.IER_ETBEI)
    assert irq2.level


def test_receive_with_rx_interrupts_and_trigger_level():
    u, irq, _ = make()
    u.write(U.REG_MCR, 1, U.MCR_OUT2)
    u.write(2, 1, 0x87)  # FIFO, trigger 8
    u.write(U.REG_IER, 1, U.IER_ERBFI)
    assert u.enqueue_input(b"abc") == 3
    assert irq.level
    assert u.read(U.REG_IIR, 1) == 0xCC  # character timeout (below trigger)
    assert u.enqueue_input(b"defghijklmnopqrstuvwxyz") == 23
    assert u.read(U.REG_IIR, 1) == 0xC4
    got = bytearray()
    while u.read(U.REG_LSR, 1) & U.LSR_DR:
        got.append(u.read(0, 1))
    assert got == b"abcdefghijklmnopqrstuvwxyz"
    assert not irq.level
    assert u.read(U.REG_IIR, 1) == 0xC1


def test_backpressure_and_fifo_off_holding_register():
    u, irq, _ = make(backlog=100)
    assert u.enqueue_input(bytes(200)) == 101  # 1-byte holding register + backlog
    assert u.enqueue_input(b"x") == 0
    u.read(0, 1)
    assert u.rx_space() == 1
    u.write(2, 1, 0x01)  # enabling FIFOs clears the receive FIFO
    assert u.rx_space() == 17  # one byte dropped with the FIFO, 16 moved in from the backlog
    assert u.read(U.REG_LSR, 1) & U.LSR_DR


def test_loopback_data_overrun_and_line_status_interrupt():
    u, irq, sink = make(out2_gates_irq=False)
    u.write(2, 1, 0x01)
    u.write(U.REG_MCR, 1, U.MCR_LOOP)
    for i in range(17):
        u.write(0, 1, i)
    assert sink.data == b""
    lsr = u.read(U.REG_LSR, 1)
    assert lsr & (U.LSR_OE | U.LSR_DR) == U.LSR_OE | U.LSR_DR
    assert not u.read(U.REG_LSR, 1) & U.LSR_OE  # read clears errors
    assert bytes(u.read(0, 1) for _ in range(16)) == bytes(range(16))
    u.write(0, 1, 0x55)
    u.write(0, 1, 0x55)
    u.write(U.REG_IER, 1, U.IER_ELSI)
    for _ in range(16):
        u.write(0, 1, 1)
    assert u.read(U.REG_IIR, 1) == 0xC6


def test_modem_status_deltas_and_interrupt():
    u, irq, _ = make(out2_gates_irq=False)
    u.read(U.REG_MSR, 1)
    u.write(U.REG_MCR, 1, U.MCR_LOOP | U.MCR_OUT1)
    msr = u.read(U.REG_MSR, 1)
    assert msr & U.MSR_RI and msr & U.MSR_DCTS  # CTS dropped on entering loopback
    u.write(U.REG_MCR, 1, U.MCR_LOOP)
    msr = u.read(U.REG_MSR, 1)
    assert msr & U.MSR_TERI and not msr & U.MSR_RI
    assert u.read(U.REG_MSR, 1) & 0x0F == 0
    u.write(U.REG_IER, 1, U.IER_EDSSI)
    u.write(U.REG_MCR, 1, 0)
    assert u.read(U.REG_IIR, 1) == 0x00  # modem status pending (FIFOs off)
    assert u.read(U.REG_MSR, 1) & 0xF0 == 0xB0
    assert u.read(U.REG_IIR, 1) == 0x01


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 8), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
                          st.integers(0, 3), st.binary(max_size=40)), max_size=40))
def test_any_access_never_raises(ops):
    u, irq, _ = make(backlog=64)
    for off, size, val, kind, data in ops:
        if kind == 0:
            u.write(off, size, val & ((1 << (8 * size)) - 1))
        elif kind == 1:
            assert 0 <= u.read(off, size) < 1 << (8 * size)
        else:
            assert 0 <= u.enqueue_input(data) <= len(data)
        assert irq.level == (u._irq_level)


_OPS = st.lists(st.tuples(st.integers(-1, 8), st.sampled_from([1, 2, 4]), st.integers(0, 2**32 - 1),
                          st.integers(0, 3), st.binary(max_size=40)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_OPS)
def test_published_lsr_is_what_a_read_returns(ops):
    """Whatever the guest and the host did, a published LSR is the value a read returns, and such a read
    changes nothing (the VMM answers it without calling the device)."""
    u, irq, _ = make(backlog=64)
    published = {}
    u.publish_reads(published.__setitem__)
    for off, size, val, kind, data in ops:
        if kind == 0:
            u.write(off, size, val & ((1 << (8 * size)) - 1))
        elif kind == 1:
            u.read(off, size)
        else:
            u.enqueue_input(data)
        v = published[U.REG_LSR]
        if v is not None:
            assert u.read(U.REG_LSR, 1) == v and published[U.REG_LSR] == v


def test_lsr_is_withdrawn_while_a_read_has_a_side_effect():
    u, irq, _ = make(out2_gates_irq=False)
    published = {}
    u.publish_reads(published.__setitem__)
    assert published == {U.REG_LSR: U.LSR_THRE | U.LSR_TEMT}
    u.enqueue_input(b"ab")
    assert published[U.REG_LSR] == U.LSR_THRE | U.LSR_TEMT | U.LSR_DR
    u.read(0, 1), u.read(0, 1)
    assert published[U.REG_LSR] == U.LSR_THRE | U.LSR_TEMT
    u.write(U.REG_MCR, 1, U.MCR_LOOP)
    assert published[U.REG_LSR] is None           # posted THR writes would feed the receiver
    for i in range(2):
        u.write(0, 1, i)                           # FIFOs off: the second byte overruns the holding register
    u.write(U.REG_MCR, 1, 0)
    assert published[U.REG_LSR] is None           # OE set: the read that clears it must reach the UART
    assert u.read(U.REG_LSR, 1) & U.LSR_OE
    assert published[U.REG_LSR] == U.LSR_THRE | U.LSR_TEMT | U.LSR_DR


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([U.REG_LCR, U.REG_MCR, U.REG_IER, U.REG_IIR]), st.integers(0, 255),
                          st.binary(min_size=1, max_size=20)), max_size=8))
def test_a_posted_run_is_the_same_as_its_writes_one_by_one(steps):
    """``posted_run`` (a VMM's batch of posted THR writes) leaves the UART, its interrupt line and its output as
    the same bytes written one at a time would, in every mode (DLAB, loopback, FIFOs, interrupts enabled)."""
    a, irq_a, sink_a = make(backlog=64)
    b, irq_b, sink_b = make(backlog=64)
    for reg, val, data in steps:
        for u in (a, b):
            u.write(reg, 1, val)
        a.posted_run(U.REG_DATA, data)
        for x in data:
            b.write(U.REG_DATA, 1, x)
        assert sink_a.data == sink_b.data and irq_a.level == irq_b.level
        assert [a.read(r, 1) for r in range(1, 8)] == [b.read(r, 1) for r in range(1, 8)]
        assert (a.dll, list(a._rx)) == (b.dll, list(b._rx))


# -- backends --------------------------------------------------------------------------------------------------

def _wait(pred, timeout=3.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.01)
    return False


def _drain(u):
    out = bytearray()
    while u.read(U.REG_LSR, 1) & U.LSR_DR:
        out.append(u.read(0, 1))
    return bytes(out)


def test_file_backend_appends(tmp_path):
    p = tmp_path / "com1.log"
    p.write_bytes(b"old:")
    be = open_backend(f"file:{p}")
    assert isinstance(be, FileBackend)
    u = UART16550(RecordingLine(), be)
    be.start(u)
    for b in b"boot":
        u.write(0, 1, b)
    be.close()
    assert p.read_bytes() == b"old:boot"


def test_unix_socket_backend_both_ways(tmp_path):
    path = str(tmp_path / "com1.sock")
    be = UnixSocketBackend(path)
    u = UART16550(RecordingLine(), be)
    be.start(u)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    c.sendall(b"in" * 50)
    got = bytearray()
    assert _wait(lambda: (got.extend(_drain(u)), len(got) == 100)[1])
    assert got == b"in" * 50
    assert _wait(lambda: be._client is not None)
    for b in b"out":
        u.write(0, 1, b)
    c.settimeout(2)
    assert c.recv(10) == b"out"
    c.close()
    be.close()
    assert not os.path.exists(path)


def test_pty_backend_both_ways():
    be = PtyBackend(announce=None)
    u = UART16550(RecordingLine(), be)
    be.start(u)
    fd = os.open(be.path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, b"key")
        got = bytearray()
        assert _wait(lambda: (got.extend(_drain(u)), bytes(got) == b"key")[1])
        for b in b"console":
            u.write(0, 1, b)
        out = bytearray()          # a pty hands written bytes to its reader from a kernel work item: not all at once
        assert _wait(lambda: (out.extend(os.read(fd, 100)), bytes(out) == b"console")[1] or len(out) >= 7)
        assert bytes(out) == b"console"
    finally:
        os.close(fd)
        be.close()


def test_stdio_backend_over_pipes_and_tty_device_path():
    from vmmshim.backends.uart import StdioBackend, TtyBackend
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    be = StdioBackend(stdin_fd=in_r, stdout_fd=out_w)
    u = UART16550(RecordingLine(), be)
    be.start(u)
    os.write(in_w, b"typed")
    got = bytearray()
    assert _wait(lambda: (got.extend(_drain(u)), bytes(got) == b"typed")[1])
    u.write(0, 1, ord("!"))
    assert os.read(out_r, 10) == b"!"
    be.close()
    for fd in (in_r, in_w, out_r, out_w):
        os.close(fd)
    # a host tty given by path (here the slave of a fresh pty)
    master, slave = os.openpty()
    be2 = open_backend(os.ttyname(slave))
    assert isinstance(be2, TtyBackend)
    u2 = UART16550(RecordingLine(), be2)
    be2.start(u2)
    os.write(master, b"z")
    assert _wait(lambda: u2.read(U.REG_LSR, 1) & U.LSR_DR)
    assert u2.read(0, 1) == ord("z")
    be2.close()
    os.close(master)
    os.close(slave)


def test_buffered_backend_writes_lines_and_flushes_a_partial_line_by_timer(tmp_path):
    from bhyve_devices.base import ManualTimers
    from vmmshim.backends.uart import BUFFER_MAX, FLUSH_NS, FileBackend
    path = tmp_path / "console"
    b = FileBackend(str(path))
    t = ManualTimers()
    b.buffer_lines(t)
    for ch in b"boot":
        b.write(bytes([ch]))
    assert path.read_bytes() == b""                     # a partial line waits
    b.write(b"\n")
    assert path.read_bytes() == b"boot\n"               # a whole line goes out at once
    b.write(b"login: ")
    t.set_time(FLUSH_NS - 1)
    assert path.read_bytes() == b"boot\n"
    t.set_time(FLUSH_NS)
    assert path.read_bytes() == b"boot\nlogin: "        # the prompt within FLUSH_NS
    b.write(b"x" * BUFFER_MAX)
    assert path.stat().st_size == 12 + BUFFER_MAX        # a long line without a newline is not held back
    b.write(b"tail")
    b.close()
    assert path.read_bytes().endswith(b"xtail")          # close() writes what is left
