"""Snapshot and restore of a :class:`~bhyve_devices.vlapic.Vlapic` (issue 23; bhyve's ``vlapic_snapshot``, which
saves the APIC page, the timer's counting state and the callout's remaining time).

What is saved: the APIC ID, IA32_APIC_BASE (hardware enable and x2APIC mode), every writable register (TPR, LDR,
DFR, SVR (software enable), ESR and the errors collected since the last ESR write, ICR, the seven LVTs), the
256-bit ISR, IRR and TMR, the LINT0 input level and a pending ExtINT, and the timer (:meth:`ApicTimer.save_state`:
mode, initial count, DCR, running, the period's end and the armed callback's time, IA32_TSC_DEADLINE and owed
periodic ticks). The derived values (VER, PPR, CCR, the x2APIC LDR) follow from these. The configuration
(vCPU id, x2APIC offered, TSC-deadline offered) comes from the device the state goes into; a state that needs
more of it than it has (x2APIC mode without x2APIC offered, TSC-deadline mode without ``tsc_hz``, another
vCPU) raises :class:`SnapshotError`.
"""

from . import vlapic_regs as R
from .snapshot import SnapshotError, check, header, int_in, load_fields, save_fields

_REGS = {  # attribute: width in bits
    "apic_id": 32, "apicbase": 64, "tpr": 8, "ldr": 32, "dfr": 32, "svr": 32, "esr": 8, "esr_pending": 8,
    "icr_lo": 32, "icr_hi": 32, "irr": 256, "isr": 256, "tmr": 256,
}
_KEYS = ("vcpu_id", *_REGS, "lvt", "lint0_level", "extint", "timer")


def save(v):
    d = header(v)
    d.update(save_fields(v, ("vcpu_id", *_REGS, "lint0_level")))
    d["lvt"] = {R.REG_NAMES[off]: val for off, val in v.lvt.items()}
    d["extint"] = v._extint
    d["timer"] = v.timer.save_state()
    return d


def load(v, state, shift_ns):
    check(v, state, _KEYS)
    name = type(v).__name__
    if state["vcpu_id"] != v.vcpu_id:
        raise SnapshotError(f"{name}: state of vCPU {state['vcpu_id']!r} given to vCPU {v.vcpu_id}")
    lvt, timer = state["lvt"], state["timer"]
    want = {R.REG_NAMES[off] for off in R.LVT_OFFSETS}
    if not isinstance(lvt, dict) or set(lvt) != want or not isinstance(timer, dict):
        raise SnapshotError(f"{name}: the LVTs or the timer are not as saved")
    for k, bits in [*_REGS.items(), *((k, 32) for k in want)]:
        val = (lvt if k in want else state)[k]
        if not int_in(val, 0, (1 << bits) - 1):
            raise SnapshotError(f"{name}.{k}: {val!r:.40} is not a {bits}-bit register value")
    base = state["apicbase"]
    allowed = R.APICBASE_BSP | R.APICBASE_X2APIC | R.APICBASE_ENABLED | R.APICBASE_ADDR
    if (base & ~allowed or (base ^ v.apicbase) & (R.APICBASE_ADDR | R.APICBASE_BSP)
            or (base & R.APICBASE_X2APIC and not v.x2apic_allowed)):
        raise SnapshotError(f"{name}: APIC_BASE {base:#x} does not fit this vCPU's configuration")
    if (timer.get("mode") != (lvt["lvt_timer"] & R.TIMER_MODE_MASK) >> R.TIMER_MODE_SHIFT
            or state["svr"] & ~R.SVR_WRITABLE or not isinstance(state["lint0_level"], bool)
            or not isinstance(state["extint"], bool)):
        raise SnapshotError(f"{name}: the timer mode, SVR or LINT0 state is not one this APIC can hold")
    v.timer.load_state(timer, shift_ns)         # checks its values before it changes anything
    load_fields(v, state, (*_REGS, "lint0_level"))
    v._extint = state["extint"]
    v.lvt = {off: lvt[R.REG_NAMES[off]] for off in R.LVT_OFFSETS}
