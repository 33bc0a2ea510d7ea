"""virtio-console (VIRTIO 1.1 section 5.3): one console port, or bhyve's named ports with MULTIPORT.

Two ways to configure it, as the ``-s`` options (parsed by :func:`console_config`) say:

- ``-s N,virtio-console[,BACKEND]``: one port and no MULTIPORT; the guest sees it as ``/dev/hvc0``. BACKEND is
  any char backend spec of ``vmmshim/backends/uart.py`` (``stdio``, ``autopty``, a tty path, ``file:PATH``,
  ``unix:PATH``, ``tcp=ADDR:PORT``); without one, output is dropped.
- bhyve's ``-s N,virtio-console,NAME=PATH[,NAME2=PATH2...]``: a port per option, numbered from 0 in the order
  given, each named NAME and backed by a Unix socket listening at PATH (bhyve's ``pci_vtcon_sock_add``), at most
  :data:`MAX_PORTS` (bhyve's ``VTCON_MAXPORTS``). The VM opens the sockets and hands them over as a
  :class:`ConsolePorts`. MULTIPORT is offered: the Linux driver shows each port as ``/dev/vportNpM`` with its name
  in ``/sys/class/virtio-ports/vportNpM/name`` (and a ``/dev/virtio-ports/NAME`` link from udev). None of them is a
  console port (bhyve: no ``hvc``). A NAME without ``=PATH`` is refused (bhyve: "port NAME requires a path").

Queues (5.3.2): 0 ``receiveq`` and 1 ``transmitq`` of port 0; with MULTIPORT 2 the control ``receiveq`` (device
to driver), 3 the control ``transmitq``, then ``2(p+1)`` and ``2(p+1)+1`` for port p >= 1. ``max_nr_ports`` is
the number of ports configured, so the driver sets up ``2(n+1)`` queues.

Control messages (5.3.6.2, ``id`` le32, ``event`` le16, ``value`` le16): after the driver's DEVICE_READY the
device sends DEVICE_ADD for every port; after a port's PORT_READY it sends PORT_NAME and, if a host client is
connected, PORT_OPEN 1; a client connecting or going later sends PORT_OPEN 1 or 0 (a Linux guest's writes to a
port wait until the host end is open; bhyve sends PORT_OPEN 1 on connect and never 0). Messages wait in the
device until the driver posts control buffers (bhyve drops them). PORT_OPEN from the driver is recorded
(:attr:`_Port.guest_open`) and otherwise ignored.

Input for a port comes through :meth:`VirtioConsole.port_feed` (port 0: :meth:`VirtioConsole.enqueue_input`, the
call :class:`bhyve_devices.uart16550.UART16550` takes, so the char backends drive either): up to ``backlog``
bytes per port wait for receive buffers; the call returns how many bytes it took (the backend retries the
rest). Output goes to the port's backend ``write(bytes)``.

Features offered: VIRTIO_CONSOLE_F_EMERG_WRITE (a byte written to ``emerg_wr`` goes to port 0's backend at once),
VIRTIO_CONSOLE_F_MULTIPORT with named ports. Configuration space (5.3.4): ``cols`` u16, ``rows`` u16,
``max_nr_ports`` u32, ``emerg_wr`` u32.

Snapshot: the negotiated features, DEVICE_READY, per port (checked to be the same ports by name) PORT_READY, the
guest's open, whether the guest was told the host end is open, and the input taken from the host end but not yet
delivered; the control messages not yet delivered. At restore the input saved goes before any the new host end has
given already, and a port whose host end's connection differs from what the guest was told gets a PORT_OPEN
(queued; it goes out with the next control delivery).

Not supported: F_SIZE (console resize), CONSOLE_PORT (a named port as the guest's ``hvc`` console; bhyve has none
either), a BACKEND together with named ports, backends other than a Unix socket for a named port, hot-plugging
ports (DEVICE_REMOVE), bhyve's config-file form ``pci.B.S.F.port.N.name``/``.path``.
"""

import collections
import functools
import struct
import threading

from construct import Int16ul, Int32ul, Struct

from bhyve_devices import snapshot as S

from .device import VIRTIO_ID_CONSOLE, VirtioDevice, bit
from .virtqueue import gather, scatter, split_segments

VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

CONSOLE_CONFIG = Struct("cols" / Int16ul, "rows" / Int16ul, "max_nr_ports" / Int32ul, "emerg_wr" / Int32ul)

# Control events (5.3.6.2)
DEVICE_READY = 0
DEVICE_ADD = 1
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

CONTROL = struct.Struct("<IHH")     # id, event, value

RXQ, TXQ = 0, 1                     # port 0
CTRL_RXQ, CTRL_TXQ = 2, 3           # with MULTIPORT

MAX_PORTS = 16                      # bhyve's VTCON_MAXPORTS
QUEUE_SIZE = 64                     # bhyve's VTCON_RINGSZ

#: Option keys that are never a ``NAME=PATH`` port: the single backend's and the ones the VM adds itself.
NOT_PORT_KEYS = frozenset({"path", "backend", "tcp", "device", "guest_memory", "virtio_msix", "vmname", "slot",
                           "func"})


def port_queues(pid):
    """(receiveq, transmitq) of port ``pid``."""
    return (RXQ, TXQ) if pid == 0 else (2 * (pid + 1), 2 * (pid + 1) + 1)


def parse_options(text):
    """The ``-s`` option string as the VM's ``parse_slot`` keys it: ``NAME=VALUE`` as is, a first option without
    ``=`` as ``path``, a later one as ``"true"``. A name given twice is a ValueError."""
    o = {}
    for i, opt in enumerate(text.split(",")):
        if not opt:
            continue
        key, sep, value = opt.partition("=")
        if not sep:
            key, value = ("path", opt) if i == 0 else (opt, "true")
        if key in o:
            raise ValueError(f"{key} given twice")
        o[key] = value
    return o


def console_config(o):
    """The console's options (a dict, see :func:`parse_options`) as ``(backend, ports)``: the one port's backend
    (``backend``, ``path`` or ``tcp=``: a spec string, an opened backend, or None) and the ``[(NAME, PATH)]`` of
    bhyve's named ports in the order given. Mistakes are ValueErrors naming them."""
    backend = o.get("backend")
    if backend is None:
        backend = o.get("path")
    if "tcp" in o:
        if backend is not None:
            raise ValueError(f"two backends ({backend} and tcp={o['tcp']}): give one")
        backend = f"tcp={o['tcp']}"
    ports = []
    for key, value in o.items():
        if key in NOT_PORT_KEYS or not isinstance(value, str):
            continue
        if key.startswith("port.") and key.count(".") == 2 and key.split(".")[1].isdigit():
            raise ValueError(f"{key} (bhyve's port.N.name/path keys) is not supported: "
                             "use -s S,virtio-console,NAME=PATH")
        if value in ("", "true"):
            raise ValueError(f"port {key} requires a path ({key}=PATH)")
        ports.append((key, value))
    if ports and backend is not None:
        raise ValueError(f"a backend ({backend}) and named ports ({ports[0][0]}=...) "
                         "cannot be mixed: give one or the other")
    if len(ports) > MAX_PORTS:
        raise ValueError(f"too many ports ({len(ports)}; at most {MAX_PORTS})")
    return backend, ports


class NullSink:
    def write(self, data):
        pass


class ConsolePorts:
    """The opened host ends of bhyve's named ports, ``[(NAME, backend)]`` with port 0 first: the VM passes it as
    the console's ``backend``, which makes a multiport :class:`VirtioConsole`. :meth:`start` gives each backend
    its port's feed and, where the backend has an ``on_client`` hook (the listening sockets), tells the device
    when a client connects or goes; a backend without one counts as always connected. :meth:`close` closes them
    all."""

    def __init__(self, ports):
        self.ports = list(ports)
        if not 1 <= len(self.ports) <= MAX_PORTS:
            raise ValueError(f"{len(self.ports)} ports (1 to {MAX_PORTS})")

    @property
    def names(self):
        return [name for name, _ in self.ports]

    def start(self, console):
        for pid, (_, backend) in enumerate(self.ports):
            if hasattr(backend, "on_client"):
                backend.on_client = functools.partial(console.host_connected, pid)
            else:
                console.host_connected(pid, True)
            backend.start(console.port_feed(pid))
        return self

    def write(self, data):
        """Port 0's output (the CharBackend ``write``)."""
        self.ports[0][1].write(data)

    def close(self):
        for _, backend in self.ports:          # no calls into the device from here on
            if getattr(backend, "on_client", None) is not None:
                backend.on_client = None
        first = None
        for _, backend in self.ports:
            try:
                backend.close()
            except Exception as exc:    # noqa: BLE001 - close the rest, then report the first
                first = first or exc
        if first is not None:
            raise first


class _Port:
    """One port's state: its backend, queues, waiting input and what each side has said."""

    def __init__(self, pid, name, sink):
        self.id, self.name, self.sink = pid, name, sink
        self.rxq, self.txq = port_queues(pid)
        self.input = collections.deque()
        self.pending = 0
        self.host_open = False      # a client is connected to the host end
        self.ready = False          # the driver sent PORT_READY
        self.guest_open = False     # the driver sent PORT_OPEN 1 (a guest process has the port open)

    def write(self, data):
        try:
            self.sink.write(data)
        except OSError:
            pass


class VirtioConsole(VirtioDevice):
    name = "virtio-console"
    device_type = VIRTIO_ID_CONSOLE
    num_queues = 2
    queue_size = QUEUE_SIZE
    features = bit(VIRTIO_CONSOLE_F_EMERG_WRITE)
    config_size = CONSOLE_CONFIG.sizeof()

    def __init__(self, backend=None, backlog=65536):
        super().__init__()
        self.backlog = backlog
        self.multiport = isinstance(backend, ConsolePorts)
        if self.multiport:
            self.ports = [_Port(pid, name, b) for pid, (name, b) in enumerate(backend.ports)]
            self.num_queues = 2 * (len(self.ports) + 1)
            self.features = bit(VIRTIO_CONSOLE_F_EMERG_WRITE) | bit(VIRTIO_CONSOLE_F_MULTIPORT)
        else:
            self.ports = [_Port(0, None, backend if backend is not None else NullSink())]
        self.backend = self.ports[0].sink
        self._ready = False                         # the driver sent DEVICE_READY
        self._closed = False                        # close(): input is dropped, nothing more is sent
        self._ctrl_out = collections.deque()        # control messages waiting for control receive buffers
        self._lock = threading.Lock()               # input, control state, the receive queues
        self._tx_locks = {q: threading.Lock() for q in range(TXQ, self.num_queues, 2)}   # one per transmitq

    def config_bytes(self):
        return CONSOLE_CONFIG.build(dict(cols=0, rows=0, max_nr_ports=len(self.ports), emerg_wr=0))

    def config_write(self, off, size, value):
        if off == 8 and self.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE):
            self.ports[0].write(bytes([value & 0xFF]))

    def _port_of_queue(self, qidx):
        """The port whose queue ``qidx`` is, or None (the control queues, a queue past the ports)."""
        if qidx in (RXQ, TXQ):
            return self.ports[0]
        pid = qidx // 2 - 1
        if qidx in (CTRL_RXQ, CTRL_TXQ) or not self.multiport or pid >= len(self.ports):
            return None
        return self.ports[pid]

    # ---- host to guest ----------------------------------------------------------------------------------------------
    def enqueue_input(self, data):
        """Queues input for port 0; returns how many bytes were taken (the rest: retry later)."""
        return self._enqueue(self.ports[0], data)

    def port_feed(self, pid):
        """The ``enqueue_input`` callable of port ``pid`` (what its backend's ``start`` takes)."""
        if pid == 0:
            return self.enqueue_input
        return functools.partial(self._enqueue, self.ports[pid])

    def pending_input(self, pid=0):
        return self.ports[pid].pending

    def _enqueue(self, port, data):
        with self._lock:
            if self._closed:
                return len(data)
            room = max(self.backlog - port.pending, 0)
            take = bytes(data[:room])
            if take:
                port.input.append(take)
                port.pending += len(take)
            self._deliver_locked(port)
        return len(take)

    def _queue(self, qidx):
        return self.queues[qidx] if qidx < len(self.queues) else None

    def _deliver_locked(self, port):
        q = self._queue(port.rxq)
        if q is None:
            return
        served = 0
        while port.input:
            chain = q.get_chain()
            if chain is None:
                break
            n = 0
            if not chain.readable:
                rest = chain.writable
                while port.input and rest:
                    piece = port.input[0]
                    k = scatter(rest, piece)
                    n += k
                    port.pending -= k
                    rest = split_segments(rest, k)[1]
                    if k < len(piece):
                        port.input[0] = piece[k:]
                        break
                    port.input.popleft()
            q.put_used(chain.head, n)
            served += 1
        if served:
            self.notify_used(q)

    # ---- control messages -------------------------------------------------------------------------------------------
    def host_connected(self, pid, up):
        """A client connected to (``up``) or left the host end of port ``pid``: PORT_OPEN to the driver."""
        with self._lock:
            port = self.ports[pid]
            port.host_open = bool(up)
            if self._ready and port.ready and not self._closed:
                self._send_locked(pid, PORT_OPEN, int(bool(up)))

    def _send_locked(self, pid, event, value, payload=b""):
        if not self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT):
            return
        self._ctrl_out.append(CONTROL.pack(pid, event, value) + payload)
        self._deliver_ctrl_locked()

    def _deliver_ctrl_locked(self):
        q = self._queue(CTRL_RXQ)
        if q is None:
            return
        served = 0
        while self._ctrl_out:
            chain = q.get_chain()
            if chain is None:
                break
            n = 0
            if not chain.readable:      # a buffer the device cannot write goes back empty, the message waits
                n = scatter(chain.writable, self._ctrl_out.popleft())
            q.put_used(chain.head, n)
            served += 1
        if served:
            self.notify_used(q)

    def _control(self, msg):
        """One message from the driver's control transmitq."""
        if len(msg) < CONTROL.size:
            return
        pid, event, value = CONTROL.unpack_from(msg)
        with self._lock:
            if event == DEVICE_READY:
                self._ready = bool(value)
                if self._ready:
                    for port in self.ports:
                        self._send_locked(port.id, DEVICE_ADD, 1)
                return
            if pid >= len(self.ports):
                return                  # a port that does not exist (bhyve: a warning)
            port = self.ports[pid]
            if event == PORT_READY:
                port.ready = bool(value)
                if port.ready:
                    self._send_locked(pid, PORT_NAME, 1, port.name.encode())
                    if port.host_open:
                        self._send_locked(pid, PORT_OPEN, 1)
            elif event == PORT_OPEN:
                port.guest_open = bool(value)

    # ---- guest to host ----------------------------------------------------------------------------------------------
    def queue_notify(self, qidx, queue):
        if self.multiport and qidx == CTRL_RXQ:
            with self._lock:
                self._deliver_ctrl_locked()
            return
        port = None
        if not (self.multiport and qidx == CTRL_TXQ):
            port = self._port_of_queue(qidx)
            if port is None:
                return
            if qidx == port.rxq:
                with self._lock:
                    self._deliver_locked(port)
                return
        with self._tx_locks[qidx]:
            served = 0
            while True:
                chain = queue.get_chain()
                if chain is None:
                    break
                data = gather(chain.readable)
                if port is None:
                    self._control(data)
                elif data:
                    port.write(data)
                queue.put_used(chain.head, 0)
                served += 1
            if served:
                self.notify_used(queue, used_all_avail=True)

    def snapshot_state(self):
        s = super().snapshot_state()
        with self._lock:
            s.update(ready=self._ready, ctrl_out=[S.b2s(m) for m in self._ctrl_out],
                     ports=[dict(name=p.name, ready=p.ready, guest_open=p.guest_open, host_open=p.host_open,
                                 input=S.b2s(b"".join(p.input))) for p in self.ports])
        return s

    def restore_state(self, state):
        ports = state.get("ports") if isinstance(state, dict) else None
        if not isinstance(ports, list) or [p.get("name") if isinstance(p, dict) else None
                                           for p in ports] != [p.name for p in self.ports]:
            raise S.SnapshotError(f"virtio-console: the ports were {ports!r:.80}, now "
                                  f"{[p.name for p in self.ports]}")
        saved = []
        for p in ports:
            if not all(isinstance(p.get(k), bool) for k in ("ready", "guest_open", "host_open")):
                raise S.SnapshotError(f"virtio-console: port {p.get('name')!r}: bad flags")
            saved.append(S.s2b(p.get("input")))
        ctrl = state.get("ctrl_out")
        if not isinstance(ctrl, list) or not isinstance(state.get("ready"), bool):
            raise S.SnapshotError("virtio-console: no ready flag or control messages")
        ctrl = [S.s2b(m) for m in ctrl]
        super().restore_state(state)
        with self._lock:
            self._ready = state["ready"]
            self._ctrl_out.extend(ctrl)
            for port, p, data in zip(self.ports, ports, saved):
                port.ready, port.guest_open = p["ready"], p["guest_open"]
                if data:
                    port.input.appendleft(data)
                    port.pending += len(data)
                if self._ready and port.ready and port.host_open != p["host_open"] and \
                        self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT):
                    self._ctrl_out.append(CONTROL.pack(port.id, PORT_OPEN, int(port.host_open)))

    def reset(self):
        """The driver's state goes (DEVICE_READY, PORT_READY, guest opens, unsent control messages); the host
        ends' connections and their waiting input stay."""
        locks = list(self._tx_locks.values())
        for lk in locks:
            lk.acquire()
        try:
            with self._lock:
                super().reset()
                self._ready = False
                self._ctrl_out.clear()
                for port in self.ports:
                    port.ready = port.guest_open = False
        finally:
            for lk in reversed(locks):
                lk.release()

    def close(self):
        """The VM is going: input from the host ends is dropped and no control message is sent any more (the
        backends themselves are closed by whoever opened them)."""
        with self._lock:
            self._closed = True
