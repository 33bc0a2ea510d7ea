"""vmmshim boots stock Debian Linux (the default guest: Debian's kernel and a busybox initramfs) inside the nested
lab, one L1 boot for all cases: to the shell marker with ACPI, with two vCPUs (both online), with the MP table
instead of ACPI, and ``reboot -f`` ending with status 0.

Opt-in (``pytest -m linux_boot tests/lab``): in about half of the boots the guest loses a timer interrupt during
Linux's timer checks (it panics in ``check_timer`` or hangs calibrating the APIC timer with vector 0x30 both in
service and requested) -- an open bug, more frequent with the HPET as Linux's clock-event device, so the ACPI
cases pass ``hpet=disable``. These tests are the acceptance test for issue 6 and fail while the bug stands.
"""

import re

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot]

VMM = ("timeout -k 5 {t} python3 -m vmmshim {args} -m 512M -s 0:0,hostbridge -s 31,lpc -l com1,/tmp/{name}.txt "
       "-f kexec,/lab/guest/vmlinuz,/lab/guest/initramfs.gz,'console=ttyS0 panic=-1 {append}'")
CASES = {
    "acpi1": ("-A -c 1", "hpet=disable"),
    "smp2": ("-A -c 2", "hpet=disable"),
    "mptable": ("-c 1", ""),
    "reboot": ("-A -c 1", "hpet=disable vmmshim.exit=reboot"),
}


@pytest.fixture(scope="module")
def boots(lab_ready):
    from vmmshim.lab import run_in_lab
    script = "cd /lab/project\n" + "\n".join(
        f"s=$(date +%s); {VMM.format(t=150, args=a, name=n, append=x)} 2>/tmp/{n}.err; st=$?; "
        f"echo \"CASE {n} status=$st seconds=$(( $(date +%s) - s ))\"; sed 's/^/{n}| /' /tmp/{n}.txt; "
        f"tail -3 /tmp/{n}.err | sed 's/^/{n}! /'"
        for n, (a, x) in CASES.items())
    res = run_in_lab(script, timeout=900)
    out = {}
    for name in CASES:
        m = re.search(rf"^CASE {name} status=(\d+) seconds=(\d+)", res.stdout, re.M)
        console = "\n".join(line[len(name) + 2:] for line in res.stdout.splitlines()
                            if line.startswith(f"{name}| "))
        out[name] = (int(m.group(1)) if m else None, int(m.group(2)) if m else None, console)
    return out


def test_acpi_boot_reaches_the_shell_and_powers_off(boots):
    status, secs, console = boots["acpi1"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert "VMMSHIM-GUEST-POWEROFF" in console and status == 1, (status, console[-1000:])
    assert "ttyS0 at I/O 0x3f8 (irq = 4" in console, "the 8250 driver did not find COM1"


def test_two_vcpus_are_online(boots):
    status, secs, console = boots["smp2"]
    assert "VMMSHIM-CPUS=2" in console, console[-2000:]
    assert status == 1


def test_mptable_boot_without_acpi(boots):
    status, secs, console = boots["mptable"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert "MultiProcessor Specification" in console, "Linux did not read the MP table"
    assert status == 2, "without ACPI Linux cannot power off: it halts (bhyve status 2)"


def test_reboot_exits_with_status_0(boots):
    status, secs, console = boots["reboot"]
    assert "VMMSHIM-GUEST-UP" in console, console[-2000:]
    assert status == 0
