"""Boot the default guest (L2) with a VMM inside L1 and time it: ``python3 -m vmmshim.lab.l2boot``.

Runs inside L1 (the lab puts the guest in ``$VMMSHIM_GUEST_DIR``).  The default VMM is the peer, QEMU with
``-accel kvm -machine pc,kernel_irqchip=off`` (the shape vmmshim has: the LAPIC in user space).  Prints the
guest's console, then one line ``L2-RESULT {json}`` with: ``marker_s`` (seconds from starting the VMM to
``VMMSHIM-GUEST-UP``), ``cpus`` (from ``VMMSHIM-CPUS=``), ``poweroff`` (the guest printed
``VMMSHIM-GUEST-POWEROFF`` and the VMM exited 0), ``exit_s``, ``status`` (the VMM's exit status, 124 on timeout).
"""

import argparse
import json
import os
import pathlib
import selectors
import subprocess
import sys
import time

from vmmshim.lab.guest import MARKER_CPUS, MARKER_OFF, MARKER_STATUS, MARKER_UP

QEMU_PEER = ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc,kernel_irqchip=off", "-m", "512",
             "-nographic", "-no-reboot"]


def guest_files(guest_dir=None):
    d = pathlib.Path(guest_dir or os.environ.get("VMMSHIM_GUEST_DIR") or "/lab/guest")
    return d / "vmlinuz", d / "initramfs.gz"


def boot(vmm=None, append="console=ttyS0 panic=-1", timeout=300.0, guest_dir=None, echo=True):
    """Boot the default guest with ``vmm`` (argv without -kernel/-initrd/-append; QEMU_PEER if None)."""
    kernel, initrd = guest_files(guest_dir)
    argv = list(vmm or QEMU_PEER) + ["-kernel", str(kernel), "-initrd", str(initrd), "-append", append]
    res = {"argv": argv, "marker_s": None, "cpus": None, "run_status": None, "poweroff": False,
           "exit_s": None, "status": None}
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    saw_off = False
    try:
        while True:
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                proc.kill()
                proc.wait()
                res["status"] = 124
                break
            if not sel.select(min(left, 1.0)):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                res["status"] = proc.wait()
                break
            now = time.monotonic() - t0
            if echo:
                sys.stdout.write(chunk.decode(errors="replace"))
            buf += chunk
            text = buf.decode(errors="replace")
            if res["marker_s"] is None and MARKER_UP in text:
                res["marker_s"] = round(now, 2)
            if not saw_off and MARKER_OFF in text:
                saw_off = True
            # keep only the tail that may hold a marker split across reads
            if len(buf) > 1 << 20:
                buf = buf[-4096:]
        for line in buf.decode(errors="replace").splitlines():
            line = line.strip()
            if line.startswith(MARKER_CPUS):
                res["cpus"] = int(line[len(MARKER_CPUS):] or 0)
            if line.startswith(MARKER_STATUS):
                res["run_status"] = int(line[len(MARKER_STATUS):] or 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    res["exit_s"] = round(time.monotonic() - t0, 2)
    res["poweroff"] = saw_off and res["status"] == 0
    sys.stdout.flush()
    print("\nL2-RESULT " + json.dumps(res), flush=True)
    return res


def parse_result(stdout: str):
    """The ``L2-RESULT`` dict from a lab run's stdout (None if absent)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("L2-RESULT "):
            return json.loads(line[len("L2-RESULT "):])
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vmmshim.lab.l2boot")
    p.add_argument("--append", default="console=ttyS0 panic=-1")
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--guest-dir")
    p.add_argument("--quiet", action="store_true", help="do not echo the guest console")
    p.add_argument("--tries", type=int, default=1,
                   help="boots in all while a boot ends or hangs before the marker (L2 hangs and triple-faults in "
                        "the lab, QEMU's too: docs/lab.md)")
    p.add_argument("vmm", nargs=argparse.REMAINDER, help="-- VMM argv (default: QEMU -accel kvm, kernel_irqchip=off)")
    a = p.parse_args(argv)
    vmm = a.vmm[1:] if a.vmm[:1] == ["--"] else a.vmm
    for _ in range(max(a.tries, 1)):
        res = boot(vmm or None, a.append, a.timeout, a.guest_dir, echo=not a.quiet)
        if res["marker_s"] is not None:
            break
    return 0 if res["marker_s"] is not None and res["poweroff"] else 1


if __name__ == "__main__":
    sys.exit(main())
