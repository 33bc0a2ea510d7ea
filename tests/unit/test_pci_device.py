"""PciDevice: header fields of hostbridge/lpc, layouts, BAR sizing and decoding, MSI, MSI-X, INTx, fuzzing."""

import pytest
from hypothesis import given, settings, strategies as st

from bhyve_devices.base import RecordingLine
from bhyve_devices.pci import config as C
from bhyve_devices.pci.device import IO, MEM32, MEM64, BarKind, PciDevice
from bhyve_devices.pci.hostbridge import PCIE_CAP, AmdHostbridge, Hostbridge
from bhyve_devices.pci.lpc import Lpc


def rd(dev, off, size):
    return dev.cfgread(off, size)


def header_fields(dev):
    return {
        "vendor": rd(dev, 0, 2), "device": rd(dev, 2, 2), "command": rd(dev, 4, 2), "status": rd(dev, 6, 2),
        "revision": rd(dev, 8, 1), "prog_if": rd(dev, 9, 1), "subclass": rd(dev, 0xA, 1), "class": rd(dev, 0xB, 1),
        "cls": rd(dev, 0xC, 1), "lat": rd(dev, 0xD, 1), "htype": rd(dev, 0xE, 1), "bist": rd(dev, 0xF, 1),
        "bars": [rd(dev, 0x10 + 4 * i, 4) for i in range(6)], "cis": rd(dev, 0x28, 4),
        "ssvid": rd(dev, 0x2C, 2), "ssid": rd(dev, 0x2E, 2), "rom": rd(dev, 0x30, 4), "cap": rd(dev, 0x34, 1),
        "res": [rd(dev, o, 1) for o in range(0x35, 0x3C)], "iline": rd(dev, 0x3C, 1), "ipin": rd(dev, 0x3D, 1),
        "mingnt": rd(dev, 0x3E, 1), "maxlat": rd(dev, 0x3F, 1),
    }


def test_hostbridge_header():
    h = header_fields(Hostbridge())
    assert (h["vendor"], h["device"], h["class"], h["subclass"], h["prog_if"]) == (0x1275, 0x1275, 6, 0, 0)
    assert h["htype"] == 0 and h["bars"] == [0] * 6 and h["rom"] == 0 and h["ipin"] == 0
    assert h["status"] == C.STS_CAPLIST and h["cap"] == 0x40 and h["command"] == 0
    assert h["revision"] == 0 and h["ssvid"] == 0 and h["ssid"] == 0 and h["res"] == [0] * 7
    dev = Hostbridge()
    cap = PCIE_CAP.parse(bytes(dev.cfgread(0x40 + i, 1) for i in range(60)))
    assert cap.cap_id == 0x10 and cap.next == 0 and cap.pcie_capabilities == 0x42
    assert cap.link_capabilities == 0x411 and cap.link_status == 0x11
    assert C.walk_capabilities(lambda o: dev.cfgread(o, 1)) == [(0x10, 0x40)]
    a = header_fields(AmdHostbridge())
    assert (a["vendor"], a["device"], a["class"], a["subclass"]) == (0x1022, 0x7432, 6, 0)


def test_lpc_header_and_pirq_defaults():
    h = header_fields(Lpc())
    assert (h["vendor"], h["device"], h["class"], h["subclass"], h["prog_if"]) == (0x8086, 0x7000, 6, 1, 0)
    assert h["status"] == 0 and h["cap"] == 0 and h["bars"] == [0] * 6 and h["ipin"] == 0
    lpc = Lpc()
    assert [lpc.cfgread(o, 1) for o in (0x60, 0x61, 0x62, 0x63, 0x68, 0x69, 0x6A, 0x6B)] == [0x80] * 8
    lpc.cfgwrite(0x61, 1, 0x0B)
    assert lpc.cfgread(0x60, 4) == 0x80800B80


def test_header_readonly_and_writable_fields():
    d = PciDevice("t", 0x1234, 0x5678, 2, 0, prog_if=1, revision=3, subsys_vendor=0xAAAA, subsys_id=0xBBBB)
    for off, size in ((0, 4), (8, 4), (0x2C, 4), (0x34, 1), (0x3D, 1), (0x0E, 1)):
        before = d.cfgread(off, size)
        d.cfgwrite(off, size, 0xFFFFFFFF)
        assert d.cfgread(off, size) == before
    assert d.cfgread(8, 4) == 0x02000103 and d.cfgread(0x2C, 4) == 0xBBBBAAAA
    d.cfgwrite(0x3C, 1, 0x0B)
    d.cfgwrite(0x0C, 2, 0x4010)
    assert d.cfgread(0x3C, 1) == 0x0B and d.cfgread(0x0C, 2) == 0x4010
    d.cfgwrite(4, 2, 0xFFFF)
    assert d.cfgread(4, 2) == C.CMD_WRITABLE


def test_status_w1c():
    d = PciDevice("t", 1, 2, 2, 0)
    d.set_cfg(C.STATUS, 2, 0xF900 | C.STS_CAPLIST)
    d.cfgwrite(C.STATUS, 2, 0x0100 | C.STS_CAPLIST)
    assert d.cfgread(C.STATUS, 2) == 0xF800 | C.STS_CAPLIST
    d.cfgwrite(C.COMMAND, 4, 0xFFFF0000)          # dword write of command+status clears the rest
    assert d.cfgread(C.STATUS, 2) == C.STS_CAPLIST and d.cfgread(C.COMMAND, 2) == 0


def test_header_construct_round_trip():
    d = PciDevice("t", 0x1AF4, 0x1001, 1, 0, subsys_vendor=0x1AF4, subsys_id=2)
    d.alloc_bar(0, IO, 64)
    d.place_bar(0, 0x2040)
    raw = bytes(d.cfg[:64])
    h = C.TYPE0_HEADER.parse(raw)
    assert h.vendor_id == 0x1AF4 and h.bars[0] == 0x2041 and h.command == C.CMD_IO
    assert C.TYPE0_HEADER.build(h) == raw and C.TYPE0_HEADER.sizeof() == 64
    for s, n in ((C.MSI_CAP64, 16), (C.MSI_CAP64_PVM, 24), (C.MSIX_CAP, 12), (C.MSIX_TABLE_ENTRY, 16)):
        assert s.sizeof() == n
        blob = bytes(range(n))
        assert s.build(s.parse(blob)) == blob


@pytest.mark.parametrize("kind,size,value,expect", [
    (IO, 0x20, 0xFFFFFFFF, [0x0000FFE1]),
    (IO, 4, 0xFFFFFFFF, [0x0000FFFD]),
    (MEM32, 0x1000, 0xFFFFFFFF, [0xFFFFF000]),
    (MEM32, 10, 0xFFFFFFFF, [0xFFFFFFF0]),
])
def test_bar_sizing_32(kind, size, value, expect):
    d = PciDevice("t", 1, 2, 2, 0)
    d.alloc_bar(0, kind, size)
    d.cfgwrite(0x10, 4, value)
    assert [d.cfgread(0x10, 4)] == expect


def test_bar_sizing_mem64_pair_and_prefetch():
    d = PciDevice("t", 1, 2, 2, 0)
    d.alloc_bar(2, MEM64, 0x4000, prefetch=True)
    assert d.bars[3].kind == BarKind.MEM64_HI
    assert d.cfgread(0x18, 4) == 0xC and d.cfgread(0x1C, 4) == 0
    d.cfgwrite(0x18, 4, 0xFFFFFFFF)
    d.cfgwrite(0x1C, 4, 0xFFFFFFFF)
    assert d.cfgread(0x18, 4) == 0xFFFFC00C and d.cfgread(0x1C, 4) == 0xFFFFFFFF
    d.cfgwrite(0x18, 4, 0x12345678)
    d.cfgwrite(0x1C, 4, 0x000000D0)
    assert d.bars[2].addr == 0xD012344000 and d.cfgread(0x18, 4) == 0x1234400C
    big = PciDevice("t", 1, 2, 2, 0)
    big.alloc_bar(0, MEM64, 8 << 30)                  # 8 GiB: the size reaches into the high dword
    big.cfgwrite(0x10, 4, 0xFFFFFFFF)
    big.cfgwrite(0x14, 4, 0xFFFFFFFF)
    assert big.cfgread(0x10, 4) == 0x4 and big.cfgread(0x14, 4) == 0xFFFFFFFE


def test_bar_subdword_writes_dropped_and_unused_bars_zero():
    d = PciDevice("t", 1, 2, 2, 0)
    d.alloc_bar(1, MEM32, 0x1000)
    d.place_bar(1, 0xC0000000)
    d.cfgwrite(0x14, 2, 0xFFFF)
    d.cfgwrite(0x10, 4, 0xFFFFFFFF)
    assert d.cfgread(0x14, 4) == 0xC0000000 and d.cfgread(0x10, 4) == 0


def test_bar_alloc_errors():
    d = PciDevice("t", 1, 2, 2, 0)
    d.alloc_bar(5, IO, 4)
    with pytest.raises(ValueError):
        d.alloc_bar(5, MEM32, 16)
    with pytest.raises(ValueError):
        d.alloc_bar(5, MEM64, 16)
    with pytest.raises(ValueError):
        d.alloc_bar(0, IO, 0x20000)


def test_decode_enable_reports_bar_changes():
    ev, hooks = [], []
    d = PciDevice("t", 1, 2, 2, 0)
    d.baraddr = lambda idx, en, addr: hooks.append((idx, en, addr))
    d.bar_changed = lambda dev, *a: ev.append(a)
    d.alloc_bar(0, IO, 0x20)
    d.alloc_bar(1, MEM32, 0x1000)
    d.alloc_bar(2, MEM64, 0x4000)
    d.place_bar(0, 0x2000)
    d.place_bar(1, 0xC0000000)
    d.place_bar(2, 0xD000000000)
    assert ev == [(0, IO, 0x2000, 0x2000, 0x20, True), (1, MEM32, 0xC0000000, 0xC0000000, 0x1000, True),
                  (2, MEM64, 0xD000000000, 0xD000000000, 0x4000, True)]
    assert d.cfgread(4, 2) == C.CMD_IO | C.CMD_MEM
    ev.clear()
    d.cfgwrite(4, 2, C.CMD_IO)                        # memory decode off
    assert ev == [(1, MEM32, 0xC0000000, 0xC0000000, 0x1000, False),
                  (2, MEM64, 0xD000000000, 0xD000000000, 0x4000, False)]
    ev.clear()
    d.cfgwrite(0x14, 4, 0xC0100000)                   # moved while not decoded: no report
    assert ev == [] and d.bars[1].addr == 0xC0100000
    d.cfgwrite(4, 2, C.CMD_IO | C.CMD_MEM)
    assert (1, MEM32, 0xC0100000, 0xC0100000, 0x1000, True) in ev
    ev.clear()
    hooks.clear()
    d.cfgwrite(0x10, 4, 0x3000)                       # moved while decoded
    assert ev == [(0, IO, 0x2000, 0x3000, 0x20, True)]
    assert hooks == [(0, False, 0x2000), (0, True, 0x3000)]
    ev.clear()
    d.cfgwrite(4, 2, C.CMD_IO | C.CMD_MEM)            # no change, no report
    assert ev == []


def make_msi(nvec=4, pvm=True):
    sent = []
    d = PciDevice("t", 1, 2, 2, 0)
    d.lintr_request()
    d.intx_line = RecordingLine()
    d.msi = lambda addr, data: sent.append((addr, data))
    off = d.add_msi_cap(nvec, per_vector_mask=pvm)
    return d, off, sent


def test_msi_program_and_notify():
    d, off, sent = make_msi(4)
    assert C.find_capability(lambda o: d.cfgread(o, 1), C.CAP_ID_MSI) == off
    cap = C.MSI_CAP64_PVM.parse(bytes(d.cfgread(off + i, 1) for i in range(24)))
    assert cap.cap_id == 5 and cap.control == (2 << 1) | C.MSI_CTRL_64BIT | C.MSI_CTRL_PVM
    d.cfgwrite(off + 4, 4, 0xFEE01003)
    d.cfgwrite(off + 8, 4, 0x1)
    d.cfgwrite(off + 12, 2, 0x4031)
    d.cfgwrite(off + 2, 2, C.MSI_CTRL_ENABLE | (7 << 4))      # asks 128 vectors: clamped to MMC (4)
    assert (d.cfgread(off + 2, 2) >> 4) & 7 == 2 and d.msi_vectors() == 4
    d.msi_notify(0)
    d.msi_notify(2)
    d.msi_notify(4)                                           # beyond the enabled vectors: dropped
    assert sent == [(0x1FEE01000, 0x4030), (0x1FEE01000, 0x4032)]
    assert d.intx_line.history == []


def test_msi_masked_vector_pending_then_delivered():
    d, off, sent = make_msi(2)
    d.cfgwrite(off + 4, 4, 0xFEE00000)
    d.cfgwrite(off + 12, 2, 0x40)
    d.cfgwrite(off + 2, 2, C.MSI_CTRL_ENABLE | (1 << 4))
    d.cfgwrite(off + 16, 4, 0xFFFFFFFF)
    assert d.cfgread(off + 16, 4) == 0x3
    d.msi_notify(1)
    assert sent == [] and d.msi_pending(1) and d.cfgread(off + 20, 4) == 0x2
    d.cfgwrite(off + 20, 4, 0)                                # pending bits are read-only
    assert d.msi_pending(1)
    d.cfgwrite(off + 16, 4, 0x1)                              # unmask vector 1 only
    assert sent == [(0xFEE00000, 0x41)] and not d.msi_pending(1)


def test_intx_fallback_and_disable():
    d, off, sent = make_msi(1, pvm=False)
    line = d.intx_line
    d.msi_notify(0)
    assert line.level and d.cfgread(C.STATUS, 2) & C.STS_INTX and sent == []
    d.cfgwrite(C.COMMAND, 2, C.CMD_INTX_DISABLE)
    assert not line.level and d.cfgread(C.STATUS, 2) & C.STS_INTX
    d.cfgwrite(C.COMMAND, 2, 0)
    assert line.level
    d.lintr_deassert()
    assert not line.level and not d.cfgread(C.STATUS, 2) & C.STS_INTX
    d.lintr_assert()
    d.cfgwrite(off + 2, 2, C.MSI_CTRL_ENABLE)                 # MSI on: INTx must not be driven
    assert not line.level
    assert d.cfgread(C.INTR_PIN, 1) == 1


def make_msix(nvec=3, bar=1):
    sent = []
    d = PciDevice("t", 1, 2, 2, 0)
    d.lintr_request()
    d.intx_line = RecordingLine()
    d.msi = lambda addr, data: sent.append((addr, data))
    off = d.add_msix_cap(nvec, bar)
    d.place_bar(bar, 0xC0000000)
    return d, off, sent, d.bar_device(bar)


def test_msix_capability_layout():
    d, off, _, win = make_msix(3, 1)
    cap = C.MSIX_CAP.parse(bytes(d.cfgread(off + i, 1) for i in range(12)))
    assert cap.cap_id == 0x11 and cap.control == 2 and cap.table == 1 and cap.pba == 0x1000 | 1
    assert d.bars[1].kind == MEM32 and d.bars[1].size == 0x2000
    for v in range(3):
        assert win.read(v * 16 + 12, 4) == 1                   # masked at reset
    assert win.read(0x1000, 8) == 0 and win.read(0x1800, 4) == 0xFFFFFFFF


def test_msix_program_notify_mask_pending():
    d, off, sent, win = make_msix(3, 1)
    for v in range(3):
        win.write(v * 16, 8, 0xFEE00000 | (v << 12))
        win.write(v * 16 + 8, 4, 0x30 + v)
    win.write(1 * 16 + 12, 4, 0)                                # unmask vector 1
    d.msi_notify(1)
    assert sent == [] and d.intx_line.level                     # MSI-X not enabled yet: INTx
    d.lintr_deassert()
    d.cfgwrite(off + 2, 2, C.MSIX_CTRL_ENABLE)
    assert d.msix_enabled
    d.msi_notify(1)
    assert sent == [(0xFEE01000, 0x31)]
    d.msi_notify(0)                                             # masked entry: pending bit
    assert sent == [(0xFEE01000, 0x31)] and d.msix_pending(0) and win.read(0x1000, 8) == 1
    win.write(12, 4, 0)                                         # unmask: delivered, pending cleared
    assert sent[-1] == (0xFEE00000, 0x30) and not d.msix_pending(0)
    d.cfgwrite(off + 2, 2, C.MSIX_CTRL_ENABLE | C.MSIX_CTRL_FUNC_MASK)
    d.msi_notify(2)
    d.msi_notify(1)
    assert len(sent) == 2 and win.read(0x1000, 1) == 0b110
    win.write(2 * 16 + 12, 4, 0)
    d.cfgwrite(off + 2, 2, C.MSIX_CTRL_ENABLE)                  # function unmask: both delivered
    assert sent[2:] == [(0xFEE01000, 0x31), (0xFEE02000, 0x32)] and win.read(0x1000, 1) == 0
    d.msi_notify(7)                                             # no such vector
    assert len(sent) == 4 and not d.intx_line.level
    win.write(0x1000, 8, 0xFF)                                  # PBA writes dropped
    assert win.read(0x1000, 8) == 0


def test_bar_window_reaches_subclass():
    class Dev(PciDevice):
        def __init__(self):
            super().__init__("t", 1, 2, 2, 0)
            self.alloc_bar(0, IO, 0x10)
            self.regs = {}

        def barread(self, idx, off, size):
            return self.regs.get((idx, off), 0)

        def barwrite(self, idx, off, size, value):
            self.regs[(idx, off)] = value

    d = Dev()
    w = d.bar_device(0)
    w.write(4, 2, 0xBEEF)
    assert w.read(4, 2) == 0xBEEF and w.read(0, 4) == 0


def test_hooks_take_over_config_accesses():
    class Dev(PciDevice):
        def cfgread_hook(self, off, size):
            return 0x1234 if off == 0x80 else None

        def cfgwrite_hook(self, off, size, value):
            self.last = (off, size, value)
            return off == 0x80

    d = Dev("t", 1, 2, 2, 0)
    assert d.cfgread(0x80, 2) == 0x1234 and d.cfgread(0x84, 2) == 0
    d.cfgwrite(0x80, 4, 7)
    assert d.last == (0x80, 4, 7)


def test_capability_space_exhaustion():
    d = PciDevice("t", 1, 2, 2, 0)
    for _ in range(8):
        d.add_capability(bytes([0x09, 0]) + bytes(22))
    with pytest.raises(ValueError):
        d.add_capability(bytes([0x09, 0]) + bytes(22))
    assert len(C.walk_capabilities(lambda o: d.cfgread(o, 1))) == 8


def _fuzz_target():
    d = PciDevice("t", 1, 2, 2, 0)
    d.lintr_request()
    d.intx_line = RecordingLine()
    d.msi = lambda a, v: None
    d.bar_changed = lambda *a: None
    d.alloc_bar(0, IO, 0x40)
    d.alloc_bar(2, MEM64, 0x4000)
    d.add_msi_cap(8, per_vector_mask=True)
    d.add_msix_cap(4, 1)
    for i in (0, 1, 2):
        d.place_bar(i, [0x2000, 0xC0000000, 0xD000000000][i])
    return d


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.integers(-8, 4200), st.sampled_from([1, 2, 3, 4, 8]),
                          st.integers(0, 2 ** 64 - 1), st.booleans()), max_size=30))
def test_fuzz_config_writes_never_raise(ops):
    d = _fuzz_target()
    for off, size, value, notify in ops:
        d.cfgwrite(off, size, value)
        v = d.cfgread(off, size)
        assert 0 <= v < 1 << (8 * min(size, 4) if size in (1, 2, 4) else 32)
        if notify:
            d.msi_notify(value % 10)
        d.bar_device(1).write(off % 0x2000, 4, value & 0xFFFFFFFF)
    lpc = Lpc()
    for off, size, value, _ in ops:
        lpc.cfgwrite(off, size, value)
        lpc.cfgread(off, size)
