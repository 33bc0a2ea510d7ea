"""Inside L1: a checkpoint of the default Linux guest and two restores of it (issue 23):
``python3 -m vmmshim.lab.snapshot_check [--tries N]``.

The guest (two vCPUs, virtio-blk on a scratch image, virtio-rnd) writes a pattern to its disk, syncs, prints
``SNAP-BEFORE``, and sleeps :data:`SLEEP_S` seconds of its own time. L1 then runs ``vmmshim ctl --suspend`` (the
VM ends with status 1), copies the image, and restores the checkpoint twice: once on the image, once with ``-s``
pointing the disk at the copy (a disk path given on the command line overrides the checkpoint's). Each restored
guest wakes from its sleep, reads the first pattern back and compares its SHA-256, writes a second pattern after
it, prints ``SNAP-AFTER <ok|bad> <seconds slept>`` and powers off (status 1). L1 checks both patterns in both
images.

One line ``SNAP-RESULT {json}`` (:func:`parse_result`): ``up``, ``before`` (the console showed SNAP-BEFORE),
``suspend_status`` (of ``vmmshim ctl``), ``suspended_status`` (the VM's), ``paused_s`` (how long the checkpoint
held the guest), ``restores`` (per restore: ``status``, ``after`` (ok/bad), ``disk`` (both patterns in the image),
``secs`` (from start to power off), ``stderr``), ``sizes`` (the checkpoint's files: apparent and allocated bytes);
then each console prefixed ``snap| ``.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

NAME = "labsnap"
SLEEP_S = 40
PATTERN_MIB = 2
FIRST_OFF_MIB, SECOND_OFF_MIB = 1, 4
SUSPEND_TIMEOUT_S = 300


def guest_script(first_sha):
    mib = PATTERN_MIB
    return (f"dd if=/dev/urandom of=/dev/null bs=64 count=1 2>/dev/null; "     # virtio-rnd answers
            f"dd if=/tmp/p1 of=/dev/vda bs=1M seek={FIRST_OFF_MIB} count={mib} conv=fsync 2>/dev/null; "
            f"sync; echo SNAP-BEFORE; a=$(cut -d' ' -f1 /proc/uptime); sleep {SLEEP_S}; "
            f"b=$(cut -d' ' -f1 /proc/uptime); "
            f"h=$(dd if=/dev/vda bs=1M skip={FIRST_OFF_MIB} count={mib} iflag=direct 2>/dev/null | sha256sum | "
            f"cut -d' ' -f1); "
            f"dd if=/tmp/p2 of=/dev/vda bs=1M seek={SECOND_OFF_MIB} count={mib} conv=fsync 2>/dev/null; sync; "
            f"[ \"$h\" = {first_sha} ] && r=ok || r=bad; echo SNAP-AFTER $r $a $b")


def _prefix(first_seed, second_seed):
    """The guest makes its two patterns itself: its seed line repeated (:func:`expected` is the same bytes)."""
    return (f"yes {first_seed} | head -c {PATTERN_MIB << 20} > /tmp/p1; "
            f"yes {second_seed} | head -c {PATTERN_MIB << 20} > /tmp/p2; ")


def expected(seed):
    line = (seed + "\n").encode()
    n = PATTERN_MIB << 20
    return (line * (n // len(line) + 1))[:n]


def _image_has(path, off_mib, data):
    with open(path, "rb") as f:
        f.seek(off_mib << 20)
        return f.read(len(data)) == data


def _ctl(*args):
    return subprocess.run([sys.executable, "-m", "vmmshim", "ctl", *args], capture_output=True, text=True,
                          timeout=SUSPEND_TIMEOUT_S)


def _sizes(base):
    out = {}
    for p in (base, base + ".kern", base + ".meta"):
        st = os.stat(p)
        out[os.path.basename(p)] = [st.st_size, st.st_blocks * 512]
    return out


def run(args):
    work = args.workdir
    os.makedirs(work, exist_ok=True)
    image, copy, snap = f"{work}/disk.img", f"{work}/disk-copy.img", f"{work}/ckp"
    l2vm.write_image(image, 16)
    first = expected("first-pattern")
    script = _prefix("first-pattern", "second-pattern") + guest_script(hashlib.sha256(first).hexdigest())
    append = f"{l2vm.BASE_APPEND} {encode_run(script)}"
    result = dict(up=False, before=False, suspend_status=None, suspended_status=None, restores=[])
    consoles = {}
    for _ in range(args.tries):
        console = f"{work}/console-0.txt"
        state = {}

        def watch(text):
            if "SNAP-BEFORE" in text and "ctl" not in state:
                state["ctl"] = _ctl(f"--vm={NAME}", f"--suspend={snap}")

        res = l2vm.boot(l2vm.vmmshim_argv(append, console, disks=[l2vm.Disk(image)], rnd=True, ncpus=2,
                                          opts=["-o", f"name={NAME}"]),
                        console, timeout=args.timeout, marker_timeout=args.timeout, watch=watch)
        consoles["boot"] = res.console
        result.update(up=res.up, before="SNAP-BEFORE" in res.console, suspended_status=res.status)
        if "ctl" in state:
            c = state["ctl"]
            result["suspend_status"] = c.returncode
            m = re.search(r"stood still ([\d.]+) s", c.stdout)
            result["paused_s"] = float(m.group(1)) if m else None
            result["suspend_stderr"] = c.stderr[-500:]
            break
    if result["suspend_status"] != 0:
        return result, consoles
    result["sizes"] = _sizes(snap)
    shutil.copyfile(image, copy)
    for i, disk in enumerate((image, copy)):
        console = f"{work}/console-{i + 1}.txt"
        extra = [] if disk == image else ["-s", f"4,virtio-blk,{disk}"]
        t0 = time.monotonic()
        res = l2vm.boot([sys.executable, "-m", "vmmshim", "-r", snap, "-l", f"com1,file:{console}", *extra],
                        console, timeout=args.timeout, marker_timeout=args.timeout)
        m = re.search(r"SNAP-AFTER (\w+) ([\d.]+) ([\d.]+)", res.console)
        result["restores"].append(dict(
            status=res.status, after=m.group(1) if m else None,
            slept=round(float(m.group(3)) - float(m.group(2)), 2) if m else None,
            disk=_image_has(disk, FIRST_OFF_MIB, first) and _image_has(disk, SECOND_OFF_MIB,
                                                                        expected("second-pattern")),
            secs=round(time.monotonic() - t0, 2), stderr=res.stderr[-800:]))
        consoles[f"restore{i + 1}"] = res.console
    return result, consoles


def parse_result(stdout):
    m = re.search(r"^SNAP-RESULT (\{.*\})$", stdout, re.M)
    return (json.loads(m.group(1)) if m else None), "\n".join(
        line[6:] for line in stdout.splitlines() if line.startswith("snap| "))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=2, help="boots while the guest hangs before the checkpoint")
    ap.add_argument("--timeout", type=float, default=400.0)
    ap.add_argument("--workdir", default="/tmp/snap")
    args = ap.parse_args(argv)
    result, consoles = run(args)
    print("SNAP-RESULT " + json.dumps(result), flush=True)
    for name, text in consoles.items():
        for line in text.splitlines():
            print(f"snap| [{name}] {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
