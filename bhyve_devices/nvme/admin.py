"""The admin command set of the NVMe controller (NVM Express Base Specification 1.4, chapter 5; bhyve
``pci_nvme.c``'s ``pci_nvme_handle_admin_cmd``), a mixin of :class:`~bhyve_devices.nvme.controller.NvmeController`.

- Create / Delete I/O Submission and Completion Queue (5.3-5.6): physically contiguous, page-aligned queues of
  2 to CAP.MQES + 1 entries inside guest RAM; statuses Invalid Queue Identifier, Invalid Queue Size, Completion
  Queue Invalid, Invalid Interrupt Vector, Invalid Queue Deletion, PRP Offset Invalid, Invalid Field.
- Identify (5.15): controller, namespace 1, the active namespace list, the namespace identification descriptors.
- Get Log Page (5.14): error information (reading it with RAE cleared re-arms Error events), SMART / health,
  firmware slot, changed namespaces (empty), commands supported and effects; dword offsets, NUMDL/NUMDU.
- Set / Get Features (5.21, 5.9): arbitration, power management (PS0 only), temperature threshold, error recovery,
  volatile write cache, number of queues (before any I/O queue exists), interrupt coalescing and vector
  configuration, write atomicity, asynchronous event configuration; SEL current, default, saved, supported.
- Asynchronous Event Request (5.2): held until an event, at most AERL + 1 outstanding.
- Abort (5.1): nothing is ever in flight to abort: DW0 bit 0 set ("not aborted").
- Doorbell Buffer Config (5.8): the shadow doorbell and EventIdx pages (page aligned, in guest RAM) for the I/O
  queues.

Admin commands use PRPs only (PSDT 0) and are never fused: anything else is Invalid Field in Command.

Not supported (Invalid Command Opcode): Format NVM, firmware download/commit, namespace management and
attachment, device self-test, security send/receive, sanitize, keep alive, directives, virtualization, NVMe-MI;
saving features (Feature Identifier Not Saveable), features not listed above (Invalid Field).
"""

from . import identify as I
from . import regs as R
from .prp import copy_out, data_buffers
from .queues import CompletionQueue, ShadowDoorbells, SubmissionQueue

PAGE_MASK = R.PAGE_SIZE - 1
LOG_SIZES = {R.LOG_ERROR: 64 * (I.ELPE + 1), R.LOG_SMART: 512, R.LOG_FIRMWARE: 512, R.LOG_CHANGED_NS: 4096,
             R.LOG_EFFECTS: 4096}
QUEUE_SIZE_NEVER_ZERO_BASED = 1     # a 0-based size of 0 (one entry) is never valid
NOT_ABORTED = 1
PS_MASK = 0x1F
THSEL_UNDER = 1
TMPSEL_COMPOSITE, TMPSEL_ALL = 0, 0xF
IRQ_CD = 1 << 16


class AdminCommands:
    def _init_admin(self):
        self._admin_handlers = {
            R.ADM_DELETE_SQ: self._delete_sq, R.ADM_CREATE_SQ: self._create_sq, R.ADM_GET_LOG_PAGE: self._get_log,
            R.ADM_DELETE_CQ: self._delete_cq, R.ADM_CREATE_CQ: self._create_cq, R.ADM_IDENTIFY: self._identify,
            R.ADM_ABORT: self._abort, R.ADM_SET_FEATURES: self._set_features,
            R.ADM_GET_FEATURES: self._get_features, R.ADM_ASYNC_EVENT: self._async_event,
            R.ADM_DOORBELL_BUFFER: self._doorbell_buffer}
        nq = (self.maxq - 1) | ((self.maxq - 1) << 16)
        self.feature_defaults = {
            R.FEAT_ARBITRATION: 0, R.FEAT_POWER_MGMT: 0, R.FEAT_TEMP_THRESHOLD: I.WCTEMP, R.FEAT_ERROR_RECOVERY: 0,
            R.FEAT_WRITE_CACHE: 1, R.FEAT_NUM_QUEUES: nq, R.FEAT_IRQ_COALESCING: 0, R.FEAT_IRQ_CONFIG: 0,
            R.FEAT_WRITE_ATOMICITY: 0, R.FEAT_ASYNC_EVENT_CONFIG: 0}

    def _reset_features(self):
        self.features = dict(self.feature_defaults)
        self.thresholds = {}            # (TMPSEL, THSEL) -> threshold
        self.irq_config = {}            # interrupt vector -> coalescing disable
        self.nsq = self.ncq = self.maxq

    def _admin(self, e):
        if e[R.E_FLAGS] & R.FLAGS_FUSE_MASK or e[R.E_FLAGS] >> R.FLAGS_PSDT_SHIFT:
            return R.INVALID_FIELD, 0
        handler = self._admin_handlers.get(e[R.E_OPCODE])
        if handler is None:
            return R.INVALID_OPCODE, 0
        return handler(e)

    def _to_host(self, e, data, length=None):
        """``data`` into the command's PRPs (``length`` bytes, zero-padded)."""
        copy_out(data_buffers(self.mem, False, e[R.E_PRP1], e[R.E_PRP2], length or len(data)), data)

    def _queue_ring(self, e, entries, entry_size):
        """The guest RAM of a new queue at PRP1, or a status."""
        base = e[R.E_PRP1]
        if base & PAGE_MASK:
            return None, R.PRP_OFFSET_INVALID
        try:
            return self.mem.view(base, entries * entry_size), R.SUCCESS
        except (OSError, ValueError, OverflowError):
            return None, R.INVALID_FIELD

    # -- queues (5.3 - 5.6) -----------------------------------------------------------------------------------
    def _create_cq(self, e):
        c10, c11 = e[R.E_CDW10], e[R.E_CDW11]
        qid, entries, iv = c10 & 0xFFFF, (c10 >> 16) + 1, c11 >> 16
        if qid == 0 or qid > self.ncq or self.cqs[qid] is not None:
            return R.INVALID_QID, 0
        if entries <= QUEUE_SIZE_NEVER_ZERO_BASED or entries > self.mqes + 1:
            return R.INVALID_QSIZE, 0
        if iv > self.maxq:
            return R.status(R.SC_INVALID_VECTOR, R.SCT_COMMAND), 0
        if not c11 & 1 or (self.cc >> R.CC_IOCQES_SHIFT) & R.CC_QES_MASK != R.CQES_LOG2:
            return R.INVALID_FIELD, 0
        ring, st = self._queue_ring(e, entries, R.CQE_SIZE)
        if ring is None:
            return st, 0
        self.cqs[qid] = CompletionQueue(qid, e[R.E_PRP1], entries, bool(c11 & 2), iv, ring)
        if self.shadow is not None:
            self.shadow.set_event(qid, entries - 1, cq=True)
        return R.SUCCESS, 0

    def _create_sq(self, e):
        c10, c11 = e[R.E_CDW10], e[R.E_CDW11]
        qid, entries, cqid = c10 & 0xFFFF, (c10 >> 16) + 1, c11 >> 16
        if qid == 0 or qid > self.nsq or self.sqs[qid] is not None:
            return R.INVALID_QID, 0
        if cqid == 0 or cqid > self.maxq or self.cqs[cqid] is None:
            return R.status(R.SC_CQ_INVALID, R.SCT_COMMAND), 0
        if entries <= QUEUE_SIZE_NEVER_ZERO_BASED or entries > self.mqes + 1:
            return R.INVALID_QSIZE, 0
        if not c11 & 1 or (self.cc >> R.CC_IOSQES_SHIFT) & R.CC_QES_MASK != R.SQES_LOG2:
            return R.INVALID_FIELD, 0
        ring, st = self._queue_ring(e, entries, R.SQE_SIZE)
        if ring is None:
            return st, 0
        self.sqs[qid] = SubmissionQueue(qid, e[R.E_PRP1], entries, cqid, ring, (c11 >> 1) & 3)
        if self.shadow is not None:
            self.shadow.set_event(qid, 0)
        return R.SUCCESS, 0

    def _delete_sq(self, e):
        qid = e[R.E_CDW10] & 0xFFFF
        if qid == 0 or qid > self.maxq or self.sqs[qid] is None:
            return R.INVALID_QID, 0
        self.sqs[qid] = None
        return R.SUCCESS, 0

    def _delete_cq(self, e):
        qid = e[R.E_CDW10] & 0xFFFF
        if qid == 0 or qid > self.maxq or self.cqs[qid] is None:
            return R.INVALID_QID, 0
        if any(sq is not None and sq.cqid == qid for sq in self.sqs):
            return R.status(R.SC_INVALID_QUEUE_DELETION, R.SCT_COMMAND), 0
        self.cqs[qid] = None
        self.irq_update()
        return R.SUCCESS, 0

    # -- Identify (5.15) and Get Log Page (5.14) -----------------------------------------------------------------
    def _identify(self, e):
        cns, nsid = e[R.E_CDW10] & 0xFF, e[R.E_NSID]
        if cns == R.CNS_CONTROLLER:
            data = self.identity.controller
        elif cns in (R.CNS_NAMESPACE, R.CNS_NS_DESCRIPTORS):
            if nsid != I.NSID:
                return R.INVALID_NAMESPACE, 0
            data = self.identity.namespace if cns == R.CNS_NAMESPACE else self.identity.descriptors
        elif cns == R.CNS_ACTIVE_NSIDS:
            if nsid >= R.NSID_ALL - 1:
                return R.INVALID_NAMESPACE, 0
            data = I.active_nsids(nsid)
        else:
            return R.INVALID_FIELD, 0
        self._to_host(e, data)
        return R.SUCCESS, 0

    def _get_log(self, e):
        c10, c11 = e[R.E_CDW10], e[R.E_CDW11]
        lid = c10 & 0xFF
        length = ((((c11 & 0xFFFF) << 16) | (c10 >> 16)) + 1) * 4
        offset = (e[R.E_CDW13] << 32) | e[R.E_CDW12]
        size = LOG_SIZES.get(lid)
        if size is None:
            return R.status(R.SC_INVALID_LOG_PAGE, R.SCT_COMMAND), 0
        if offset & 3 or offset >= size or length > I.MAX_TRANSFER:
            return R.INVALID_FIELD, 0
        if lid == R.LOG_SMART and e[R.E_NSID] not in (0, I.NSID, R.NSID_ALL):
            return R.INVALID_NAMESPACE, 0
        if lid == R.LOG_ERROR:
            with self._ev_lock:
                data = I.error_log(list(self.error_entries))
        elif lid == R.LOG_SMART:
            data = I.smart_log(self.stats)
        else:
            data = {R.LOG_FIRMWARE: self.identity.firmware_log, R.LOG_CHANGED_NS: self.identity.changed_ns_log,
                    R.LOG_EFFECTS: self.identity.effects_log}[lid]
        self._to_host(e, data[offset:offset + length], length)
        if lid == R.LOG_ERROR and not c10 & R.LOG_RAE:
            self.acknowledge(R.AE_TYPE_ERROR)
        return R.SUCCESS, 0

    # -- features (5.21, 5.9) ---------------------------------------------------------------------------------
    def _set_features(self, e):
        c10, c11, nsid = e[R.E_CDW10], e[R.E_CDW11], e[R.E_NSID]
        fid = c10 & 0xFF
        if fid not in self.features:
            return R.INVALID_FIELD, 0
        if c10 & R.FEAT_SAVE:
            return R.status(R.SC_FEATURE_NOT_SAVEABLE, R.SCT_COMMAND), 0
        if fid == R.FEAT_ERROR_RECOVERY:
            if nsid not in (I.NSID, R.NSID_ALL):
                return R.INVALID_NAMESPACE, 0
        elif nsid not in (0, R.NSID_ALL):
            return R.status(R.SC_FEATURE_NOT_NS_SPECIFIC, R.SCT_COMMAND), 0
        value, dw0 = c11, 0
        if fid == R.FEAT_NUM_QUEUES:
            nsqr, ncqr = c11 & 0xFFFF, c11 >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                return R.INVALID_FIELD, 0
            if any(q is not None for q in self.sqs[1:] + self.cqs[1:]):
                return R.status(R.SC_SEQUENCE_ERROR), 0
            self.nsq, self.ncq = min(nsqr + 1, self.maxq), min(ncqr + 1, self.maxq)
            value = dw0 = (self.nsq - 1) | ((self.ncq - 1) << 16)
        elif fid == R.FEAT_POWER_MGMT and c11 & PS_MASK:
            return R.INVALID_FIELD, 0
        elif fid == R.FEAT_TEMP_THRESHOLD:
            tmpsel, thsel = (c11 >> 16) & 0xF, (c11 >> 20) & 0x3
            if thsel > THSEL_UNDER or tmpsel not in (TMPSEL_COMPOSITE, TMPSEL_ALL):
                return R.INVALID_FIELD, 0
            self.thresholds[(tmpsel, thsel)] = c11 & 0xFFFF
            return R.SUCCESS, 0
        elif fid == R.FEAT_IRQ_CONFIG:
            if c11 & 0xFFFF > self.maxq:
                return R.INVALID_FIELD, 0
            self.irq_config[c11 & 0xFFFF] = c11 & IRQ_CD
            return R.SUCCESS, 0
        elif fid == R.FEAT_WRITE_CACHE:
            value = c11 & 1
        self.features[fid] = value
        return R.SUCCESS, dw0

    def _get_features(self, e):
        c10, c11 = e[R.E_CDW10], e[R.E_CDW11]
        fid, sel = c10 & 0xFF, (c10 >> 8) & 0x7
        if fid not in self.features or sel > R.SEL_SUPPORTED:
            return R.INVALID_FIELD, 0
        if sel == R.SEL_SUPPORTED:
            return R.SUCCESS, R.FEAT_CAP_CHANGEABLE | (R.FEAT_CAP_NS_SPECIFIC if fid == R.FEAT_ERROR_RECOVERY
                                                      else 0)
        current = sel == R.SEL_CURRENT
        if fid == R.FEAT_TEMP_THRESHOLD:
            key = ((c11 >> 16) & 0xF, (c11 >> 20) & 0x3)
            default = I.WCTEMP if key[1] != THSEL_UNDER else 0
            return R.SUCCESS, (self.thresholds.get(key, default) if current else default)
        if fid == R.FEAT_IRQ_CONFIG:
            iv = c11 & 0xFFFF
            if iv > self.maxq:
                return R.INVALID_FIELD, 0
            return R.SUCCESS, iv | (self.irq_config.get(iv, 0) if current else 0)
        return R.SUCCESS, self.features[fid] if current else self.feature_defaults[fid]

    # -- events, abort, shadow doorbells ----------------------------------------------------------------------
    def _async_event(self, e):
        if len(self._aers) > I.AERL:
            return R.status(R.SC_AER_LIMIT, R.SCT_COMMAND), 0
        with self._ev_lock:
            self._aers.append(e[R.E_CID])
        return None

    def _abort(self, e):
        return R.SUCCESS, NOT_ABORTED

    def _doorbell_buffer(self, e):
        db, ei = e[R.E_PRP1], e[R.E_PRP2]
        if db & PAGE_MASK or ei & PAGE_MASK:
            return R.INVALID_FIELD, 0
        try:
            shadow = ShadowDoorbells(self.mem.view(db, R.PAGE_SIZE), self.mem.view(ei, R.PAGE_SIZE), db, ei)
        except (OSError, ValueError, OverflowError):
            return R.INVALID_FIELD, 0
        for q in self.sqs[1:]:
            if q is not None:
                shadow.set_value(q.qid, q.tail)
                shadow.set_event(q.qid, q.tail)
        for q in self.cqs[1:]:
            if q is not None:
                shadow.set_value(q.qid, q.head, cq=True)
                shadow.set_event(q.qid, q.head, cq=True)
        self.shadow = shadow
        # the I/O queues' doorbells may now be taken without an exit: registered anew before the host hears of it
        # (a doorbell write while the VM moves them would be lost), here on the serving thread (see controller.py)
        self.rebind()
        return R.SUCCESS, 0
