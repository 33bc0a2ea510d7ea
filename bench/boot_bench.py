"""Linux boot time: vmmshim beside QEMU in the same L1 of the nested lab (``python3 -m bench.boot_bench``).

Boots the default guest (Debian's kernel, busybox initramfs) to its shell marker with each VMM, alternating,
``--rounds`` times, and prints the medians, their ratio and vmmshim's exits by reason. Absolute times mean
little here (L1 is QEMU TCG with nested SVM, where every exit is slow: docs/lab.md, "Timings measured"); the ratio
is the comparison.
"""

import argparse
import re
import statistics
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--boot-timeout", type=float, default=120, help="seconds one boot may take")
    args = ap.parse_args(argv)
    from vmmshim.lab import run_in_lab
    res = run_in_lab(f"python3 -m bench.boot_l2 --rounds {args.rounds} --timeout {args.boot_timeout}",
                     timeout=2 * (args.boot_timeout + 15) * args.rounds + 60)
    times, fails = {"vmmshim": [], "qemu": []}, {"vmmshim": 0, "qemu": 0}
    for m in re.finditer(r"^BOOT (\S+) round=\d+ marker_s=(\S+) status=(\d+)", res.stdout, re.M):
        if m.group(2) == "None":
            fails[m.group(1)] += 1
        else:
            times[m.group(1)].append(float(m.group(2)))
    print(f"Linux boot to the shell marker in the nested lab (L1 boot {res.boot_s:.1f} s), {args.rounds} rounds")
    print(f"{'VMM':<10} {'median s':>9} {'samples':<30} failed")
    for vmm in ("vmmshim", "qemu"):
        med = statistics.median(times[vmm]) if times[vmm] else float("nan")
        print(f"{vmm:<10} {med:>9.2f} {' '.join(f'{t:.1f}' for t in times[vmm]):<30} {fails[vmm]}")
    if times["vmmshim"] and times["qemu"]:
        print(f"ratio vmmshim/qemu: {statistics.median(times['vmmshim']) / statistics.median(times['qemu']):.2f}x")
    stats = re.findall(r"^STATS (.*)$", res.stdout, re.M)
    for line in [x for x in stats if not x.startswith("(failed boot)")][:1]:
        print(f"exits by reason (first vmmshim boot): {line}")
    for line in [x for x in stats if x.startswith("(failed boot)")]:
        print(line)
    return 0 if times["vmmshim"] else 1


if __name__ == "__main__":
    sys.exit(main())
