"""``vmmshim conformance``: the conformance suite (``tests/conformance``) on every provider present, printed as a
matrix (case x provider: pass, FAIL, n/s = not supported by a declared limit, or skipped with the reason), and
the exit traces of each case recorded per provider and diffed.

    vmmshim conformance [--providers kvm,soft] [--record DIR] [--diff DIR] [-k EXPR]

Exit status 1 when a case passes on one provider and fails on another (a difference without a declared reason),
or when any case fails on every provider; 0 otherwise; 4 (bhyve's error status) for a bad argument, with one
line on stderr. ``--record DIR`` writes ``DIR/<case>.<provider>.trace`` (one line per exit: reason and the
payload fields every provider reports the same way); ``--diff DIR`` prints, for each case recorded on two
providers, the first exit where their traces part.

Not supported: replaying a trace into a provider (the traces are compared, not re-executed).
"""

import collections
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMIT_RE = re.compile(r"declares limit ([\w, -]+)")


class MatrixPlugin:
    """Collects each test's outcome keyed by (case, provider)."""

    def __init__(self):
        self.results = collections.OrderedDict()
        self.params = {}

    def pytest_collection_modifyitems(self, items):
        for item in items:
            cs = getattr(item, "callspec", None)
            prov = cs.params.get("provider") if cs else None
            case = re.sub(r"\[.*\]$", "", item.nodeid.split("::", 1)[-1])
            if cs is not None:
                rest = [str(v)[:40] for k, v in sorted(cs.params.items()) if k != "provider"]   # a long param
                # (a guest program) must not widen the whole table
                if rest:
                    case += "[" + "-".join(rest) + "]"
            self.params[item.nodeid] = (case, prov or "-")

    def pytest_runtest_logreport(self, report):
        key = self.params.get(report.nodeid)
        if key is None:
            return
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            if report.passed:
                outcome = "pass"
            elif report.skipped:
                reason = str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
                m = LIMIT_RE.search(reason)
                outcome = f"n/s ({m.group(1)})" if m else "skip"
            else:
                outcome = "FAIL"
            self.results[key] = outcome


def run(providers, keyword=None, record=None):
    import pytest
    plugin = MatrixPlugin()
    env_backup = dict(os.environ)
    os.environ["VMMSHIM_PROVIDERS"] = ",".join(providers)
    if record:
        os.makedirs(record, exist_ok=True)
        os.environ["VMMSHIM_TRACE_DIR"] = os.path.abspath(record)
    args = ["-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts=", os.path.join(ROOT, "tests", "conformance")]
    if keyword:
        args += ["-k", keyword]
    try:
        pytest.main(args, plugins=[plugin])
    finally:
        os.environ.clear()
        os.environ.update(env_backup)
    return plugin.results


def matrix(results, providers):
    """``(lines, problems)``: the printed table, and the cases whose outcomes disagree without a reason."""
    cases = list(dict.fromkeys(c for c, _ in results))
    width = max([len(c) for c in cases] + [4])
    cols = [max(len(p), 8) for p in providers]
    lines = [f"{'case':<{width}}  " + "  ".join(f"{p:<{w}}" for p, w in zip(providers, cols))]
    problems = []
    for case in cases:
        row = [results.get((case, p), "-") for p in providers]
        lines.append(f"{case:<{width}}  " + "  ".join(f"{o:<{w}}" for o, w in zip(row, cols)))
        ran = [o for o in row if o in ("pass", "FAIL")]
        if "FAIL" in ran and "pass" in ran:
            problems.append(f"{case}: passes on {', '.join(p for p, o in zip(providers, row) if o == 'pass')}, "
                            f"fails on {', '.join(p for p, o in zip(providers, row) if o == 'FAIL')}")
        elif ran and all(o == "FAIL" for o in ran):
            problems.append(f"{case}: fails on every provider that ran it")
    counts = collections.Counter(o.split(" ")[0] for o in results.values())
    lines.append(f"{len(cases)} cases x {len(providers)} providers: " +
                 ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    return lines, problems


def diff(directory):
    """First divergence of each case's traces between providers."""
    by_case = collections.defaultdict(dict)
    for name in sorted(os.listdir(directory)):
        m = re.match(r"^(.*)\.([a-z]+)\.trace$", name)
        if m:
            with open(os.path.join(directory, name)) as f:
                by_case[m.group(1)][m.group(2)] = f.read().splitlines()
    out = []
    for case, traces in sorted(by_case.items()):
        if len(traces) < 2:
            continue
        (pa, ta), (pb, tb) = sorted(traces.items())[:2]
        for i, (a, b) in enumerate(zip(ta, tb)):
            if a != b:
                out.append(f"{case}: exit {i}: {pa}: {a} | {pb}: {b}")
                break
        else:
            if len(ta) != len(tb):
                out.append(f"{case}: {pa} has {len(ta)} exits, {pb} has {len(tb)}")
    return out


def main(argv=None):
    sys.path.insert(0, ROOT)
    from ops.nvmm import available_providers
    from vmmshim.flags import ArgumentParser
    ap = ArgumentParser(prog="vmmshim conformance", description=__doc__.splitlines()[0])
    ap.add_argument("--providers", help="comma-separated (default: every provider present)")
    ap.add_argument("--record", metavar="DIR", help="write each case's exit trace per provider")
    ap.add_argument("--diff", metavar="DIR", help="compare the traces recorded in DIR")
    ap.add_argument("-k", dest="keyword", help="only cases matching this pytest expression")
    args = ap.parse_args(argv)
    if args.diff:
        lines = diff(args.diff)
        print("\n".join(lines) if lines else "traces agree")
        return 0
    present = [p for p, why in available_providers().items() if why is None]
    providers = args.providers.split(",") if args.providers else present
    results = run(providers, args.keyword, args.record)
    lines, problems = matrix(results, providers)
    print("\n".join(lines))
    for p in problems:
        print(f"DIFFERENCE: {p}")
    if args.record:
        d = diff(args.record)
        print(f"trace differences ({len(d)} cases):" if d else "exit traces agree across providers")
        for line in d:
            print("  " + line)
    return 1 if problems else 0
