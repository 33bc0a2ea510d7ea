"""python3 -m vmmshim.lab {build,guest,run,status}: see docs/lab.md."""

import argparse
import json
import subprocess
import sys

from vmmshim.lab import guest as guest_mod
from vmmshim.lab import image as image_mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m vmmshim.lab", description="the nested lab (docs/lab.md)")
    sub = p.add_subparsers(dest="what", required=True)
    b = sub.add_parser("build", help="build the L1 root image (debootstrap) and the default guest")
    b.add_argument("--force", action="store_true", help="rebuild even when the inputs did not change")
    b.add_argument("--no-guest", action="store_true", help="the L1 image only")
    g = sub.add_parser("guest", help="build the default guest (vmlinuz, initramfs.gz)")
    g.add_argument("--force", action="store_true")
    sub.add_parser("fetch", help="download and extract the guest kernel and busybox .debs into the cache")
    r = sub.add_parser("run", help="boot L1 and run a command in it")
    r.add_argument("--timeout", type=float, default=600, help="seconds for the command inside L1 (default 600)")
    r.add_argument("--boot-timeout", type=float, default=240, help="seconds for L1 to reach its init")
    r.add_argument("--retries", type=int, default=2, help="L1 boots to retry when one hangs (default 2)")
    r.add_argument("--smp", type=int, default=2)
    r.add_argument("--mem", default="6G")
    r.add_argument("--echo", action="store_true", help="show L1's console as it runs")
    r.add_argument("--keep", action="store_true", help="keep the work disk, console log and results")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD... (one argument is run as a shell string)")
    sub.add_parser("status", help="what is built, where, and whether the lab can run")
    a = p.parse_args(argv)

    if a.what == "build":
        try:
            image_mod.build_image(force=a.force)
            if not a.no_guest:
                guest_mod.build_guest(force=a.force)
        except (image_mod.BuildError, guest_mod.GuestBuildError) as e:
            print(f"[lab] build failed: {e}", file=sys.stderr)
            return 1
        return 0
    if a.what == "guest":
        try:
            guest_mod.build_guest(force=a.force)
        except guest_mod.GuestBuildError as e:
            print(f"[guest] build failed: {e}", file=sys.stderr)
            return 1
        return 0
    if a.what == "fetch":
        try:
            guest_mod.fetch_packages()
        except (guest_mod.GuestBuildError, OSError, subprocess.CalledProcessError) as e:
            print(f"[guest] fetch failed: {e}", file=sys.stderr)
            return 1
        return 0
    if a.what == "status":
        from vmmshim.lab.run import lab_available

        ok, why = lab_available()
        info = {"available": ok, "reason": why, "image": str(image_mod.image_dir()),
                "image_built": image_mod.image_ready(), "guest": str(guest_mod.guest_dir()),
                "guest_built": guest_mod.guest_ready()}
        if image_mod.image_ready():
            m = image_mod.manifest()
            info.update(kernel=m["kernel"], build_timings=m["timings"])
        print(json.dumps(info, indent=1))
        return 0 if ok else 1

    from vmmshim.lab.run import LabError, Terminated, run_in_lab

    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("run: give a command after --")
    cmd = cmd[0] if len(cmd) == 1 else cmd
    try:
        res = run_in_lab(cmd, timeout=a.timeout, smp=a.smp, mem=a.mem, boot_timeout=a.boot_timeout,
                         retries=a.retries, keep=a.keep, echo=a.echo)
    except LabError as e:
        print(f"[lab] {e}", file=sys.stderr)
        return 255
    except Terminated as e:
        print(f"[lab] stopped by {e}; L1 killed", file=sys.stderr)
        return 143
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    print(f"[lab] status {res.status}; L1 boot {res.boot_s:.1f} s; command {res.cmd_s:.1f} s; "
          f"total {res.total_s:.1f} s; attempts {res.attempts}; /dev/kvm in L1: {'yes' if res.kvm else 'no'}",
          file=sys.stderr)
    return res.status


if __name__ == "__main__":
    sys.exit(main())
