"""virtio-net's host ends as :class:`bhyve_devices.backends.NetBackend` s (bhyve ``net_backends.c``), and their
receive poll thread.

- :class:`TapBackend` (Linux): ``/dev/net/tun`` with ``TUNSETIFF`` (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) on the
  named interface (an existing, persistent tap is attached; a new one is created if we may), non-blocking, with
  ``TUNSETVNETHDRSZ`` following the negotiated header length (tested against a real tap where the tests may
  create one), so the virtio-net header travels through the tap unchanged and frames move between the tap and
  guest memory with ``readv``/``writev``. ``TUNSETOFFLOAD`` follows the GUEST_* offloads the driver accepted
  (:func:`tun_offload_flags`); the tap takes partially checksummed and GSO frames when that ioctl works. Its
  ``accel`` (:mod:`.netfast`, attached by ``open_device_backends`` unless ``vmmshim.net_compiled`` is false)
  moves batches of frames between the tap and guest memory in C.
- :class:`NetBSDTapBackend`: ``/dev/tapN``, plain Ethernet frames (the device adds and strips the virtio header).
  Written from NetBSD's tap(4); not tested here.
- :class:`SocketPairBackend`: an ``AF_UNIX``/``SOCK_SEQPACKET`` pair, one frame per message; ``peer`` is the other
  end (tests, or user-space switches).
- ``slirp`` (:mod:`.slirp`): user-mode networking on libslirp, bhyve's ``slirp`` backend with its ``hostfwd``;
  ``stream=unix:PATH|tcp:HOST:PORT`` (:mod:`.stream`): QEMU's ``-netdev stream`` framing (passt, another VM).
  Each has a thread of its own (not the poll thread below).

:func:`open_backend` picks the backend by name as bhyve does (by prefix); a name no backend has is an error listing
them (before, any name created a host tap of that name).

Receive (:meth:`_FdBackend.start_rx`): one thread per backend blocks in ``poll`` on the backend fd and a wake pipe.
It polls the backend only while the device's ``ready()`` says the guest has posted receive buffers: with none it
waits on the pipe alone until :meth:`_FdBackend.rx_kick` (the driver notified the receive queue), so it never
spins (``stats['rx_waits']`` counts the waits); a hang-up without data ends the backend's polling. The ioctl
numbers come from ``ops/ioc.py``.

Not supported: the cloning ``/dev/tap`` with ``TAPGIFNAME``, FreeBSD's vmnet (a ``vmnetN`` name opens a tap of
that name), vale/netmap and netgraph backends, multiqueue taps, UFO/USO offloads.
"""

import fcntl
import os
import select
import socket
import struct
import threading

from bhyve_devices.virtio.net import (VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
                                      VIRTIO_NET_F_GUEST_TSO6)
from ops.ioc import _IOW

from . import slirp_options as _slirp_options
from . import stream as _stream

# Linux <linux/if_tun.h> and <linux/if.h>
_TUN_IOC_TYPE = ord("T")
_INT_SIZE = struct.calcsize("i")
TUNSETIFF = _IOW(_TUN_IOC_TYPE, 202, _INT_SIZE)
TUNSETOFFLOAD = _IOW(_TUN_IOC_TYPE, 208, struct.calcsize("I"))
TUNSETVNETHDRSZ = _IOW(_TUN_IOC_TYPE, 216, _INT_SIZE)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFNAMSIZ = 16
_IFREQ_FLAGS = struct.Struct(f"{IFNAMSIZ}sH22x")      # struct ifreq with ifr_flags: 40 bytes
TUN_PATH = "/dev/net/tun"
READ_CHUNK = 4096                                     # wake-pipe bytes drained per read
TAP_PREFIXES = ("tap", "vmnet")                       # bhyve's tap backend prefixes
SLIRP_PREFIX = "slirp"
STREAM_NAME = "stream"
BACKENDS = "tapN, vmnetN, slirp[,hostfwd=...], stream=unix:PATH|tcp:HOST:PORT[,server=on]"


def tun_offload_flags(features):
    """The TUNSETOFFLOAD flags for the GUEST_* offloads in ``features`` (what the driver can receive)."""
    if not features >> VIRTIO_NET_F_GUEST_CSUM & 1:
        return 0
    flags = TUN_F_CSUM
    if features >> VIRTIO_NET_F_GUEST_TSO4 & 1:
        flags |= TUN_F_TSO4
    if features >> VIRTIO_NET_F_GUEST_TSO6 & 1:
        flags |= TUN_F_TSO6
    if flags & (TUN_F_TSO4 | TUN_F_TSO6) and features >> VIRTIO_NET_F_GUEST_ECN & 1:
        flags |= TUN_F_TSO_ECN
    return flags


class _FdBackend:
    """A frame transport on one fd (``fileno()``), with the receive poll thread (see the module docstring)."""

    vnet_hdr = False
    offloads = False
    accel = None        # a compiled data path (netfast.py), set by the opener on a tap with the header

    def _init_rx(self):
        self.stats = dict(rx_waits=0)
        self._thread = None
        self._wake_r = self._wake_w = -1
        self._stop = False

    def fileno(self):
        raise NotImplementedError

    def recv_into(self, segs):
        """Bytes read into ``segs``; ``None`` when no frame is waiting; 0 at end of file (the peer is gone)."""
        try:
            return os.readv(self.fileno(), segs)
        except BlockingIOError:
            return None

    def send(self, segs):
        try:
            os.writev(self.fileno(), segs)
        except BlockingIOError:
            pass  # the backend is full: the frame is dropped, as a NIC would

    def set_vnet_hdr_len(self, n):
        pass

    def set_offload(self, features):
        pass

    # ---- receive ------------------------------------------------------------------------------------------------------
    def start_rx(self, ready, receive):
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._rx_loop, args=(ready, receive), name="virtio-net rx",
                                        daemon=True)
        self._thread.start()

    def rx_kick(self):
        if self._wake_w < 0:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def rx_poll_fileno(self):
        """What the receive thread polls for frames (the backend's fd; a backend may announce them elsewhere)."""
        return self.fileno()

    def _rx_loop(self, ready, receive):
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        fd = self.rx_poll_fileno()
        polling_backend = False
        hung_up = False
        while not self._stop:
            want = not hung_up and ready()
            if want != polling_backend:
                if want:
                    poller.register(fd, select.POLLIN)
                else:
                    poller.unregister(fd)
                    self.stats["rx_waits"] += 1
                polling_backend = want
            try:
                events = poller.poll()
            except InterruptedError:
                continue
            for efd, ev in events:
                if efd == self._wake_r:
                    try:
                        while os.read(self._wake_r, READ_CHUNK):
                            pass
                    except BlockingIOError:
                        pass
                elif ev & (select.POLLERR | select.POLLNVAL | select.POLLHUP) and not ev & select.POLLIN:
                    if polling_backend:
                        poller.unregister(fd)
                        polling_backend = False
                    hung_up = True
                elif ev & select.POLLIN:
                    receive()
        try:
            poller.unregister(fd)
        except (KeyError, ValueError):
            pass

    def close(self):
        """Stops the receive thread, then closes the fds (:meth:`_close_fd`)."""
        self._stop = True
        self.rx_kick()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = -1
        self._close_fd()

    def _close_fd(self):
        pass


class TapBackend(_FdBackend):
    """A Linux tap interface (see the module docstring)."""

    vnet_hdr = True

    def __init__(self, name, vnet_hdr=True, tun_path=TUN_PATH):
        self._init_rx()
        self.name = name
        self.fd = os.open(tun_path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = _IFREQ_FLAGS.pack(name.encode()[:IFNAMSIZ - 1], flags)
            fcntl.ioctl(self.fd, TUNSETIFF, ifr)
        except OSError:
            os.close(self.fd)
            raise
        self.vnet_hdr = vnet_hdr
        self.offloads = False
        if vnet_hdr:
            try:
                self._set_tun_offload(0)
                self.offloads = True
            except OSError:
                pass

    def fileno(self):
        return self.fd

    def set_vnet_hdr_len(self, n):
        if self.vnet_hdr:
            fcntl.ioctl(self.fd, TUNSETVNETHDRSZ, struct.pack("i", n))

    def set_offload(self, features):
        self._set_tun_offload(tun_offload_flags(features))

    def _set_tun_offload(self, tun_flags):
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, tun_flags)

    def _close_fd(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NetBSDTapBackend(_FdBackend):
    """NetBSD tap(4): ``/dev/tapN`` read/written one Ethernet frame per call, no virtio header. Untested here."""

    vnet_hdr = False

    def __init__(self, name, dev_dir="/dev"):
        self._init_rx()
        self.name = name
        self.fd = os.open(os.path.join(dev_dir, name), os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)

    def fileno(self):
        return self.fd

    def _close_fd(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SocketPairBackend(_FdBackend):
    """Frames over an AF_UNIX SOCK_SEQPACKET pair; the test (or a switch) uses ``peer``. With ``offloads`` (and
    ``vnet_hdr``) the peer promises to cope with offloaded frames; ``offload_flags`` records the last setting as
    the TUNSETOFFLOAD flags a tap would have been given."""

    def __init__(self, vnet_hdr=False, offloads=False):
        self._init_rx()
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.setblocking(False)
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads and vnet_hdr
        self.offload_flags = None

    def set_offload(self, features):
        self.offload_flags = tun_offload_flags(features)

    def fileno(self):
        return self.sock.fileno()

    def _close_fd(self):
        self.sock.close()
        self.peer.close()


def open_backend(name, options=None, compiled=False):
    """The backend bhyve's ``-s N,virtio-net,NAME`` names, as ``net_backends.c``'s ``netbe_init`` picks it by
    prefix: ``tap*``/``vmnet*`` -> TapBackend on Linux, NetBSDTapBackend on NetBSD (no options); ``slirp*`` ->
    :class:`.slirp.SlirpBackend` (``options``: :data:`.slirp_options.OPTIONS`); ``stream`` -> :class:`.stream.StreamBackend`
    (``options``: ``stream=ADDRESS[,server=on]``); None -> None (a device without a backend). Any other name, or an
    option the backend does not take, is a ``ValueError`` listing what there is. ``compiled``: slirp's loop in C
    where it builds (:mod:`.slirp_fast`)."""
    if name is None:
        return None
    options = dict(options or {})
    if name.startswith(SLIRP_PREFIX):
        from . import slirp_fast         # it builds on this module's _FdBackend
        return slirp_fast.open_backend(_slirp_options.parse_options(options), compiled=compiled)
    if name == STREAM_NAME:
        return _stream.StreamBackend(*_stream.parse_options(options))
    if name.startswith(TAP_PREFIXES):
        if options:
            raise ValueError(f"{name}: unknown option {sorted(options)[0]!r} (a tap takes none)")
        if os.uname().sysname == "NetBSD":
            return NetBSDTapBackend(name)
        return TapBackend(name)
    raise ValueError(f"unknown backend {name!r} (the backends: {BACKENDS})")
