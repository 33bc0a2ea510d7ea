"""The whole-list paths of AHCI's PRDT (``Command._ram_views``) and NVMe's PRP lists (``prp._list_views``) give
exactly what their entry-by-entry paths give, or leave the case to them: hypothesis draws tables (addresses in
and past RAM, odd counts, neighbours, lengths short of and past the table), run once over a memory with a ``ram``
view and once over one without."""

import struct

from hypothesis import given, settings, strategies as st

from bhyve_devices.ahci.command import Command, HostBusFault, PrdtShort
from bhyve_devices.base import BytesMemory
from bhyve_devices.nvme import prp
from bhyve_devices.nvme.regs import NvmeError

RAM = 1 << 20
FILL = bytes(range(256)) * (RAM // 256)


class NoRam(BytesMemory):
    """The same bytes with no ``ram`` view: every buffer through ``view``."""

    def __init__(self, other):
        self.__dict__.update(other.__dict__)
        self.ram = None


def _outcome(fn):
    try:
        return [(bytes(m[:8]), len(m)) for m in fn()]
    except (HostBusFault, PrdtShort, NvmeError) as exc:
        return type(exc).__name__


entry = st.tuples(st.integers(0, RAM + 8192), st.integers(0, 9000))


@settings(max_examples=300, deadline=None)
@given(st.lists(entry, min_size=1, max_size=12), st.integers(1, 60000), st.booleans())
def test_ahci_prdt_fast_path_agrees(entries, length, partial):
    mem = BytesMemory(RAM, 0)
    mem.buf[:] = FILL
    table = memoryview(b"".join(struct.pack("<QII", a, 0, c) for a, c in entries))
    fast = Command(mem, 0, 0, len(entries), b"", b"", table, 0)
    slow = Command(NoRam(mem), 0, 0, len(entries), b"", b"", table, 0)
    assert _outcome(lambda: fast._views(length, partial)) == _outcome(lambda: slow._views(length, partial))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, (RAM >> 12) + 2), min_size=3, max_size=40), st.integers(0, 4095))
def test_nvme_prp_list_fast_path_agrees(pages, tail):
    mem = BytesMemory(RAM, 0)
    mem.buf[:] = FILL
    lst = 0x1000
    struct.pack_into(f"<{len(pages) - 1}Q", mem.buf, lst, *[p << 12 for p in pages[1:]])
    length = (len(pages) - 1) * 4096 + 4096 - tail if tail < 4096 else len(pages) * 4096
    assert _outcome(lambda: prp.prp_buffers(mem, pages[0] << 12, lst, length)) == \
        _outcome(lambda: prp.prp_buffers(NoRam(mem), pages[0] << 12, lst, length))
