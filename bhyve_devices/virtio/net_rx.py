"""virtio-net's receive side (VIRTIO 1.1 section 5.1.6.3, 5.1.6.4 "Processing of Incoming Packets"), a mixin of
:class:`bhyve_devices.virtio.net.VirtioNet`.

The backend calls :meth:`NetRxMixin.receive_pending` (on its own thread, ``start_rx``) while frames are waiting and
:meth:`NetRxMixin._rx_ready` says the guest has posted receive buffers; a notification of the receive queue kicks it
(``rx_kick``) to look again. A backend with a compiled data path (``accel``: the Linux tap) serves a batch first
(``accel.rx``); a chain it leaves goes through :meth:`NetRxMixin._receive_one`.

A frame is read straight into the next posted chain, with the virtio-net header first; what does not fit goes on,
from the spill buffer, in further chains when ``VIRTIO_NET_F_MRG_RXBUF`` is negotiated (``num_buffers`` says how
many), or, without it, the frame is dropped as an oversized one (``stats['rx_dropped']``). When the driver has not
posted enough buffers yet for a mergeable frame, the frame is *held* whole in the spill buffer, its chains go
back, ``avail_event`` asks for the driver's next chain (EVENT_IDX), and it goes first once there is room: QEMU
queues such a frame too, and a dropped segment cost the guest's TCP a retransmission. While a frame is held no
other is read (the order on the wire is kept). A backend whose peer is gone is not asked again.

Not supported: more than one held frame, a held frame across a checkpoint (it is lost, as a frame on the wire).
"""

from .virtqueue import scatter, split_segments

RXQ = 0
RX_BATCH = 256                  # frames one receive_pending call takes at most (the receive thread's default)
HELD_RETRIES = 8                # looks again for chains posted while a held frame waited (as netfast.c)
_NUM_BUFFERS = 10               # virtio_net_hdr.num_buffers: in the header when it is longer than this (12 bytes)


class NetRxMixin:
    """Expects ``queues``, ``backend``, ``hdr_len``, ``mrg``, ``stats``, ``_spill``, ``_held``, ``_rx_lock``,
    ``_accel``, ``_ram(queue)``, ``_stop_backend`` and ``notify_used``."""

    def _rx_ready(self):
        """Whether the backend should look for frames: the guest has posted receive buffers, and no frame waits
        for more of them (one that does is placed first, here, if it can be)."""
        if self._stop_backend or not self.queues:
            return False
        if self._held:
            self.receive_pending()
            if self._held:
                return False
        q = self.queues[RXQ]
        return q.usable and q.has_chain()

    def receive_pending(self, limit=RX_BATCH):
        """Moves up to ``limit`` waiting frames from the backend into the receive queue (rx thread, or tests);
        returns how many were delivered."""
        delivered = 0
        with self._rx_lock:
            if not self.queues:
                return 0
            q = self.queues[RXQ]
            ram = self._ram(q)
            res = (self._accel.rx(ram, q, self.hdr_len, self.mrg, self._spill, self._held, limit)
                   if ram is not None else None)
            if res is not None:
                delivered = res.frames
                self._held = res.held
                self.stats["rx_frames"] += res.frames
                self.stats["rx_bytes"] += res.bytes
                self.stats["rx_dropped"] += res.dropped
                if res.eof:
                    self._stop_backend = True
                    self.stats["rx_backend_closed"] = 1
                if not res.more:
                    limit = 0       # no frame, no buffer, waiting, or the batch's limit: Python has nothing to add
            while delivered < limit:
                r = self._place_held(q) if self._held else self._receive_one(q)
                if r is None:
                    break
                delivered += r
            if delivered:
                self.notify_used(q)
        return delivered

    def _hold(self, q, first, tail, seen):
        """Keeps the frame ``first`` + the spill's first ``tail`` bytes whole in the spill; its chains went back."""
        spill = self._spill
        spill[len(first):len(first) + tail] = spill[:tail]
        spill[:len(first)] = first
        self._held = len(first) + tail
        return self._wait(q, seen)

    def _wait(self, q, seen):
        """The held frame waits for chains: asks the driver for its next one; places it now if chains came."""
        for _ in range(HELD_RETRIES):
            if not q.ask_for_more(seen):
                return None
            seen = q.avail_index()
            r = self._place_held(q, retry=False)
            if r is not None:
                return r
        return None

    def _place_held(self, q, retry=True):
        """The held frame into the next chains: 1 (delivered), 0 (the first chain was not a receive buffer and
        went back empty, or the frame was dropped) or None (still too few chains posted)."""
        hl, held = self.hdr_len, self._held
        seen = q.avail_index()
        chain = q.get_chain()
        if chain is None:
            return self._wait(q, seen) if retry else None
        hdr_segs = split_segments(chain.writable, hl)[0]
        if sum(len(m) for m in hdr_segs) < hl or chain.readable:
            q.put_used(chain.head, 0)   # not a receive buffer: return it empty
            return 0
        src = memoryview(self._spill)[:held]
        k = scatter(chain.writable, src)
        used = [(chain.head, k)]
        src = src[k:]
        while len(src):
            c = q.get_chain() if self.mrg else None
            if c is None or c.readable:
                q.unget(len(used) + (c is not None))
                if c is not None or not self.mrg:
                    self._held = 0      # a chain that is no receive buffer: the frame is lost
                    self.stats["rx_dropped"] += 1
                    return 0
                return self._wait(q, seen) if retry else None
            k = scatter(c.writable, src)
            used.append((c.head, k))
            src = src[k:]
        self._held = 0
        self._finish(q, hdr_segs, used, held - hl)
        return 1

    def _finish(self, q, hdr_segs, used, n):
        """num_buffers into the header (12-byte header), the chains into the used ring, the counters."""
        if self.hdr_len > _NUM_BUFFERS:
            scatter(split_segments(hdr_segs, _NUM_BUFFERS)[1], len(used).to_bytes(2, "little"))
        for head, length in used:
            q.put_used(head, length)
        self.stats["rx_frames"] += 1
        self.stats["rx_bytes"] += n

    def _receive_one(self, q):
        """One frame: returns 1 (delivered), 0 (dropped) or None (no buffer or no frame waiting, or the frame is
        held for more buffers)."""
        seen = q.avail_index()
        chain = q.get_chain()
        if chain is None:
            return None
        hl = self.hdr_len
        hdr_segs, body = split_segments(chain.writable, hl)
        if sum(len(m) for m in hdr_segs) < hl or chain.readable:
            q.put_used(chain.head, 0)   # not a receive buffer: return it empty
            return 0
        spill = memoryview(self._spill)
        first_room = sum(len(m) for m in body)
        backend = self.backend
        try:
            if backend.vnet_hdr:
                got = backend.recv_into(hdr_segs + body + [spill])
            else:
                got = backend.recv_into(body + [spill])
        except OSError:
            got = 0                      # a backend error ends backend polling, as an end of file does
        if got is None:
            q.unget()
            return None
        if got == 0:
            self._stop_backend = True    # peer gone: stop polling it (no busy loop on POLLHUP)
            self.stats["rx_backend_closed"] = 1
            q.unget()
            return None
        n = got - hl if backend.vnet_hdr else got   # the frame's length
        if n < 0:
            q.unget()
            self.stats["rx_dropped"] += 1
            return 0
        if not backend.vnet_hdr:
            scatter(hdr_segs, bytes(hl))
        used = [(chain.head, hl + min(n, first_room))]
        extra = n - first_room
        if extra > 0:
            if not self.mrg:
                q.unget()  # larger than a buffer, as a NIC without mergeable buffers: the frame is lost
                self.stats["rx_dropped"] += 1
                return 0
            src = spill[:extra]
            while len(src):
                c = q.get_chain()
                if c is not None and c.readable:
                    q.unget(len(used) + 1)      # not a receive buffer: the frame is lost
                    self.stats["rx_dropped"] += 1
                    return 0
                if c is None:
                    q.unget(len(used))
                    return self._hold(q, b"".join(bytes(m) for m in hdr_segs + body), extra, seen)
                k = scatter(c.writable, src)
                used.append((c.head, k))
                src = src[k:]
        self._finish(q, hdr_segs, used, n)
        return 1
