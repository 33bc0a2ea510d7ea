"""User-mode networking for virtio-net on libslirp (bhyve ``net_backend_slirp.c``, QEMU ``-netdev user``): a
:class:`bhyve_devices.backends.NetBackend` carrying plain Ethernet frames (the device adds and strips the virtio-net
header), with no root and no host configuration.

``-s 2,virtio-net,slirp[,hostfwd=RULE[;RULE...]][,OPTION=VALUE...]``. The guest network is QEMU's: 10.0.2.0/24,
the host (gateway) at 10.0.2.2, libslirp's DNS forwarder (to the host's resolvers) at 10.0.2.3, DHCP leases from
10.0.2.15. Options (:func:`.slirp_options.parse_options`):

- ``hostfwd`` (bhyve's and QEMU's): ``;``-separated rules ``tcp|udp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``
  (an empty host address is 0.0.0.0, as bhyve's; an empty guest address is the first DHCP address; host port 0
  takes a free port, which is written to stderr and kept in :attr:`SlirpBackend.forwards`). A malformed rule is a
  ``ValueError``, a host port that cannot be bound an ``OSError``, each one line naming the rule.
- ``open`` (bhyve's; ``open=false`` restricts) and ``restrict=on|off`` (QEMU's): restricted, the guest reaches
  nothing outside (libslirp answers its connections with a reset and drops its datagrams; DHCP then offers no
  router or DNS), while ``hostfwd`` still forwards inwards. bhyve restricts unless ``open`` is given; vmmshim
  follows QEMU (outbound traffic allowed) unless ``restrict=on`` or ``open=false`` is given.
- ``net=ADDR[/MASK]``, ``host=ADDR``, ``dhcpstart=ADDR``, ``dns=ADDR``, ``hostname=NAME``, ``domainname=NAME``
  (QEMU's names; the addresses must lie inside ``net``).

Offloads (:mod:`.offload`): the backend carries the virtio-net header, so the device offers the tap's offloads.
The guest's checksums are completed here and its 64 KiB TCP segments go to ``slirp_input`` whole (libslirp takes an
IP packet of any length up to 64 KiB); the segments libslirp sends one connection's way in one burst are merged
into one 64 KiB frame for a driver that accepted GUEST_TSO4 (receive coalescing). Without them every frame is 1.5
KiB and costs the guest and the VMM a virtqueue entry each way (``docs/lab.md``, "slirp offloads and TSC-deadline
writes in the run loop").

This module is the Python loop; where its C library builds, ``-s N,virtio-net,slirp`` opens the compiled one
(:mod:`.slirp_fast`: the same instance and forwards, its thread and frames in C), unless ``vmmshim.net_compiled``
is false.

Threads: one thread per backend (``slirp``) makes every libslirp call between setup (``slirp_new`` and the
forwards, on the opening thread) and :meth:`SlirpBackend.close` (``slirp_cleanup`` once the thread ended): it feeds the guest's frames to
``slirp_input``, runs ``slirp_pollfds_fill``/``poll``/``slirp_pollfds_poll`` over libslirp's sockets and a wake
pipe, fires libslirp's timers (``timer_new``/``timer_mod``, on the monotonic clock ``clock_get_ns`` reports) and
calls the device's ``receive`` when frames for the guest wait and the guest has posted buffers.
Flow control: the device's transmit puts each frame in a bounded queue (:data:`TX_QUEUE_FRAMES`,
:data:`TX_QUEUE_BYTES`) and, when it is full, waits up to :data:`TX_WAIT_S` for the thread to take one, then drops
the frame (``stats['tx_dropped']``): a flooding guest is slowed to libslirp's pace. Frames libslirp sends while
the guest has no receive buffers wait in a queue of :data:`RX_QUEUE_FRAMES` and :data:`RX_QUEUE_BYTES`; past that they are dropped
(``stats['rx_dropped']``) and TCP resends them, as libslirp's ``send_packet`` contract allows.

Checked here: Debian 12's libslirp0 4.7.0 on Linux (``tests/unit/test_net_slirp.py``). On NetBSD the same code
loads pkgsrc's ``net/libslirp`` (``/usr/pkg/lib/libslirp.so.0``; the declared layout is the LP64 one NetBSD/amd64
shares) but has not been run there.

Not supported: IPv6 (``ipv6``, ``ipv6-net``, ``ipv6-host``, IPv6 host forwards), ``tftp``, ``bootfile``,
``dnssearch``, ``guestfwd``, ``smb``, bhyve's separate ``slirp-helper`` process and Capsicum sandbox, changing the
forwards while the VM runs.
"""

import errno
import os
import select
import sys
import threading
import time

from bhyve_devices.virtio.chain import scatter, split_segments
from bhyve_devices.virtio.net import VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4

from . import offload, slirp_ffi
from .netqueue import FrameQueue, ThreadedFrameBackend, WakePipe
from .slirp_ffi import ffi

TX_QUEUE_FRAMES = 256           # guest frames waiting for the slirp thread (a transmit queue's worth)
TX_QUEUE_BYTES = 1 << 20
TX_WAIT_S = 0.1                 # how long a full transmit queue holds the device's transmit before a drop
RX_QUEUE_FRAMES = 512           # frames for the guest waiting for its receive buffers
RX_QUEUE_BYTES = 2 << 20
NS_PER_MS = 1_000_000


# ---- libslirp's callbacks (one set for every backend: the opaque pointer is the backend's handle) ---------------------
_POLL_TO_SLIRP = ((select.POLLIN, slirp_ffi.POLL_IN), (select.POLLOUT, slirp_ffi.POLL_OUT),
                  (select.POLLPRI, slirp_ffi.POLL_PRI), (select.POLLERR, slirp_ffi.POLL_ERR),
                  (select.POLLHUP, slirp_ffi.POLL_HUP))


@ffi.callback("ssize_t(const void *, size_t, void *)", error=-1)
def _send_packet(buf, length, opaque):
    ffi.from_handle(opaque)._to_guest(memoryview(ffi.buffer(buf, length)))
    return length


@ffi.callback("void(const char *, void *)")
def _guest_error(msg, opaque):
    be = ffi.from_handle(opaque)
    be.stats["guest_errors"] += 1
    be.last_guest_error = ffi.string(msg).decode(errors="replace")


@ffi.callback("int64_t(void *)", error=0)
def _clock_get_ns(opaque):
    return time.monotonic_ns()


class _Timer:
    __slots__ = ("cb", "cb_opaque", "expire_ms", "handle")

    def __init__(self, cb, cb_opaque):
        self.cb, self.cb_opaque, self.expire_ms, self.handle = cb, cb_opaque, None, None


@ffi.callback("void *(SlirpTimerCb, void *, void *)")
def _timer_new(cb, cb_opaque, opaque):
    t = _Timer(cb, cb_opaque)
    t.handle = ffi.new_handle(t)
    ffi.from_handle(opaque)._timers.add(t)
    return t.handle


@ffi.callback("void(void *, void *)")
def _timer_free(timer, opaque):
    ffi.from_handle(opaque)._timers.discard(ffi.from_handle(timer))


@ffi.callback("void(void *, int64_t, void *)")
def _timer_mod(timer, expire_ms, opaque):
    ffi.from_handle(timer).expire_ms = expire_ms


@ffi.callback("void(int, void *)")
def _register_poll_fd(fd, opaque):
    pass            # SIGPIPE is ignored in Python: nothing to set on the socket


@ffi.callback("void(void *)")
def _notify(opaque):
    ffi.from_handle(opaque)._wake.wake()


@ffi.callback("int(int, int, void *)", error=-1)
def _add_poll(fd, events, opaque):
    be = ffi.from_handle(opaque)
    ev = 0
    for pbit, sbit in _POLL_TO_SLIRP:
        if events & sbit:
            ev |= pbit
    be._pollfds.append((fd, ev))
    return len(be._pollfds) - 1


@ffi.callback("int(int, void *)", error=0)
def _get_revents(idx, opaque):
    be = ffi.from_handle(opaque)
    rev = be._revents.get(be._pollfds[idx][0], 0)
    return sum(sbit for pbit, sbit in _POLL_TO_SLIRP if rev & pbit)


_CALLBACKS = ffi.new("SlirpCb *", dict(send_packet=_send_packet, guest_error=_guest_error,
                                       clock_get_ns=_clock_get_ns, timer_new=_timer_new, timer_free=_timer_free,
                                       timer_mod=_timer_mod, register_poll_fd=_register_poll_fd,
                                       unregister_poll_fd=_register_poll_fd, notify=_notify))


def _in_addr(addr):
    p = ffi.new("struct in_addr *")
    p.s_addr = int.from_bytes(addr.packed, sys.byteorder)      # network byte order in memory
    return p[0]


# ---- the backend ------------------------------------------------------------------------------------------------------
class SlirpBackend(ThreadedFrameBackend):
    """One libslirp instance and its thread (see the module docstring). ``forwards``: ``(proto, host address,
    bound host port, guest address, guest port)`` per ``hostfwd`` rule."""

    vnet_hdr = True                 # the device hands over the header; the offloads are done here
    offloads = True

    def __init__(self, config, announce=sys.stderr):
        self._lib, self._glib = slirp_ffi.load()
        self.config = config
        self.last_guest_error = None
        self._wake = WakePipe()
        self._stop = False
        self._thread = None
        self._keep = []
        self._init_loop()
        self._slirp = self._lib.slirp_new(self._slirp_config(config), *self._callbacks())
        if self._slirp == ffi.NULL:
            self._wake.close()
            raise OSError(errno.EINVAL, f"slirp: libslirp {slirp_ffi.version()} refused the configuration")
        try:
            self.forwards = self._add_forwards(config.forwards)
        except BaseException:
            self._lib.slirp_cleanup(self._slirp)
            self._slirp = ffi.NULL
            self._wake.close()
            raise
        for f, (proto, ha, hp, ga, gp) in zip(config.forwards, self.forwards):
            if f.host_port == 0 and announce is not None:
                print(f"vmmshim: slirp hostfwd {proto} {ha}:{hp} -> {ga}:{gp}", file=announce, flush=True)
        self._thread = threading.Thread(target=self._loop, name="slirp", daemon=True)
        self._thread.start()

    def _init_loop(self):
        """The Python loop's state and counters (``slirp_fast.py``'s loop keeps its own in C)."""
        self.stats = dict(tx_frames=0, tx_dropped=0, tx_segmented=0, rx_frames=0, rx_dropped=0, rx_merged=0,
                          guest_errors=0, timers_fired=0)
        self._txq = FrameQueue(TX_QUEUE_FRAMES, TX_QUEUE_BYTES)
        self._rxq = offload.Coalescer(RX_QUEUE_FRAMES, RX_QUEUE_BYTES)
        self._hdr_len = offload.HDR.size
        self._ready, self._receive = (lambda: False), None
        self._timers = set()
        self._pollfds, self._revents = [], {}
        self._handle = ffi.new_handle(self)

    def _callbacks(self):
        """``(SlirpCb *, opaque)`` for ``slirp_new``: this class's are Python's (``slirp_fast.py`` has C ones)."""
        return _CALLBACKS, self._handle

    def _slirp_config(self, c):
        cfg = ffi.new("SlirpConfig *")
        cfg.version = slirp_ffi.CONFIG_VERSION
        cfg.restricted = int(c.restricted)
        cfg.in_enabled = True
        cfg.vnetwork = _in_addr(c.net.network_address)
        cfg.vnetmask = _in_addr(c.net.netmask)
        cfg.vhost = _in_addr(c.host)
        cfg.vdhcp_start = _in_addr(c.dhcpstart)
        cfg.vnameserver = _in_addr(c.dns)
        for field, text in (("vhostname", c.hostname), ("vdomainname", c.domainname)):
            if text:
                s = ffi.new("char[]", text.encode())
                self._keep.append(s)
                setattr(cfg, field, s)
        self._keep.append(cfg)
        return cfg

    def _add_forwards(self, forwards):
        seen, out = self._forward_sockets(), []
        for f in forwards:
            rc = self._lib.slirp_add_hostfwd(self._slirp, int(f.udp), _in_addr(f.host_addr), f.host_port,
                                             _in_addr(f.guest_addr), f.guest_port)
            if rc < 0:
                err = ffi.errno or errno.EADDRINUSE
                raise OSError(err, f"slirp: hostfwd rule {f.rule!r}: cannot bind {f.proto} "
                                   f"{f.host_addr}:{f.host_port}: {os.strerror(err)}")
            new = self._forward_sockets() - seen
            seen |= new
            port = min(new)[2] if new else f.host_port
            guest = f.guest_addr if int(f.guest_addr) else self.config.dhcpstart
            out.append((f.proto, str(f.host_addr), port, str(guest), f.guest_port))
        return out

    def _forward_sockets(self):
        """``{(proto, fd, bound port)}`` of the HOST_FORWARD lines of ``slirp_connection_info``."""
        text = slirp_ffi.take_string(self._glib, self._lib.slirp_connection_info(self._slirp))
        out = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[0].endswith("[HOST_FORWARD]") and parts[3].isdigit():
                out.add((parts[0][:3].lower(), parts[1], int(parts[3])))
        return out

    # ---- the NetBackend Protocol --------------------------------------------------------------------------------------
    def set_vnet_hdr_len(self, n):
        self._hdr_len = n
        self._rxq.set_features(self._rxq.csum, self._rxq.tso4, n)

    def set_offload(self, features):
        """What the driver accepted: GUEST_CSUM and GUEST_TSO4 allow merged frames (those waiting are dropped
        when it changes, as a link reset would: they were built for the driver before)."""
        self._rxq.set_features(features >> VIRTIO_NET_F_GUEST_CSUM & 1, features >> VIRTIO_NET_F_GUEST_TSO4 & 1,
                               self._hdr_len)

    def send(self, segs):
        data = b"".join(segs)
        frames = offload.transmit_frames(data, bytearray(memoryview(data)[self._hdr_len:]), whole=True)
        if not frames:
            self.stats["tx_dropped"] += 1
            return
        self.stats["tx_segmented"] += len(frames) - 1
        for frame in frames:
            if not self._queue_frame(frame, TX_WAIT_S):
                return

    def recv_into(self, segs):
        try:
            hdr, frame = self._rxq.pop()
        except IndexError:
            return None
        hdr_segs, rest = split_segments(segs, self._hdr_len)
        scatter(hdr_segs, hdr)
        return self._hdr_len + scatter(rest, frame)

    def close(self):
        """Stops the thread, then frees libslirp's instance (its sockets close)."""
        if not self._stop_thread():
            return
        if not self._thread.is_alive() and self._slirp != ffi.NULL:
            self._lib.slirp_cleanup(self._slirp)
            self._slirp = ffi.NULL
            self._wake.close()
        self._thread = None

    # ---- the slirp thread ---------------------------------------------------------------------------------------------
    def _to_guest(self, frame):
        """A frame libslirp sends (a view valid during the call only: the queue copies it)."""
        if not self._rxq.add(frame):
            self.stats["rx_dropped"] += 1
            return
        self.stats["rx_frames"] += 1
        self.stats["rx_merged"] = self._rxq.merged

    def _deliver(self):
        while self._rxq and self._receive is not None and self._ready():
            waiting = len(self._rxq)
            self._receive()
            if len(self._rxq) >= waiting:
                break           # the device took nothing: it waits for buffers (rx_kick)

    def _feed(self):
        lib, slirp = self._lib, self._slirp
        while True:
            frame = self._txq.get()
            if frame is None:
                return
            lib.slirp_input(slirp, ffi.from_buffer(frame), len(frame))

    def _fire_timers(self):
        now = time.monotonic_ns() // NS_PER_MS
        for t in [t for t in list(self._timers) if t.expire_ms is not None and t.expire_ms <= now]:
            t.expire_ms = None
            self.stats["timers_fired"] += 1
            t.cb(t.cb_opaque)

    def _poll_ms(self, slirp_ms):
        ms = None if slirp_ms == slirp_ffi.TIMEOUT_INFINITE else slirp_ms
        due = [t.expire_ms for t in list(self._timers) if t.expire_ms is not None]
        if due:
            left = max(0, min(due) - time.monotonic_ns() // NS_PER_MS)
            ms = left if ms is None else min(ms, left)
        return ms

    def _loop(self):
        lib, slirp = self._lib, self._slirp
        timeout = ffi.new("uint32_t *")
        wake_r = self._wake.r
        while not self._stop:
            self._feed()
            self._fire_timers()
            self._deliver()
            self._pollfds = []
            timeout[0] = slirp_ffi.TIMEOUT_INFINITE
            lib.slirp_pollfds_fill(slirp, timeout, _add_poll, self._handle)
            events = {}
            for fd, ev in self._pollfds:
                events[fd] = events.get(fd, 0) | ev
            poller = select.poll()
            poller.register(wake_r, select.POLLIN)
            for fd, ev in events.items():
                poller.register(fd, ev)
            failed = 0
            try:
                self._revents = dict(poller.poll(self._poll_ms(timeout[0])))
            except OSError:
                self._revents, failed = {}, 1
            lib.slirp_pollfds_poll(slirp, failed, _get_revents, self._handle)
            if self._revents.get(wake_r):
                self._wake.drain()
