"""Inside the nested lab's L1: boot the default guest to its shell marker with vmmshim and with QEMU (the peer,
``-machine pc,kernel_irqchip=off``: a userspace LAPIC like ours), alternating, and print one ``BOOT`` line per
boot (VMM, seconds to the marker, exit status) plus vmmshim's exits by reason. Run by bench/boot_bench.py."""

import argparse
import os
import selectors
import subprocess
import sys
import tempfile
import time

GUEST = "/lab/guest"
APPEND = "console=ttyS0 panic=-1"     # the stock command line: each VMM's default clock devices
MARKER = b"VMMSHIM-GUEST-UP"


def argv_for(vmm):
    k, i = f"{GUEST}/vmlinuz", f"{GUEST}/initramfs.gz"
    if vmm == "qemu":
        return ["qemu-system-x86_64", "-accel", "kvm", "-machine", "pc,kernel_irqchip=off", "-m", "512",
                "-nographic", "-no-reboot", "-kernel", k, "-initrd", i, "-append", APPEND]
    return [sys.executable, "-m", "vmmshim", "-o", "vmmshim.stats=true", "-A", "-m", "512M", "-s", "0:0,hostbridge",
            "-s", "31,lpc", "-l", "com1,stdio", "-f", f"kexec,{k},{i},{APPEND}"]


def boot(vmm, timeout):
    t0 = time.monotonic()
    errf = tempfile.TemporaryFile()         # a file, not a pipe: a chatty VMM must never block on stderr
    p = subprocess.Popen(argv_for(vmm), stdout=subprocess.PIPE, stderr=errf, stdin=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ)
    buf, marker = b"", None
    while time.monotonic() - t0 < timeout:
        if not sel.select(1.0):
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        if marker is None and MARKER in buf:
            marker = time.monotonic() - t0
    try:
        status = p.wait(max(1.0, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        status = 124
    errf.seek(0)
    err = errf.read().decode(errors="replace")
    stats = [line for line in err.splitlines() if line.startswith("vmmshim: vcpu")]
    if marker is None:              # say why: the console's and stderr's last lines
        tail = buf.decode(errors="replace").splitlines()[-6:] + err.splitlines()[-4:]
        stats = stats + [f"(failed boot) {line[:200]}" for line in tail]
    return marker, status, stats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=150)
    args = ap.parse_args()
    for r in range(args.rounds):
        for vmm in ("vmmshim", "qemu"):
            marker, status, stats = boot(vmm, args.timeout)
            print(f"BOOT {vmm} round={r} marker_s={marker if marker is None else round(marker, 2)} status={status}",
                  flush=True)
            for line in stats:
                print(f"STATS {line}", flush=True)


if __name__ == "__main__":
    main()
