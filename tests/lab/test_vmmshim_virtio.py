"""Stock Linux drives vmmshim's virtio devices inside the nested lab (issue 7), through
``python3 -m vmmshim.lab.virtio_check`` (see there for what each guest does and what L1 checks): ``main`` (one
guest with virtio-blk read-write and read-only, virtio-net on a tap in L1 and virtio-rnd; MSI-X, the modern
interface), ``intx`` (no MSI-X: INTx, then a driver reload onto the legacy interface; GET_ID, discard; with
KVM's doorbells off, so every notification exits and the transport rings the device's thread itself) and
``smp`` (``main`` on two vCPUs).

Each case is its own L1 boot, booted six times at most (``run_in_lab(retry_killed=True)``), and
``virtio_check`` boots the guest up to three times in one L1 while it stops before ``VMMSHIM-GUEST-UP``; the
tests judge only a boot that reached it. L1 is QEMU TCG emulating nested SVM, and it fails often: one CI run
lost both L1 boots of the ``smp`` case (each L1 kernel panicked, "stack guard page was hit" in ``error_entry``
with python3 current), and single ``smp`` boots here on 2026-11-22 lost about half of their L1s or L2 guests,
with the compiled run loop off and with guest RAM off transparent huge pages as well as with both on; a full run
on the final code of that session needed the third L1 for ``smp`` (the counts, and how long each case's guest
runs take, are in ``docs/lab.md``).
"""

import pytest

# per case: up to six L1 boots, each up to 120 s to boot + 450 s of command + 90 s of grace (a case that
# needs them all ends at the timeout)
pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(2400)]

MiB = 1 << 20
L1_ATTEMPTS = 6
GUEST_TRIES = 3


def _need_up(result, console):
    if not result["up"]:
        pytest.fail(f"no {result['case']} boot reached VMMSHIM-GUEST-UP in {result['hangs']} tries (the timer "
                    f"bug?):\n{console[-2000:]}\n{result['stderr']}")


def _case(case):
    """Runs one case in its own L1 (another L1 when the command is killed) and returns (result, console)."""
    from vmmshim.lab import run_in_lab
    from vmmshim.lab.virtio_check import parse_result

    res = run_in_lab(f"python3 -m vmmshim.lab.virtio_check --case {case} --tries {GUEST_TRIES} --timeout 200",
                     timeout=450, boot_timeout=120, retries=L1_ATTEMPTS - 1, retry_killed=True)
    result, console = parse_result(res.stdout, case)
    if result is not None:
        print(f"virtio lab case {case}: L1 attempt {res.attempts}, up={result.get('up')} failed boots before "
              f"it={result.get('hangs')} marker {result.get('marker_s')} s, run {result.get('total_s')} s, "
              f"status {result.get('status')}")
    assert result is not None, (f"no VIRTIO-RESULT for {case} in {res.attempts} L1 boots (status {res.status}):"
                                f"\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{res.console[-1500:]}")
    _need_up(result, console)
    return result, console


@pytest.fixture(scope="module")
def check(lab_ready):
    return _case("main")


@pytest.fixture(scope="module")
def intx(lab_ready):
    return _case("intx")


@pytest.fixture(scope="module")
def smp(lab_ready):
    return _case("smp")


def tail(console, n=2500):
    return "\n--- guest console (tail) ---\n" + console[-n:]


def test_guest_powers_off_after_using_every_device(check):
    r, console = check
    assert r["powered_off"] and r["status"] == 1, (r["status"], r["stderr"], tail(console))
    assert "VMMSHIM-RUN-STATUS=0" in console, tail(console)


def test_virtio_blk_write_lands_in_the_image(check):
    r, console = check
    vx, exp = r["vx"], r["expect"]
    assert vx.get("RW-W") == "0", "dd to /dev/vda failed" + tail(console)
    back, written = (vx.get("RW-BACK", "") + " ?").split()[:2]
    assert written == exp["seq_md5"], "the guest's pattern is not what L1 expects" + tail(console)
    assert back == written, "reading vda back in the guest gave other bytes" + tail(console)
    assert exp["rw_pattern_on_disk"], "the pattern is not in the image at 2 MiB" + tail(console)
    assert exp["rw_head_intact"], "the image's first MiB changed" + tail(console)


def test_virtio_blk_reads_what_l1_wrote(check):
    r, console = check
    assert r["vx"].get("RW-READ") == r["expect"]["rw_head_md5"], tail(console)


def test_virtio_blk_readonly_disk(check):
    r, console = check
    vx, exp = r["vx"], r["expect"]
    assert vx.get("RO-FLAG") == "1", "Linux did not see VIRTIO_BLK_F_RO" + tail(console)
    assert vx.get("RO-W") not in (None, "0"), "a write to the read-only disk succeeded" + tail(console)
    assert "dd: error writing '/dev/vdb'" in console, tail(console)
    assert exp["ro_unchanged"], "the read-only image changed" + tail(console)
    assert vx.get("RO-SUM") == exp["ro_md5"], "reading the read-only disk gave other bytes" + tail(console)


def test_virtio_net_ping_both_ways(check):
    r, console = check
    vx = r["vx"]
    assert vx.get("PING") == "0", "the guest could not ping L1" + tail(console)
    assert vx.get("GATE", "").startswith("rc=0 received="), "L1 could not ping the guest" + tail(console)
    assert int(vx["GATE"].split("received=")[1]) >= 1, tail(console)


def test_virtio_net_moves_a_file_both_ways(check):
    r, console = check
    vx, exp, sink = r["vx"], r["expect"], r["sink"]
    assert vx.get("SEND") == "0", "nc from the guest failed" + tail(console)
    assert sink and sink["bytes"] == MiB, f"L1 received {sink}" + tail(console)
    assert sink["sha256"] == exp["ro_sent_sha256"], "the file arrived changed" + tail(console)
    assert vx.get("RECV") == exp["src_md5"], "the file L1 sent arrived changed" + tail(console)


def test_virtio_rnd_gives_bytes(check):
    r, console = check
    vx = r["vx"]
    assert vx.get("RNG-CUR", "").startswith("virtio_rng"), "hw_random does not use virtio" + tail(console)
    assert vx.get("RNG-BYTES") == "4096", tail(console)
    od = vx.get("RNG-OD", "")
    assert len(od) == 128 and od != "0" * 128, "/dev/hwrng gave no (or zero) bytes" + tail(console)


def test_intx_modern_then_reset_then_legacy(intx):
    r, console = intx
    vx, exp = r["vx"], r["expect"]
    assert r["powered_off"] and r["status"] == 1, (r["status"], r["stderr"], tail(console))
    for phase, v1 in (("MODERN", "1"), ("LEGACY", "0")):
        assert vx.get(f"{phase}-BLK") == exp["rw_head_md5"], phase + tail(console)
        rng = vx.get(f"{phase}-RNG", "").split()
        assert rng[:1] and rng[0].startswith("virtio_rng") and rng[1:] == ["64"], phase + tail(console)
        assert vx.get(f"{phase}-PING") == "0", phase + tail(console)
        assert vx.get(f"{phase}-W") == "0", phase + tail(console)
        versions = {k: v for k, v in vx.items() if k.startswith(f"{phase}-V1-")}
        assert len(versions) == 3 and set(versions.values()) == {v1}, (phase, versions, tail(console))
    assert vx.get("RMMOD") == "0" and vx.get("INSMOD") == "0", tail(console)
    assert exp["modern_write_on_disk"] and exp["legacy_write_on_disk"] and exp["rw_head_intact"], tail(console)
    assert r["irqs"] and all(i["chip"] == "IO-APIC" for i in r["irqs"].values()), r["irqs"]
    assert sum(i["count"] for i in r["irqs"].values()) > 0, r["irqs"]


def test_blk_config_serial_and_discard(intx):
    r, console = intx
    vx, exp = r["vx"], r["expect"]
    assert vx.get("SIZE") == "131072 512", tail(console)
    assert vx.get("SERIAL") == exp["serial"], tail(console)
    assert vx.get("DISCARD") == "0" and exp["discarded_zero"], tail(console)


def test_net_mac_and_link(intx):
    r, console = intx
    mac, carrier = (r["vx"].get("MAC", "") + " ? ?").split()[:2]
    assert mac.startswith("00:a0:98:") and carrier == "1", tail(console)


def test_two_vcpus(smp):
    r, console = smp
    vx, exp = r["vx"], r["expect"]
    assert "VMMSHIM-CPUS=2" in console, tail(console)
    assert r["powered_off"] and r["status"] == 1, (r["status"], r["stderr"], tail(console))
    assert vx.get("RW-READ") == exp["rw_head_md5"] and exp["rw_pattern_on_disk"], tail(console)
    assert vx.get("RO-SUM") == exp["ro_md5"] and exp["ro_unchanged"], tail(console)
    assert vx.get("PING") == "0" and vx.get("RECV") == exp["src_md5"], tail(console)
    assert r["sink"] and r["sink"]["sha256"] == exp["ro_sent_sha256"], tail(console)
    assert vx.get("RNG-BYTES") == "4096", tail(console)
