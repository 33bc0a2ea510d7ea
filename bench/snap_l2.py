"""Inside L1: how long a restore of the default guest takes until it runs again, beside its cold boot (issue 23's
benchmark). Run by ``bench/snap_bench.py``; by hand in L1: ``python3 -m bench.snap_l2 --rounds 1``.

Each round boots the guest once (``-c 2``, virtio-blk, virtio-rnd): its script prints ``SNAP-TICK-<n>`` every
0.1 s of its own time. The cold boot's figure is the VMM's start to the guest's shell marker. At tick
:data:`CHECKPOINT_AT` L1 runs ``vmmshim ctl --suspend``; then the checkpoint is restored :data:`RESTORES` times, and
each restore's figure is ``vmmshim -r``'s start to the first tick line the restored guest prints (it was at most
0.1 s of guest time away from one). One ``SNAP {json}`` line per round: ``cold_s``, ``suspend_s`` (ctl's wall
time), ``paused_s`` (what the VM reported), ``restore_s`` (a list), ``memory`` (apparent and allocated bytes).

Not measured: a restore into a guest that then does disk I/O (the lab test does that), checkpoint size against
guest memory size.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

from vmmshim.lab import l2vm
from vmmshim.lab.guest import MARKER_UP, encode_run

NAME = "snapbench"
CHECKPOINT_AT = 20
RESTORES = 3
TICK_SCRIPT = "i=0; while [ $i -lt 3000 ]; do echo SNAP-TICK-$i; i=$((i+1)); sleep 0.1; done"
TIMEOUT_S = 300


def _console(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _wait(console, until, proc, t0, timeout=TIMEOUT_S):
    """Seconds from ``t0`` until ``until(console text)`` held, or None when ``proc`` ended or ``timeout`` passed
    first."""
    while time.monotonic() - t0 < timeout and proc.poll() is None:
        if until(_console(console)):
            return time.monotonic() - t0
        time.sleep(0.05)
    return None


def _run_until(argv, console, until):
    """Starts ``argv``; returns (:func:`_wait`'s seconds, the process, left running)."""
    if os.path.exists(console):
        os.unlink(console)
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return _wait(console, until, proc, t0), proc


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def one_round(work, image):
    append = f"{l2vm.BASE_APPEND} {encode_run(TICK_SCRIPT)}"
    argv = l2vm.vmmshim_argv(append, f"{work}/cold.txt", disks=[l2vm.Disk(image)], rnd=True, ncpus=2,
                             opts=["-o", f"name={NAME}"])
    snap = f"{work}/ckp"
    rec = dict(cold_s=None, suspend_s=None, paused_s=None, restore_s=[])
    cold, proc = _run_until(argv, f"{work}/cold.txt", lambda t: MARKER_UP in t)
    rec["cold_s"] = None if cold is None else round(cold, 2)
    if cold is None:
        _stop(proc)
        return rec
    # the tick after CHECKPOINT_AT: that one's line is complete (the console ends lines with \r\n)
    ticked = _wait(f"{work}/cold.txt", lambda t: f"SNAP-TICK-{CHECKPOINT_AT + 1}" in t, proc, time.monotonic())
    if ticked is not None:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "vmmshim", "ctl", f"--vm={NAME}", f"--suspend={snap}"],
                           capture_output=True, text=True, timeout=TIMEOUT_S)
        rec["suspend_s"] = round(time.monotonic() - t0, 2)
        m = re.search(r"stood still ([\d.]+) s", r.stdout)
        rec["paused_s"] = float(m.group(1)) if m else None
    if rec["suspend_s"] is not None and proc.poll() is None:
        try:
            proc.wait(60)                   # the suspended VM ends by itself
        except subprocess.TimeoutExpired:
            pass
    _stop(proc)
    if rec["paused_s"] is None:
        return rec
    st = os.stat(snap)
    rec["memory"] = [st.st_size, st.st_blocks * 512]
    for i in range(RESTORES):
        console = f"{work}/restore-{i}.txt"
        secs, p = _run_until([sys.executable, "-m", "vmmshim", "-r", snap, "-l", f"com1,file:{console}"], console,
                             lambda t: "SNAP-TICK-" in t)
        _stop(p)
        rec["restore_s"].append(None if secs is None else round(secs, 2))
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/snapbench")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    image = f"{args.workdir}/disk.img"
    l2vm.write_image(image, 16)
    for rnd in range(args.rounds):
        rec = one_round(args.workdir, image)
        rec["round"] = rnd
        print("SNAP " + json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
