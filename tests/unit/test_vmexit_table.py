"""The VM's exit-handler table (bhyve ``vmexit.c``) fed fabricated ``vm_exit``s over a recording ops layer (a
``VmmApi`` double, ``recording_ops.py``): pure logic, no hypervisor (the same paths run on KVM in
tests/conformance/test_vmm_ops.py)."""

import pytest

from ops.vmm_ops import (Msr, SpinupAp, Suspended, VmExit, VmExitCode as E, VmRegName as R,
                         VmSuspendHow, Vmx)
from vmmshim import vm as vmmod

from .recording_ops import RecordingOps


@pytest.fixture
def vm(monkeypatch):
    monkeypatch.setattr(vmmod, "HostMemory", lambda size, path=None: type("M", (), {"addr": 0, "size": size})())
    v = vmmod.VM(RecordingOps(), vmmod.VmConfig(ncpus=2, memsize=1 << 20))
    started = []
    monkeypatch.setattr(v, "_start_vcpu", lambda vcpu, rip: started.append((vcpu, rip)))
    v.started = started
    yield v
    v.timers.close()


def fabricated(code, u=None, rip=0x1000, inst_length=0):
    ex = VmExit()
    ex.exitcode, ex.u, ex.rip, ex.inst_length = code, u, rip, inst_length
    return ex


def test_the_table_has_only_what_bhyve_vmexit_keeps(vm):
    """Port and MMIO exits are completed in the ops layer; the VM's table holds what bhyve's ``vmexit.c`` keeps."""
    assert set(vm.handlers) == {E.VM_EXITCODE_RDMSR, E.VM_EXITCODE_WRMSR, E.VM_EXITCODE_SPINUP_AP,
                                E.VM_EXITCODE_SUSPENDED, E.VM_EXITCODE_HLT, E.VM_EXITCODE_VMX,
                                E.VM_EXITCODE_BOGUS, E.VM_EXITCODE_DEBUG, E.VM_EXITCODE_BPT, E.VM_EXITCODE_MTRAP,
                                E.VM_EXITCODE_DB}      # bhyve's vmexit_debug, _breakpoint, _mtrap, _db: the GDB stub's


def test_debug_exits_without_a_debugger_run_on(vm):
    for code in (E.VM_EXITCODE_DEBUG, E.VM_EXITCODE_BPT, E.VM_EXITCODE_MTRAP, E.VM_EXITCODE_DB):
        assert vm.handlers[code](0, fabricated(code)) == vmmod.CONTINUE


def test_known_msr_read_completes_with_value_and_rip(vm):
    assert vm.handlers[E.VM_EXITCODE_RDMSR](1, fabricated(E.VM_EXITCODE_RDMSR, Msr(0x1A0), 0x2000, 2)) == \
        vmmod.CONTINUE
    assert vm.ops.regs[(1, R.VM_REG_GUEST_RAX)] == 1 and vm.ops.regs[(1, R.VM_REG_GUEST_RDX)] == 0
    assert vm.ops.regs[(1, R.VM_REG_GUEST_RIP)] == 0x2002


@pytest.mark.parametrize("ignore", [False, True])
def test_unknown_msr_gp_unless_ignored(monkeypatch, ignore):
    monkeypatch.setattr(vmmod, "HostMemory", lambda size, path=None: type("M", (), {"addr": 0, "size": size})())
    v = vmmod.VM(RecordingOps(), vmmod.VmConfig(memsize=1 << 20, ignore_msrs=ignore))
    try:
        v.handlers[E.VM_EXITCODE_RDMSR](0, fabricated(E.VM_EXITCODE_RDMSR, Msr(0x4B564D99), 0x3000, 2))
        v.handlers[E.VM_EXITCODE_WRMSR](0, fabricated(E.VM_EXITCODE_WRMSR, Msr(0x4B564D99, 5), 0x3002, 2))
        injected = [c for c in v.ops.calls if c[0] == "vm_inject_exception"]
        if ignore:
            assert injected == [] and v.ops.regs[(0, R.VM_REG_GUEST_RIP)] == 0x3004
            assert v.ops.regs[(0, R.VM_REG_GUEST_RAX)] == 0
        else:
            assert injected == [("vm_inject_exception", 0, 13, 0)] * 2
            assert (0, R.VM_REG_GUEST_RIP) not in v.ops.regs
    finally:
        v.timers.close()


def test_spinup_ap_starts_the_thread_once(vm):
    ex = fabricated(E.VM_EXITCODE_SPINUP_AP, SpinupAp(1, 0x8000))
    assert vm.handlers[E.VM_EXITCODE_SPINUP_AP](0, ex) == vmmod.CONTINUE
    assert vm.started == [(1, 0)]
    assert vm.ops.regs[(1, R.VM_REG_GUEST_CS)] == 0x800
    vm.threads[1] = object()
    vm.handlers[E.VM_EXITCODE_SPINUP_AP](0, ex)
    vm.handlers[E.VM_EXITCODE_SPINUP_AP](0, fabricated(E.VM_EXITCODE_SPINUP_AP, SpinupAp(7, 0x8000)))
    assert vm.started == [(1, 0)], "a second SIPI or a vCPU that does not exist starts nothing"


@pytest.mark.parametrize("how,status", [(VmSuspendHow.VM_SUSPEND_RESET, 0), (VmSuspendHow.VM_SUSPEND_POWEROFF, 1),
                                        (VmSuspendHow.VM_SUSPEND_HALT, 2),
                                        (VmSuspendHow.VM_SUSPEND_TRIPLEFAULT, 3)])
def test_suspended_maps_to_bhyve_exit_status(vm, how, status):
    assert vm.handlers[E.VM_EXITCODE_SUSPENDED](0, fabricated(E.VM_EXITCODE_SUSPENDED, Suspended(how))) == \
        vmmod.ABORT
    assert vm.status == status


def test_invalid_guest_state_is_an_error_with_a_message(vm):
    assert vm.handlers[E.VM_EXITCODE_VMX](0, fabricated(E.VM_EXITCODE_VMX, Vmx(0, 33))) == vmmod.ABORT
    assert vm.status == vmmod.EXIT_ERROR and "could not run the guest" in vm.error
    assert "hardware exit reason 0x21" in vm.error and "<vm_exit" not in vm.error


def test_first_stop_wins(vm):
    vm.stop(vmmod.EXIT_POWEROFF)
    vm.stop(vmmod.EXIT_ERROR, "late")
    assert vm.status == vmmod.EXIT_POWEROFF and vm.error is None
