"""A test double of the ops layer: every call of ``ops.vmm_api.VmmApi`` (the table's sixteen members and the calls
beyond it), each recorded in ``calls`` and answering what an empty VM would. A call the Protocol does not declare
is an ``AttributeError``, so a VM test fails when ``vmmshim/`` makes an undeclared call."""

from ops.vmm_api import VMM_API_CALLS
from ops.vmm_ops import VMM_OPS_MEMBERS


class RecordingOps:
    def __init__(self):
        self.calls = []
        self.regs = {}

    def vm_init(self, spec):
        self.calls.append(("vm_init", spec))
        return "vmi"

    def vmsetreg(self, vmi, vcpu, num, val):
        self.regs[(vcpu, num)] = val
        self.calls.append(("vmsetreg", vcpu, num, val))

    def vm_features(self, vmi):
        return frozenset()

    def vcpu_stats(self, vmi, vcpu):
        return {"exits": {}, "answered_io": 0, "bus_mmio": 0}

    def vcpu_failure(self, vmi, vcpu, exit_reason):
        return f"vcpu{vcpu}: the CPU could not run the guest (hardware exit reason {exit_reason:#x})"

    def vm_atpic_ranges(self, vmi):
        return []

    def vm_debug_state(self, vmi):
        return []


def _recorder(name):
    def record(self, vmi, *args):
        self.calls.append((name,) + args)
    record.__name__ = name
    return record


for _name in VMM_OPS_MEMBERS + VMM_API_CALLS:
    if _name not in RecordingOps.__dict__:
        setattr(RecordingOps, _name, _recorder(_name))
