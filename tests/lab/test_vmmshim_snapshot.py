"""Checkpoint and restore of the default Linux guest in the nested lab (issue 23), through
``python3 -m vmmshim.lab.snapshot_check`` (see there for the sequence): two vCPUs, virtio-blk and virtio-rnd;
the guest writes to its disk, is suspended with ``vmmshim ctl --suspend`` while it sleeps, and is restored twice
(on its image, and on a copy given with ``-s``); each restored guest finds what it wrote, writes more, sleeps
the rest of its sleep (its clock stood still meanwhile) and powers off with status 1."""

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def session(lab_ready):
    from vmmshim.lab import run_in_lab
    from vmmshim.lab.snapshot_check import parse_result
    res = run_in_lab("python3 -m vmmshim.lab.snapshot_check --tries 2 --timeout 400", timeout=1500,
                     boot_timeout=120, retries=1, retry_killed=True)
    result, console = parse_result(res.stdout)
    assert result is not None, (f"no SNAP-RESULT in {res.attempts} L1 boots (status {res.status}):\n"
                                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{res.console[-1500:]}")
    print(f"snapshot lab: {result}")
    return result, console


def test_the_guest_is_suspended_while_it_sleeps(session):
    r, console = session
    assert r["up"] and r["before"], console[-3000:]
    assert r["suspend_status"] == 0, (r.get("suspend_stderr"), console[-2000:])
    assert r["suspended_status"] == 1, console[-2000:]
    mem, alloc = r["sizes"]["ckp"]
    assert alloc < mem, r["sizes"]                 # a sparse memory file


@pytest.mark.parametrize("i", [0, 1])
def test_each_restore_finds_its_data_writes_more_and_powers_off(session, i):
    r, console = session
    assert len(r["restores"]) == 2, (r, console[-3000:])
    rs = r["restores"][i]
    assert rs["after"] == "ok", (rs, console[-3000:])
    assert rs["status"] == 1 and rs["disk"], (rs, console[-3000:])
    assert 35 <= rs["slept"] <= 60, rs               # the guest's sleep of 40 s: its clock did not jump
