"""The Linux guest's clock runs at the host's rate and an idle guest leaves the host core idle (issue 6), measured
in the nested lab by ``l1_clock_idle.py``: the guest sleeps 10 s between two console lines carrying its uptime;
L1 times the lines' arrival and the vmmshim process's CPU use over the same interval.

In the lab every exit and every wake-up costs milliseconds (L1 is QEMU TCG), so an idle guest's CPU use is
compared with QEMU's (``-machine pc,kernel_irqchip=off``) booting the same guest in the same L1 with the same
clocksource: QEMU's guest reads kvm-clock, vmmshim's the HPET (its TSC calibration fails in the lab), so the peer
the test judges against is QEMU with ``-cpu qemu64,-kvmclock``, whose guest reads the HPET too; QEMU's default is
printed beside it. Its timer interrupts are counted to show the idle guest is tickless.

Measured (10 s of idle guest, % of one L1 core): vmmshim 13-15 %, QEMU without kvmclock 5.0-6.1 %, QEMU
default 5.3-6.9 %; about 18 timer interrupts a second; the clock within 0.3 %. The guest makes about 170 exits a
second when idle (113 HPET counter reads, 15 LAPIC timer writes, 10 EOIs, HLTs and injections), and the gap to QEMU is
the Python exit path's cost per exit (about 0.9 ms in L1 against QEMU's 0.35 ms). A VMM that spins or ticks
while the guest idles is far beyond the bounds. On kvm_pvm, an idle 100 Hz guest costs 1.5-1.8 %
(``tests/kvm/test_idle.py``).
"""

import re

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot]

RATE_TOLERANCE = 0.01          # the 1 % over 10 s
IDLE_VS_QEMU = 3.0             # vmmshim's idle CPU over QEMU's, same guest and clocksource (measured: 2.1-2.6x)
IDLE_CORE_SHARE = 0.25         # of one L1 core (measured: 13-15 %; a spinning VMM takes the whole core)
PEER = "qemu-nokvmclock"       # QEMU whose guest reads the HPET, as vmmshim's does
IDLE_IRQS_PER_S = 50           # a tickless idle guest: far below the 250 Hz periodic tick (measured: about 17)


@pytest.fixture(scope="module")
def measured(lab_ready):
    from vmmshim.lab import run_in_lab

    res = run_in_lab("cd /lab/project && python3 tests/lab/l1_clock_idle.py --peer", timeout=500)
    print(res.stdout)                      # the RESULT lines, QEMU's too, for the record (pytest -s)
    out = {}
    for m in re.finditer(r"^RESULT ([\w-]+) guest_s=([\d.]+) host_s=([\d.]+) cpu_s=([\d.]+) timer_irqs=(\d+)",
                         res.stdout, re.M):
        out[m.group(1)] = tuple(float(x) for x in m.groups()[1:])
    assert "vmmshim" in out, (res.status, res.stdout[-3000:], res.stderr[-2000:])
    return out


def test_guest_clock_advances_at_the_host_rate(measured):
    guest_s, host_s, _, _ = measured["vmmshim"]
    assert guest_s >= 10
    assert abs(guest_s / host_s - 1) <= RATE_TOLERANCE, measured


def test_idle_guest_leaves_the_host_core_idle(measured):
    _, host_s, cpu_s, irqs = measured["vmmshim"]
    assert irqs / host_s <= IDLE_IRQS_PER_S, f"the idle guest ticks: {measured}"
    assert cpu_s / host_s <= IDLE_CORE_SHARE, f"vmmshim keeps the core busy: {measured}"
    assert PEER in measured, f"the QEMU peer did not boot: {measured}"
    _, q_host_s, q_cpu_s, _ = measured[PEER]
    assert cpu_s / host_s <= IDLE_VS_QEMU * (q_cpu_s / q_host_s), measured
