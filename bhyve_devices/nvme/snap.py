"""Snapshot and restore of the NVMe controller's state (issue 23, the protocol of :mod:`bhyve_devices.snapshot`;
bhyve's ``pci_nvme_snapshot``): what :class:`~bhyve_devices.nvme.pci.NvmePci` saves under ``"nvme"`` next to the
PCI function's state (:mod:`bhyve_devices.pci.devsnap`).

Saved (:func:`controller_state`), all of it guest-visible:

- ``config``: the configuration the state belongs to (``maxq``, CAP.MQES, the LBA size and the namespace size):
  a restore into a controller built otherwise (another ``maxq=``, ``qsz=``, ``sectsz=``, a resized image) is
  refused;
- the registers CC, CSTS (RDY, CFS, SHST), AQA, ASQ, ACQ and the interrupt mask INTMS (INTMC reads the same);
- every submission queue (id, base, entries, the completion queue it posts to, QPRIO, head, tail, the invalid
  shadow tail already reported) and every completion queue (id, base, entries, IEN, interrupt vector, head, tail,
  phase tag, whether a submission queue waits for room, whether entries await their interrupt), the admin queues
  included; each queue's ring is mapped again in the guest memory the controller was built with;
- the shadow doorbell and EventIdx pages of Doorbell Buffer Config (their guest addresses);
- the Set Features values (``features``, the temperature thresholds, the per-vector interrupt configuration) and
  the number of I/O queues granted (Number of Queues);
- the outstanding Asynchronous Event Requests (their CIDs, in the order they came), the events not yet reported
  and the event types masked until their log page is read;
- the error log entries and the SMART / health counters (Get Log Page reads them).

Commands the host submitted and the controller has not fetched yet are their queue's tail beyond its head: they
are served after the restore (the VM rings every doorbell when it starts). A command being served is refused
(SnapshotError): at the checkpoint's quiet point none is, the serving thread holding the controller's lock.

Not saved: ``errors`` (controller bugs, diagnostics), the hooks to the PCI function, the identity (rebuilt from
the configuration).
"""

from functools import partial

from bhyve_devices import snapshot as S

from . import regs as R
from .admin import IRQ_CD, THSEL_UNDER, TMPSEL_ALL, TMPSEL_COMPOSITE
from .identify import AERL, ELPE
from .queues import CompletionQueue, ShadowDoorbells, SubmissionQueue

_bool = partial(S.want_bool, "nvme")
_dict = partial(S.want_dict, "nvme")

NVME_KEYS = ("config", "cc", "csts", "aqa", "asq", "acq", "intms", "sqs", "cqs", "shadow", "features",
             "thresholds", "irq_config", "nsq", "ncq", "aers", "events", "masked", "error_entries", "stats")
SQ_KEYS = ("qid", "base", "size", "cqid", "prio", "head", "tail", "bad_tail")
CQ_KEYS = ("qid", "base", "size", "ien", "iv", "head", "tail", "phase", "stalled", "posted")
ERROR_KEYS = dict(count=64, sqid=16, cid=16, status=16, param_loc=16, lba=64, nsid=32, vsia=8, trtype=8, csi=64,
                  ttsi=16)           # field -> width in bits (layouts.ERROR_ENTRY)
CSTS_MASK = R.CSTS_RDY | R.CSTS_CFS | (3 << R.CSTS_SHST_SHIFT)
AQA_MASK = (R.AQA_ASQS_MASK << R.AQA_ACQS_SHIFT) | R.AQA_ASQS_MASK
ADMIN_MAX_ENTRIES = R.AQA_ASQS_MASK + 1
PAGE_MASK = R.PAGE_SIZE - 1


def _config(c):
    return dict(maxq=c.maxq, mqes=c.mqes, lba_shift=c.lba_shift, nsze=c.nsze)


def controller_state(c):
    """The saved state of controller ``c`` (the caller holds its lock); SnapshotError if it cannot be saved now."""
    if c._serving:
        raise S.SnapshotError("nvme: a command is being served (the controller is not at a quiet point)")
    shadow = c.shadow
    if shadow is not None and (shadow.db_gpa is None or shadow.ei_gpa is None):
        raise S.SnapshotError("nvme: the shadow doorbell pages have no guest address")
    with c._ev_lock:
        aers, events, masked = list(c._aers), [list(e) for e in c._events], sorted(c._masked)
        entries = [dict(e) for e in c.error_entries]
        stats = dict(c.stats)
    return dict(
        config=_config(c), cc=c.cc, csts=c.csts, aqa=c.aqa, asq=c.asq, acq=c.acq, intms=c.intms,
        sqs=[None if q is None else {k: getattr(q, k) for k in SQ_KEYS} for q in c.sqs],
        cqs=[None if q is None else {k: getattr(q, k) for k in CQ_KEYS} for q in c.cqs],
        shadow=None if shadow is None else [shadow.db_gpa, shadow.ei_gpa],
        features={str(k): v for k, v in sorted(c.features.items())},
        thresholds=[[t, s, v] for (t, s), v in sorted(c.thresholds.items())],
        irq_config=[[iv, cd] for iv, cd in sorted(c.irq_config.items())],
        nsq=c.nsq, ncq=c.ncq, aers=aers, events=events, masked=masked, error_entries=entries, stats=stats)


def _int(where, v, lo, hi):
    """``v`` if it is an int in ``lo``..``hi`` (inclusive), else SnapshotError."""
    if not S.int_in(v, lo, hi):
        raise S.SnapshotError(f"nvme: {where} = {v!r:.40} (expected {lo}..{hi:#x})")
    return v


def _list(where, v, n=None):
    if not isinstance(v, list) or (n is not None and len(v) != n):
        raise S.SnapshotError(f"nvme: {where} is not a list" + (f" of {n}" if n is not None else ""))
    return v


def _view(c, where, base, size):
    try:
        return c.mem.view(base, size)
    except (OSError, ValueError, OverflowError, AttributeError) as exc:
        raise S.SnapshotError(f"nvme: {where} at {base:#x} is not in guest memory: {exc}") from None


class ControllerState:
    """A saved controller state checked against controller ``c`` (SnapshotError otherwise), its queues mapped in
    ``c``'s guest memory; :meth:`apply` puts it in (nothing of ``c`` changes before)."""

    def __init__(self, c, n):
        _dict("the controller state", n, NVME_KEYS)
        if n["config"] != _config(c):
            raise S.SnapshotError(f"nvme: saved by a controller of {n['config']!r:.120}, this one is {_config(c)}")
        self.c = c
        self.regs = dict(cc=_int("CC", n["cc"], 0, R.CC_WRITABLE), csts=_int("CSTS", n["csts"], 0, CSTS_MASK),
                         aqa=_int("AQA", n["aqa"], 0, AQA_MASK), asq=_int("ASQ", n["asq"], 0, R.QUEUE_BASE_MASK),
                         acq=_int("ACQ", n["acq"], 0, R.QUEUE_BASE_MASK),
                         intms=_int("INTMS", n["intms"], 0, 0xFFFFFFFF))
        for k, mask in (("cc", R.CC_WRITABLE), ("csts", CSTS_MASK), ("aqa", AQA_MASK), ("asq", R.QUEUE_BASE_MASK),
                        ("acq", R.QUEUE_BASE_MASK)):
            if self.regs[k] & ~mask:
                raise S.SnapshotError(f"nvme: {k.upper()} = {self.regs[k]:#x} has reserved bits set")
        ready = bool(self.regs["csts"] & R.CSTS_RDY)
        self.cqs = self._cqs(_list("cqs", n["cqs"], c.maxq + 1))
        self.sqs = self._sqs(_list("sqs", n["sqs"], c.maxq + 1))
        if ready != (self.sqs[0] is not None) or ready != (self.cqs[0] is not None):
            raise S.SnapshotError("nvme: CSTS.RDY and the admin queues disagree")
        if not ready and any(q is not None for q in self.sqs + self.cqs):
            raise S.SnapshotError("nvme: I/O queues on a controller that is not ready")
        self.shadow = self._shadow(n["shadow"], ready)
        self.features = self._features(n["features"])
        self.thresholds = {}
        for i, t in enumerate(_list("thresholds", n["thresholds"])):
            tmpsel, thsel, value = _list(f"thresholds[{i}]", t, 3)
            if tmpsel not in (TMPSEL_COMPOSITE, TMPSEL_ALL):
                raise S.SnapshotError(f"nvme: thresholds[{i}]: TMPSEL {tmpsel!r:.20}")
            self.thresholds[(tmpsel, _int(f"thresholds[{i}] THSEL", thsel, 0, THSEL_UNDER))] = \
                _int(f"thresholds[{i}]", value, 0, 0xFFFF)
        self.irq_config = {}
        for i, t in enumerate(_list("irq_config", n["irq_config"])):
            iv, cd = _list(f"irq_config[{i}]", t, 2)
            if cd not in (0, IRQ_CD):
                raise S.SnapshotError(f"nvme: irq_config[{i}]: CD {cd!r:.20}")
            self.irq_config[_int(f"irq_config[{i}] vector", iv, 0, c.maxq)] = cd
        self.nsq, self.ncq = _int("nsq", n["nsq"], 1, c.maxq), _int("ncq", n["ncq"], 1, c.maxq)
        for q in self.sqs[1:]:
            if q is not None and q.qid > self.nsq:
                raise S.SnapshotError(f"nvme: submission queue {q.qid} beyond the {self.nsq} granted")
        for q in self.cqs[1:]:
            if q is not None and q.qid > self.ncq:
                raise S.SnapshotError(f"nvme: completion queue {q.qid} beyond the {self.ncq} granted")
        self.aers = [_int("aers", x, 0, 0xFFFF) for x in _list("aers", n["aers"])]
        if len(self.aers) > AERL + 1:
            raise S.SnapshotError(f"nvme: {len(self.aers)} Asynchronous Event Requests, at most {AERL + 1}")
        self.events = [tuple(_int("events", x, 0, 0xFF) for x in _list("events[]", e, 3))
                       for e in _list("events", n["events"])]
        self.masked = {_int("masked", x, 0, 7) for x in _list("masked", n["masked"])}
        self.error_entries = [self._error_entry(e) for e in _list("error_entries", n["error_entries"])]
        if len(self.error_entries) > ELPE + 1:
            raise S.SnapshotError(f"nvme: {len(self.error_entries)} error log entries, at most {ELPE + 1}")
        stats = _dict("stats", n["stats"], c.stats)
        self.stats = {k: _int(f"stats.{k}", stats[k], 0, (1 << 64) - 1) for k in c.stats}

    def _base(self, where, base, entries, entry_size):
        _int(f"{where} base", base, 0, R.QUEUE_BASE_MASK)
        if base & PAGE_MASK:
            raise S.SnapshotError(f"nvme: {where} base {base:#x} is not page aligned")
        return _view(self.c, where, base, entries * entry_size)

    def _size(self, where, qid, size):
        return _int(f"{where} size", size, 2, ADMIN_MAX_ENTRIES if qid == 0 else self.c.mqes + 1)

    def _saved_queues(self, kind, saved, keys, entry_size):
        """Each saved queue of ``kind`` checked for what every queue has: ``(qid, state, where, size, ring)``, or
        None where none was."""
        for i, s in enumerate(saved):
            if s is None:
                yield None
                continue
            where = f"{kind} queue {i}"
            _dict(where, s, keys)
            if s["qid"] != i:
                raise S.SnapshotError(f"nvme: {where} saved as queue {s['qid']!r:.20}")
            size = self._size(where, i, s["size"])
            yield i, s, where, size, self._base(where, s["base"], size, entry_size)

    def _cqs(self, saved):
        out = []
        for got in self._saved_queues("completion", saved, CQ_KEYS, R.CQE_SIZE):
            if got is None:
                out.append(None)
                continue
            i, s, where, size, ring = got
            q = CompletionQueue(i, s["base"], size, _bool(f"{where} IEN", s["ien"]),
                                _int(f"{where} vector", s["iv"], 0, self.c.maxq), ring)
            q.head = _int(f"{where} head", s["head"], 0, size - 1)
            q.tail = _int(f"{where} tail", s["tail"], 0, size - 1)
            q.phase = _int(f"{where} phase", s["phase"], 0, 1)
            q.stalled, q.posted = _bool(f"{where} stalled", s["stalled"]), _bool(f"{where} posted", s["posted"])
            if i == 0 and (not q.ien or q.iv):
                raise S.SnapshotError("nvme: the admin completion queue interrupts on vector 0")
            out.append(q)
        return out

    def _sqs(self, saved):
        out = []
        for got in self._saved_queues("submission", saved, SQ_KEYS, R.SQE_SIZE):
            if got is None:
                out.append(None)
                continue
            i, s, where, size, ring = got
            cqid = _int(f"{where} CQ", s["cqid"], 0, self.c.maxq)
            if (cqid == 0) != (i == 0) or self.cqs[cqid] is None:
                raise S.SnapshotError(f"nvme: {where} posts to completion queue {cqid}, which it cannot")
            q = SubmissionQueue(i, s["base"], size, cqid, ring, _int(f"{where} QPRIO", s["prio"], 0, 3))
            q.head = _int(f"{where} head", s["head"], 0, size - 1)
            q.tail = _int(f"{where} tail", s["tail"], 0, size - 1)
            if s["bad_tail"] is not None:
                _int(f"{where} bad_tail", s["bad_tail"], 0, 0xFFFFFFFF)
            q.bad_tail = s["bad_tail"]
            out.append(q)
        return out

    def _shadow(self, saved, ready):
        if saved is None:
            return None
        db, ei = _list("shadow", saved, 2)
        if not ready:
            raise S.SnapshotError("nvme: shadow doorbells on a controller that is not ready")
        for name, gpa in (("shadow doorbell page", db), ("EventIdx page", ei)):
            _int(name, gpa, 0, R.QUEUE_BASE_MASK)
            if gpa & PAGE_MASK:
                raise S.SnapshotError(f"nvme: {name} {gpa:#x} is not page aligned")
        return ShadowDoorbells(_view(self.c, "shadow doorbell page", db, R.PAGE_SIZE),
                               _view(self.c, "EventIdx page", ei, R.PAGE_SIZE), db, ei)

    def _features(self, saved):
        want = {str(k) for k in self.c.feature_defaults}
        if not isinstance(saved, dict) or set(saved) != want:
            raise S.SnapshotError(f"nvme: features {sorted(saved) if isinstance(saved, dict) else saved!r:.80}, "
                                  f"expected {sorted(want)}")
        return {int(k): _int(f"feature {k}", v, 0, 0xFFFFFFFF) for k, v in saved.items()}

    @staticmethod
    def _error_entry(e):
        _dict("an error log entry", e, ERROR_KEYS)
        if set(e) != set(ERROR_KEYS):
            raise S.SnapshotError(f"nvme: error log entry keys {sorted(e)!r:.80}")
        return {k: _int(f"error log {k}", e[k], 0, (1 << bits) - 1) for k, bits in ERROR_KEYS.items()}

    def apply(self):
        """Puts the state into the controller (a fresh one: nothing is sent to the host)."""
        c = self.c
        with c._lock:
            for k, v in self.regs.items():
                setattr(c, k, v)
            c.sqs, c.cqs, c.shadow = self.sqs, self.cqs, self.shadow
            c.features, c.thresholds, c.irq_config = self.features, self.thresholds, self.irq_config
            c.nsq, c.ncq = self.nsq, self.ncq
            with c._ev_lock:
                c._aers, c._events, c._masked = self.aers, self.events, self.masked
                c.error_entries, c.stats = self.error_entries, self.stats
