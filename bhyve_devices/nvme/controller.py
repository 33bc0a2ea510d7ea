"""The NVMe controller's state machine (NVM Express Base Specification 1.4; bhyve ``pci_nvme.c``): the controller
registers (3.1), enable, reset and shutdown (7.6), the queues (4.1) and their doorbells, the serving of the
submission queues, completions with their phase tags (4.6), asynchronous events (5.2) and the shadow doorbells of
Doorbell Buffer Config (5.8). The admin commands are :class:`~bhyve_devices.nvme.admin.AdminCommands`', the NVM
I/O commands :class:`~bhyve_devices.nvme.io.NvmCommands`'; the PCI function around it (BARs, MSI-X, INTx, the
doorbell fast path) is :class:`bhyve_devices.nvme.pci.NvmePci`.

Threads. :meth:`NvmeController.serve` is the one place commands run: it fetches from every submission queue with
new entries (admin first, then the I/O queues round robin, :data:`BATCH` entries at a time), runs them, posts their
completions and then interrupts once per completion queue. It runs under the controller's lock on whichever thread
calls it: the device's doorbell thread (a submission queue doorbell rang, ``vmmshim/fastpaths.py``), a vCPU about
to halt, or the writing thread where the VM has no doorbells. Register and completion-queue-head writes come on
vCPU threads; a CC write that resets the controller takes the lock, so it waits for a command in progress.

Doorbells. A write to a submission queue tail doorbell stores the tail and rings (:meth:`doorbell_write` returns
the queue to ring). Once the host has given a shadow doorbell page (Doorbell Buffer Config, as Linux does for its
I/O queues), the I/O queues' tails and heads are read from that page instead, so a doorbell write carries no
information but "look": the PCI function then lets KVM's ioeventfd take those writes without an exit. That change
(``rebind``) is made on the serving thread before the command completes, so no doorbell write can fall between
the old registration and the new one; removing a doorbell serves its pending ring there, which only marks the
pass to run again. A reset goes back outside the lock (a vCPU must not hold it while the doorbell thread may wait
for it) and may drop a doorbell write made during the reset itself. After each
pass the controller writes each I/O submission queue's EventIdx (the host writes the register again only once it
moves past what was served) and reads the tails again behind a barrier, so no submission is missed. A completion
queue's EventIdx stays just behind its head (the host need not write the register) unless the queue is full or the
interrupt is level-triggered: then the next head update must be written.

A bad doorbell write (a queue that does not exist, a tail or head outside the queue or past what was posted) is
dropped and becomes an Error asynchronous event (5.2.1: Write to Invalid Doorbell Register, Invalid Doorbell Write
Value) with an error log entry; it is reported when an Asynchronous Event Request is outstanding, after which the
Error type stays masked until the host reads the error log with RAE cleared. A controller bug is caught, recorded
in ``errors`` and answered with Internal Error; a fault that cannot be answered in a queue (an admin queue outside
RAM) sets CSTS.CFS.

Not supported: NVM subsystem reset, the abort of a command (none is ever outstanding except held Asynchronous
Event Requests), weighted round robin arbitration, interrupt coalescing (the feature is kept, not applied),
shadow doorbells for the admin queue (its registers are always written, as Linux does).
"""

import struct
import threading

from . import regs as R
from .admin import AdminCommands
from .identify import ELPE, Identity, derived_ids
from .io import NvmCommands
from .queues import CompletionQueue, SubmissionQueue, full_barrier

BATCH = 64                          # commands taken from one queue before the next queue's turn
REGISTER_IMAGE = struct.Struct("<QIIII4xIIIQQII")     # the first 64 bytes of BAR 0, as REGISTER_FILE
INTERNAL_ERROR = R.status(R.SC_INTERNAL_ERROR, dnr=False)


class NvmeController(AdminCommands, NvmCommands):
    """One controller with one namespace over ``backend`` (a ``BlockBackend``), guest RAM ``mem``.

    Hooks its PCI function sets: ``irq(vector)`` (a completion queue of that vector got entries),
    ``irq_update()`` (heads or masks moved: a level-triggered line is recomputed), ``kick()`` (serve soon, on the
    device's thread; None: serve here), ``rebind()`` (the set of doorbells KVM may take changed),
    ``level_triggered()`` (INTx in use)."""

    def __init__(self, backend, mem, *, maxq=16, qsz=2048, sectsz=512, serial="NVME-0-0", dsm="auto",
                 nodelete=False, vmname="vm", slot=0, func=0, eui64=0):
        self.backend, self.mem = backend, mem
        self.maxq, self.mqes, self.sectsz = maxq, qsz - 1, sectsz
        self.lba_shift = sectsz.bit_length() - 1
        self.nsze = backend.size >> self.lba_shift
        self.readonly = bool(backend.readonly)
        self.deallocates = bool(backend.candelete) and not self.readonly and not nodelete
        self.dsm = dsm == "enable" or (dsm == "auto" and self.deallocates)
        eui, nguid, nqn = derived_ids(vmname, slot, func, eui64)
        self.identity = Identity(serial=serial, nsze=self.nsze, lba_shift=self.lba_shift, readonly=self.readonly,
                                 dsm=self.dsm, deallocates=self.deallocates, eui64=eui, nguid=nguid, subnqn=nqn)
        self.cap = (self.mqes | R.CAP_CQR | (R.READY_TIMEOUT << R.CAP_TO_SHIFT) | (R.DSTRD << R.CAP_DSTRD_SHIFT)
                    | R.CAP_CSS_NVM)
        self.irq = self.irq_update = self.rebind = lambda *a: None
        self.level_triggered = lambda: False
        self.kick = None
        self.errors = []                # controller bugs (never a guest's doing)
        self.stats = dict(bytes_read=0, bytes_written=0, reads=0, writes=0, media_errors=0, error_entries=0)
        self.error_entries = []         # the error log, newest first
        self._lock = threading.RLock()  # held while commands run and while the controller resets
        self._ev_lock = threading.Lock()
        self._serving = self._again = False
        self.cc = self.aqa = self.asq = self.acq = 0
        self._init_admin()
        self._init_io()
        self._reset_state()

    def _reset_state(self):
        self.sqs = [None] * (self.maxq + 1)
        self.cqs = [None] * (self.maxq + 1)
        self.shadow = None
        self.csts = 0
        self.intms = 0
        self._aers = []                 # CIDs of the outstanding Asynchronous Event Requests
        self._events = []               # (type, info, log page) not yet reported
        self._masked = set()            # event types reported and not yet acknowledged
        self._reset_features()

    @property
    def ready(self):
        return bool(self.csts & R.CSTS_RDY) and not self.csts & R.CSTS_CFS

    # -- registers (3.1) --------------------------------------------------------------------------------------
    def read_register(self, off, size):
        if off < 0 or off + size > R.REGISTER_FILE_SIZE:
            return 0                    # doorbells and reserved registers read as zero
        image = REGISTER_IMAGE.pack(self.cap, R.NVME_VERSION, self.intms, self.intms, self.cc, self.csts, 0,
                                    self.aqa, self.asq, self.acq, 0, 0)
        return int.from_bytes(image[off:off + size], "little")

    def write_register(self, off, size, value):
        if size == 8 and off in (R.REG_ASQ, R.REG_ACQ):
            self._set_queue_base(off, value)
            return
        if size != 4:
            return
        value &= 0xFFFFFFFF
        if off == R.REG_CC:
            self._write_cc(value)
        elif off in (R.REG_INTMS, R.REG_INTMC):
            self.intms = (self.intms | value) if off == R.REG_INTMS else (self.intms & ~value)
            self.irq_update()
        elif off == R.REG_AQA:
            self.aqa = value & ((R.AQA_ASQS_MASK << R.AQA_ACQS_SHIFT) | R.AQA_ASQS_MASK)
        elif off in (R.REG_ASQ, R.REG_ACQ):
            old = self.asq if off == R.REG_ASQ else self.acq
            self._set_queue_base(off, (old & ~0xFFFFFFFF) | value)
        elif off in (R.REG_ASQ + 4, R.REG_ACQ + 4):
            old = self.asq if off == R.REG_ASQ + 4 else self.acq
            self._set_queue_base(off - 4, (old & 0xFFFFFFFF) | (value << 32))

    def _set_queue_base(self, off, value):
        value &= R.QUEUE_BASE_MASK
        if off == R.REG_ASQ:
            self.asq = value
        else:
            self.acq = value

    def _write_cc(self, value):
        rebind = False
        with self._lock:
            old = self.cc
            if old & R.CC_EN:
                value = (old & ~R.CC_WHILE_ENABLED) | (value & R.CC_WHILE_ENABLED)
            self.cc = new = value & R.CC_WRITABLE
            if (old ^ new) & R.CC_EN:
                if new & R.CC_EN:
                    self._enable()
                else:
                    rebind = self.shadow is not None
                    self._reset_state()
            if (new >> R.CC_SHN_SHIFT) & R.CC_SHN_MASK and not (old >> R.CC_SHN_SHIFT) & R.CC_SHN_MASK:
                self._shutdown()
        if rebind:
            self.rebind()
        self.irq_update()

    def _enable(self):
        """CC.EN 0 -> 1 (7.6.1): the admin queues from AQA/ASQ/ACQ; a configuration that cannot work sets CFS."""
        asqs, acqs = (self.aqa & R.AQA_ASQS_MASK) + 1, ((self.aqa >> R.AQA_ACQS_SHIFT) & R.AQA_ASQS_MASK) + 1
        mps = (self.cc >> R.CC_MPS_SHIFT) & R.CC_MPS_MASK
        css = (self.cc >> R.CC_CSS_SHIFT) & R.CC_CSS_MASK
        try:
            if asqs < 2 or acqs < 2 or mps != 0 or css not in (R.CSS_NVM, R.CSS_ADMIN_ONLY):
                raise ValueError("admin queue attributes or configuration not supported")
            sq_ring = self.mem.view(self.asq, asqs * R.SQE_SIZE)
            cq_ring = self.mem.view(self.acq, acqs * R.CQE_SIZE)
        except (OSError, ValueError, OverflowError):
            self.csts = R.CSTS_CFS
            return
        self.sqs[0] = SubmissionQueue(0, self.asq, asqs, 0, sq_ring)
        self.cqs[0] = CompletionQueue(0, self.acq, acqs, True, 0, cq_ring)
        self.csts = R.CSTS_RDY

    def _shutdown(self):
        """CC.SHN (7.6.2): everything written is flushed to the image; shutdown processing is then complete."""
        try:
            if not self.readonly:
                self.backend.flush()
        except OSError:
            pass
        self.csts = (self.csts & ~(3 << R.CSTS_SHST_SHIFT)) | (R.SHST_COMPLETE << R.CSTS_SHST_SHIFT)

    # -- doorbells (3.1.24, 3.1.25) -------------------------------------------------------------------------
    def doorbell_write(self, off, size, value):
        """A doorbell register write; returns the submission queue to serve (ring its doorbell), or None."""
        rel = off - R.DOORBELL_BASE
        if size != 4 or rel < 0 or rel % R.DOORBELL_STRIDE or not self.ready:
            return None
        y, is_cq = divmod(rel // R.DOORBELL_STRIDE, 2)
        if is_cq:
            self._cq_head_written(y, value & 0xFFFFFFFF)
            return None
        sq = self.sqs[y] if y <= self.maxq else None
        if sq is None:
            self.event(R.AE_INFO_INVALID_DOORBELL)
            return None
        if y and self.shadow is not None:
            return y                    # the tail is in the shadow page
        if value >= sq.size:
            self.event(R.AE_INFO_INVALID_DB_VALUE)
            return None
        sq.tail = value
        return y

    def _cq_head_written(self, y, value):
        cq = self.cqs[y] if y <= self.maxq else None
        if cq is None:
            self.event(R.AE_INFO_INVALID_DOORBELL)
            return
        if y and self.shadow is not None:
            value = self.shadow.value(y, cq=True)
            if value >= cq.size:
                self.event(R.AE_INFO_INVALID_DB_VALUE)
                return
        elif not cq.valid_head(value):
            self.event(R.AE_INFO_INVALID_DB_VALUE)
            return
        cq.head = value
        if cq.stalled:
            cq.stalled = False
            self._kick()
        self.irq_update()

    def rang(self, y):
        """Submission queue ``y``'s doorbell rang (the device's doorbell function): serve."""
        if y and self.shadow is not None and (y > self.maxq or self.sqs[y] is None):
            self.event(R.AE_INFO_INVALID_DOORBELL)
        self.serve()

    def _kick(self):
        kick = self.kick
        if kick is not None:
            kick()
        else:
            self.serve()

    # -- asynchronous events (5.2) ----------------------------------------------------------------------------
    def event(self, info, etype=R.AE_TYPE_ERROR, log=R.LOG_ERROR):
        """An asynchronous event (and its error log entry), reported when an AER is outstanding."""
        with self._ev_lock:
            self.stats["error_entries"] += 1
            self.error_entries.insert(0, dict(count=self.stats["error_entries"], sqid=0xFFFF, cid=0xFFFF,
                                              status=0, param_loc=0xFFFF, lba=0, nsid=0, vsia=0, trtype=0, csi=0,
                                              ttsi=0))
            del self.error_entries[ELPE + 1:]
            if (etype, info, log) not in self._events:
                self._events.append((etype, info, log))
        self._kick()

    def acknowledge(self, etype):
        """The host read the log page of ``etype`` with RAE cleared: its events may be reported again."""
        with self._ev_lock:
            self._masked.discard(etype)

    def _deliver_events(self):
        cq, sq = self.cqs[0], self.sqs[0]
        done = False
        with self._ev_lock:
            while self._aers and cq.has_room():
                ev = next((e for e in self._events if e[0] not in self._masked), None)
                if ev is None:
                    break
                self._events.remove(ev)
                self._masked.add(ev[0])
                cq.post(ev[0] | (ev[1] << 8) | (ev[2] << 16), sq.head, 0, self._aers.pop(0), R.SUCCESS)
                done = True
        return done

    # -- serving ----------------------------------------------------------------------------------------------
    def serve(self):
        """Runs what the submission queues hold (see the module docstring); never raises."""
        with self._lock:
            if self._serving:
                self._again = True
                return
            self._serving = True
            try:
                if self.ready:
                    self._serve_locked()
            except Exception as exc:    # a controller bug: fatal status, never out of a guest access
                self.errors.append(f"serve: {exc!r}")
                self.csts |= R.CSTS_CFS
            finally:
                self._serving = False

    def _serve_locked(self):
        while self.ready:
            self._again = False
            again = self._deliver_events()
            for sq in [q for q in self.sqs if q is not None]:
                if self.sqs[sq.qid] is sq:
                    again |= self._drain(sq)
            self._interrupts()
            if self.shadow is not None and self._arm_shadow():
                continue
            if not (again or self._again):
                break

    def _tail(self, sq):
        if sq.qid and self.shadow is not None:
            tail = self.shadow.value(sq.qid)
            if tail >= sq.size:
                if sq.bad_tail != tail:
                    sq.bad_tail = tail
                    self.event(R.AE_INFO_INVALID_DB_VALUE)
                return sq.head
            sq.tail = tail
        return sq.tail

    def _room(self, cq):
        if cq.has_room():
            return True
        if cq.qid and self.shadow is not None:
            self._shadow_head(cq)
            if cq.has_room():
                return True
            self.shadow.set_event(cq.qid, cq.head, cq=True)
            full_barrier()
            self._shadow_head(cq)
        cq.stalled = True
        if cq.has_room():               # a head written while we looked: not stalled after all
            cq.stalled = False
            return True
        return False

    def _shadow_head(self, cq):
        head = self.shadow.value(cq.qid, cq=True)
        if head < cq.size:
            cq.head = head

    def _drain(self, sq):
        cq = self.cqs[sq.cqid]
        tail = self._tail(sq)
        n = 0
        compiled = self._compiled and sq.qid
        while sq.head != tail and n < BATCH and self.sqs[sq.qid] is sq and self.ready:
            if compiled:                # the compiled pass first; here only what it does not serve
                n += self._drain_compiled(sq, cq, tail, BATCH - n)
                if sq.head == tail or n >= BATCH:
                    break
            if not self._room(cq):
                break
            entry = sq.fetch()
            n += 1
            try:
                result = self._admin(entry) if sq.qid == 0 else self._io(entry)
            except R.NvmeError as e:
                result = e.status, 0
            except Exception as exc:    # a controller bug: this command fails, the controller goes on
                self.errors.append(f"opcode {entry[0]:#x} on queue {sq.qid}: {exc!r}")
                result = INTERNAL_ERROR, 0
            if result is not None:      # None: held (an Asynchronous Event Request)
                cq.post(result[1], sq.head, sq.qid, entry[2], result[0])
        # another pass is due after an admin command (it may have made queues, events or the shadow page) or
        # where entries are left (the batch ended); an I/O queue served to its tail needs none
        return n > 0 and (sq.qid == 0 or sq.head != tail)

    def _interrupts(self):
        """One interrupt per completion queue that got entries; the shadow EventIdx of each I/O queue set."""
        shadow, level = self.shadow, None
        for cq in self.cqs:
            if cq is None or not cq.posted:
                continue
            cq.posted = False
            if shadow is not None and cq.qid:
                if level is None:
                    level = self.level_triggered()
                if level or cq.stalled:
                    self._shadow_head(cq)
                    shadow.set_event(cq.qid, cq.head, cq=True)
                else:
                    shadow.set_event(cq.qid, (cq.head - 1) % cq.size, cq=True)
            if cq.ien:
                self.irq(cq.iv)

    def _arm_shadow(self):
        """Each I/O submission queue's EventIdx at what was served, then its tail read again: True if new entries
        arrived meanwhile (on a queue with room to complete them)."""
        shadow = self.shadow
        sqs = [q for q in self.sqs[1:] if q is not None]
        for sq in sqs:
            shadow.set_event(sq.qid, sq.head)
        full_barrier()
        for sq in sqs:
            tail = shadow.value(sq.qid)
            if tail < sq.size and tail != sq.head and not self.cqs[sq.cqid].stalled:
                return True
        return False

    def intx_pending(self):
        """A completion queue with interrupts on holds entries the host has not consumed (7.5.1)."""
        for cq in list(self.cqs):
            if cq is not None and cq.ien:
                if cq.qid and self.shadow is not None:
                    self._shadow_head(cq)
                if cq.unconsumed():
                    return True
        return False
