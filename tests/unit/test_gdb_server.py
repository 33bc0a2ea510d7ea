"""The GDB stub's all-stop bookkeeping (``vmmshim/gdb/server.py``) over a stand-in VM: two vCPUs stopped by
debug-register breakpoints at once give two stop replies, the second at the next ``c`` with nothing resumed; a
step of one vCPU (gdb stepping over its breakpoint) runs while the other's stop waits and is reported first; the
breakpoint a match names is the one in its slot when it matched."""

import threading
import time
from types import SimpleNamespace

from ops.vmm_ops import VmExitCode as E
from vmmshim.gdb.server import GdbStub
from vmmshim.gdb.target import Z_HARD, Z_WRITE

WAIT_S = 5.0
F, DATA = 0x100074, 0x200000


class FakeOps:
    """What the stub calls, recorded; every provider debug feature offered."""

    def __init__(self):
        self.calls = []

    def vm_features(self, vmi):
        return {"debug-step", "debug-bp", "debug-hw", "debug-watch"}

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args[1:]))


class Alive:
    @staticmethod
    def is_alive():
        return True


def make_stub():
    vm = SimpleNamespace(ops=FakeOps(), vmi=None, config=SimpleNamespace(ncpus=2), threads={0: Alive(), 1: Alive()})
    stub = GdbStub(vm, "127.0.0.1", 0, log=lambda msg: None)
    stub.conn = object()                     # as if gdb were attached
    return stub, vm.ops


def exit_in_thread(stub, vcpu, code, dr6=0):
    """``vcpu_exit`` on a thread of its own, as a vCPU's, once it parked; returns the thread (it ends when gdb
    lets the vCPU run)."""
    vmexit = SimpleNamespace(exitcode=code, rip=F, u=SimpleNamespace(dr6=dr6))
    t = threading.Thread(target=stub.vcpu_exit, args=(vcpu, vmexit), daemon=True)
    t.start()
    end = time.monotonic() + WAIT_S
    while vcpu not in stub.parked and time.monotonic() < end:
        time.sleep(0.01)
    return t


def next_stop(stub):
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        reply = stub._next_stop()
        if reply is not None:
            return reply
        time.sleep(0.01)
    raise AssertionError("no stop reply")


def resumed(ops):
    return [c for c in ops.calls if c[0] == "vm_resume_cpu"]


def test_two_breakpoint_stops_at_once_are_both_reported():
    stub, ops = make_stub()
    try:
        stub.target.insert_hw(stub.vcpus, Z_HARD, F, 1)
        threads = [exit_in_thread(stub, v, E.VM_EXITCODE_DB, 1) for v in (1, 0)]
        assert next_stop(stub) == "T05hwbreak:;thread:2;"
        assert stub._resume(0, False, "") is None and not resumed(ops)     # c: the pending stop, nothing runs
        assert next_stop(stub) == "T05hwbreak:;thread:1;"
        assert stub._resume(0, False, "") is None and resumed(ops) == [("vm_resume_cpu", -1)]
        for t in threads:
            t.join(WAIT_S)
            assert not t.is_alive()
    finally:
        stub.close()


def test_a_step_runs_while_another_stop_waits_and_is_reported_first():
    stub, ops = make_stub()
    try:
        stub.target.insert_hw(stub.vcpus, Z_WRITE, DATA, 4)
        stub.target.insert_hw(stub.vcpus, Z_HARD, F, 1)
        first = exit_in_thread(stub, 1, E.VM_EXITCODE_DB, 1 << 1)
        other = exit_in_thread(stub, 0, E.VM_EXITCODE_DB, 1 << 0)     # the watchpoint
        assert next_stop(stub) == "T05hwbreak:;thread:2;"
        stub.target.remove_hw(stub.vcpus, Z_WRITE, DATA, 4)      # gdb moves F's breakpoint to slot 0 meanwhile
        assert stub._resume(1, True, "") is None and resumed(ops) == [("vm_resume_cpu", 1)]    # the step runs
        first.join(WAIT_S)
        assert not first.is_alive()
        stepped = exit_in_thread(stub, 1, E.VM_EXITCODE_MTRAP)
        assert next_stop(stub) == "T05thread:2;"
        assert stub._resume(0, False, "") is None and len(resumed(ops)) == 1
        assert next_stop(stub) == f"T05watch:{DATA:x};thread:1;"    # vCPU 0's match, as it was when it hit
        stub._resume(0, False, "")
        for t in (other, stepped):
            t.join(WAIT_S)
            assert not t.is_alive()
    finally:
        stub.close()
