"""The kernel side of a checkpoint (issue 23; bhyve's ``vm_snapshot_req`` of ``vmm_snapshot.c``, what bhyve writes
to its ``.kern`` file): per vCPU the NVMM state (``struct nvmm_x64_state``, every category: segments, GPRs, CRs,
DRs, MSRs with the TSC, interrupt state, FXSAVE), the engine's flags around it (a pending NMI, a HLT the
checkpoint's hold interrupted, started or waiting for its SIPI), the MSRs the ops layer keeps (IA32_TSC_ADJUST,
IA32_SPEC_CTRL, the kvmclock and PV EOI MSRs, read from the provider where it answers them itself), the vlapic;
for the VM the vioapic, the 8259 pair, the APIC bus and the paravirtual clock's time (KVM_GET_CLOCK where KVM
keeps kvmclock, else ``ops/pvclock.py``'s system time), which a restore sets again, so the guest's kvmclock goes
on from where it stood, on any provider. Everything is JSON (the state bytes as hex), in the provider-neutral
layout every provider reads and writes, so a checkpoint taken on one provider restores on another.

Taken only at the quiet point: every started vCPU held before its next entry (``vm_suspend_cpu``), so no exit is
half handled. An event already injected for that entry and not yet delivered (a run a kick stopped before the
guest ran: an interrupt the vlapic has already moved to its ISR, an exception, an NMI) is saved as the provider
names it (``Vcpu.queued_event``, like ``kvm_vcpu_events`` in QEMU's migration or the VMCS entry field in bhyve's)
and injected again by the restore; where the provider cannot name it (NVMM keeps it in the VMCB, its state holds
only the "event pending" bit) :func:`snapshot_vm` raises ``SnapshotError`` naming the vCPU, and the checkpoint
fails with one line while the VM runs on.

Restore writes the state into a VM built from the same configuration, before any vCPU ran: the NVMM state is set
whole (the provider converts it), the MSRs the ops layer answers are written again through its own MSR path (so
kvmclock's record and PV EOI's word are mapped again where the guest put them), and the devices take their
states with ``shift_ns``. The guest's TSC is the saved one where the provider can set it (a provider with the
``tsc-write`` limit, kvm_pvm, keeps its own: the guest's TSC then jumps ahead by the time the checkpoint waited).

Not supported: the XSAVE state beyond FXSAVE (AVX registers; NVMM's layout has none), an event queued on the
libnvmm provider, a software interrupt KVM is re-delivering.
"""

import time

from bhyve_devices.snapshot import SnapshotError, b2s, s2b

from .kvm_para import MSR_KVM_PV_EOI_EN
from .nvmm import constants as C
from .nvmm.state import STATE_SIZE
from .nvmm.x86 import msr_policy as P
from .pvclock import MSRS as PVCLOCK_MSRS

SNAPSHOT_VERSION = 1
_FLAGS = ("nmi", "cr8", "started", "halted_if_clear")
TSC_ADJUST = "tsc_adjust"       # saved as a value, not written as the MSR (that would move the restored TSC)


def _vlapic(ctx):
    """The vlapic's state, with a TSC-deadline tick the KVM provider's ticker took and left to Python fired first
    (the timer thread, held off by the checkpoint, has not), and the ticker held off while it is read."""
    vl, dl = ctx.vlapic, ctx.tsc_deadline
    if vl is None:
        return None
    if dl is None:
        return vl.snapshot()
    with dl.paused():
        if dl.expire():
            vl.on_deadline()
        return vl.snapshot()


def snapshot_vm(vm):
    """The engine ``vm``'s kernel state as JSON values (see the module docstring)."""
    vcpus = {}
    for vid, ctx in sorted(vm.vcpus.items()):
        if ctx.spinups:
            raise SnapshotError(f"vcpu{vid}: an AP start-up is in flight")
        nv = ctx.nv
        nv.getstate(C.NVMM_X64_STATE_ALL)
        try:
            event = nv.queued_event()
        except OSError as exc:
            raise SnapshotError(f"vcpu{vid}: {exc.strerror}") from None
        msrs = _kept_msrs(ctx)
        if vm.kernel_clock:                 # the provider answers the clock MSRs: ask it for their values
            msrs += [[m, v] for m, v in zip(PVCLOCK_MSRS, nv.get_msrs(list(PVCLOCK_MSRS))) if v]
        st = {"state": b2s(nv.state.buf), "hlt_held": list(ctx.hlt_held) if ctx.hlt_held else None,
              "msrs": msrs, "vlapic": _vlapic(ctx), "event": list(event) if event is not None else None}
        st.update({k: getattr(ctx, k) for k in _FLAGS})
        vcpus[str(vid)] = st
    clock = vm.machine.kernel_clock() if vm.kernel_clock else time.monotonic_ns() - vm.clock_epoch_ns
    return {"version": SNAPSHOT_VERSION, "vcpus": vcpus, "vioapic": vm.vioapic.snapshot(),
            "vatpic": vm.vatpic.snapshot(), "apicbus": vm.apicbus.snapshot(), "pv_clock_ns": clock}


def _kept_msrs(ctx):
    """``[[msr, value], ...]`` the ops layer answers for this vCPU, in the order a restore writes them again."""
    out = []
    arch = getattr(ctx, "arch_msrs", None)
    if arch is not None:
        out += [[P.MSR_SPEC_CTRL, arch.spec_ctrl]] if arch.spec_ctrl else []
        out += [[TSC_ADJUST, arch.tsc_adjust]] if arch.tsc_adjust else []
    if ctx.pvclock is not None:
        out += [[msr, v] for msr, v in sorted(ctx.pvclock.msr_value.items()) if v]
    if ctx.pv_eoi is not None:
        ctx.pv_eoi.sync()                   # not armed in the saved memory: the restored vCPU starts disarmed
        out += [[MSR_KVM_PV_EOI_EN, ctx.pv_eoi.msr_value]] if ctx.pv_eoi.msr_value else []
    return out


def restore_vm(vm, state, shift_ns):
    """Puts ``state`` (from :func:`snapshot_vm`) into the engine ``vm``, built from the same configuration and not
    yet run. SnapshotError names what does not fit."""
    if not isinstance(state, dict) or state.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(f"kernel state version {state.get('version') if isinstance(state, dict) else None}, "
                            f"this is version {SNAPSHOT_VERSION}")
    vcpus = state.get("vcpus")
    if not isinstance(vcpus, dict) or sorted(map(int, vcpus)) != sorted(vm.vcpus):
        raise SnapshotError(f"the checkpoint has vCPUs {sorted(vcpus or {})}, the VM {sorted(vm.vcpus)}")
    clock = state.get("pv_clock_ns")
    if not isinstance(clock, int) or clock < 0:
        raise SnapshotError(f"the paravirtual clock's time {clock!r} is not a time")
    if vm.kernel_clock:
        vm.machine.kernel_clock(clock)
    else:                                   # ops/pvclock.py's system time goes on from the saved time
        vm.clock_epoch_ns = time.monotonic_ns() - clock
        for ctx in vm.vcpus.values():
            if ctx.pvclock is not None:
                ctx.pvclock.epoch_ns = vm.clock_epoch_ns
    vm.apicbus.restore(state["apicbus"], shift_ns)
    vm.vioapic.restore(state["vioapic"], shift_ns)
    vm.vatpic.restore(state["vatpic"], shift_ns)
    for vid, ctx in sorted(vm.vcpus.items()):
        st = vcpus[str(vid)]
        nv = ctx.nv
        nv.state.buf[:] = s2b(st["state"], STATE_SIZE)
        nv.setstate(C.NVMM_X64_STATE_ALL)
        for k in _FLAGS:
            setattr(ctx, k, st[k])
        ctx.hlt_held = tuple(st["hlt_held"]) if st["hlt_held"] else None
        if ctx.vlapic is not None:
            if st["vlapic"] is None:
                raise SnapshotError(f"vcpu{vid}: the checkpoint has no vlapic state")
            ctx.vlapic.restore(st["vlapic"], shift_ns)
        for msr, value in st["msrs"]:
            if msr == TSC_ADJUST:
                vm.kernel_msr(ctx, P.MSR_TSC_ADJUST)                      # creates the vCPU's ArchMsrs
                ctx.arch_msrs.tsc_adjust = value                         # the TSC itself is in the state
            elif msr in PVCLOCK_MSRS and vm.kernel_clock:
                nv.set_msrs([(msr, value)])
            else:
                handled, _ = vm.kernel_msr(ctx, msr, value)
                if not handled:
                    raise SnapshotError(f"vcpu{vid}: MSR {msr:#x} is not kept by the ops layer here")
        _requeue(ctx, vid, st.get("event"))
        ctx.pending = True


def _requeue(ctx, vid, event):
    """Injects again the event the checkpoint found queued (``[type, vector, error]``) for the first entry, which
    then takes no other (``event_queued``)."""
    if event is None:
        return
    if not (isinstance(event, list) and len(event) == 3 and event[0] in (C.NVMM_VCPU_EVENT_EXCP,
                                                                         C.NVMM_VCPU_EVENT_INTR)
            and isinstance(event[1], int) and 0 <= event[1] < 256 and (event[2] is None or isinstance(event[2], int))):
        raise SnapshotError(f"vcpu{vid}: the queued event {event!r} is not an event")
    ctx.nv.event.set(event[0], event[1], event[2] or 0)
    try:
        ctx.nv.inject()
    except OSError as exc:
        raise SnapshotError(f"vcpu{vid}: the queued event cannot be injected again: {exc.strerror}") from None
    ctx.event_queued = True
