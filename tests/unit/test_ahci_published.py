"""AHCI's published registers (``AhciPci.publish_mmio_reads``, ``Hba.publish_reads``: IS and each port's PxIS,
PxSACT and PxCI): what the VMM may answer without an exit must be what a read through the device returns. A
recording publisher stands in for the provider; after every guest action of a hypothesis stream (NCQ and DMA
commands, commands that fail, a bad command table, interrupt clears, COMRESET, stopping a port, HBA resets, a
checkpoint restored into a fresh controller) each published register equals ``barread`` of it, and an unmapped
BAR publishes nothing more."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.ahci import layouts as L
from bhyve_devices.ahci.ata import READ_DMA_EXT, READ_FPDMA_QUEUED, WRITE_FPDMA_QUEUED
from bhyve_devices.ahci.pci import ABAR
from bhyve_devices.ahci.testdriver import Controller, h2d, ncq
from bhyve_devices.backends import MemoryBlockBackend

SECTORS = 256
PORTS = (0, 2)


class Recorder:
    """The provider's side: the last value published for each offset (None: withdrawn)."""

    def __init__(self):
        self.values, self.calls = {}, 0

    def __call__(self, offset, value):
        assert offset % 4 == 0 and (value is None or 0 <= value <= 0xFFFFFFFF)
        self.values[offset] = value
        self.calls += 1

    def check(self, pci):
        live = {off: v for off, v in self.values.items() if v is not None}
        assert live, "nothing is published"
        seen = {off: pci.barread(ABAR, off, 4) for off in live}
        assert live == seen


def rig(threaded=False):
    ctl = Controller({p: ("hd", MemoryBlockBackend(bytearray(SECTORS * 512))) for p in PORTS}, threaded=threaded)
    rec = Recorder()
    ctl.pci.publish_mmio_reads(ABAR, rec)
    ctl.up()
    return ctl, rec


def expected_offsets(pci):
    hba = pci.hba
    regs = [L.IS] + [L.PORT_BASE + p * L.PORT_STRIDE + r for p in range(hba.nports) for r in (L.P_IS, L.P_SACT, L.P_CI)]
    return set(regs)


def test_every_register_is_published_at_mapping_and_follows_a_command():
    ctl, rec = rig()
    assert set(rec.values) == expected_offsets(ctl.pci)
    rec.check(ctl.pci)
    drv = ctl.drv
    drv.issue(0, 3, ncq(READ_FPDMA_QUEUED, 3, 0, 8), [(drv.alloc(4096), 4096)], queued=True)
    rec.check(ctl.pci)
    port_is = L.PORT_BASE + L.P_IS
    assert rec.values[port_is] & L.IS_SDBS and rec.values[L.IS] == 1      # what the handler reads first
    drv.pw(0, L.P_IS, rec.values[port_is])
    drv.w(L.IS, 1)
    rec.check(ctl.pci)
    assert rec.values[port_is] == 0 and rec.values[L.IS] == 0


def test_an_unmapped_bar_publishes_nothing_more():
    ctl, rec = rig()
    ctl.pci.publish_mmio_reads(ABAR, None)
    calls = rec.calls
    ctl.drv.command(0, 0, h2d(READ_DMA_EXT, 0, 1), [(ctl.drv.alloc(512), 512)])
    assert rec.calls == calls
    ctl.pci.publish_mmio_reads(ABAR + 1, rec)       # another BAR: nothing there
    assert rec.calls == calls


ACTIONS = st.sampled_from(["ncq_read", "ncq_write", "dma_read", "bad_lba", "bad_table", "clear", "comreset",
                           "stop", "hba_reset"])
RAM = 8 << 20                   # the test driver's


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(ACTIONS, st.sampled_from(PORTS), st.integers(0, 31)), min_size=1, max_size=25))
def test_published_registers_read_as_the_device_after_every_action(steps):
    ctl, rec = rig()
    drv = ctl.drv
    for action, port, slot in steps:
        buf = drv.alloc(4096)
        if action in ("ncq_read", "ncq_write"):
            op = READ_FPDMA_QUEUED if action == "ncq_read" else WRITE_FPDMA_QUEUED
            drv.issue(port, slot, ncq(op, slot, slot, 8), [(buf, 4096)], write=action == "ncq_write", queued=True)
        elif action == "dma_read":
            drv.issue(port, slot, h2d(READ_DMA_EXT, slot, 8), [(buf, 4096)])
        elif action == "bad_lba":
            drv.issue(port, slot, ncq(READ_FPDMA_QUEUED, slot, SECTORS, 8), [(buf, 4096)], queued=True)
        elif action == "bad_table":
            drv.issue(port, slot, b"", ctba=RAM - 64)       # the command table runs past RAM: a fatal error
        elif action == "clear":
            drv.pw(port, L.P_IS, drv.pr(port, L.P_IS))
            drv.w(L.IS, drv.r(L.IS))
        elif action == "comreset":
            drv.pw(port, L.P_CMD, L.CMD_FRE)
            drv.pw(port, L.P_SCTL, L.SCTL_DET_COMRESET)
            drv.pw(port, L.P_SCTL, 0)
            drv.pw(port, L.P_CMD, L.CMD_FRE | L.CMD_ST)
        elif action == "stop":
            drv.stop(port)
        else:
            ctl.up()
        rec.check(ctl.pci)
    ctl.close()


def test_a_restored_controller_publishes_its_restored_registers():
    ctl, rec = rig()
    drv = ctl.drv
    drv.issue(2, 5, ncq(READ_FPDMA_QUEUED, 5, 0, 8), [(drv.alloc(4096), 4096)], queued=True)
    state = ctl.pci.snapshot()
    fresh, rec2 = rig()
    fresh.pci.restore(state, 0)
    rec2.check(fresh.pci)
    assert rec2.values == rec.values and rec2.values[L.IS] == 1 << 2


def test_a_threaded_port_publishes_what_it_ends():
    ctl, rec = rig(threaded=True)
    drv = ctl.drv
    try:
        for slot in range(8):
            st_ = drv.command(0, slot, ncq(READ_FPDMA_QUEUED, slot, slot * 8, 8), [(drv.alloc(4096), 4096)],
                              queued=True)
            assert st_.ok
            rec.check(ctl.pci)
    finally:
        ctl.close()


@pytest.mark.parametrize("value", [0, 0xFFFFFFFF])
def test_a_write_of_the_same_value_publishes_nothing(value):
    ctl, rec = rig()
    drv = ctl.drv
    drv.pw(0, L.P_IS, 0xFFFFFFFF)
    calls = rec.calls
    drv.pw(0, L.P_IS, value)            # write 1 to clear: nothing set, nothing changes
    assert rec.calls == calls
