"""Exit traces: a provider wrapped so that every vCPU exit is written as one line, for comparing providers
(``vmmshim conformance --record/--diff``). A line holds the exit reason and the payload fields every provider
reports the same way (port, direction, size; the MMIO address and direction; the MSR and value; IF at HLT);
addresses of the next instruction are left out, since KVM reports them only as well as it can decode.

Not supported: recording the data the callbacks returned (traces are compared, not replayed).
"""

from . import constants as C


def describe(ex):
    r = ex.reason
    name = C.EXIT_NAMES.get(r, hex(r))
    if r == C.NVMM_VCPU_EXIT_IO:
        io = ex.io
        return f"{name} port={io.port:#x} in={int(io.in_)} size={io.operand_size}"
    if r == C.NVMM_VCPU_EXIT_MEMORY:
        mem = ex.mem
        return f"{name} gpa={mem.gpa:#x} write={int(bool(mem.prot & C.NVMM_PROT_WRITE))}"
    if r == C.NVMM_VCPU_EXIT_RDMSR:
        return f"{name} msr={ex.rdmsr.msr:#x}"
    if r == C.NVMM_VCPU_EXIT_WRMSR:
        return f"{name} msr={ex.wrmsr.msr:#x} val={ex.wrmsr.val:#x}"
    if r == C.NVMM_VCPU_EXIT_HALTED:
        return f"{name} if={int(bool(ex.exitstate.rflags & C.RFLAGS_IF))}"
    return name


class _Proxy:
    def __init__(self, target):
        object.__setattr__(self, "_t", target)

    def __getattr__(self, name):
        return getattr(self._t, name)

    def __setattr__(self, name, value):
        setattr(self._t, name, value)


class TracingVcpu(_Proxy):
    def __init__(self, vcpu, sink):
        super().__init__(vcpu)
        object.__setattr__(self, "_sink", sink)

    def run(self):
        ex = self._t.run()
        self._sink.write(f"cpu{self._t.cpuid} {describe(ex)}\n")
        return ex


class TracingMachine(_Proxy):
    def __init__(self, machine, sink):
        super().__init__(machine)
        object.__setattr__(self, "_sink", sink)

    def vcpu_create(self, cpuid):
        return TracingVcpu(self._t.vcpu_create(cpuid), self._sink)


class TracingProvider(_Proxy):
    """``provider`` with every machine it creates traced into ``sink`` (a text file)."""

    def __init__(self, provider, sink):
        super().__init__(provider)
        object.__setattr__(self, "_sink", sink)

    def machine_create(self):
        return TracingMachine(self._t.machine_create(), self._sink)
