"""virtio-net's host ends (``vmmshim/backends/net.py``): the receive poll thread asks the device before it polls
the backend, comes back on a kick, stops on close; the socket pair carries frames both ways; and the layering rule
that lets devices be given their backends (``bhyve_devices/`` imports nothing from ``ops/`` or ``vmmshim/``)."""

import ast
import pathlib
import threading
import time

from bhyve_devices.backends import CharBackend, NetBackend
from bhyve_devices.virtio import net as N
from vmmshim.backends import net as NB
from vmmshim.backends.uart import FileBackend

ROOT = pathlib.Path(__file__).resolve().parents[2]


def wait_for(cond, timeout=5):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_rx_thread_receives_only_while_ready_and_looks_again_on_a_kick():
    be = NB.SocketPairBackend()
    assert isinstance(be, NetBackend)
    ready = threading.Event()
    got = []

    def receive():
        got.append(bytes(be.sock.recv(4096)))
    be.start_rx(ready.is_set, receive)
    be.peer.send(b"frame-1")
    time.sleep(0.2)
    assert got == [] and be.stats["rx_waits"] == 0       # not ready: the backend is never polled
    ready.set()
    be.rx_kick()
    assert wait_for(lambda: got == [b"frame-1"])
    ready.clear()
    be.rx_kick()
    assert wait_for(lambda: be.stats["rx_waits"] == 1)    # stopped polling the backend, waits on the kick pipe
    be.peer.send(b"frame-2")
    time.sleep(0.2)
    assert got == [b"frame-1"]
    thread = be._thread
    be.close()
    assert not thread.is_alive()
    be.rx_kick()                                          # after close: nothing to kick, no error


def test_end_of_file_stops_polling_the_backend():
    """The receiver reads the end of file (the peer is gone) and says it is not ready any more: the thread stops
    polling the backend instead of spinning on the hang-up."""
    be = NB.SocketPairBackend()
    state = dict(gone=False, calls=0)

    def receive():
        state["calls"] += 1
        if be.recv_into([memoryview(bytearray(64))]) == 0:
            state["gone"] = True
    be.start_rx(lambda: not state["gone"], receive)
    be.peer.close()
    assert wait_for(lambda: be.stats["rx_waits"] == 1)
    time.sleep(0.2)
    assert state == dict(gone=True, calls=1) and be._thread.is_alive()
    be.close()


def test_the_device_drives_the_backend_through_the_protocol():
    be = NB.SocketPairBackend(vnet_hdr=True, offloads=True)
    dev = N.VirtioNet(be, start=False)
    assert dev.features & N.OFFLOAD_FEATURES == N.OFFLOAD_FEATURES
    dev.apply_features(dev.features)
    assert be.offload_flags == NB.tun_offload_flags(dev.features) != 0
    dev.close()
    assert be.sock.fileno() == -1


def test_open_backend_names():
    assert NB.open_backend(None) is None


def test_uart_backends_are_char_backends(tmp_path):
    be = FileBackend(str(tmp_path / "out"))
    assert isinstance(be, CharBackend)
    be.close()


def test_bhyve_devices_import_nothing_from_ops_or_vmmshim():
    bad = []
    for path in sorted((ROOT / "bhyve_devices").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bad += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("ops", "vmmshim")]
    assert bad == []
