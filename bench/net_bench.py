"""virtio-net on a tap and on user-mode networking: vmmshim and QEMU in the same L1 of the nested lab
(``python3 -m bench.net_bench [--rounds N] [--quick] [--net-mib M] [--configs tap,slirp]``).

Runs ``bench/net_l2.py`` in the lab, one L1 boot per round; in each, every config is booted once with vmmshim and
once with QEMU (``-accel kvm -machine pc,kernel_irqchip=off``, ``virtio-net-pci``), the VMMs taking turns at going
first. ``tap``: vmmshim's ``-s N,virtio-net,tap0`` against QEMU's ``-netdev tap``, L1 at 10.0.2.1 on the tap;
``slirp``: vmmshim's ``slirp`` backend (libslirp) against QEMU's ``-netdev user``, the guest's address from DHCP
and L1 at 10.0.2.2 (L1's loopback through the VMM). The guest sends ``--net-mib`` MiB to L1 through ``nc`` and
reads as much back, and times each itself. Prints per config and direction the median seconds and throughput per
VMM, and vmmshim's share of QEMU's throughput (QEMU's time / vmmshim's: 0.8 means vmmshim moves 80% of what QEMU
moves).

Absolute numbers mean little (L1 is QEMU TCG with nested SVM, where every exit is slow); the ratio measured in one
run is the comparison. Not measured: latency (ping, request/response), UDP, several connections at once, the
guest's checksum and segmentation offloads on or off, and traffic beyond L1 (slirp's NAT to the outside world).
"""

import argparse
import json
import re
import statistics
import sys

from bench.io_bench import _fmt, run_rounds

VMMS = ("vmmshim", "qemu")
CONFIGS = ("tap", "slirp")
DIRECTIONS = (("NETTX", "guest -> L1"), ("NETRX", "L1 -> guest"))
MiB = 1 << 20
DEFAULT_ROUNDS = 4


def parse(stdout):
    """(config, [records]) from net_l2's output."""
    m = re.search(r"^NET-CONFIG (\{.*\})$", stdout, re.M)
    cfg = json.loads(m.group(1)) if m else {}
    return cfg, [json.loads(x) for x in re.findall(r"^NET (\{.*\})$", stdout, re.M)]


def medians(recs, config, step):
    """{vmm: median seconds} over the boots where the step succeeded."""
    out = {}
    for v in VMMS:
        secs = [r["steps"][step]["seconds"] for r in recs if r["vmm"] == v and r["config"] == config
                and step in r["steps"] and r["steps"][step]["status"] == 0 and r["steps"][step]["seconds"] > 0]
        if secs:
            out[v] = statistics.median(secs)
    return out


def table(cfg, recs):
    """Per config and direction: each VMM's median seconds and MiB/s, and the share (QEMU's time / vmmshim's)."""
    lines = [f"{'':<20}{'vmmshim':>24}{'QEMU':>24}{'share':>8}"]
    for config in (c for c in CONFIGS if any(r["config"] == c for r in recs)):
        for step, label in DIRECTIONS:
            med = medians(recs, config, step)
            cells = [f"{med[v]:>8.2f} s {_fmt(cfg['net_mib'] / med[v]):>6} MiB/s " if v in med else f"{'-':>24}"
                     for v in VMMS]
            share = f"{med['qemu'] / med['vmmshim']:>7.2f}x" if len(med) == 2 else f"{'-':>8}"
            lines.append(f"{config + ' ' + label:<20}" + "".join(cells) + share)
    return "\n".join(lines)


def short_transfers(cfg, recs):
    """A line per boot where L1's Sink or Source did not move ``net_mib`` MiB."""
    want = cfg["net_mib"] * MiB
    out = []
    for r in recs:
        for side in ("l1_sink", "l1_source"):
            got = (r.get(side) or {}).get("bytes")
            if got != want:
                out.append(f"--- {r['vmm']} {r['config']} round {r['round']}: {side} moved {got} bytes, not {want}")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                    help="L1 boots; the VMMs take turns at going first, so an even number is fair")
    ap.add_argument("--quick", action="store_true", help="1 round, 2 MiB each way")
    ap.add_argument("--net-mib", type=int, help="MiB each way (net_l2's default: 8; 2 quick)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one round's command in L1")
    ap.add_argument("--lock", default="/tmp/vmmshim-lab.lock", help="flock this file around each round's lab run")
    args = ap.parse_args(argv)
    unknown = set(args.configs.split(",")) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown config(s) {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    rounds = 1 if args.quick else args.rounds
    cmds = [f"python3 -m bench.net_l2 --first-round {rnd} --configs {args.configs}" + (" --quick" if args.quick else "")
            + (f" --net-mib {args.net_mib}" if args.net_mib else "")
            for rnd in range(rounds)]
    cfg, recs = run_rounds(cmds, parse, args.timeout, args.lock)
    if not recs:
        return 1
    print(f"network in the nested lab, {rounds} round(s), {cfg['net_mib']} MiB each way; "
          f"share = QEMU's time / vmmshim's (1.0: as fast as QEMU)")
    print(table(cfg, recs))
    for v in VMMS:
        retried = sum(r["failed_boots"] for r in recs if r["vmm"] == v)
        print(f"{v}: {sum(1 for r in recs if r['vmm'] == v)} measured boots, {retried} boots retried")
    for line in short_transfers(cfg, recs):
        print(line)
    for r in recs:
        if "console_tail" in r:
            print(f"--- {r['vmm']} {r['config']} round {r['round']}: console tail\n{r['console_tail']}\n"
                  f"{r.get('stderr_tail', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
