"""virtio-9p through the PCI transport, driven by the test driver as Linux's 9pnet_virtio drives it: the mount
tag in the configuration space, requests as chains (the T-message readable, room for the R-message writable,
Linux's zero-copy layouts in indirect tables), reset, the ``-s`` options and the registry; and hypothesis's
hostile chains and messages, with every view of guest memory checked to lie in RAM and the files beside the share
(and a read-only share itself) checked unchanged."""

import errno
import os
import struct
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.pci import config as PC
from bhyve_devices.pci import registry
from bhyve_devices.virtio import p9 as P
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from tests.unit.test_p9_security import lab, snapshot
from tests.unit.test_p9_rig import O_RDWR, TREAD, TVERSION, TWRITE, P9Client, P9Error
from tests.unit.virtqueue_rig import RecordingMemory
from vmmshim.backends import close_device_backends, open_device_backends
from vmmshim.backends.p9fs import HostShare

MEM_BASE = 0x10000
MEM_SIZE = 1 << 20
ROOM = 16384


class Guest:
    """A guest with the device at slot 4: the driver, and a 9P client whose requests go through the queue."""

    def __init__(self, share, tag="share", readonly=False, modern=True, msix=True, **server_kw):
        self.mem = RecordingMemory(MEM_SIZE, MEM_BASE)
        self.dev = P.Virtio9p(HostShare(share, readonly=readonly), tag, **server_kw)
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.pci.set_cfg(PC.DEVICE, 2, P.PCI_DEVICE_9P)
        self.drv = PciDriver(self.pci, self.mem, modern=modern)
        self.feats = self.drv.init(msix=msix)
        self.q = self.drv.queues[0]
        self.req = self.drv.alloc.alloc(ROOM)
        self.rep = self.drv.alloc.alloc(ROOM)
        self.table = self.drv.alloc.alloc(16 * 64, 16)
        self.client = P9Client(self.transport)

    def transport(self, req, room):
        self.drv.alloc.write(self.req, req)
        self.q.add(out=[(self.req, len(req))], inn=[(self.rep, min(room, ROOM))])
        self.drv.notify(0)
        (head, n), = self.q.get_used()
        return self.drv.alloc.read(self.rep, n)

    def chain(self, outs, ins, indirect=True):
        self.q.add(out=outs, inn=ins, indirect_at=self.table if indirect else None)
        self.drv.notify(0)
        return self.q.get_used()

    def in_ram(self):
        return all(MEM_BASE <= gpa and gpa + n <= MEM_BASE + MEM_SIZE for gpa, n in self.mem.granted)


@pytest.fixture
def share(tmp_path):
    root = tmp_path / "share"
    root.mkdir()
    (root / "big.bin").write_bytes(os.urandom(20000))
    return str(root)


@pytest.mark.parametrize("modern,msix", [(False, False), (True, True)])
def test_identity_features_and_mount_tag(share, modern, msix):
    g = Guest(share, tag="hostshare", modern=modern, msix=msix)
    h = g.pci.header()
    assert (h.device_id, g.pci.get_cfg(PC.CLASS, 1), g.pci.get_cfg(PC.SUBSYS_ID, 2)) == (0x1009, 0x01, 9)
    assert g.drv.device_features() & 1 and g.feats & 1
    cfg = P.P9_CONFIG.parse(g.drv.config_bytes(P.P9_CONFIG.sizeof()))
    assert cfg.tag_len == 9 and cfg.tag[:9] == b"hostshare" and cfg.tag[9:] == bytes(256 - 9)
    c = g.client
    assert c.version(1 << 20) == (128 * 4096, b"9P2000.L")
    c.attach(0)
    c.walk(0, 1, "big.bin")
    c.lopen(1)
    assert c.read(1, 10, 100) == open(os.path.join(share, "big.bin"), "rb").read()[10:110]
    assert (g.drv.msix_vectors() if msix else [g.drv.isr()]) and g.in_ram()
    assert not g.pci.errors and g.dev.server.errors == []


def test_linux_zero_copy_chains_in_indirect_tables(share):
    """Tread: the header readable, an 11-byte Rread header then page buffers writable; Twrite: the 23-byte header
    and the data pages readable, 11 bytes writable (9pnet_virtio's p9_virtio_zc_request)."""
    g = Guest(share)
    c = g.client
    c.version()
    c.attach(0)
    c.walk(0, 1, "big.bin")
    c.lopen(1)
    a = g.drv.alloc
    treq = a.put(struct.pack("<IBHIQI", 23, TREAD, 9, 1, 1000, 8192))
    rhdr, p1, p2 = a.alloc(11), a.alloc(4096, 4096), a.alloc(4096, 4096)
    (head, n), = g.chain([(treq, 23)], [(rhdr, 11), (p1, 4096), (p2, 4096)])
    assert n == 11 + 8192 and struct.unpack("<IBHI", a.read(rhdr, 11)) == (n, TREAD + 1, 9, 8192)
    data = open(os.path.join(share, "big.bin"), "rb").read()
    assert a.read(p1, 4096) + a.read(p2, 4096) == data[1000:9192]
    c.walk(0, 2)
    c.lcreate(2, "out.bin", O_RDWR)
    payload = os.urandom(6000)
    whdr = a.put(struct.pack("<IBHIQI", 23 + 6000, TWRITE, 10, 2, 0, 6000))
    d1, d2 = a.put(payload[:4096], 4096), a.put(payload[4096:], 4096)
    rep = a.alloc(11)
    (head, n), = g.chain([(whdr, 23), (d1, 4096), (d2, 6000 - 4096)], [(rep, 11)])
    assert n == 11 and struct.unpack("<IBHI", a.read(rep, 11)) == (11, TWRITE + 1, 10, 6000)
    assert open(os.path.join(share, "out.bin"), "rb").read() == payload
    # a request without room for even an Rlerror is returned with length 0, the device stays up
    (head, n), = g.chain([(treq, 23)], [(rhdr, 4)], indirect=False)
    assert n == 0 and not g.drv.status() & STATUS_DEVICE_NEEDS_RESET and g.in_ram()


def test_reset_clunks_every_fid_and_close_gives_the_share_back(share):
    g = Guest(share)
    c = g.client
    c.version()
    c.attach(0)
    c.walk(0, 1, "big.bin")
    c.lopen(1)
    fs = g.dev.fs
    assert fs._fds == 2
    g.drv.set_status(0)
    assert g.dev.server.fids == {} and fs._fds == 1
    g.drv.init(msix=True)
    g.q = g.drv.queues[0]
    c.version()
    c.attach(0)
    assert c.walk(0, 1, "big.bin")
    g.pci.close()
    assert fs._fds == 0


@pytest.mark.parametrize("text,want", [
    ("share=/x", ("share", "/x", False)),
    ("share=/x,ro", ("share", "/x", True)),
    ("sharename=/x", ("sharename", "/x", False)),
])
def test_legacy_options(text, want):
    assert P.share_config(P.parse_options(text)) == want


@pytest.mark.parametrize("keys,want", [
    ({"share": "/x"}, ("share", "/x", False)),                          # -s 4,virtio-9p,share=/x
    ({"share": "/x", "ro": "true"}, ("share", "/x", True)),
    ({"sharename": "/x"}, ("sharename", "/x", False)),                  # -s 4,virtio-9p,sharename=/x
    ({"sharename": "tag", "path": "/x", "ro": "false"}, ("tag", "/x", False)),    # bhyve's config keys
])
def test_config_keys(keys, want):
    assert P.share_config(dict(keys, slot=4, func=0, vmname="vm", guest_memory=None, virtio_msix=None)) == want


@pytest.mark.parametrize("keys,needle", [
    ({"share": "/x", "bogus": "true"}, "unknown option 'bogus'"),
    ({"a": "/x", "b": "/y"}, "more than one share name"),
    ({}, "share name required"),
    ({"path": "/x"}, "share name required"),
    ({"share": ""}, "path required"),
    ({"t" * 257: "/x"}, "share name too long"),
])
def test_bad_options(keys, needle):
    with pytest.raises(ValueError) as e:
        P.share_config(keys)
    assert needle in str(e.value)
    with pytest.raises(ValueError):
        P.parse_options("a=/x,b=/y")


def test_opened_by_the_vm_and_built_by_name(share, tmp_path):
    mem = RecordingMemory(MEM_SIZE, MEM_BASE)
    o = open_device_backends("virtio-9p", {"hostdir": share, "ro": "true", "guest_memory": mem})
    assert (o["sharename"], o["path"], o["ro"], o["backend"].readonly) == ("hostdir", share, True, True)
    d = registry.create("virtio-9p", o)
    assert d.vdev.tag == b"hostdir" and d.header().device_id == 0x1009 and d.single_vector is False
    d.close()
    o = open_device_backends("virtio-9p", f"t={share}")
    d = registry.create("virtio-9p", dict(o, guest_memory=mem, virtio_msix="false"))
    assert d.single_vector and d.vdev.fs.readonly is False
    d.close()
    with pytest.raises(FileNotFoundError):
        open_device_backends("virtio-9p", {"s": str(tmp_path / "missing")})
    with pytest.raises(NotADirectoryError):
        open_device_backends("virtio-9p", {"s": os.path.join(share, "big.bin")})
    with pytest.raises(ValueError):
        registry.create("virtio-9p", {"s": share})                     # not opened by the VM
    o = open_device_backends("virtio-9p", {"s": share})
    close_device_backends(o)
    assert o["backend"]._fds == 0


def test_ro_share_through_the_device(share):
    g = Guest(share, readonly=True)
    c = g.client
    c.version()
    c.attach(0)
    c.walk(0, 1)
    with pytest.raises(P9Error) as e:
        c.lcreate(1, "x")
    assert e.value.errno == errno.EROFS


# ---- hypothesis ------------------------------------------------------------------------------------------------------
def _t(mtype, tag, body):
    return struct.pack("<IBH", 7 + len(body), mtype, tag) + body


_SEED_MSGS = [
    _t(TVERSION, 0xFFFF, struct.pack("<I", 8192) + b"\x08\x009P2000.L"),
    _t(104, 1, struct.pack("<II", 0, 0xFFFFFFFF) + b"\0\0\0\0" + struct.pack("<I", 0)),       # attach
    _t(110, 2, struct.pack("<IIH", 0, 1, 1) + b"\x03\0dir"),                                  # walk
    _t(14, 3, struct.pack("<I", 1) + b"\1\0f" + struct.pack("<III", 0o102, 0o644, 0)),          # lcreate
    _t(TWRITE, 4, struct.pack("<IQI", 1, 0, 4) + b"data"),
    _t(110, 5, struct.pack("<IIH", 0, 2, 2) + b"\2\0up\7\0outside"),                          # walk via ..
    _t(16, 6, struct.pack("<I", 0) + b"\1\0s" + b"\4\0/etc" + struct.pack("<I", 0)),            # symlink
    _t(TREAD, 7, struct.pack("<IQI", 1, 0, 4096)),
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), readonly=st.booleans(), modern=st.booleans(),
       chains=st.lists(st.tuples(
           st.one_of(st.sampled_from(_SEED_MSGS), st.binary(max_size=64)),
           st.lists(st.tuples(st.integers(-0x2000, MEM_SIZE + 0x2000), st.integers(0, 0x3000)), max_size=3),
           st.lists(st.tuples(st.integers(-0x2000, MEM_SIZE + 0x2000), st.integers(0, 0x3000)), max_size=3),
           st.booleans()), min_size=1, max_size=8))
def test_hostile_chains_and_messages(data, readonly, modern, chains):
    with tempfile.TemporaryDirectory() as tmp:
        share, outside = lab(tmp)
        before_out, before_share = snapshot(outside), snapshot(share)
        g = Guest(share, readonly=readonly, modern=modern, msix=modern)
        a = g.drv.alloc
        for msg, outs, ins, good in chains:
            if data.draw(st.booleans()):                  # flip a byte of the message
                b = bytearray(msg)
                if b:
                    b[data.draw(st.integers(0, len(b) - 1))] = data.draw(st.integers(0, 255))
                msg = bytes(b)
            if good or not (outs or ins):                 # the message in a buffer of its own, room after
                outs = [(a.put(msg) if msg else g.req, len(msg))] + [(MEM_BASE + o % MEM_SIZE, 0) for o, _ in outs]
                ins = [(g.rep, data.draw(st.sampled_from([0, 4, 11, 64, ROOM])))]
            else:
                outs = [(MEM_BASE + o, n) for o, n in outs]
                ins = [(MEM_BASE + o, n) for o, n in ins]
            try:
                g.q.add(out=outs, inn=ins)
            except IndexError:
                break
            g.drv.notify(0)
            g.q.get_used()
            if g.drv.alloc.next > MEM_BASE + MEM_SIZE - 0x4000:
                break
        assert g.in_ram()
        assert not g.pci.errors or g.drv.status() & STATUS_DEVICE_NEEDS_RESET
        assert all("notify" not in e for e in g.pci.errors), g.pci.errors
        assert g.dev.server.errors == []
        g.pci.close()
        assert snapshot(outside) == before_out
        if readonly:
            assert snapshot(share) == before_share
