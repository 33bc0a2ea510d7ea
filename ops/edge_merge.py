"""Whether an ISA edge that merged with a still-pending request was declined by the guest or held up by the host
(issue 24, item 5). The PIT sends a merged edge again (``bhyve_devices/vatpit.py``); that is right when the host
kept the vCPU off the CPU (QEMU's and KVM's reinjection: the guest would have taken the tick had it run), and wrong
when the guest ran with interrupts off, where a PC's 8259 and I/O APIC merge the edges and the ticks are gone
(Intel 8259A datasheet, "Interrupt Request Register"; the I/O APIC's and LAPIC's IRR: SDM 10.8.4). Linux relies on
the latter: without ACPI it calibrates its APIC timer with interrupts off for about 100 ms, then counts jiffies
against the fresh timer; re-sent ticks from the calibration would land in that count and fail its verification.

The judge counts the vCPU's exits since the pending edge was raised. Every entry into the guest looks at what is
pending first and injects it when the guest can take it (``Vm.before_entry``), so a request still pending after
:data:`DECLINED_EXITS` exits met the guest unable to take it at each of those entries (interrupts off, or a
higher priority in service): the guest declined it, and the merged edge is lost, as on hardware. Fewer exits
means the host did not run the vCPU: the edge goes out again. A vCPU not started counts as held up.

Why exits and not time: a first version counted the vCPU thread's CPU time (2 ms declined). Natively that is
far above an exit's cost, but in the nested lab's TCG L1 handling one kick exit takes milliseconds of Python, so
with three idle-class CPU hogs in L1 an MP-table boot judged ticks the guest took at once as declined and lost
them (jiffies delta 18 and 21, verification failures). An exit count does not depend on how fast the host is.

Not supported: ISA edges are judged by the BSP, where the 8259's INTR goes (LINT0) and where the PIT's IRQ0 goes on
the kernels we boot; an I/O APIC entry routing the pin to another vCPU is judged by the BSP as well. Entries the
KVM provider's compiled run loop makes without returning to Python (answered port reads) are not counted, which
can only make an edge look held up (sent again).
"""

DECLINED_EXITS = 3      # exits with the request pending: the guest could not take it at any of those entries


class EdgeJudge:
    """Per ISA IRQ: the judging vCPU's exit count when its pending edge was raised. ``progress()`` gives that
    vCPU's exits so far (None while it has none to give)."""

    def __init__(self, progress, threshold=DECLINED_EXITS):
        self._progress = progress
        self.threshold = threshold
        self._raised = {}
        self.declined = 0           # merged edges judged declined by the guest (lost, as on hardware)
        self.held_up = 0            # merged edges judged held up by the host (sent again by their source)

    def raised(self, irq):
        """An edge on ``irq`` reached the controller as a new request."""
        self._raised[irq] = self._progress()

    def merged(self, irq):
        """An edge on ``irq`` merged with the pending one: True when the guest declined it (report it delivered:
        it is lost), False when the host held the vCPU up (report it merged: its source sends it again)."""
        then, now = self._raised.get(irq), self._progress()
        if then is not None and now is not None and now - then >= self.threshold:
            self.declined += 1
            return True
        self.held_up += 1
        return False
