"""KVM-only facts of the provider: the comm-page contract's cost (no system call for cached state), the
hardware kind, and the one-line errors for a host without a usable /dev/kvm."""

import errno

import pytest

from ops.nvmm import ProviderUnavailable
from ops.nvmm import constants as C
from ops.nvmm.kvm import provider as kvmprov
from ops.nvmm.kvm import vcpu as kvmvcpu
from ops.nvmm.kvm import vcpu_state as kvmstate
from tests.guests.asm import assemble, symbols
from tests.guests.harness import CODE, Guest


@pytest.fixture
def ioctl_counter(monkeypatch):
    calls = []
    real = kvmvcpu._IOCTL

    def counting(fd, req, *args):
        calls.append(req)
        return real(fd, req, *args)
    for mod in (kvmvcpu, kvmstate):      # the run path and the state cache each bind fcntl.ioctl
        monkeypatch.setattr(mod, "_IOCTL", counting)
    return calls


def test_cached_getstate_makes_no_syscall(kvm_provider, ioctl_counter):
    g = Guest(kvm_provider)
    try:
        g.load(CODE, assemble(".code64\nout %al, $0x98\nhlt\n", CODE))
        g.setup_long64(CODE, large=True)
        v = g.vcpu
        assert v.run().reason == C.NVMM_VCPU_EXIT_IO
        ioctl_counter.clear()
        cheap = C.NVMM_X64_STATE_GPRS | C.NVMM_X64_STATE_SEGS | C.NVMM_X64_STATE_CRS | C.NVMM_X64_STATE_INTR
        v.getstate(cheap)
        v.getstate(cheap)
        v.assist_io()
        v.setstate(C.NVMM_X64_STATE_GPRS)
        assert ioctl_counter == [], "getstate/setstate/assist after an exit must not enter the kernel"
        v.getstate(C.NVMM_X64_STATE_MSRS)          # STAR..TSC live outside kvm_sregs: one KVM_GET_MSRS
        assert len(ioctl_counter) == 1
        v.getstate(C.NVMM_X64_STATE_MSRS)
        assert len(ioctl_counter) == 1, "a second getstate of a cached category entered the kernel"
        assert v.run().reason == C.NVMM_VCPU_EXIT_HALTED
    finally:
        g.close()


def test_one_syscall_per_io_exit(kvm_provider, ioctl_counter):
    """Steady state: one KVM_RUN per port-I/O exit and nothing else (the assist reads kvm_run)."""
    g = Guest(kvm_provider)
    try:
        g.load(CODE, assemble(".code64\nmov $50, %ecx\n1: out %al, $0x98\ndec %ecx\njnz 1b\nhlt\n", CODE))
        g.setup_long64(CODE, large=True)
        v = g.vcpu
        assert v.run().reason == C.NVMM_VCPU_EXIT_IO     # first run commits state (uses ioctls)
        v.assist_io()
        v._install_fast_paths()                           # re-bind the fast path to the counting ioctl
        ioctl_counter.clear()
        exits = 0
        while v.run().reason == C.NVMM_VCPU_EXIT_IO:
            v.assist_io()
            exits += 1
        assert exits == 49
        assert len(ioctl_counter) == exits + 1            # + the run that ended in HLT
    finally:
        g.close()


def test_missing_dev_kvm_is_one_clear_line(monkeypatch):
    monkeypatch.setattr(kvmprov, "KVM_DEVICE", "/nonexistent/kvm")
    with pytest.raises(ProviderUnavailable) as err:
        kvmprov.KvmProvider()
    assert err.value.errno == errno.ENOENT
    assert "\n" not in str(err.value) and "/nonexistent/kvm" in str(err.value)


def test_hardware_kind_is_reported():
    assert kvmprov.hardware_kind() in ("kvm_intel", "kvm_amd", "kvm_pvm", "unknown")


def test_capability_declares_pvm_limits(kvm_provider):
    cap = kvm_provider.capability()
    assert cap.version == C.NVMM_KERN_VERSION and cap.state_size == 1008
    assert cap.arch.vcpu_conf_support & C.NVMM_CAP_ARCH_VCPU_CONF_CPUID
    if kvmprov.is_paravirtual():
        assert {"paging32", "irq-window-late"} <= cap.limits


def test_interrupt_after_an_io_exit_waits_for_the_completion(kvm_provider, ioctl_counter):
    """KVM finishes an exiting I/O (or MMIO, or MSR) instruction only at the next KVM_RUN; an interrupt queued
    before that was lost under nested SVM. The provider first completes the instruction (KVM_RUN with
    immediate_exit, no guest entry), then queues the interrupt, which the guest then takes after the IN."""
    from ops.nvmm.kvm import ioctls as K

    g = Guest(kvm_provider)
    try:
        src = ".code64\n.globl handler\nsti\nin $0x60, %al\n1: jmp 1b\nhandler:\nmov %rax, %rcx\nhlt\n"
        g.load(CODE, assemble(src, CODE))
        g.setup_long64(CODE, large=True)
        g.setup_idt64({0x40: symbols(src, CODE)["handler"]})
        g.io_in[0x60] = b"\x5a"
        v = g.vcpu
        assert v.run().reason == C.NVMM_VCPU_EXIT_IO
        v.assist_io()
        ioctl_counter.clear()
        v.event.set(C.NVMM_VCPU_EVENT_INTR, 0x40)
        v.inject()
        assert ioctl_counter[:2] == [K.KVM_RUN, K.KVM_INTERRUPT], ioctl_counter
        assert g.run().reason == C.NVMM_VCPU_EXIT_HALTED
        assert g.gpr(C.NVMM_X64_GPR_RCX) & 0xFF == 0x5A, "the IN completed before the handler ran"
        assert g.gpr(C.NVMM_X64_GPR_RIP) == symbols(src, CODE)["handler"] + 4
    finally:
        g.close()


def test_stop_signals_only_a_thread_inside_kvm_run(kvm_provider, monkeypatch):
    """A kick to a vCPU outside KVM_RUN sets immediate_exit and sends no signal (the signal interrupts
    whatever the thread is doing, and its handler runs on the main thread); inside KVM_RUN it signals."""
    import threading
    import time

    sent = []
    real_kill = kvmvcpu.signal.pthread_kill

    def kill(tid, sig):
        sent.append(tid)
        real_kill(tid, sig)
    monkeypatch.setattr(kvmvcpu.signal, "pthread_kill", kill)
    g = Guest(kvm_provider)
    try:
        g.load(CODE, assemble(".code64\nout %al, $0x98\n1: jmp 1b\n", CODE))
        g.setup_long64(CODE, large=True)
        v = g.vcpu
        out = {}

        def worker():
            out["first"] = v.run().reason
            ready.wait(10)
            out["second"] = v.run().reason
        ready = threading.Event()
        t = threading.Thread(target=worker)
        t.start()
        while "first" not in out and t.is_alive():
            time.sleep(0.01)
        v.stop()                                     # the worker waits outside KVM_RUN
        assert sent == []
        v.clear_stop()
        ready.set()
        time.sleep(0.3)
        assert t.is_alive() and "second" not in out  # the withdrawn stop did not end the spin
        v.stop()
        t.join(10)
        assert out == {"first": C.NVMM_VCPU_EXIT_IO, "second": C.NVMM_VCPU_EXIT_STOPPED} and len(sent) == 1
    finally:
        g.close()
