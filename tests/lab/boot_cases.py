"""Boots the default guest with vmmshim in one L1, one boot per case, and returns each case's status, seconds and
console: the shared body of the lab modules that only need the guest's console (``test_vmmshim_linux.py``,
``test_vmmshim_smp.py``).

A boot that never reaches the shell (the lab's L2 has hung and triple-faulted early, in the TCG-emulated L1) is
tried again, ``BOOT_TRIES`` boots in all; the failed tries are printed and counted in CASE lines, and a case
passes on a boot that reached the shell."""

import re

BOOT_TRIES = 3
VMM = ("timeout -k 5 {t} python3 -m vmmshim {args} -m 512M -s 0:0,hostbridge -s 31,lpc -l com1,stdio "
       "-f kexec,/lab/guest/vmlinuz,/lab/guest/initramfs.gz,'console=ttyS0 panic=-1 {append}' "
       "</dev/null >/tmp/{name}.txt")      # the console on stdio, as a user runs it


def run_cases(cases, vm_timeout=150, lab_timeout=1200):
    """``cases``: ``{name: (vmmshim flags, kernel command-line additions)}``; returns ``{name: (status, seconds,
    console)}`` (None for what a case never printed)."""
    from vmmshim.lab import run_in_lab
    script = "cd /lab/project\n" + "\n".join(
        f"for try in $(seq 1 {BOOT_TRIES}); do s=$(date +%s); {VMM.format(t=vm_timeout, args=a, name=n, append=x)} "
        f"2>/tmp/{n}.err; st=$?; grep -q VMMSHIM-GUEST-UP /tmp/{n}.txt && break; "
        f"echo \"{n}: try $try did not reach the shell (status $st)\" >&2; tail -5 /tmp/{n}.txt >&2; done; "
        f"echo \"CASE {n} status=$st seconds=$(( $(date +%s) - s )) tries=$try\"; sed 's/^/{n}| /' /tmp/{n}.txt; "
        f"tail -3 /tmp/{n}.err | sed 's/^/{n}! /'"
        for n, (a, x) in cases.items())
    # L1 (QEMU TCG) itself fails now and then: one CI run here lost two L1 boots in a row, one that stopped its
    # heartbeat and one whose kernel hit a stack guard page in exc_page_fault, both after some cases had passed
    res = run_in_lab(script, timeout=lab_timeout, retries=2, retry_killed=True)
    print(re.findall(r"^CASE .*$", res.stdout, re.M), res.stderr[-3000:])
    out = {}
    for name in cases:
        m = re.search(rf"^CASE {name} status=(\d+) seconds=(\d+)", res.stdout, re.M)
        console = "\n".join(line[len(name) + 2:] for line in res.stdout.splitlines()
                            if line.startswith(f"{name}| "))
        out[name] = (int(m.group(1)) if m else None, int(m.group(2)) if m else None, console)
    return out
