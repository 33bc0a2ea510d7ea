"""virtio I/O of a Linux guest: vmmshim beside QEMU in the same L1 of the nested lab
(``python3 -m bench.io_bench [--rounds N] [--quick]``).

Runs ``bench/io_l2.py`` in the lab, one L1 boot per round (each well under 8 minutes): each round boots the
default guest once with vmmshim and once with QEMU (``-accel kvm -machine pc,kernel_irqchip=off``,
``-drive if=virtio``, ``-netdev tap`` + ``virtio-net-pci``) on the same image and tap, the two taking turns at
going first (a fresh L1's first guest runs slower; 4 rounds by default, and a line after the table gives each
VMM's sequential times when first and when second), and the guest times sequential 1 MiB writes and reads with
O_DIRECT, 4 KiB reads one at a time (one dd process), random 4 KiB reads (a dd per read, with the cost of
starting dd measured alone), and nc to and from L1. Prints the medians per VMM and the vmmshim/QEMU ratio of
the times (a ratio of 5 means vmmshim takes 5 times as long, i.e. has a fifth of the throughput).

Full rounds: 256 MiB, 1024 QD1 reads, 200 random reads, 2 MiB each way (vmmshim's guest sent so little through
nc here that more network would not fit a round in 8 minutes). ``--quick``: one round, 64 MiB, 256 + 100 reads,
1 MiB of network. What each took is in docs/lab.md ("Timings measured").
Absolute numbers mean little (L1 is QEMU TCG with nested SVM, where every exit is slow); the ratio is the
comparison. ``--append`` adds guest kernel parameters for both VMMs (e.g. a clock source).
"""

import argparse
import contextlib
import fcntl
import json
import re
import statistics
import sys

MiB = 1 << 20
ROWS = (  # step, label, how to turn seconds into the figure printed, unit
    ("SEQW", "seq write, 1 MiB req, O_DIRECT", lambda c, s: c["mib"] / s, "MiB/s"),
    ("SEQR", "seq read, 1 MiB req, O_DIRECT", lambda c, s: c["mib"] / s, "MiB/s"),
    ("SEQ4K", "4 KiB reads, QD1, one dd", lambda c, s: c["seq4k"] / s, "IOPS"),
    ("RAND4K", "random 4 KiB reads, dd each", lambda c, s: c["rand"] / s, "IOPS"),
    ("LOOP4K", "  (same loop on /dev/zero)", lambda c, s: c["rand"] / s, "runs/s"),
    ("NETTX", "net guest -> L1 (nc)", lambda c, s: c["net_mib"] / s, "MiB/s"),
    ("NETRX", "net L1 -> guest (nc)", lambda c, s: c["net_mib"] / s, "MiB/s"),
)


def parse(stdout):
    """(config, [records]) from io_l2's output."""
    m = re.search(r"^IO-CONFIG (\{.*\})$", stdout, re.M)
    cfg = json.loads(m.group(1)) if m else {}
    return cfg, [json.loads(x) for x in re.findall(r"^IO (\{.*\})$", stdout, re.M)]


def _fmt(x):
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def table(cfg, recs, vmms=("vmmshim", "qemu")):
    """The printed table: per step the median seconds and the figure per VMM, and the time ratio."""
    lines = [f"{'step':<34}" + "".join(f"{v:>26}" for v in vmms) + f"{'ratio':>8}"]
    for step, label, fig, unit in ROWS:
        cells, med = [], {}
        for v in vmms:
            secs = [r["steps"][step]["seconds"] for r in recs if r["vmm"] == v and step in r["steps"]
                    and r["steps"][step]["status"] == 0 and r["steps"][step]["seconds"] > 0]
            if secs:
                med[v] = statistics.median(secs)
                cells.append(f"{med[v]:>10.2f} s {_fmt(fig(cfg, med[v])):>6} {unit:<6}")
            else:
                cells.append(f"{'-':>12} {'':>13}")
        ratio = f"{med[vmms[0]] / med[vmms[1]]:>7.1f}x" if len(med) == 2 else f"{'-':>8}"
        lines.append(f"{label:<34}" + "".join(cells) + ratio)
    return "\n".join(lines)


def first_second(recs, steps=("SEQW", "SEQR")):
    """A line per VMM: its median seconds per step when it ran first in its L1 and when second (a fresh L1's first
    guest runs slower; ``io_l2`` makes the VMMs take turns)."""
    out = []
    for v in ("vmmshim", "qemu"):
        cells = []
        for step in steps:
            for first in (True, False):
                secs = [r["steps"][step]["seconds"] for r in recs if r["vmm"] == v and r.get("first") is first
                        and step in r["steps"] and r["steps"][step]["status"] == 0]
                cells.append(f"{step} {'first' if first else 'second'} "
                             + (f"{statistics.median(secs):.2f} s ({len(secs)})" if secs else "-"))
        out.append(f"{v}: " + ", ".join(cells))
    return "\n".join(out)


@contextlib.contextmanager
def lab_lock(path):
    """Holds the lab lock (``flock PATH``, shared with whoever else runs the lab here) for one round."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_rounds(cmds, parse_fn, timeout, lock):
    """Runs each command in its own L1 (one round each, under the lab lock); returns the last config and all the
    records ``parse_fn`` reads from the rounds' output, and prints the output of a round that gave none."""
    from vmmshim.lab import run_in_lab
    cfg, recs = {}, []
    for rnd, cmd in enumerate(cmds):
        with lab_lock(lock):
            res = run_in_lab(cmd, timeout=timeout)
        c, r = parse_fn(res.stdout)
        if not r:
            print(f"round {rnd}: no result (status {res.status})", res.stdout[-3000:], res.stderr[-3000:], sep="\n")
        cfg, recs = c or cfg, recs + r
    return cfg, recs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4, help="L1 boots; the VMMs take turns at going first in them, so "
                    "an even number is fair")
    ap.add_argument("--quick", action="store_true", help="1 round, small sizes: one lab command under 8 minutes")
    ap.add_argument("--append", default="", help="more guest kernel parameters (both VMMs)")
    ap.add_argument("--timeout", type=float, default=450, help="seconds for one round's command in L1")
    ap.add_argument("--lock", default="/tmp/vmmshim-lab.lock", help="flock this file around each round's lab "
                    "run, so one lab runs at a time ('' for none)")
    args = ap.parse_args(argv)
    rounds = 1 if args.quick else args.rounds
    cmds = []
    for rnd in range(rounds):
        cmd = f"python3 -m bench.io_l2 --rounds 1 --first-round {rnd}" + (" --quick" if args.quick else "")
        cmds.append(cmd + (f" --append '{args.append}'" if args.append else ""))
    cfg, recs = run_rounds(cmds, parse, args.timeout, args.lock)
    if not recs:
        return 1
    print(f"virtio I/O in the nested lab, {rounds} round(s); region {cfg['mib']} MiB, "
          f"{cfg['seq4k']} QD1 reads, {cfg['rand']} random reads, {cfg['net_mib']} MiB each way"
          + (f"; guest append {cfg['append']!r}" if cfg.get("append") else ""))
    print(table(cfg, recs))
    print(first_second(recs))
    for v in ("vmmshim", "qemu"):
        failed = sum(r["failed_boots"] for r in recs if r["vmm"] == v)
        missing = sum(1 for r in recs if r["vmm"] == v and len(r["steps"]) < len(ROWS))
        print(f"{v}: {sum(1 for r in recs if r['vmm'] == v)} measured boots, {failed} boots retried (hung or "
              f"triple fault before the shell), {missing} with steps missing")
    for r in recs:
        if "console_tail" in r:
            print(f"--- {r['vmm']} round {r['round']}: console tail\n{r['console_tail']}\n{r.get('stderr_tail', '')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
