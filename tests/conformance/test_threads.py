"""vCPUs in threads: two vCPUs running at once, and ``stop()`` of a vCPU spinning in the guest."""

import threading
import time

from ops.nvmm import constants as C
from tests.guests.asm import assemble
from tests.guests.harness import CODE

SPIN = 0x3000 + 0x7000     # a second code page for the other vCPU, away from the page tables


def test_two_vcpus_in_two_threads(guest_factory):
    g = guest_factory(vcpus=2)
    loop = ".code64\nmov $300, %ecx\n1: out %al, (%dx)\ndec %ecx\njnz 1b\nhlt\n"
    g.load(CODE, assemble(loop, CODE))
    g.build_identity_paging(large=True)
    for v in g.vcpus:
        g.setup_long64(CODE, vcpu=v, build=False)
        v.getstate(C.NVMM_X64_STATE_GPRS)
        v.state.gprs[C.NVMM_X64_GPR_RDX] = 0x500 + v.cpuid
        v.setstate(C.NVMM_X64_STATE_GPRS)
    results, errors = {}, []

    def worker(v):
        try:
            results[v.cpuid] = g.run(vcpu=v).reason
        except Exception as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)
    threads = [threading.Thread(target=worker, args=(v,)) for v in g.vcpus]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert results == {0: C.NVMM_VCPU_EXIT_HALTED, 1: C.NVMM_VCPU_EXIT_HALTED}
    for cpu in (0, 1):
        assert sum(1 for p, _, _ in g.io_log if p == 0x500 + cpu) == 300


def test_stop_interrupts_a_spinning_guest(guest_factory):
    g = guest_factory()
    g.load(CODE, assemble(".code64\n1: jmp 1b\n", CODE))
    g.setup_long64(CODE, large=True)
    v = g.vcpu
    out = {}

    def worker():
        t0 = time.monotonic()
        out["reason"] = v.run().reason
        out["elapsed"] = time.monotonic() - t0
    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.3)
    assert t.is_alive(), "the spinning guest returned on its own"
    v.stop()
    t.join(10)
    assert not t.is_alive(), "stop() did not interrupt the running guest"
    assert out["reason"] == C.NVMM_VCPU_EXIT_STOPPED
    # the vCPU is usable afterwards: stop before run gives STOPPED at once, then the guest runs again
    v.stop()
    assert v.run().reason == C.NVMM_VCPU_EXIT_STOPPED


def test_clear_stop_withdraws_a_stop_not_yet_delivered(guest_factory):
    """The ops layer withdraws a kick's stop when it is about to look at what the kick was for; a stop after
    that is kept."""
    g = guest_factory()
    g.load(CODE, assemble(".code64\nout %al, (%dx)\nout %al, (%dx)\nhlt\n", CODE))
    g.setup_long64(CODE, large=True)
    v = g.vcpu
    v.stop()
    v.clear_stop()
    assert v.run().reason == C.NVMM_VCPU_EXIT_IO
    v.assist_io()
    v.stop()
    assert v.run().reason == C.NVMM_VCPU_EXIT_STOPPED
    assert v.run().reason == C.NVMM_VCPU_EXIT_IO
