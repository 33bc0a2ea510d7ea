"""``vmmshim linux``: the README's main job, the default guest (Debian's kernel and a busybox initramfs, built by
``vmmshim.lab.guest``) booted with the xhyve command line a user would type.

Where it runs depends on this host's ``/dev/kvm`` (``ops.nvmm.kvm.provider.hardware_kind``):

- **kvm_intel / kvm_amd** (hardware-assisted): vmmshim boots the guest right here, console on stdio;
- **kvm_pvm** (paravirtual) or no KVM module: a stock kernel crawls in supervisor mode there, so the same
  command runs inside the nested lab (QEMU TCG with nested SVM and a real ``kvm_amd`` in L1, ``docs/lab.md``)
  and the guest's console is printed when it ends.

The exit status is the VM's (bhyve's: 0 reset, 1 power off, 2 halt, 3 triple fault, 4 error); a bad argument
(``-c`` and ``-m`` are checked as the ``vmmshim`` command reads them) is one line and status 4 before anything
boots. The guest's init powers off after running ``--run CMD`` (``vmmshim.run=`` on the kernel command line), so
a clean boot exits 1.

Not supported: an interactive shell through the lab (the lab returns output when the command ends).
"""

import os
import shlex
import sys

HW_KINDS = ("kvm_intel", "kvm_amd")
LAB_TIMEOUT_S = 600
LAB_GUEST_TRIES = 3
EXIT_POWEROFF = 1


def guest_argv(guest_dir, cpus, mem, console, run=None, cmdline_extra=""):
    """The xhyve-style argv that boots the default guest."""
    from vmmshim.lab.guest import encode_run

    cmdline = "console=ttyS0 panic=-1"
    if cmdline_extra:
        cmdline += " " + cmdline_extra
    if run:
        cmdline += " " + encode_run(run)
    return ["-A", "-m", mem, "-c", str(cpus), "-s", "0:0,hostbridge", "-s", "31,lpc",
            "-l", f"com1,{console}",
            "-f", f"kexec,{guest_dir}/vmlinuz,{guest_dir}/initramfs.gz,{cmdline}"]


def where_to_run():
    """("here" or "lab", why)."""
    from ops.nvmm.kvm.provider import hardware_kind

    kind = hardware_kind()
    if kind in HW_KINDS:
        return "here", f"/dev/kvm is {kind} (hardware-assisted): booting the default guest directly"
    if os.environ.get("VMMSHIM_LAB"):
        return "here", "inside the nested lab: booting the default guest directly"
    return "lab", (f"/dev/kvm is {kind} ({'paravirtual' if kind == 'kvm_pvm' else 'not hardware-assisted'}): "
                   "a stock Linux kernel crawls there, so the default guest boots in the nested lab "
                   "(QEMU TCG, nested SVM, kvm_amd in L1; docs/lab.md), about a minute and a half")


def lab_script(vmm_cmd):
    """The shell script that runs ``vmm_cmd`` inside L1: up to ``LAB_GUEST_TRIES`` boots while the guest
    triple-faults (status 3) before ``VMMSHIM-GUEST-UP``; the last boot's console on stdout, its stderr on stderr,
    its status as the script's."""
    from vmmshim.lab.guest import MARKER_UP

    return (f"for try in $(seq 1 {LAB_GUEST_TRIES}); do "
            f"timeout -k 5 {LAB_TIMEOUT_S - 60} {vmm_cmd} >/tmp/guest.out 2>/tmp/guest.err; st=$?; "
            f"if [ $st -eq 3 ] && ! grep -q {MARKER_UP} /tmp/guest.out; then "
            f"echo \"vmmshim: lab: the guest triple-faulted before its shell (boot $try of {LAB_GUEST_TRIES}; "
            f"the lab's emulated nested SVM, docs/lab.md)\" >&2; tail -3 /tmp/guest.out >&2; continue; fi; "
            f"break; done; cat /tmp/guest.out; cat /tmp/guest.err >&2; exit $st")


def main(argv):
    from vmmshim.config import ConfigError
    from vmmshim.flags import ArgumentParser, UsageError, parse_args

    ap = ArgumentParser(prog="vmmshim linux", description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--cpus", type=int, default=2)
    ap.add_argument("-m", "--mem", default="512M")
    ap.add_argument("--run", default="", help="shell command the guest runs before it powers off")
    ap.add_argument("--append", default="", help="more kernel command line")
    ap.add_argument("--here", action="store_true", help="boot here even if /dev/kvm is paravirtual")
    args = ap.parse_args(argv)
    try:        # -c and -m as the vmmshim command reads them, here rather than after a minute of lab boot
        parse_args(guest_argv("/", args.cpus, args.mem, "stdio"))
    except (UsageError, ConfigError) as exc:
        ap.error(str(exc))
    from vmmshim.lab import guest as guest_mod

    where, why = where_to_run()
    if args.here:
        where = "here"
    print(f"vmmshim: {why}", file=sys.stderr, flush=True)
    if where == "here":
        gdir = os.environ.get("VMMSHIM_GUEST_DIR") or str(guest_mod.guest_dir())
        if not os.path.exists(os.path.join(gdir, "vmlinuz")):
            print(f"vmmshim: default guest not built in {gdir} (scripts/install-deps.sh or "
                  "python3 -m vmmshim.lab guest)", file=sys.stderr)
            return 4
        from vmmshim.runner import reported, run_vm

        argv = guest_argv(gdir, args.cpus, args.mem, "stdio", args.run, args.append)
        return reported(lambda: run_vm(parse_args(argv)))
    from vmmshim.lab import lab_available, run_in_lab

    ok, reason = lab_available()
    if not ok:
        print(f"vmmshim: the nested lab cannot run: {reason}", file=sys.stderr)
        return 4
    inner = ["python3", "-m", "vmmshim", *guest_argv("/lab/guest", args.cpus, args.mem, "stdio", args.run,
                                                     args.append)]
    # L1 (QEMU TCG) itself hangs or crashes now and then, and its L2 guests triple-fault early in boot now and
    # then, QEMU's as well as vmmshim's (docs/lab.md): a killed L1 gets another boot, and so does a guest that
    # triple-faulted before its shell marker (its --run command had not started), saying so on stderr
    from vmmshim.lab.run import Terminated
    try:
        res = run_in_lab(lab_script(shlex.join(inner)), timeout=LAB_TIMEOUT_S + 120, retry_killed=True)
    except Terminated as exc:        # L1 is killed with the guest in it: a power off, as the signal asked
        print(f"vmmshim: {exc}: the lab was stopped (L1 killed, the guest powered off)", file=sys.stderr)
        return EXIT_POWEROFF
    sys.stdout.write(res.stdout)
    sys.stderr.write(res.stderr)
    print(f"vmmshim: lab: L1 boot {res.boot_s:.1f} s, guest run {res.cmd_s:.1f} s, VM exit status {res.status}",
          file=sys.stderr)
    return res.status
