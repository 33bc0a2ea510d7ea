"""Snapshot and restore of the register devices (issue 23; ``bhyve_devices/snapshot.py``): the 16550 UART, the
ACPI PM registers, the POST port, the 8042 keyboard controller and the debug-exit port.

Same method and shared helpers (``Twin``, ``roundtrip``, ``SHIFT``) as ``test_snapshot_platform.py``, which tests the
timer devices and the bad states of all of them: each test drives a device as a guest would, snapshots it, sends the
state through JSON, restores it into a fresh device and runs the original and the copy side by side.
"""

from bhyve_devices.atkbdc import KeyboardController
from bhyve_devices.debugexit import DebugExit
from bhyve_devices.pm import ACPI_ENABLE, PM1_PWRBTN_EN, PM1_PWRBTN_STS, PowerManagement
from bhyve_devices.post import PostPort
from bhyve_devices.uart16550 import UART16550
from tests.unit.test_snapshot_platform import SHIFT, Twin, roundtrip


# -- UART -----------------------------------------------------------------------------------------------------

class Sink:
    def __init__(self):
        self.data = bytearray()

    def write(self, b):
        self.data += b


def make_uart(t, line):
    return UART16550(line, Sink(), backlog=64)


def uart_regs(u):
    u.write(3, 1, u.read(3, 1) | 0x80)
    dl = (u.read(0, 1), u.read(1, 1))
    u.write(3, 1, u.read(3, 1) & 0x7F)
    return [dl, u.read(1, 1), u.read(3, 1), u.read(4, 1), u.read(5, 1), u.read(6, 1), u.read(7, 1)]


def test_uart_registers_fifo_and_backlog_go_on_in_order():
    def drive(tw):
        u = tw.a
        u.write(3, 1, 0x83)                     # DLAB, 8N1
        u.write(0, 1, 0x01)                     # 115200 baud
        u.write(1, 1, 0x00)
        u.write(3, 1, 0x1B)                     # 8E1
        u.write(2, 1, 0x47)                     # FIFO on, cleared, trigger 4
        u.write(4, 1, 0x0B)                     # DTR RTS OUT2
        u.write(7, 1, 0x5C)
        u.write(1, 1, 0x07)                     # ERBFI ETBEI ELSI
        assert u.enqueue_input(bytes(range(40))) == 40
        u.read(0, 1), u.read(0, 1)              # the guest takes two bytes
        u.write(0, 1, ord("x"))                 # a THR write: THRE pending
    tw = Twin(make_uart, drive)
    assert tw.lb.level and tw.restore_events == [(True, 0)]     # the line is driven again
    assert tw.both(uart_regs)[0] == (1, 0)
    assert tw.b.sink.data == b""
    iir = [tw.both(lambda u: u.read(2, 1)) for _ in range(2)]
    assert iir == [0xC4, 0xC4]                  # RX data at the trigger level first
    got = tw.both(lambda u: bytes(u.read(0, 1) for _ in range(38)))
    assert got == bytes(range(2, 40))
    assert tw.both(lambda u: u.read(2, 1)) == 0xC2                # then THR empty
    assert tw.both(lambda u: u.read(2, 1)) == 0xC1
    assert not tw.la.level and not tw.lb.level
    tw.both(lambda u: u.write(0, 1, ord("y")))
    assert tw.b.sink.data == b"y"


def test_uart_loopback_with_an_overrun_and_msr_deltas():
    def drive(tw):
        u = tw.a
        u.write(2, 1, 0x00)                     # FIFOs off: a 1-byte holding register
        u.write(4, 1, 0x1F)                     # loopback, all outputs
        u.write(4, 1, 0x1A)                     # drop DTR and OUT1: DDSR, TERI
        u.write(0, 1, 0x41)
        u.write(0, 1, 0x42)                     # overrun
        u.write(1, 1, 0x0F)
    tw = Twin(make_uart, drive)
    assert tw.both(lambda u: u.read(6, 1)) & 0x0F
    assert tw.both(lambda u: [u.read(2, 1), u.read(5, 1), u.read(5, 1), u.read(0, 1), u.read(2, 1)])
    tw.both(uart_regs)


# -- PM, POST, 8042, debug exit -------------------------------------------------------------------------------

def test_pm_registers_and_sci():
    def make(t, line):
        return PowerManagement(line)

    def drive(tw):
        pm = tw.a
        pm.smi_device.write(0, 1, ACPI_ENABLE)
        pm.evt_device.write(2, 2, PM1_PWRBTN_EN)
        pm.cnt_device.write(0, 2, 3 << 10)      # SLP_TYP 3, stored only
        pm.reset_device.write(0, 1, 0x02)
        assert pm.press_power_button()
    tw = Twin(make, drive)
    assert tw.lb.level and tw.restore_events == [(True, 0)] and tw.b.acpi_enabled
    assert tw.both(lambda pm: (pm.evt_device.read(0, 4), pm.cnt_device.read(0, 2), pm.reset_device.read(0, 1)))
    tw.both(lambda pm: pm.evt_device.write(0, 2, PM1_PWRBTN_STS))
    assert not tw.lb.level and tw.b.pm1_status == 0


def test_post_8042_and_debugexit():
    post = PostPort()
    post.write(0, 1, 0x3C)
    p2 = PostPort()
    p2.restore(roundtrip(post.snapshot()), SHIFT)
    assert p2.read(0, 1) == 0x3C

    kbc = KeyboardController()
    kbc.cmd_port.write(0, 1, 0x60)
    kbc.data_port.write(0, 1, 0x47)              # CTR
    kbc.cmd_port.write(0, 1, 0xAD)               # keyboard disabled
    kbc.cmd_port.write(0, 1, 0xD3)               # echo to the aux buffer ...
    kbc.data_port.write(0, 1, 0x99)              # ... a byte waits, AUX set
    kbc.cmd_port.write(0, 1, 0xD1)               # the output port's byte comes next
    k2 = KeyboardController()
    k2.restore(roundtrip(kbc.snapshot()), SHIFT)
    assert k2.cmd_port.read(0, 1) == kbc.cmd_port.read(0, 1) == 0x3D   # OBF SYS CMD unlocked AUX
    assert k2.data_port.read(0, 1) == 0x99 and k2.cmd_port.read(0, 1) & 1 == 0
    resets = []
    k2._on_reset = lambda: resets.append(1)
    k2.data_port.write(0, 1, 0x02)               # the pending 0xD1 takes it: reset line low
    assert resets == [1] and k2.output_port == 0x02
    k2.cmd_port.write(0, 1, 0x20)
    assert k2.data_port.read(0, 1) == 0x47 | 0x10

    exits = []
    dx = DebugExit(exits.append)
    d2 = DebugExit(exits.append)
    d2.restore(roundtrip(dx.snapshot()), SHIFT)
    assert d2.value is None
    d2.write(0, 4, 3)
    assert exits == [7]
    d3 = DebugExit(exits.append)
    d3.restore(roundtrip(d2.snapshot()), SHIFT)
    d3.write(0, 4, 5)                            # it already ended: no second exit
    assert d3.value == 3 and exits == [7]
