"""The slirp backend with its thread's loop and every frame in C (``slirpfast.c``): what ``-s N,virtio-net,slirp``
opens where the library builds (``vmmshim.net_compiled``, default true), beside the Python loop of :mod:`.slirp`.

The Python backend spends, in the nested lab, a few milliseconds of Python per frame between the device's doorbell
thread and its own loop (``docs/lab.md``, "slirp offloads and TSC-deadline writes in the run loop"). Here the
libslirp instance, its configuration and host forwards are the same (:class:`~.slirp.SlirpBackend` sets them up),
but libslirp's callbacks are C functions and its thread runs ``vmmshim_slirp_loop`` with the GIL released. The
device side is two ``SOCK_SEQPACKET`` socketpairs that read and write like a tap with the virtio-net header, so the
device moves frames with the tap's compiled path (``netfast.c``, :attr:`SlirpFastBackend.accel`):

- guest -> host: the device writes each frame (header first) to ``tx``; the loop completes its checksum and hands it
  to ``slirp_input``, a TCP GSO frame whole (see ``slirpfast.c``);
- host -> guest: libslirp's ``send_packet`` writes the frame, a header first (``DATA_VALID`` when the driver
  accepted GUEST_CSUM), to ``rx``; the loop announces a round's frames once, on an eventfd the device's receive
  thread waits on (``VMMSHIM_SLIRP_BURST=0``: it waits on ``rx`` itself, as on a tap, and the first frame of a
  burst wakes it). A window of TCP segments then reaches the guest as one batch with one interrupt.

Flow control: the socketpairs' buffers (:data:`SOCKET_BUFFER`). The device's writes wait up to :data:`TX_WAIT_S`
for room, then the frame is dropped (a flooding guest is slowed to libslirp's pace); a frame for the guest that
does not fit is dropped (``rx_dropped``) and TCP resends it.

Not supported: receive coalescing and software segmentation (the Python backend has both; a GSO frame whose IP
length disagrees with its size is dropped here, and Linux never sends one), what ``slirpfast.c`` names.
"""

import os
import pathlib
import socket
import struct
import sys

from bhyve_devices.virtio.net import VIRTIO_NET_F_GUEST_CSUM
from bhyve_devices.virtio.net_rx import RX_BATCH
from ops import native

from . import netfast, slirp, slirp_ffi
from .net import _FdBackend

SOURCE = pathlib.Path(__file__).with_name("slirpfast.c")
CDEF = """
struct vmmshim_slirp_timer { void *cb; void *cb_opaque; int64_t expire_ms; int used; };
struct vmmshim_pollfd { int fd; short events; short revents; };
struct vmmshim_slirp {
    void *slirp;
    void *input;
    void *pollfds_fill;
    void *pollfds_poll;
    int32_t tx_fd;
    int32_t rx_fd;
    int32_t wake_fd;
    uint32_t hdr_len;
    uint32_t guest_csum;
    uint32_t stop;
    int32_t rx_signal_fd;
    uint32_t rx_written;
    uint64_t tx_frames, tx_dropped, rx_frames, rx_dropped, guest_errors, polls;
    char last_error[256];
    struct vmmshim_pollfd pfd[512];
    int32_t npfd;
    struct vmmshim_slirp_timer timers[16];
    uint8_t buf[65600];
};
int vmmshim_slirp_loop(struct vmmshim_slirp *s);
long vmmshim_slirp_send_packet(const void *buf, size_t len, void *opaque);
void vmmshim_slirp_guest_error(const char *msg, void *opaque);
int64_t vmmshim_slirp_clock_get_ns(void *opaque);
void *vmmshim_slirp_timer_new(void *cb, void *cb_opaque, void *opaque);
void vmmshim_slirp_timer_free(void *timer, void *opaque);
void vmmshim_slirp_timer_mod(void *timer, int64_t expire_ms, void *opaque);
void vmmshim_slirp_poll_fd(int fd, void *opaque);
void vmmshim_slirp_notify(void *opaque);
"""
_library = native.LazyLibrary(SOURCE, "slirpfast", CDEF)

SOCKET_BUFFER = 1 << 20         # bytes each socketpair holds per direction
ENV_BURST_OFF = "VMMSHIM_SLIRP_BURST"   # =0: the receive thread waits on the frames' socketpair (woken per frame)
TX_WAIT_S = 0.1                 # how long the device's write waits for room before the frame is dropped
_TIMEVAL = struct.Struct("@ll")


def unavailable():
    """Why :func:`open_backend` gives the Python backend (``None`` when it does not)."""
    _library.get()
    return _library.why


def _fnptr(src_ffi, fn, dst_ffi, ctype):
    """The C function ``fn`` of one cffi library as a ``ctype`` of another (both dlopened in this process)."""
    return dst_ffi.cast(ctype, int(src_ffi.cast("uintptr_t", fn)))


class _DeviceEnd(_FdBackend):
    """The device's side of the socketpairs, with the tap's receive thread (``_FdBackend``), which waits on the
    loop's burst eventfd (``signal_fd``), not on the frames' socketpair: it is woken once a round of libslirp's."""

    def __init__(self, rx_fd, tx_fd, signal_fd):
        self._init_rx()
        self.rx_fd, self.tx_fd, self.signal_fd = rx_fd, tx_fd, signal_fd

    def fileno(self):
        return self.rx_fd

    def rx_poll_fileno(self):
        return self.signal_fd if self.signal_fd >= 0 else self.rx_fd

    def _signal(self):
        if self.signal_fd < 0:
            return
        try:
            os.eventfd_write(self.signal_fd, 1)
        except (BlockingIOError, OSError):
            pass                    # full, or closed: a wake-up is waiting, or nobody is left to wake

    def start_rx(self, ready, receive):
        if self.signal_fd < 0:
            super().start_rx(ready, receive)
            return

        def take():
            try:
                os.eventfd_read(self.signal_fd)
            except (BlockingIOError, OSError):
                pass
            if receive() >= RX_BATCH:
                self._signal()      # the batch's limit: the rest of the burst waits in the socketpair
        super().start_rx(ready, take)

    def rx_kick(self):
        """The driver posted receive buffers: frames the socketpair still holds are looked at again."""
        self._signal()
        super().rx_kick()

    def send(self, segs):
        try:
            os.writev(self.tx_fd, segs)
        except (BlockingIOError, TimeoutError):
            pass                    # still full after TX_WAIT_S: the frame is dropped, as a busy link would


class SlirpFastBackend(slirp.SlirpBackend):
    """One libslirp instance whose thread runs in C (see the module docstring); ``forwards`` as the Python one."""

    def __init__(self, config, announce=sys.stderr):
        self._fffi, self._flib = _library.get()
        self._s = self._fffi.new("struct vmmshim_slirp *")
        self._rx_dev, rx_loop = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._tx_dev, tx_loop = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._loop_socks = (rx_loop, tx_loop)
        for sk in (rx_loop, self._tx_dev):
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        self._tx_dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                _TIMEVAL.pack(int(TX_WAIT_S), int(TX_WAIT_S % 1 * 1_000_000)))
        for sk in (self._rx_dev, rx_loop, tx_loop):
            sk.setblocking(False)
        self._rx_signal = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) \
            if os.environ.get(ENV_BURST_OFF, "1") != "0" else -1
        self._dev = _DeviceEnd(self._rx_dev.fileno(), self._tx_dev.fileno(), self._rx_signal)
        s = self._s
        s.rx_fd, s.tx_fd, s.rx_signal_fd = rx_loop.fileno(), tx_loop.fileno(), self._rx_signal
        s.hdr_len = 10
        try:
            super().__init__(config, announce)
        except BaseException:
            self._close_sockets()
            raise
        self.accel = netfast.accelerator(self.fileno, tx_fileno=self._tx_fileno)

    # ---- setup (SlirpBackend's hooks) -----------------------------------------------------------------------------
    def _callbacks(self):
        sf, lib, s = self._fffi, self._flib, self._s
        sffi = slirp_ffi.ffi
        names = dict(send_packet="vmmshim_slirp_send_packet", guest_error="vmmshim_slirp_guest_error",
                     clock_get_ns="vmmshim_slirp_clock_get_ns", timer_new="vmmshim_slirp_timer_new",
                     timer_free="vmmshim_slirp_timer_free", timer_mod="vmmshim_slirp_timer_mod",
                     register_poll_fd="vmmshim_slirp_poll_fd", unregister_poll_fd="vmmshim_slirp_poll_fd",
                     notify="vmmshim_slirp_notify")
        cbs = sffi.new("SlirpCb *")
        types = dict(sffi.typeof("SlirpCb").fields)
        for field, name in names.items():
            setattr(cbs, field, _fnptr(sf, getattr(lib, name), sffi, types[field].type))
        self._keep_cbs = cbs
        s.wake_fd = self._wake.r
        return cbs, sffi.cast("void *", int(sf.cast("uintptr_t", s)))

    def _loop(self):
        """The thread: libslirp's functions given to the C loop, which runs until :meth:`close`."""
        sffi, s, lib = slirp_ffi.ffi, self._s, self._lib
        for field, fn in (("input", lib.slirp_input), ("pollfds_fill", lib.slirp_pollfds_fill),
                          ("pollfds_poll", lib.slirp_pollfds_poll)):
            setattr(s, field, _fnptr(sffi, fn, self._fffi, "void *"))
        s.slirp = _fnptr(sffi, self._slirp, self._fffi, "void *")
        err = self._flib.vmmshim_slirp_loop(s)
        if err:
            self.last_guest_error = f"slirp loop: {os.strerror(err)}"

    def _init_loop(self):
        pass                        # the C loop keeps its state and counters (stats, below)

    def _wake_to_stop(self):
        self._s.stop = 1
        self._wake.wake()

    # ---- the NetBackend Protocol (the device's side) --------------------------------------------------------------
    def fileno(self):
        return self._rx_dev.fileno() if self._rx_dev is not None else -1

    def _tx_fileno(self):
        return self._tx_dev.fileno() if self._tx_dev is not None else -1

    @property
    def stats(self):
        s = self._s
        return dict(tx_frames=s.tx_frames, tx_dropped=s.tx_dropped, rx_frames=s.rx_frames, rx_dropped=s.rx_dropped,
                    guest_errors=s.guest_errors, polls=s.polls)

    @property
    def last_guest_error(self):
        text = self._fffi.string(self._s.last_error).decode(errors="replace")
        return self._loop_error or text or None

    @last_guest_error.setter
    def last_guest_error(self, value):
        self._loop_error = value

    def set_vnet_hdr_len(self, n):
        self._s.hdr_len = n

    def set_offload(self, features):
        self._s.guest_csum = features >> VIRTIO_NET_F_GUEST_CSUM & 1

    def send(self, segs):
        self._dev.send(segs)

    def recv_into(self, segs):
        return self._dev.recv_into(segs)

    def start_rx(self, ready, receive):
        self._dev.start_rx(ready, receive)

    def rx_kick(self):
        self._dev.rx_kick()

    def close(self):
        self._dev.close()
        thread = self._thread
        super().close()
        if thread is None or not thread.is_alive():
            self._close_sockets()       # else the C loop may still use them: they go with the process

    def _close_sockets(self):
        for sk in (self._rx_dev, self._tx_dev, *self._loop_socks):
            if sk is not None:
                sk.close()
        self._rx_dev = self._tx_dev = None
        self._loop_socks = ()
        if self._rx_signal >= 0:
            os.close(self._rx_signal)
            self._rx_signal = -1


def open_backend(config, compiled=True, announce=sys.stderr):
    """The compiled backend where it builds and ``compiled``, else the Python one (:class:`~.slirp.SlirpBackend`)."""
    if compiled and _library.get() is not None:
        return SlirpFastBackend(config, announce)
    return slirp.SlirpBackend(config, announce)
