"""The Linux guest's clock runs at the host's rate and an idle guest leaves the host core idle (issue 6), measured
in the nested lab by ``l1_clock_idle.py``: the guest sleeps 10 s between two console lines carrying its uptime;
L1 times the lines' arrival and the vmmshim process's CPU use over the same interval.

In the lab every exit and every wake-up costs milliseconds (L1 is QEMU TCG), so an idle guest's CPU use is
compared with QEMU's (``-machine pc,kernel_irqchip=off``) booting the same guest in the same L1, and its timer
interrupts are counted to show the idle guest is tickless. Measured: vmmshim 11.5 % of an L1 core, QEMU 6.8 %,
about 17 timer interrupts a second; the clock within 0.3 %. On kvm_pvm, an idle 100 Hz guest costs 1.5-1.8 %
(``tests/kvm/test_idle.py``).
"""

import re

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot]

RATE_TOLERANCE = 0.01          # the 1 % over 10 s
IDLE_VS_QEMU = 2.5             # vmmshim's idle CPU over QEMU's, same guest, same L1 (measured: about 1.7x)
IDLE_IRQS_PER_S = 50           # a tickless idle guest: far below the 250 Hz periodic tick (measured: about 17)


@pytest.fixture(scope="module")
def measured(lab_ready):
    from vmmshim.lab import run_in_lab

    res = run_in_lab("cd /lab/project && python3 tests/lab/l1_clock_idle.py --peer", timeout=500)
    print(res.stdout)                      # the RESULT lines, QEMU's too, for the record (pytest -s)
    out = {}
    for m in re.finditer(r"^RESULT (\w+) guest_s=([\d.]+) host_s=([\d.]+) cpu_s=([\d.]+) timer_irqs=(\d+)",
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
    assert "qemu" in measured, "the QEMU peer did not boot"
    _, q_host_s, q_cpu_s, _ = measured["qemu"]
    assert cpu_s / host_s <= IDLE_VS_QEMU * (q_cpu_s / q_host_s), measured
