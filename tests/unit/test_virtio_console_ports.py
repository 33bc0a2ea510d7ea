"""virtio-console's options (the positional backend, bhyve's ``NAME=PATH`` ports) and its multiport device
(VIRTIO 1.1 section 5.3.6: control queues, DEVICE_ADD, PORT_NAME, PORT_OPEN), driven through the PCI transport by
the test driver the way Linux's ``virtio_console`` driver does it; the Unix sockets behind named ports."""

import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from bhyve_devices.base import BytesMemory
from bhyve_devices.pci import registry
from bhyve_devices.virtio import console as C
from bhyve_devices.virtio.console import (CONSOLE_CONFIG, VIRTIO_CONSOLE_F_EMERG_WRITE, VIRTIO_CONSOLE_F_MULTIPORT,
                                          ConsolePorts, VirtioConsole, console_config, parse_options)
from bhyve_devices.virtio.device import STATUS_DEVICE_NEEDS_RESET
from bhyve_devices.virtio.testdriver import PciDriver
from bhyve_devices.virtio.transport import VirtioPciDevice
from vmmshim.backends import close_device_backends, open_device_backends
from vmmshim.backends.uart import UnixSocketBackend

WAIT_S = 5
BAD_ID = 0xFFFFFFFF             # Linux sends DEVICE_READY with this id
CTRL_BUF = 256


def _wait(cond, timeout=WAIT_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


class Sink:
    def __init__(self):
        self.out = []
        self.closed = False

    def write(self, data):
        self.out.append(bytes(data))

    def start(self, feed):
        self.feed = feed
        return self

    def close(self):
        self.closed = True


# ---- options ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("autopty", ("autopty", [])),
    ("stdio", ("stdio", [])),
    ("/dev/pts/3", ("/dev/pts/3", [])),
    ("unix:/tmp/c.sock", ("unix:/tmp/c.sock", [])),
    ("tcp=127.0.0.1:1234", ("tcp=127.0.0.1:1234", [])),
    ("", (None, [])),
    ("port1=/tmp/a.sock", (None, [("port1", "/tmp/a.sock")])),
    ("port1=/a,org.qemu.guest_agent.0=rel/b", (None, [("port1", "/a"), ("org.qemu.guest_agent.0", "rel/b")])),
])
def test_options_positional_backend_and_named_ports(text, want):
    assert console_config(parse_options(text)) == want


def test_the_vms_own_keys_are_not_ports():
    """What ``parse_slot`` and the VM put in the dict: the first option as ``path``, the VM's extra keys."""
    o = {"path": "autopty", "guest_memory": object(), "virtio_msix": "true", "vmname": "vm", "slot": 4, "func": 0}
    assert console_config(o) == ("autopty", [])
    o = {"port1": "/a", "port2": "/b", "virtio_msix": "false", "vmname": "vm", "slot": 4, "func": 0}
    assert console_config(o) == (None, [("port1", "/a"), ("port2", "/b")])


@pytest.mark.parametrize("opts,needle", [
    ({"port1": "true"}, "port port1 requires a path"),        # -s 4,virtio-console,port0=/a,port1
    ({"port1": ""}, "port port1 requires a path"),
    ({"path": "stdio", "port1": "/a"}, "cannot be mixed"),
    ({"path": "stdio", "tcp": "127.0.0.1:1"}, "two backends"),
    ({"port.0.name": "x"}, "not supported"),
    ({f"p{i}": f"/s{i}" for i in range(C.MAX_PORTS + 1)}, "too many ports (17; at most 16)"),
])
def test_option_mistakes_are_one_line_value_errors(opts, needle):
    with pytest.raises(ValueError) as ei:
        console_config(opts)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_sixteen_ports_are_allowed_and_a_name_twice_is_refused():
    _, ports = console_config({f"p{i}": f"/s{i}" for i in range(C.MAX_PORTS)})
    assert len(ports) == C.MAX_PORTS
    with pytest.raises(ValueError, match="given twice"):
        parse_options("a=/x,a=/y")
    assert parse_options("stdio,ro") == {"path": "stdio", "ro": "true"}


def test_port_queues_are_bhyves():
    assert [C.port_queues(p) for p in range(4)] == [(0, 1), (4, 5), (6, 7), (8, 9)]


# ---- the multiport device through the transport ---------------------------------------------------------------------
class Guest:
    """Linux's side of a multiport console: control buffers posted, DEVICE_READY, then PORT_READY per port."""

    def __init__(self, nports=2, modern=True, msix=False, want=None, names=None):
        self.sinks = [Sink() for _ in range(nports)]
        names = names or [f"port{i}" for i in range(nports)]
        self.ports = ConsolePorts(list(zip(names, self.sinks)))
        self.dev = VirtioConsole(self.ports)
        self.mem = BytesMemory(1 << 20)
        self.pci = VirtioPciDevice(self.dev, self.mem)
        self.drv = PciDriver(self.pci, self.mem, modern=modern)
        self.feats = self.drv.init(want=want, msix=msix)
        self.bufs = {}

    def post_ctrl(self, n=4):
        q = self.drv.queues[C.CTRL_RXQ]
        for _ in range(n):
            a = self.drv.alloc.alloc(CTRL_BUF)
            self.bufs[q.add(inn=[(a, CTRL_BUF)])] = a
        self.drv.notify(C.CTRL_RXQ)

    def control(self):
        """The control messages the device returned since the last call: [(id, event, value, payload)]."""
        out = []
        for head, n in self.drv.queues[C.CTRL_RXQ].get_used():
            data = self.drv.alloc.read(self.bufs.pop(head), n)
            out.append(struct.unpack_from("<IHH", data) + (data[8:],))
        return out

    def send(self, pid, event, value):
        q = self.drv.queues[C.CTRL_TXQ]
        q.add(out=[(self.drv.alloc.put(struct.pack("<IHH", pid, event, value)), 8)])
        self.drv.notify(C.CTRL_TXQ)
        return q.get_used()

    def ready(self):
        self.post_ctrl(8)
        assert self.send(BAD_ID, C.DEVICE_READY, 1)[0][1] == 0


@pytest.mark.parametrize("modern,msix", [(True, True), (False, False)])
def test_multiport_offers_named_ports_and_queues_per_port(modern, msix):
    g = Guest(3, modern=modern, msix=msix)
    assert g.feats >> VIRTIO_CONSOLE_F_MULTIPORT & 1 and g.feats >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1
    assert CONSOLE_CONFIG.parse(g.drv.config_bytes(12)).max_nr_ports == 3
    assert len(g.pci.queues) == 8                   # (3 + 1) * 2, as Linux's init_vqs asks for
    g.ready()
    assert g.control() == [(p, C.DEVICE_ADD, 1, b"") for p in range(3)]
    for p in range(3):
        g.send(p, C.PORT_READY, 1)
        assert g.control() == [(p, C.PORT_NAME, 1, f"port{p}".encode())]


def test_port_open_follows_the_host_client_once_the_port_is_ready():
    g = Guest(2, names=["org.qemu.guest_agent.0", "log"])
    g.dev.host_connected(1, True)                   # a client before the driver is up: remembered
    g.ready()
    assert [m[1] for m in g.control()] == [C.DEVICE_ADD, C.DEVICE_ADD]
    g.send(1, C.PORT_READY, 1)
    assert g.control() == [(1, C.PORT_NAME, 1, b"log"), (1, C.PORT_OPEN, 1, b"")]
    g.send(0, C.PORT_READY, 1)
    assert g.control() == [(0, C.PORT_NAME, 1, b"org.qemu.guest_agent.0")]
    g.dev.host_connected(0, True)
    g.dev.host_connected(1, False)
    assert g.control() == [(0, C.PORT_OPEN, 1, b""), (1, C.PORT_OPEN, 0, b"")]
    g.send(0, C.PORT_OPEN, 1)                        # the guest opened /dev/vport0p0
    assert g.dev.ports[0].guest_open and not g.dev.ports[1].guest_open


def test_control_messages_wait_for_control_buffers():
    g = Guest(2)
    g.send(BAD_ID, C.DEVICE_READY, 1)               # no control receive buffers posted yet
    assert g.control() == []
    g.post_ctrl(1)
    assert g.control() == [(0, C.DEVICE_ADD, 1, b"")]
    g.post_ctrl(1)
    assert g.control() == [(1, C.DEVICE_ADD, 1, b"")]


def test_bad_control_messages_are_ignored():
    g = Guest(2)
    g.ready()
    g.control()
    g.send(7, C.PORT_READY, 1)                      # no such port
    q = g.drv.queues[C.CTRL_TXQ]
    q.add(out=[(g.drv.alloc.put(b"\x01\x00"), 2)])  # short
    g.drv.notify(C.CTRL_TXQ)
    assert [n for _, n in q.get_used()] == [0]
    g.send(0, C.RESIZE, 0)
    assert g.control() == [] and not g.pci.errors


def test_data_flows_on_each_ports_own_queues():
    g = Guest(3)
    for p, (rxq, txq) in enumerate(C.port_queues(p) for p in range(3)):
        tx = g.drv.queues[txq]
        msg = f"from guest on {p}\n".encode()
        tx.add(out=[(g.drv.alloc.put(msg[:5]), 5), (g.drv.alloc.put(msg[5:]), len(msg) - 5)])
        g.drv.notify(txq)
        assert tx.get_used()[0][1] == 0
        assert g.sinks[p].out == [msg] and all(not s.out for k, s in enumerate(g.sinks) if k != p)
        g.sinks[p].out.clear()
        feed = g.dev.port_feed(p)
        assert feed(f"to {p}".encode()) == 4        # kept until the guest posts a buffer
        assert g.dev.pending_input(p) == 4
        rx = g.drv.queues[rxq]
        b = g.drv.alloc.alloc(16)
        rx.add(inn=[(b, 16)])
        g.drv.notify(rxq)
        assert [n for _, n in rx.get_used()] == [4] and g.drv.alloc.read(b, 4) == f"to {p}".encode()
    assert g.dev.port_feed(0) == g.dev.enqueue_input


def test_emergency_write_goes_to_port_0():
    g = Guest(2)
    g.drv.config_write(8, 4, ord("!"))
    assert g.sinks[0].out == [b"!"] and g.sinks[1].out == []


def test_reset_forgets_the_driver_but_not_the_host_ends():
    g = Guest(2)
    g.ready()
    g.send(0, C.PORT_READY, 1)
    g.dev.host_connected(0, True)
    g.control()
    assert g.dev.port_feed(1)(b"kept") == 4
    g.drv.init()                                    # reset and set up again
    g.dev.host_connected(0, True)                   # not ready yet: nothing sent
    g.ready()
    assert g.control() == [(0, C.DEVICE_ADD, 1, b""), (1, C.DEVICE_ADD, 1, b"")]
    g.send(0, C.PORT_READY, 1)
    assert g.control() == [(0, C.PORT_NAME, 1, b"port0"), (0, C.PORT_OPEN, 1, b"")]
    assert g.dev.pending_input(1) == 4


def test_after_close_input_is_dropped_and_nothing_is_sent():
    g = Guest(2)
    g.ready()
    g.send(1, C.PORT_READY, 1)
    g.control()
    g.dev.close()
    assert g.dev.port_feed(1)(b"late") == 4 and g.dev.pending_input(1) == 0
    g.dev.host_connected(1, True)
    assert g.control() == []
    hooked = Sink()
    hooked.on_client = print
    ConsolePorts([("a", hooked)]).close()
    assert hooked.on_client is None and hooked.closed   # the backend's reader can no longer call the device


def test_a_driver_without_multiport_gets_port_0_only():
    want = PciDriver(VirtioPciDevice(VirtioConsole(ConsolePorts([("a", Sink())])), BytesMemory(1 << 20)),
                     BytesMemory(1 << 20), modern=True).device_features() & ~(1 << VIRTIO_CONSOLE_F_MULTIPORT)
    g = Guest(2, want=want)
    g.dev.host_connected(0, True)                   # no control queue: nothing to send, nothing fails
    tx = g.drv.queues[1]
    tx.add(out=[(g.drv.alloc.put(b"hi"), 2)])
    g.drv.notify(1)
    assert g.sinks[0].out == [b"hi"] and not g.pci.errors


def test_single_port_console_stays_as_it_was():
    dev = VirtioConsole(Sink())
    assert not dev.features >> VIRTIO_CONSOLE_F_MULTIPORT & 1 and dev.num_queues == 2
    assert CONSOLE_CONFIG.parse(dev.config_bytes()).max_nr_ports == 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(qidx=st.integers(0, 7), data=st.lists(st.tuples(st.binary(max_size=12), st.integers(-0x1000, 0x110000),
                                                       st.integers(0, 0x20000), st.booleans()),
                                             min_size=1, max_size=6),
       feed=st.binary(max_size=32), modern=st.booleans())
def test_hostile_chains_on_any_queue(qidx, data, feed, modern):
    g = Guest(3, modern=modern)
    q = g.drv.queues[qidx]
    for payload, off, n, writable in data:
        gpa = (g.mem.base + off) % 2**64
        if payload and not writable:
            segs = dict(out=[(g.drv.alloc.put(payload), len(payload))])
        else:
            segs = dict(inn=[(gpa, n)]) if writable else dict(out=[(gpa, n)])
        try:
            q.add(**segs)
        except IndexError:
            break
        g.drv.notify(qidx)
        g.dev.port_feed(qidx % 3)(feed)
        g.dev.host_connected(qidx % 3, bool(n & 1))
        q.get_used()
    assert not g.pci.errors or g.drv.status() & STATUS_DEVICE_NEEDS_RESET
    assert all("internal" not in e and "notify" not in e for e in g.pci.errors)


# ---- the VM's side: Unix sockets behind named ports ----------------------------------------------------------------
def _console_opts(spec, mem=None):
    return open_device_backends("virtio-console", {**parse_options(spec), "guest_memory": mem, "vmname": "vm",
                                                   "virtio_msix": "true", "slot": 4, "func": 0})


def test_named_ports_listen_on_their_sockets_and_are_removed_on_close(tmp_path):
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    mem = BytesMemory(1 << 20)
    opts = _console_opts(f"port1={a},log={b}", mem)
    ports = opts["backend"]
    assert isinstance(ports, ConsolePorts) and ports.names == ["port1", "log"]
    assert all(isinstance(be, UnixSocketBackend) for _, be in ports.ports)
    dev = registry.create("virtio-console", opts)
    try:
        assert dev.vdev.multiport and len(dev.queues) == 6
        drv = PciDriver(dev, mem, modern=True)
        drv.init()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.connect(str(b))                       # the backend's client hook reaches the device
            assert _wait(lambda: dev.vdev.ports[1].host_open)
            c.sendall(b"in")
            assert _wait(lambda: dev.vdev.pending_input(1) == 2)
        assert _wait(lambda: not dev.vdev.ports[1].host_open)
    finally:
        dev.close()
    assert not a.exists() and not b.exists()


def test_a_regular_file_at_a_port_path_is_refused_left_alone_and_earlier_ports_closed(tmp_path):
    a, f = tmp_path / "a.sock", tmp_path / "f"
    f.write_bytes(b"mine\n")
    with pytest.raises(OSError) as ei:
        _console_opts(f"port1={a},port2={f}")
    msg = ei.value.strerror
    assert msg.startswith("cannot create port port2: ") and str(f) in msg and "\n" not in msg
    assert f.read_bytes() == b"mine\n" and not a.exists()


def test_a_stale_socket_is_replaced_and_a_file_put_there_later_is_not_removed(tmp_path):
    a = tmp_path / "a.sock"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(a))
    old.close()                                     # stale: nobody listens
    opts = _console_opts(f"port1={a}")
    os.unlink(a)
    a.write_bytes(b"someone else's\n")              # replaced under the VM: not ours to remove
    close_device_backends(opts)
    assert a.read_bytes() == b"someone else's\n"


def test_too_long_a_socket_path_is_one_line(tmp_path):
    with pytest.raises(OSError) as ei:
        _console_opts(f"port1={tmp_path / ('x' * 200)}")
    assert "cannot create port port1" in ei.value.strerror and "None" not in ei.value.strerror


def test_positional_backend_is_opened_from_the_first_option(tmp_path):
    log = tmp_path / "hvc0.log"
    opts = _console_opts(f"file:{log}")
    try:
        assert not isinstance(opts["backend"], (str, ConsolePorts)) and log.exists()
    finally:
        close_device_backends(opts)
    opts = open_device_backends("virtio-console", "tcp=127.0.0.1:0")
    try:
        assert opts["backend"].address[0] == "127.0.0.1"
    finally:
        close_device_backends(opts)
    with pytest.raises(OSError, match="No such file"):
        _console_opts(str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()
