"""NVMe submission and completion queues in guest RAM, and the shadow doorbells (NVM Express Base Specification
1.4: 4.1 submission and completion queues, 4.6 completion entries and the phase tag, 5.8 Doorbell Buffer Config).

A queue is a ring of fixed-size entries at a physically contiguous, page-aligned base (CAP.CQR is set); its
memory is viewed once, when it is created, through the device's ``GuestMemory`` (so it lies in guest RAM), and
every access slices that view. The controller (``controller.py``) owns the queues and calls them under its lock:

- :class:`SubmissionQueue`: the host writes entries at its tail and the tail doorbell; the controller fetches at
  ``head`` (each entry is unpacked once, :data:`~bhyve_devices.nvme.regs.SQE`) and reports ``head`` in every
  completion (SQHD).
- :class:`CompletionQueue`: the controller posts at ``tail`` with the phase tag, which flips on each wrap (4.6);
  the host consumes and writes the head doorbell. Full is head == tail + 1 (4.1).
- :class:`ShadowDoorbells`: the two pages Doorbell Buffer Config names: the shadow doorbell page, where the host
  writes each queue's tail/head before (maybe) writing the doorbell register, and the EventIdx page, where the
  controller says from which value on it wants the register written (Linux's ``nvme_dbbuf_need_event``, the
  virtio event-index rule over 16-bit values). The slots are laid out as the doorbell registers are.

Not supported: queues in a PRP list (CAP.CQR), submission queue priorities (QPRIO is kept, round robin is used).
"""

import struct
import threading

from .regs import CQE, CQE_SIZE, DOORBELL_STRIDE, SQE, SQE_SIZE

_U32 = struct.Struct("<I")
_BARRIER = threading.Lock()


def full_barrier():
    """A store-load barrier between writing an EventIdx and reading the shadow doorbell again (the host does the
    same in the other order, with ``mb()``): a lock round trip is a locked instruction on the host CPU."""
    with _BARRIER:
        pass


class SubmissionQueue:
    __slots__ = ("qid", "base", "size", "cqid", "prio", "ring", "head", "tail", "bad_tail")

    def __init__(self, qid, base, size, cqid, ring, prio=0):
        self.qid, self.base, self.size, self.cqid, self.prio = qid, base, size, cqid, prio
        self.ring = ring            # a memoryview of size * 64 bytes of guest RAM
        self.head = 0               # the next entry the controller fetches
        self.tail = 0               # the last tail the host wrote (register or shadow)
        self.bad_tail = None        # an invalid shadow tail already reported

    def pending(self):
        return self.head != self.tail

    def fetch(self):
        """The entry at ``head`` as the tuple of :data:`~bhyve_devices.nvme.regs.SQE`; advances ``head``."""
        entry = SQE.unpack_from(self.ring, self.head * SQE_SIZE)
        self.head = (self.head + 1) % self.size
        return entry


class CompletionQueue:
    __slots__ = ("qid", "base", "size", "ien", "iv", "ring", "head", "tail", "phase", "stalled", "posted")

    def __init__(self, qid, base, size, ien, iv, ring):
        self.qid, self.base, self.size, self.ien, self.iv = qid, base, size, ien, iv
        self.ring = ring            # a memoryview of size * 16 bytes of guest RAM
        self.head = 0               # the host's: the next entry it will consume
        self.tail = 0               # ours: the next entry we post
        self.phase = 1              # the phase tag of this pass through the ring
        self.stalled = False        # a submission queue waits for room here
        self.posted = False         # entries posted since the last interrupt

    def has_room(self):
        return (self.tail + 1) % self.size != self.head

    def unconsumed(self):
        return self.head != self.tail

    def post(self, dw0, sqhd, sqid, cid, st):
        """One completion (``st``: the 15-bit status field) at ``tail``, with this pass's phase tag."""
        CQE.pack_into(self.ring, self.tail * CQE_SIZE, dw0 & 0xFFFFFFFF, 0, sqhd, sqid, cid,
                      ((st << 1) | self.phase) & 0xFFFF)
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1
        self.posted = True

    def valid_head(self, head):
        """A head the host may write: inside the queue, and not past what was posted (3.1.25)."""
        return head < self.size and (head - self.head) % self.size <= (self.tail - self.head) % self.size


class ShadowDoorbells:
    """The shadow doorbell page and the EventIdx page (memoryviews of one page each; ``db_gpa``/``ei_gpa``: their
    guest addresses, which a snapshot saves)."""

    def __init__(self, db_page, ei_page, db_gpa=None, ei_gpa=None):
        self.db, self.ei = db_page, ei_page
        self.db_gpa, self.ei_gpa = db_gpa, ei_gpa

    @staticmethod
    def _off(qid, cq):
        return (2 * qid + cq) * DOORBELL_STRIDE

    def value(self, qid, cq=False):
        return _U32.unpack_from(self.db, self._off(qid, cq))[0]

    def set_value(self, qid, value, cq=False):
        _U32.pack_into(self.db, self._off(qid, cq), value)

    def set_event(self, qid, value, cq=False):
        _U32.pack_into(self.ei, self._off(qid, cq), value & 0xFFFF)

    def event(self, qid, cq=False):
        return _U32.unpack_from(self.ei, self._off(qid, cq))[0]


def need_event(event_idx, new, old):
    """Whether a host that moved a doorbell from ``old`` to ``new`` writes the register (16-bit arithmetic)."""
    return ((new - event_idx - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
