"""pm.c (reset, PM1, SMI_CMD, power button), the POST ports and the minimal 8042."""

from hypothesis import given, settings, strategies as st

from bhyve_devices.atkbdc import KeyboardController
from bhyve_devices.base import RecordingLine
from bhyve_devices.pm import (ACPI_DISABLE, ACPI_ENABLE, PM1_CNT, PM1_EN, PM1_PWRBTN_EN, PM1_PWRBTN_STS, PM1_STS,
                              PowerManagement)
from bhyve_devices.post import PostPort


class Bus:
    def __init__(self, *ranges_lists):
        self.ranges = [r for rl in ranges_lists for r in rl]

    def _find(self, port):
        for base, length, dev in self.ranges:
            if base <= port < base + length:
                return base, dev
        raise KeyError(hex(port))

    def out(self, port, size, value):
        base, dev = self._find(port)
        dev.write(port - base, size, value)

    def inp(self, port, size):
        base, dev = self._find(port)
        return dev.read(port - base, size)


def make():
    calls = []
    sci = RecordingLine()
    pm = PowerManagement(sci, on_reset=lambda: calls.append("reset"), on_poweroff=lambda: calls.append("off"))
    return pm, sci, calls, Bus(pm.ranges())


def test_layouts_round_trip():
    for layout, defined in ((PM1_STS, 0x8731), (PM1_EN, 0x0721), (PM1_CNT, 0xFFFF)):
        for v in (0, 1, 0x0100, 0x2001, 0x8521, 0xFFFF):
            raw = (v & defined).to_bytes(2, "little")
            assert layout.build(layout.parse(raw)) == raw
    assert PM1_STS.parse((PM1_PWRBTN_STS).to_bytes(2, "little")).pwrbtn_sts
    c = PM1_CNT.parse((0x2000 | 5 << 10 | 1).to_bytes(2, "little"))
    assert (c.slp_en, c.slp_typ, c.sci_en) == (True, 5, True)


def test_reset_register():
    pm, sci, calls, bus = make()
    bus.out(0xCF9, 1, 0x02)
    assert calls == [] and bus.inp(0xCF9, 1) == 0x02
    bus.out(0xCF9, 1, 0x06)
    assert calls == ["reset"]
    bus.out(0xCF9, 1, 0x0E)
    assert calls == ["reset", "reset"]


def test_acpi_enable_and_power_button_sci():
    pm, sci, calls, bus = make()
    assert not pm.press_power_button()  # legacy mode: the caller powers off
    assert not sci.level
    bus.out(0xB2, 1, ACPI_ENABLE)
    assert bus.inp(0x404, 2) & 1
    bus.out(0x402, 2, PM1_PWRBTN_EN)
    assert bus.inp(0x402, 2) == PM1_PWRBTN_EN
    assert pm.press_power_button()
    assert sci.level
    assert bus.inp(0x400, 2) & PM1_PWRBTN_STS
    assert bus.inp(0x400, 4) == PM1_PWRBTN_STS | PM1_PWRBTN_EN << 16
    bus.out(0x400, 2, PM1_PWRBTN_STS)  # write 1 to clear
    assert not sci.level
    assert bus.inp(0x400, 2) == 0
    bus.out(0xB2, 1, ACPI_DISABLE)
    assert not bus.inp(0x404, 2) & 1


def test_status_without_enable_does_not_raise_sci():
    pm, sci, calls, bus = make()
    bus.out(0xB2, 1, ACPI_ENABLE)
    assert pm.press_power_button()
    assert not sci.level
    bus.out(0x402, 2, PM1_PWRBTN_EN)
    assert sci.level


def test_sci_en_is_read_only_and_s5_powers_off():
    pm, sci, calls, bus = make()
    bus.out(0x404, 2, 0x0001)
    assert bus.inp(0x404, 2) & 1 == 0
    bus.out(0xB2, 1, ACPI_ENABLE)
    bus.out(0x404, 2, 0x0000)
    assert bus.inp(0x404, 2) & 1 == 1
    bus.out(0x404, 2, 3 << 10 | 1 << 13)  # S3: ignored
    assert calls == []
    assert bus.inp(0x404, 2) == 3 << 10 | 1  # SLP_EN reads 0
    bus.out(0x404, 2, 5 << 10 | 1 << 13)  # Linux acpi_enter_sleep_state(S5)
    assert calls == ["off"]


def test_post_ports():
    codes = []
    p80, p84 = PostPort(on_code=codes.append), PostPort()
    p80.write(0, 1, 0x3A)
    p84.write(0, 1, 0x12)
    assert (p80.read(0, 1), p84.read(0, 1), codes) == (0x3A, 0x12, [0x3A])
    assert p80.read(0, 2) == 0xFF3A


def test_atkbdc_reset_and_linux_i8042_probe():
    calls = []
    irq1, irq12 = RecordingLine(), RecordingLine()
    kbd = KeyboardController(on_reset=lambda: calls.append("reset"), irq1=irq1, irq12=irq12)
    bus = Bus(kbd.ranges())
    # i8042_flush: no OBF
    assert bus.inp(0x64, 1) & 1 == 0
    assert bus.inp(0x64, 1) & 2 == 0  # kb_wait sees IBF clear
    # self-test
    bus.out(0x64, 1, 0xAA)
    assert bus.inp(0x64, 1) & 1 and bus.inp(0x60, 1) == 0x55
    assert bus.inp(0x64, 1) & 1 == 0
    # read and write the CTR
    bus.out(0x64, 1, 0x20)
    ctr = bus.inp(0x60, 1)
    bus.out(0x64, 1, 0x60)
    bus.out(0x60, 1, ctr | 0x03)
    bus.out(0x64, 1, 0x20)
    assert bus.inp(0x60, 1) == ctr | 0x03
    # aux loop and aux disable bit test
    bus.out(0x64, 1, 0xD3)
    bus.out(0x60, 1, 0x5A)
    assert bus.inp(0x64, 1) & 0x21 == 0x21 and bus.inp(0x60, 1) == 0x5A
    assert irq12.pulses == 1
    bus.out(0x64, 1, 0xA7)
    bus.out(0x64, 1, 0x20)
    assert bus.inp(0x60, 1) & 0x20
    # a keyboard command gets a fast timeout answer with IRQ1
    bus.out(0x60, 1, 0xF2)
    assert bus.inp(0x64, 1) & 0x41 == 0x41 and bus.inp(0x60, 1) == 0xFE
    assert irq1.pulses == 1
    assert calls == []
    bus.out(0x64, 1, 0xFE)
    assert calls == ["reset"]
    bus.out(0x64, 1, 0xD1)
    bus.out(0x60, 1, 0x02)
    assert calls == ["reset", "reset"]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(-1, 5), st.sampled_from([1, 2, 4]),
                          st.integers(0, 2**32 - 1), st.booleans()), max_size=30))
def test_any_access_never_raises(ops):
    pm, sci, calls, bus = make()
    kbd = KeyboardController(on_reset=lambda: None)
    devs = [pm.reset_device, pm.evt_device, pm.cnt_device, pm.smi_device, kbd.data_port, kbd.cmd_port, PostPort()]
    for which, off, size, val, is_write in ops:
        dev = devs[which]
        val &= (1 << (8 * size)) - 1
        if is_write:
            dev.write(off, size, val)
        else:
            assert 0 <= dev.read(off, size) < 1 << (8 * size)
    pm.press_power_button()
