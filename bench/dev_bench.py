"""NVMe, AHCI and virtio-9p (issue 21) beside virtio-blk: vmmshim and QEMU in the same L1 of the nested lab
(``python3 -m bench.dev_bench [--rounds N] [--quick] [--mib M] [--devices nvme,ahci-hd,virtio-9p,virtio-blk]``).

Runs ``bench/dev_l2.py`` in the lab, one L1 boot per round; in each, every device is booted once with vmmshim and
once with QEMU (``-accel kvm -machine pc,kernel_irqchip=off``), the VMMs taking turns at going first. Prints per
device and step the median seconds and throughput per VMM, and vmmshim's share of QEMU's throughput (QEMU's time
/ vmmshim's: 0.8 means vmmshim moves 80% of what QEMU moves; issue 21 asks for 0.8 or more).

Absolute numbers mean little (L1 is QEMU TCG with nested SVM, where every exit is slow); the ratio measured in one
run is the comparison.
"""

import argparse
import json
import re
import statistics
import sys

from bench.io_bench import _fmt, run_rounds

UNITS = {  # step: (label, figure from (config, seconds), unit)
    "SEQW": ("seq write, 1 MiB req, O_DIRECT", lambda c, s: c["mib"] / s, "MiB/s"),
    "SEQR": ("seq read, 1 MiB req, O_DIRECT", lambda c, s: c["mib"] / s, "MiB/s"),
    "SEQ4K": ("4 KiB reads, QD1, one dd", lambda c, s: c["seq4k"] / s, "IOPS"),
    "P9W": ("file write, 1 MiB, fsync", lambda c, s: c["mib"] / s, "MiB/s"),
    "P9R": ("file read, 1 MiB, cold", lambda c, s: c["mib"] / s, "MiB/s"),
}
ORDER = ("nvme", "ahci-hd", "virtio-9p", "virtio-blk")


def parse(stdout):
    """(config, [records]) from dev_l2's output."""
    m = re.search(r"^DEV-CONFIG (\{.*\})$", stdout, re.M)
    cfg = json.loads(m.group(1)) if m else {}
    return cfg, [json.loads(x) for x in re.findall(r"^DEV (\{.*\})$", stdout, re.M)]


def medians(recs, device, step):
    """{vmm: median seconds} over the boots where the step succeeded."""
    out = {}
    for v in ("vmmshim", "qemu"):
        secs = [r["steps"][step]["seconds"] for r in recs if r["vmm"] == v and r["device"] == device
                and step in r["steps"] and r["steps"][step]["status"] == 0 and r["steps"][step]["seconds"] > 0]
        if secs:
            out[v] = statistics.median(secs)
    return out


def table(cfg, recs):
    lines = [f"{'device':<11}{'step':<32}{'vmmshim':>24}{'qemu':>24}{'share':>8}"]
    devices = [d for d in ORDER if any(r["device"] == d for r in recs)]
    for d in devices:
        steps = [s for s in UNITS if any(s in r["steps"] for r in recs if r["device"] == d)]
        for step in steps:
            label, fig, unit = UNITS[step]
            med = medians(recs, d, step)
            cells = [f"{med[v]:>8.2f} s {_fmt(fig(cfg, med[v])):>6} {unit:<6}" if v in med else f"{'-':>24}"
                     for v in ("vmmshim", "qemu")]
            share = f"{med['qemu'] / med['vmmshim']:>7.2f}x" if len(med) == 2 else f"{'-':>8}"
            lines.append(f"{d:<11}{label:<32}" + "".join(cells) + share)
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="L1 boots; the VMMs take turns at going first")
    ap.add_argument("--quick", action="store_true", help="1 round, a 32 MiB region")
    ap.add_argument("--devices", default="nvme,ahci-hd,virtio-9p,virtio-blk")
    ap.add_argument("--mib", type=int, help="region and file size in MiB (dev_l2's default: 128; 32 quick)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one round's command in L1")
    ap.add_argument("--lock", default="/tmp/vmmshim-lab.lock", help="flock this file around each round's lab run")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cmds = [f"python3 -m bench.dev_l2 --first-round {rnd} --devices {args.devices}" + (" --quick" if args.quick else "")
            + (f" --mib {args.mib}" if args.mib else "")
            for rnd in range(rounds)]
    cfg, recs = run_rounds(cmds, parse, args.timeout, args.lock)
    if not recs:
        return 1
    print(f"disk and folder devices in the nested lab, {rounds} round(s); region {cfg['mib']} MiB, "
          f"{cfg['seq4k']} QD1 reads; share = QEMU's time / vmmshim's (1.0: as fast as QEMU)")
    print(table(cfg, recs))
    for r in recs:
        if "console_tail" in r:
            print(f"--- {r['vmm']} {r['device']} round {r['round']}: console tail\n{r['console_tail']}\n"
                  f"{r.get('stderr_tail', '')}")
        if r["device"] == "virtio-9p" and r.get("share_bytes") != cfg["mib"] << 20:
            print(f"--- {r['vmm']} round {r['round']}: the shared file has {r.get('share_bytes')} bytes, "
                  f"not {cfg['mib'] << 20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
