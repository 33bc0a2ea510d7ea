"""IPI routing through ApicBus: physical, logical flat/cluster, x2APIC cluster, shorthands, lowest priority,
NMI, INIT/SIPI hooks, illegal vectors, IOAPIC/MSI delivery."""

import threading

from bhyve_devices import vlapic_regs as R
from bhyve_devices.apicbus import ApicBus
from bhyve_devices.base import ManualTimers
from bhyve_devices.vlapic import Vlapic


class Hooks:
    def __init__(self):
        self.inits, self.sipis, self.nmis, self.kicks = [], [], [], []

    def bus(self):
        return ApicBus(on_init=self.inits.append, on_sipi=lambda c, v, src: self.sipis.append((c, v)),
                       on_nmi=self.nmis.append, kick=self.kicks.append)


def machine(n=4, x2=False, ids=None, **kw):
    h = Hooks()
    bus = h.bus()
    t = ManualTimers()
    vs = []
    for i in range(n):
        v = Vlapic(i, t, bus, apic_id=None if ids is None else ids[i], x2apic_enabled=x2, **kw)
        if x2:
            v.wrmsr(0x80F, 0x1FF)
        else:
            v.write(R.SVR, 4, 0x1FF)
        vs.append(v)
    return h, bus, vs


def ipi(v, dest, lo):
    v.write(R.ICR_HI, 4, dest << 24)
    v.write(R.ICR_LO, 4, lo)


def pending(vs):
    return [v.pending_intr() for v in vs]


def test_physical_fixed():
    h, bus, vs = machine()
    ipi(vs[0], 2, 0x40)
    assert pending(vs) == [None, None, 0x40, None]
    assert h.kicks == [2]
    assert vs[0].read(R.ICR_LO, 4) == 0x40                  # delivery status reads idle


def test_physical_broadcast_and_missing_id():
    h, bus, vs = machine()
    ipi(vs[1], 0xFF, 0x41)
    assert pending(vs) == [0x41] * 4
    ipi(vs[1], 9, 0x51)
    assert pending(vs) == [0x41] * 4


def test_logical_flat():
    h, bus, vs = machine()
    for i, v in enumerate(vs):
        v.write(R.LDR, 4, (1 << i) << 24)
    ipi(vs[0], 0x05, R.ICR_LOGICAL | 0x42)
    assert pending(vs) == [0x42, None, 0x42, None]
    ipi(vs[0], 0xFF, R.ICR_LOGICAL | 0x52)
    assert pending(vs) == [0x52] * 4


def test_logical_cluster():
    h, bus, vs = machine()
    for v, ldr in zip(vs, (0x11, 0x12, 0x21, 0x22)):
        v.write(R.DFR, 4, 0x0FFFFFFF)
        v.write(R.LDR, 4, ldr << 24)
    assert vs[0].read(R.DFR, 4) == 0x0FFFFFFF
    ipi(vs[0], 0x13, R.ICR_LOGICAL | 0x43)
    assert pending(vs) == [0x43, 0x43, None, None]
    ipi(vs[0], 0x22, R.ICR_LOGICAL | 0x53)
    assert pending(vs) == [0x43, 0x43, None, 0x53]


def test_x2apic_cluster_and_physical():
    h, bus, vs = machine(x2=True, ids=[0, 1, 16, 17])
    vs[0].wrmsr(0x830, ((1 << 16 | 3) << 32) | R.ICR_LOGICAL | 0x44)
    assert pending(vs) == [None, None, 0x44, 0x44]
    vs[0].wrmsr(0x830, (17 << 32) | 0x54)
    assert pending(vs) == [None, None, 0x44, 0x54]
    vs[3].wrmsr(0x830, (0xFFFFFFFF << 32) | 0x64)
    assert pending(vs) == [0x64] * 4


def test_shorthands():
    h, bus, vs = machine()
    ipi(vs[1], 0, (R.SHORTHAND_SELF << 18) | 0x45)
    assert pending(vs) == [None, 0x45, None, None]
    ipi(vs[1], 0, (R.SHORTHAND_ALL_EXCL << 18) | 0x55)
    assert pending(vs) == [0x55, 0x45, 0x55, 0x55]
    ipi(vs[1], 0, (R.SHORTHAND_ALL_INCL << 18) | 0x65)
    assert pending(vs) == [0x65] * 4


def test_lowest_priority():
    h, bus, vs = machine()
    for v, tpr in zip(vs, (0x30, 0x10, 0x20, 0x40)):
        v.write(R.TPR, 4, tpr)
    ipi(vs[0], 0xFF, (R.DELMODE_LOWPRI << 8) | 0x86)
    assert pending(vs) == [None, 0x86, None, None]
    for v in vs:
        v.write(R.TPR, 4, 0)
    got = set()
    for vec in (0x90, 0xA0, 0xB0, 0xC0):                     # ties: round robin over all four
        done = bus.deliver(None, 0xFF, False, R.DELMODE_LOWPRI, vec)
        assert len(done) == 1
        got.add(done[0])
    assert got == {0, 1, 2, 3}


def test_nmi():
    h, bus, vs = machine()
    ipi(vs[0], 3, R.DELMODE_NMI << 8)
    assert h.nmis == [3] and 3 in h.kicks
    assert pending(vs) == [None] * 4


def test_init_sipi_sequence():
    h, bus, vs = machine()
    vs[1].write(R.TPR, 4, 0x70)
    ipi(vs[0], 1, (R.DELMODE_INIT << 8) | R.ICR_LEVEL_ASSERT | R.ICR_TRIGGER_LEVEL)
    assert h.inits == [1]
    assert vs[1].read(R.TPR, 4) == 0 and vs[1].read(R.SVR, 4) == 0xFF      # INIT-reset
    ipi(vs[0], 1, (R.DELMODE_INIT << 8) | R.ICR_TRIGGER_LEVEL)               # de-assert: ignored
    assert h.inits == [1]
    ipi(vs[0], 1, (R.DELMODE_STARTUP << 8) | 0x9A)
    ipi(vs[0], 1, (R.DELMODE_STARTUP << 8) | 0x9A)                           # second SIPI ignored
    assert h.sipis == [(1, 0x9A)]
    assert not bus.waiting_for_sipi(1)


def test_init_all_excl_then_sipi_all_excl():
    h, bus, vs = machine()
    ipi(vs[0], 0, (R.SHORTHAND_ALL_EXCL << 18) | (R.DELMODE_INIT << 8) | R.ICR_LEVEL_ASSERT)
    assert h.inits == [1, 2, 3]
    ipi(vs[0], 0, (R.SHORTHAND_ALL_EXCL << 18) | (R.DELMODE_STARTUP << 8) | 0x10)
    assert h.sipis == [(1, 0x10), (2, 0x10), (3, 0x10)]


def test_aps_start_waiting_for_sipi_bsp_does_not():
    h, bus, vs = machine()
    assert not bus.waiting_for_sipi(0) and bus.waiting_for_sipi(2)
    ipi(vs[1], 0, (R.DELMODE_STARTUP << 8) | 0x10)
    assert h.sipis == []


def test_illegal_vector_send():
    h, bus, vs = machine()
    ipi(vs[0], 1, 0x05)
    assert pending(vs) == [None] * 4
    vs[0].write(R.ESR, 4, 0)
    assert vs[0].read(R.ESR, 4) == R.ESR_SEND_ILLEGAL_VECTOR
    ipi(vs[0], 1, (R.DELMODE_NMI << 8) | 0x02)                               # NMI ignores the vector
    assert h.nmis == [1]


def test_illegal_vector_receive_via_bus():
    h, bus, vs = machine()
    bus.deliver_intr(2, True, R.DELMODE_FIXED, 0x0E, False)
    vs[2].write(R.ESR, 4, 0)
    assert vs[2].read(R.ESR, 4) == R.ESR_RECV_ILLEGAL_VECTOR


def test_deliver_intr_level_sets_tmr():
    h, bus, vs = machine()
    assert bus.deliver_intr(3, True, R.DELMODE_FIXED, 0x61, True) == [3]
    assert vs[3].read(R.TMR0 + 0x30, 4) == 1 << 1
    assert bus.deliver_intr(0xFF, True, R.DELMODE_FIXED, 0x62, False) == [0, 1, 2, 3]
    assert bus.deliver_intr(1, True, R.DELMODE_EXTINT, 0x62, False) == []
    assert bus.deliver_intr(1, True, R.DELMODE_NMI, 0, False) == [1] and h.nmis == [1]


def test_disabled_targets_skipped():
    h, bus, vs = machine()
    vs[2].write(R.SVR, 4, 0xFF)                                              # software-disabled
    vs[3].set_apicbase(0xFEE00000)                                           # hardware-disabled
    ipi(vs[0], 0xFF, 0x70)
    assert pending(vs) == [0x70, 0x70, None, None]
    assert bus.deliver_intr(3, True, R.DELMODE_FIXED, 0x71, False) == []    # a physical MSI to the disabled one
    assert bus.deliver_intr(1, True, R.DELMODE_FIXED, 0x71, False) == [1]


def test_cross_ipis_do_not_deadlock():
    h, bus, vs = machine(n=2)

    def storm(src, dst):
        for _ in range(300):
            ipi(vs[src], dst, 0x80)
            vs[src].pending_intr()

    ts = [threading.Thread(target=storm, args=(0, 1)), threading.Thread(target=storm, args=(1, 0))]
    for th in ts:
        th.start()
    for th in ts:
        th.join(10)
    assert not any(th.is_alive() for th in ts)
    assert pending(vs) == [0x80, 0x80]
