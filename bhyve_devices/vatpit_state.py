"""The 8254's snapshot and restore (``snapshot.py``'s protocol), called by :class:`vatpit.PIT8254` with its
lock held.

Saved per channel: the programming (``mode``, ``rw``, ``bcd``), the gate, the count loaded (``initial``), when
counting started (``load_ns``, a timer-service time) and the ticks counted before a gate stop (``frozen_ticks``),
``triggered`` and ``null_count``, the write and read flip-flops (``wlow``, ``rflip``, ``rlatched_msb``), a count
latch still to be read (``latch``, its bytes) and a latched status byte, channel 0's periodic state (``step``,
``next_edge``) and its armed IRQ0 timer as its deadline. Restored, ``load_ns`` and the deadline move by
``shift_ns``: a read at the same guest-relative time returns the same count and the next IRQ0 edge (a catch-up
pulse too) comes at its shifted time, the later ones on the same grid. The PIT's speaker bit and its debugging
counters (``pulses``, ``merged``, ``dropped``) are saved too.
"""

from .snapshot import SnapshotError, check, header, load_fields, save_fields, shifted

_INTS = ("mode", "rw", "initial", "frozen_ticks", "step", "next_edge")
_BOOLS = ("bcd", "gate", "triggered", "null_count", "rflip")
_OPTS = ("load_ns", "wlow", "rlatched_msb", "status")
_KEYS = _INTS + _BOOLS + _OPTS + ("latch", "deadline")


def snapshot(pit):
    chans = []
    for c in pit.channels:
        d = save_fields(c, _INTS + _BOOLS + _OPTS)
        d["latch"] = list(c.latch) if c.latch else None
        d["deadline"] = c.deadline if c.timer is not None else None
        chans.append(d)
    return {**header(pit), "channels": chans, "speaker": pit.speaker, "pulses": pit.pulses, "merged": pit.merged,
            "dropped": pit.dropped}


def _byte(v):
    return isinstance(v, int) and 0 <= v <= 0xFF


def _load_channel(c, s):
    name = f"PIT8254 channel {c.index}"
    if not isinstance(s, dict):
        raise SnapshotError(f"{name}: the state is not a mapping")
    missing = [k for k in _KEYS if k not in s]
    if missing:
        raise SnapshotError(f"{name}: the state has no {', '.join(missing)}")
    load_fields(c, s, _INTS, (int,))
    load_fields(c, s, _BOOLS, (bool,))
    load_fields(c, s, _OPTS, (int, type(None)))
    latch, deadline = s["latch"], s["deadline"]
    ok = (0 <= c.mode <= 5 and 0 <= c.rw <= 3 and 0 <= c.initial <= 65536
          and min(c.frozen_ticks, c.step, c.next_edge) >= 0
          and all(v is None or _byte(v) for v in (c.wlow, c.rlatched_msb, c.status))
          and (latch is None or isinstance(latch, list) and 1 <= len(latch) <= 2 and all(map(_byte, latch)))
          and (deadline is None or isinstance(deadline, int) and (c.mode not in (2, 3) or c.step > 0)))
    if not ok:
        raise SnapshotError(f"{name}: a field is out of range")
    c.latch = list(latch) if latch else None


def restore(pit, state, shift_ns):
    check(pit, state, ("channels", "speaker", "pulses", "merged", "dropped"))
    chans = state["channels"]
    if not isinstance(chans, list) or len(chans) != len(pit.channels):
        raise SnapshotError("PIT8254: the channels are not a list of three")
    for c, s in zip(pit.channels, chans):
        pit._cancel(c)
        _load_channel(c, s)
    load_fields(pit, state, ("speaker",), (bool,))
    load_fields(pit, state, ("pulses", "merged", "dropped"), (int,))
    for c, s in zip(pit.channels, chans):
        c.load_ns = shifted(c.load_ns, shift_ns)
        if s["deadline"] is not None:
            pit._set_timer(c, s["deadline"] + shift_ns)
