"""Stock Linux on vmmshim's user-mode network inside the nested lab (issue 20), through
``python3 -m vmmshim.lab.slirp_check`` (see there for what the guest and L1 do): vmmshim runs as an unprivileged
user, the guest leases its address from libslirp's DHCP with busybox ``udhcpc``, fetches a file from an HTTP
server on L1's loopback through 10.0.2.2, sends one to L1, receives and serves one through ``hostfwd`` rules, and
uses a second NIC on a tap at the same time."""

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(2400)]

MiB = 1 << 20


@pytest.fixture(scope="module")
def slirp(lab_ready):
    from vmmshim.lab import run_in_lab
    from vmmshim.lab.slirp_check import parse_result
    res = run_in_lab("python3 -m vmmshim.lab.slirp_check --tries 3 --timeout 240", timeout=600, boot_timeout=120,
                     retries=3, retry_killed=True)
    result, console = parse_result(res.stdout)
    assert result is not None, (f"no SLIRP-RESULT in {res.attempts} L1 boots (status {res.status}):\n"
                                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{res.console[-1500:]}")
    print(f"slirp lab: L1 attempt {res.attempts}, up={result['up']} status={result['status']} "
          f"run {result['total_s']} s, ports {result['ports']}")
    assert result["up"], f"the guest never reached its shell:\n{console[-2000:]}\n{result['stderr']}"
    return result, console


def tail(console, result):
    return (f"\nL1 sent {result['sent_in']}, read {result['out']}\n--- stderr ---\n{result['stderr']}\n"
            f"--- guest console (tail) ---\n{console[-2500:]}")


def test_the_guest_powers_off_and_vmmshim_ran_unprivileged(slirp):
    r, console = slirp
    assert r["status"] == 1 and r["powered_off"], tail(console, r)
    assert "VMMSHIM-RUN-STATUS=0" in console, tail(console, r)
    assert r["user"] != "root"


def test_dhcp_lease_from_libslirp(slirp):
    r, console = slirp
    assert r["vx"].get("DHCP") == "0", tail(console, r)
    assert r["vx"].get("LEASE", "").split()[:2] == ["10.0.2.15", "10.0.2.2"], tail(console, r)


def test_http_through_the_gateway_to_l1_loopback(slirp):
    r, console = slirp
    assert r["vx"].get("WGET") == "0", tail(console, r)
    assert r["vx"].get("HTTP") == r["expect"]["http"], tail(console, r)


def test_guest_sends_a_file_to_l1(slirp):
    r, console = slirp
    assert r["vx"].get("SEND") == "0", tail(console, r)
    assert r["sink"] and r["sink"]["bytes"] == MiB and r["sink"]["sha256"] == r["expect"]["sink"], tail(console, r)


def test_hostfwd_into_the_guest_both_ways(slirp):
    r, console = slirp
    assert set(r["ports"]) == {"7000", "7001"}, (r["ports"], tail(console, r))      # JSON keys are strings
    assert r["sent_in"] == r["expect"]["into_guest"], (r["sent_in"], tail(console, r))
    assert r["vx"].get("IN") == r["expect"]["into_guest"], "the file L1 sent arrived changed" + tail(console, r)
    assert r["out"] == {"bytes": MiB, "sha256": r["expect"]["http"]}, (r["out"], tail(console, r))


def test_a_second_nic_on_a_tap_works_beside_slirp(slirp):
    r, console = slirp
    assert r["vx"].get("TAP-PING") == "0", tail(console, r)
