"""Port-I/O exit round trip: vmmshim's paths beside a C loop over raw KVM, in one run.

The guest is the same 64-bit loop in every case (``out %al,(%dx); dec %rcx; jnz``, N iterations). Rows:

- ``C raw KVM``: ``bench/kvm_loop.c``, built here with gcc, one ``KVM_RUN`` per exit;
- ``bare``: Python's floor, ``fcntl.ioctl(fd, KVM_RUN)`` in a loop with no decoding, assist or device;
- ``provider``: the NVMM primitives (``Vcpu.run`` -> IO exit -> ``assist_io`` -> a counting device callback);
- ``vmm_ops`` (when ``ops.nvmm_ops`` exists): the whole path, ``vmm_ops_nvmm.vmrun`` + the VM's exit-handler
  table + the port bus + a device.

Runs alternate (C, provider, vmm_ops, C, ...) and medians are printed with their ratio to C; then each path runs
once more under ``strace -c -f`` to count system calls per exit. Usage: ``python3 -m bench.exit_bench [-n N]
[--rounds R]``. Absolute times only mean something on a hardware-assisted KVM; on kvm_pvm compare ratios.
"""

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PORT = 0x510
GUEST = """
.code64
1: out %al, (%dx)
  dec %rcx
  jnz 1b
  hlt
"""


def build_c_peer(outdir):
    exe = os.path.join(outdir, "kvm_loop")
    subprocess.run(["gcc", "-O2", "-o", exe, os.path.join(HERE, "kvm_loop.c")], check=True)
    return exe


# -- workers (run in a child process so strace can count them alone) -------------------------------------------
def _loop_vcpu(n):
    """The benchmark guest on a KVM vCPU through the harness, RCX = ``n`` iterations, RDX = the port."""
    sys.path.insert(0, ROOT)
    from ops.nvmm import nvmm_init, constants as C
    from tests.guests.asm import assemble
    from tests.guests.harness import Guest, CODE

    g = Guest(nvmm_init("kvm"))
    g.load(CODE, assemble(GUEST, CODE))
    g.setup_long64(CODE, large=True)
    v = g.vcpu
    v.getstate(C.NVMM_X64_STATE_GPRS)
    v.state.gprs[C.NVMM_X64_GPR_RCX] = n
    v.state.gprs[C.NVMM_X64_GPR_RDX] = PORT
    v.setstate(C.NVMM_X64_STATE_GPRS)
    return g, v


def worker_provider(n):
    from ops.nvmm import api, constants as C
    g, v = _loop_vcpu(n)

    class Counter:                      # the device: counts what the guest writes
        count = 0
        total = 0

        def io(self, port, is_in, data):
            self.count += 1
            self.total += data[0]

    dev = Counter()
    v.configure(C.NVMM_VCPU_CONF_CALLBACKS, api.AssistCallbacks(io=dev.io))
    run, assist, IO = v.run, v.assist_io, C.NVMM_VCPU_EXIT_IO
    t0 = time.perf_counter()
    while True:
        if run().reason != IO:
            break
        assist()
    dt = time.perf_counter() - t0
    print(f"exits={dev.count} seconds={dt:.6f}")


def worker_bare(n):
    """The floor for Python: the same guest, the loop only re-enters (``fcntl.ioctl(fd, KVM_RUN)`` and one byte
    of kvm_run read per exit), no decoding, no assist, no device."""
    import fcntl
    from ops.nvmm.kvm import ioctls as K
    g, v = _loop_vcpu(n)
    v.run()                        # commits the state; the first OUT exit
    fd, mm, ioctl, krun, kio = v.fd, v.mm, fcntl.ioctl, K.KVM_RUN, K.KVM_EXIT_IO
    count = 1
    t0 = time.perf_counter()
    while True:
        ioctl(fd, krun)
        if mm[8] != kio:
            break
        count += 1
    dt = time.perf_counter() - t0
    print(f"exits={count} seconds={dt:.6f}")


def worker_vmm_ops(n):
    sys.path.insert(0, ROOT)
    from bench.ops_path import run_ops_loop
    count, dt = run_ops_loop(GUEST, n, PORT)
    print(f"exits={count} seconds={dt:.6f}")


def _parse(out):
    m = re.search(r"exits=(\d+) seconds=([0-9.]+)", out)
    if not m:
        raise RuntimeError(f"worker printed no result:\n{out}")
    return int(m.group(1)), float(m.group(2))


def _cmd(kind, n, exe):
    if kind == "C raw KVM":
        return [exe, str(n), str(PORT)]
    return [sys.executable, os.path.abspath(__file__), "--worker", kind, "-n", str(n)]


def measure(kind, n, exe):
    proc = subprocess.run(_cmd(kind, n, exe), capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{kind} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    exits, secs = _parse(proc.stdout)
    if exits != n:
        raise RuntimeError(f"{kind}: {exits} exits, expected {n}")
    return secs / exits * 1e6


def syscalls_per_exit(kind, n, exe):
    """Total system calls of the measured process divided by its exits, minus a run with almost no exits."""
    if not shutil.which("strace"):
        return None

    def total(count):
        with tempfile.NamedTemporaryFile(mode="r", suffix=".strace") as f:
            subprocess.run(["strace", "-f", "-c", "-o", f.name] + _cmd(kind, count, exe),
                           capture_output=True, text=True, check=True)
            text = f.read()
        m = re.search(r"^100\.00\s+\S+\s+\S+\s+(\d+)", text, re.M) or \
            re.search(r"^\s*\S+\s+\S+\s+\S+\s+(\d+)\s+(?:\d+\s+)?total$", text, re.M)
        return int(m.group(1)) if m else None

    big, small = total(n), total(1)
    if big is None or small is None:
        return None
    return (big - small) / (n - 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=100000, help="exits per run")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--strace-n", type=int, default=20000)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker and ROOT not in sys.path:
        sys.path.insert(0, ROOT)       # a worker runs as a script: bench/ is its sys.path[0], not the repository
    if args.worker == "provider":
        return worker_provider(args.n)
    if args.worker == "vmm_ops":
        return worker_vmm_ops(args.n)
    if args.worker == "bare":
        return worker_bare(args.n)

    kinds = ["C raw KVM", "bare", "provider"]
    if os.path.exists(os.path.join(HERE, "ops_path.py")):
        kinds.append("vmm_ops")
    with tempfile.TemporaryDirectory() as d:
        exe = build_c_peer(d)
        samples = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for k in kinds:
                samples[k].append(measure(k, args.n, exe))
        sc = {k: syscalls_per_exit(k, args.strace_n, exe) for k in kinds}
    from ops.nvmm.kvm.provider import hardware_kind
    print(f"port-I/O exit round trip, {args.n} exits x {args.rounds} rounds (alternating), /dev/kvm: "
          f"{hardware_kind()}")
    print(f"{'path':<12} {'us/exit':>9} {'exits/s':>10} {'vs C':>6} {'syscalls/exit':>14}  samples (us)")
    base = statistics.median(samples["C raw KVM"])
    for k in kinds:
        med = statistics.median(samples[k])
        s = "n/a" if sc[k] is None else f"{sc[k]:.3f}"
        print(f"{k:<12} {med:>9.2f} {1e6 / med:>10.0f} {med / base:>5.3f}x {s:>14}  "
              + " ".join(f"{x:.2f}" for x in samples[k]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
