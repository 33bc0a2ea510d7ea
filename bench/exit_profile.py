"""Where a vmmshim run's vCPU time goes, exit by exit, on the KVM provider:
``python3 -m bench.exit_profile [--out FILE] -- <vmmshim arguments>``.

Runs vmmshim in this process with ``KVM_RUN`` timed: each run's time inside the ioctl (the guest and the
kernel; with the compiled loop, ``fastrun.c``, one call that may answer published port reads and run again
counts as one run), and the time from its return to the next run (user space: handling the exit, injecting,
waiting for the GIL), without the time slept in HLT. At exit it prints one line per exit kind (the reason, and the port,
the MMIO page or the MSR), the slowest first by total time in user space. This is how the nested lab's boot was
found to spend most of its user space on the console's LSR reads (``docs/lab.md``); in the lab:
``python3 -m vmmshim.lab run -- 'cd /lab/project && python3 -m bench.exit_profile -- -A -m 512M ...'``.
With the compiled run loop it also tells the time KVM_RUN itself took (C's clock) and the time from its return to
Python running again, which is the wait for the GIL while another thread (a doorbell, the timers) holds it.

Not supported: the NVMM and soft providers (the timing wraps the KVM provider's ioctl), per-vCPU breakdowns.
"""

import argparse
import atexit
import collections
import runpy
import struct
import sys
import time

from ops.nvmm.kvm import ioctls as K
from ops.nvmm.kvm import layouts as L
from ops.nvmm.kvm import vcpu as kvm_vcpu

IO_PORT = L.RUN_U + 2           # kvm_run.io.port
MSR_INDEX = L.RUN_U + 12        # kvm_run.msr.index
PAGE_MASK = ~0xFFF
TOP = 25
_NAMES = {v: k[len("KVM_EXIT_"):] for k, v in vars(K).items() if k.startswith("KVM_EXIT_") and isinstance(v, int)}


class Profile:
    def __init__(self, after_s=0.0):
        self.since = time.perf_counter() + after_s     # runs that begin earlier are left out (a boot before idle)
        self.runs = []          # (start, end, kind)
        self.halts = []         # (start, end) of the HLT waits
        self.vcpus = {}         # vCPU fd -> KvmVcpu
        self.return_ns = 0      # compiled loop: from KVM_RUN's return (C's clock) to Python running (the GIL)

    def kind(self, fd):
        v = self.vcpus.get(fd)
        if v is None:
            return "?"
        mm = v.mm
        reason = mm[L.RUN_EXIT_REASON]
        name = _NAMES.get(reason, str(reason))
        if reason == K.KVM_EXIT_IO:
            return f"{name} {struct.unpack_from('<H', mm, IO_PORT)[0]:#x}"
        if reason == K.KVM_EXIT_MMIO:
            return f"{name} {struct.unpack_from('<Q', mm, L.RUN_U)[0] & PAGE_MASK:#x}"
        if reason in (K.KVM_EXIT_X86_RDMSR, K.KVM_EXIT_X86_WRMSR):
            return f"{name} {struct.unpack_from('<I', mm, MSR_INDEX)[0]:#x}"
        return name

    def install(self):
        from ops.nvmm.kvm import fastrun
        fastrun.TIMING = True                   # the compiled loop's clock counters, for the GIL line
        real_ioctl, real_init = kvm_vcpu._IOCTL, kvm_vcpu.KvmVcpu.__init__
        prof, clock = self, time.perf_counter

        def ioctl(fd, req, *args):
            if req != K.KVM_RUN:
                return real_ioctl(fd, req, *args)
            t0 = clock()
            try:
                r = real_ioctl(fd, req, *args)
            except OSError:
                prof.runs.append((t0, clock(), "EINTR (a kick)"))
                raise
            prof.runs.append((t0, clock(), prof.kind(fd)))
            return r

        real_compiled = kvm_vcpu.KvmVcpu._compiled_run

        def compiled_run(vcpu):             # the compiled loop (fastrun.c): one call, KVM_RUNs until an exit
            f, fd = real_compiled(vcpu), vcpu.fd
            stats, mono = vcpu.run_stats, time.monotonic_ns

            def timed(table, mmio):
                t0 = clock()
                err = f(table, mmio)
                back = mono()
                prof.runs.append((t0, clock(), "EINTR (a kick)" if err else prof.kind(fd)))
                prof.return_ns += back - stats.ns_last_return     # KVM_RUN's return to Python running again
                return err
            return timed
        kvm_vcpu.KvmVcpu._compiled_run = compiled_run

        def init(vcpu, *args, **kw):
            real_init(vcpu, *args, **kw)
            prof.vcpus[vcpu.fd] = vcpu
        kvm_vcpu._IOCTL, kvm_vcpu.KvmVcpu.__init__ = ioctl, init

        from ops import vmm
        real_halt = vmm.Vm.handle_hlt

        def halt(vm, ctx, rflags):
            t0 = clock()
            try:
                return real_halt(vm, ctx, rflags)
            finally:
                prof.halts.append((t0, clock()))
        vmm.Vm.handle_hlt = halt

    def report(self):
        runs = sorted(r for r in self.runs if r[0] >= self.since)
        halts = sorted(h for h in self.halts if h[0] >= self.since)
        per = collections.defaultdict(lambda: [0, 0.0, 0.0])      # kind -> [n, user s, kernel s]
        total_in = total_out = total_halt = 0.0
        h = 0
        for (t0, t1, kind), nxt in zip(runs, runs[1:]):
            while h < len(halts) and halts[h][0] < t1:
                h += 1
            slept = 0.0
            j = h
            while j < len(halts) and halts[j][1] <= nxt[0]:
                slept += halts[j][1] - halts[j][0]
                j += 1
            out = nxt[0] - t1 - slept
            row = per[kind]
            row[0] += 1
            row[1] += out
            row[2] += t1 - t0
            total_in, total_out, total_halt = total_in + t1 - t0, total_out + out, total_halt + slept
        answered = sum(v.answered_io() for v in self.vcpus.values())
        in_c = sum(v.run_stats.ns_in_run for v in self.vcpus.values() if v.run_stats is not None) / 1e9
        lines = [f"{len(runs)} KVM_RUNs: {total_in:.2f} s inside, {total_out:.2f} s in user space, "
                 f"{total_halt:.2f} s asleep in HLT; {answered} port reads answered inside (published reads)",
                 f"compiled loop: {in_c:.2f} s in KVM_RUN by its own clock, {self.return_ns / 1e9:.2f} s from "
                 "KVM_RUN's return to Python running again (taking the GIL back)",
                 f"{'exit':<28}{'count':>8}{'user us/exit':>14}{'user s':>8}{'kernel us/exit':>16}"]
        for kind, (n, out, inside) in sorted(per.items(), key=lambda kv: -kv[1][1])[:TOP]:
            lines.append(f"{kind:<28}{n:>8}{out / n * 1e6:>14.1f}{out:>8.2f}{inside / n * 1e6:>16.1f}")
        return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m bench.exit_profile", description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the table here (default: stderr)")
    ap.add_argument("--after", type=float, default=0.0, metavar="S",
                    help="count only the runs that begin S seconds after the start (an idle guest after its boot)")
    ap.add_argument("vmmshim", nargs=argparse.REMAINDER, help="-- then vmmshim's arguments")
    args = ap.parse_args(argv)
    vm_args = args.vmmshim[1:] if args.vmmshim[:1] == ["--"] else args.vmmshim
    prof = Profile(args.after)
    prof.install()

    def report():
        text = prof.report()
        if args.out:
            with open(args.out, "w") as f:
                print(text, file=f)
        else:
            print(text, file=sys.stderr)
    atexit.register(report)
    sys.argv = ["vmmshim", *vm_args]
    runpy.run_module("vmmshim", run_name="__main__")


if __name__ == "__main__":
    main()
