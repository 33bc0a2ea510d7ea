"""Restore beside cold boot (issue 23): ``python3 -m bench.snap_bench [--rounds N]`` runs ``bench/snap_l2.py`` in
the nested lab, one L1 boot per round, and prints the medians: the default guest's cold boot (VMM start to its
shell marker), ``vmmshim ctl --suspend`` (wall time, and how long the guest stood still), and ``vmmshim -r`` until
the restored guest prints again, with the restore's share of the cold boot's time.

Absolute numbers mean little (L1 is QEMU TCG); the ratio measured in one run is the comparison. Not measured:
QEMU's ``loadvm`` (another format and another machine model; the issue compares restore with cold boot).
"""

import argparse
import json
import re
import statistics
import sys

from bench.io_bench import run_rounds


def parse(stdout):
    return {}, [json.loads(x) for x in re.findall(r"^SNAP (\{.*\})$", stdout, re.M)]


def _med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def table(recs):
    cold = _med(r["cold_s"] for r in recs)
    restore = _med(s for r in recs for s in r["restore_s"])
    rows = [("cold boot to the shell marker", cold), ("ctl --suspend (wall)", _med(r["suspend_s"] for r in recs)),
            ("  of which the guest stood still", _med(r["paused_s"] for r in recs)),
            ("restore until the guest prints", restore)]
    lines = [f"{'step':<36}{'median s':>10}"]
    lines += [f"{name:<36}{'-' if v is None else f'{v:.2f}':>10}" for name, v in rows]
    if cold and restore:
        lines.append(f"restore / cold boot: {restore / cold:.2f}x the time")
    mems = [r["memory"] for r in recs if r.get("memory")]
    if mems:
        size, used = mems[-1]
        lines.append(f"memory file: {size >> 20} MiB, {used >> 20} MiB allocated (sparse)")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="L1 boots")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--lock", default="/tmp/vmmshim-lab.lock")
    args = ap.parse_args(argv)
    _, recs = run_rounds(["python3 -m bench.snap_l2 --rounds 1"] * args.rounds, parse, args.timeout, args.lock)
    if not recs:
        return 1
    print(f"restore beside cold boot in the nested lab, {args.rounds} round(s), "
          f"{sum(len(r['restore_s']) for r in recs)} restores")
    print(table(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
