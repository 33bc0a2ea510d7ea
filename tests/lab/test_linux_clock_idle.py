"""The Linux guest's clock runs at the host's rate and an idle guest leaves the host core idle (issue 6), measured
in the nested lab by ``l1_clock_idle.py``: the guest sleeps 10 s between two console lines carrying its uptime;
L1 times the lines' arrival and the vmmshim process's CPU use over the same interval.

In the lab every exit and every wake-up costs milliseconds (L1 is QEMU TCG), so an idle guest's CPU use is
compared with QEMU's (``-machine pc,kernel_irqchip=off``) booting the same guest in the same L1 with the same
clocksource: both guests read kvm-clock (KVM's own in both, ``Machine.kernel_pvclock``; vmmshim offers it by
default, the test's ``-o x86.kvm_pv=true`` only says so), and the test checks vmmshim's guest did choose it.
QEMU with ``-cpu qemu64,-kvmclock`` (its guest reads the HPET) is printed beside it.

The bounds sit well above what was measured (docs/lab.md, "An idle guest's clock and CPU"): QEMU's own idle share
moved between L1s by more than vmmshim's, so the ratio's bound leaves room for that, and a VMM that spins or ticks
while the guest idles is still far beyond every bound. Before the paravirtual clock, vmmshim's guest read the HPET
(its TSC calibration against the PIT fails in the lab) many times a second, and each of those exits cost far more
L1 time in Python than QEMU's did. On kvm_pvm an idle guest's share is checked by ``tests/kvm/test_idle.py``.
"""

import re

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot]

RATE_TOLERANCE = 0.01          # the 1 % over 10 s
IDLE_VS_QEMU = 3.0             # vmmshim's idle CPU over QEMU's, same guest and clocksource (measured: docs/lab.md)
IDLE_CORE_SHARE = 0.20         # of one L1 core (measured: docs/lab.md; a spinning VMM takes the whole core)
PEER = "qemu"                  # QEMU's guest reads kvm-clock, as vmmshim's does
CLOCKSOURCE = "kvm-clock"
IDLE_IRQS_PER_S = 50           # a tickless idle guest: far below the 250 Hz periodic tick (measured: docs/lab.md)


@pytest.fixture(scope="module")
def lab_run(lab_ready):
    from vmmshim.lab import run_in_lab

    res = run_in_lab("cd /lab/project && python3 tests/lab/l1_clock_idle.py --peer", timeout=700,
                     retry_killed=True)
    print(res.stdout)                      # the RESULT lines, QEMU's too, for the record (pytest -s)
    return res


@pytest.fixture(scope="module")
def measured(lab_run):
    out = {}
    for m in re.finditer(r"^RESULT ([\w-]+) guest_s=([\d.]+) host_s=([\d.]+) cpu_s=([\d.]+) timer_irqs=(\d+) "
                         r"clocksource=(\S+)", lab_run.stdout, re.M):
        out[m.group(1)] = tuple(float(x) for x in m.groups()[1:5]) + (m.group(6),)
    assert "vmmshim" in out, (lab_run.status, lab_run.stdout[-3000:], lab_run.stderr[-2000:])
    return out


def test_guest_clock_advances_at_the_host_rate(measured):
    guest_s, host_s, _, _, clocksource = measured["vmmshim"]
    assert clocksource == CLOCKSOURCE, f"the guest did not take the paravirtual clock: {measured}"
    assert guest_s >= 10
    assert abs(guest_s / host_s - 1) <= RATE_TOLERANCE, measured


def test_idle_guest_leaves_the_host_core_idle(measured, lab_run):
    _, host_s, cpu_s, irqs, _ = measured["vmmshim"]
    assert irqs / host_s <= IDLE_IRQS_PER_S, f"the idle guest ticks: {measured}"
    assert cpu_s / host_s <= IDLE_CORE_SHARE, f"vmmshim keeps the core busy: {measured}"
    assert PEER in measured, f"the QEMU peer did not boot, twice: {lab_run.stdout[-4000:]}"
    _, q_host_s, q_cpu_s, _, q_clocksource = measured[PEER]
    assert q_clocksource == CLOCKSOURCE, f"the peer's guest reads another clock: {measured}"
    assert cpu_s / host_s <= IDLE_VS_QEMU * (q_cpu_s / q_host_s), measured
