"""Catching up on the ticks of a periodic timer whose callbacks ran late: how many to keep and how far apart to
send them. Shared by the 8254's channel 0 (``vatpit``) and the local APIC timer's periodic mode (``vlapic_timer``).

The ticks that passed while the timer thread slept go out one by one, period / (backlog + 1) apart as QEMU's RTC
slew spaces its reinjections (2 to 8 a period), but at least 1 ms apart (half a period at most), so each can reach
the guest through a controller that holds one pending request per line. Ticks over a second late (a stopped VM, a
host asleep) are dropped rather than sent in a burst.

Not supported: any other policy (QEMU's back-to-back firing, bhyve's restart from now).
"""

NS_PER_S = 1_000_000_000
CATCHUP_DIVISIONS = 8           # late ticks go out 2 to 8 per period (QEMU's RTC slew: period / (backlog + 1))
CATCHUP_MIN_NS = 1_000_000      # ... and at least 1 ms apart (half a period at most), so the guest takes each
BACKLOG_LIMIT_NS = NS_PER_S     # ticks later than one second are dropped rather than sent in a burst


def backlog_limit(period_ns):
    """The most late ticks kept for a timer of this period (one second of them, at least one)."""
    return max(1, BACKLOG_LIMIT_NS // period_ns)


def catchup_delay(period_ns, backlog, merged=False):
    """How long after this tick to send the next of ``backlog`` late ones; ``merged``: this one merged with a
    request the guest has not taken yet, so the next waits half a period (sooner would not help it)."""
    spacing = period_ns // 2 if merged else period_ns // (min(backlog, CATCHUP_DIVISIONS - 1) + 1)
    return max(spacing, min(CATCHUP_MIN_NS, period_ns // 2))
