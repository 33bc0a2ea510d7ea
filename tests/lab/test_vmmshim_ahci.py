"""Stock Linux drives vmmshim's AHCI controller inside the nested lab (issue 21): the Debian guest's ``ahci``,
``sd_mod``, ``sr_mod`` and ``isofs`` modules over ``-s 4,ahci-hd,IMG -s 5,ahci-cd,ISO``.

The host builds an ISO with ``xorriso`` (a text file and 300 000 pseudo-random bytes) and sends it to L1; this
file, run in L1 as ``python3 tests/lab/test_vmmshim_ahci.py --l1 --iso ISO``, makes a 64 MiB disk image whose
first MiB it fills (and its fifth MiB, which the guest discards), boots the default guest with both devices
(up to three boots while one stops before ``VMMSHIM-GUEST-UP``), and after the guest powered off reads the image
back. The guest (:data:`GUEST_SCRIPT`) prints ``VX-*`` lines:

- ``VX-DEVS`` whether ``/dev/sda`` and ``/dev/sr0`` appeared, ``VX-SIZE`` sda's sectors and logical block size,
  ``VX-QD`` its queue depth (31 or 32: NCQ is on), ``VX-DISCARD-MAX`` its discard limit;
- ``VX-HEAD`` the md5 of sda's first MiB (O_DIRECT), ``VX-W`` dd's status writing 1 MiB of ``seq`` output at 2 MiB
  with O_DIRECT, ``VX-BACK`` the md5 read back and the md5 of what was written, ``VX-TRIM`` blkdiscard's status on
  4-5 MiB;
- ``VX-MOUNT`` the status of mounting ``/dev/sr0`` (iso9660, read-only), ``VX-HELLO`` the text file,
  ``VX-BLOB`` the md5 of the binary file, ``VX-CDW`` dd's status writing the CD (it must fail);
- ``/proc/interrupts``' ahci line.

L1 prints one ``AHCI-RESULT {json}`` line (the boot, the guest's lines, what L1 found in the image) and the guest's
console, each line prefixed with ``ahci| ``.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(2400)]

MiB = 1 << 20
IMAGE_MB = 64
HELLO = "hello from the vmmshim ahci-cd\n"
BLOB_SIZE = 300_000
L1_ATTEMPTS = 4
GUEST_TRIES = 3

GUEST_SCRIPT = """\
m5(){ md5sum | cut -d' ' -f1; }
i=0; while [ $i -lt 40 ] && ! { [ -b /dev/sda ] && [ -b /dev/sr0 ]; }; do sleep 0.25; i=$((i+1)); done
echo VX-DEVS $([ -b /dev/sda ] && echo sda) $([ -b /dev/sr0 ] && echo sr0)
echo VX-SIZE $(cat /sys/block/sda/size) $(cat /sys/block/sda/queue/logical_block_size)
echo VX-QD $(cat /sys/block/sda/device/queue_depth)
echo VX-DISCARD-MAX $(cat /sys/block/sda/queue/discard_max_bytes)
echo VX-HEAD $(dd if=/dev/sda bs=65536 count=16 iflag=direct 2>/dev/null | m5)
seq 1 200000 | head -c 1048576 >/tmp/p
dd if=/tmp/p of=/dev/sda bs=65536 seek=32 oflag=direct; echo VX-W $?
echo VX-BACK $(dd if=/dev/sda bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | m5) $(m5 </tmp/p)
blkdiscard -o 4194304 -l 1048576 /dev/sda; echo VX-TRIM $?
sync
mkdir -p /mnt/cd; mount -t iso9660 -o ro /dev/sr0 /mnt/cd; echo VX-MOUNT $?
echo VX-HELLO $(cat /mnt/cd/hello.txt)
echo VX-BLOB $(m5 </mnt/cd/blob.bin) $(wc -c </mnt/cd/blob.bin)
umount /mnt/cd
dd if=/dev/zero of=/dev/sr0 bs=2048 count=1 2>/dev/null; echo VX-CDW $?
grep -i ahci /proc/interrupts
dmesg | grep -iE 'ata[0-9]|ahci|sr0|sda' | tail -20
"""


def blob():
    out, i = bytearray(), 0
    while len(out) < BLOB_SIZE:
        out += hashlib.sha256(b"ahci-blob" + i.to_bytes(8, "little")).digest()
        i += 1
    return bytes(out[:BLOB_SIZE])


def seq_pattern(n=MiB):
    """What ``seq 1 200000 | head -c N`` prints."""
    return "".join(f"{i}\n" for i in range(1, 200001)).encode()[:n]


def build_iso(path, workdir):
    """The test's ISO, made with Debian's xorriso (``scripts/install-deps.sh`` installs it)."""
    src = os.path.join(workdir, "iso-src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "hello.txt"), "w") as f:
        f.write(HELLO)
    with open(os.path.join(src, "blob.bin"), "wb") as f:
        f.write(blob())
    subprocess.run(["xorriso", "-as", "mkisofs", "-quiet", "-V", "VMMSHIM_AHCI", "-o", path, src], check=True,
                   capture_output=True)


# -- inside L1 -----------------------------------------------------------------------------------------------------
def vmmshim_argv(append, console, image, iso, mem="512M"):
    from vmmshim.lab import l2vm
    g = l2vm.guest_dir()
    return [sys.executable, "-m", "vmmshim", "-A", "-c", "1", "-m", mem, "-s", "0:0,hostbridge", "-s", "31,lpc",
            "-s", f"4,ahci-hd,{image}", "-s", f"5,ahci-cd,{iso}", "-l", f"com1,file:{console}",
            "-f", f"kexec,{g}/vmlinuz,{g}/initramfs.gz,{append}"]


def run_l1(iso, workdir="/tmp/ahci", tries=GUEST_TRIES, timeout=240.0):
    from vmmshim.lab import l2vm
    from vmmshim.lab.guest import encode_run

    os.makedirs(workdir, exist_ok=True)
    image, console = f"{workdir}/disk.img", f"{workdir}/console.txt"
    head, fifth = l2vm.pattern(MiB, b"ahci-head"), l2vm.pattern(MiB, b"ahci-trim")

    def prepare():
        with open(image, "wb") as f:
            f.write(head)
            f.seek(4 * MiB)
            f.write(fifth)
            f.truncate(IMAGE_MB * MiB)

    with open(iso, "rb") as f:
        iso_md5 = hashlib.md5(f.read()).hexdigest()
    append = f"{l2vm.BASE_APPEND} {encode_run(GUEST_SCRIPT)}"
    res, hangs = l2vm.boot_retry(lambda: vmmshim_argv(append, console, image, iso), console, tries=tries,
                                 prepare=prepare, timeout=timeout)
    with open(image, "rb") as f:
        now = f.read(5 * MiB)
    with open(iso, "rb") as f:
        iso_after = hashlib.md5(f.read()).hexdigest()
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    vx = {}
    for m in re.finditer(r"^VX-([A-Za-z0-9-]+) ?(.*?)\r?$", res.console, re.M):
        vx[m.group(1)] = m.group(2).strip()
    expect = dict(head_md5=md5(head), seq_md5=md5(seq_pattern()), blob_md5=md5(blob()),
                  head_intact=now[:MiB] == head, pattern_on_disk=now[2 * MiB:3 * MiB] == seq_pattern(),
                  trimmed_zero=now[4 * MiB:5 * MiB] == bytes(MiB), iso_unchanged=iso_after == iso_md5)
    result = dict(status=res.status, up=res.up, powered_off=res.powered_off, hangs=hangs, hung=res.hung,
                  timed_out=res.timed_out, marker_s=res.marker_s, total_s=res.total_s, stderr=res.stderr[-1500:],
                  expect=expect, vx=vx)
    print("AHCI-RESULT " + json.dumps(result), flush=True)
    for line in res.console.splitlines():
        print("ahci| " + line)
    return result


def parse_result(stdout):
    for m in re.finditer(r"^AHCI-RESULT (\{.*\})$", stdout, re.M):
        result = json.loads(m.group(1))
        console = "\n".join(line[6:] for line in stdout.splitlines() if line.startswith("ahci| "))
        return result, console
    return None, ""


# -- on the host ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lab(lab_ready, tmp_path_factory):
    from vmmshim.lab import run_in_lab

    if shutil.which("xorriso") is None:
        pytest.fail("xorriso is not installed (scripts/install-deps.sh installs it)")
    work = tmp_path_factory.mktemp("ahci")
    iso = str(work / "ahci.iso")
    build_iso(iso, str(work))
    res = run_in_lab(f"python3 tests/lab/test_vmmshim_ahci.py --l1 --iso /lab/files/ahci.iso --tries {GUEST_TRIES}",
                     timeout=450, boot_timeout=120, retries=L1_ATTEMPTS - 1, retry_killed=True,
                     extra_files={"ahci.iso": iso})
    result, console = parse_result(res.stdout)
    assert result is not None, (f"no AHCI-RESULT in {res.attempts} L1 boots (status {res.status}):\n"
                                f"{res.stdout[-2000:]}\n{res.stderr[-2000:]}\n{res.console[-1500:]}")
    print(f"ahci lab: L1 attempt {res.attempts}, up={result['up']} after {result['hangs']} failed boots, marker "
          f"{result['marker_s']} s, run {result['total_s']} s, status {result['status']}")
    if not result["up"]:
        pytest.fail(f"no boot reached VMMSHIM-GUEST-UP in {result['hangs']} tries:\n{console[-2000:]}\n"
                    f"{result['stderr']}")
    return result, console


def tail(console, n=2500):
    return "\n--- guest console (tail) ---\n" + console[-n:]


def test_guest_powers_off_after_using_both_devices(lab):
    r, console = lab
    assert r["powered_off"] and r["status"] == 1, (r["status"], r["stderr"], tail(console))
    assert r["vx"].get("DEVS") == "sda sr0", tail(console)


def test_sda_is_the_disk_with_ncq(lab):
    r, console = lab
    assert r["vx"].get("SIZE") == f"{IMAGE_MB * MiB // 512} 512", tail(console)
    assert r["vx"].get("QD") in ("31", "32"), "NCQ is off" + tail(console)


def test_sda_reads_what_l1_wrote(lab):
    r, console = lab
    assert r["vx"].get("HEAD") == r["expect"]["head_md5"], tail(console)


def test_a_pattern_written_in_the_guest_is_in_the_image_after_power_off(lab):
    r, console = lab
    vx, exp = r["vx"], r["expect"]
    assert vx.get("W") == "0", "dd to /dev/sda failed" + tail(console)
    back, written = (vx.get("BACK", "") + " ?").split()[:2]
    assert written == exp["seq_md5"] and back == written, tail(console)
    assert exp["pattern_on_disk"], "the pattern is not in the image at 2 MiB" + tail(console)
    assert exp["head_intact"], "the image's first MiB changed" + tail(console)


def test_trim_reaches_the_image(lab):
    r, console = lab
    assert int(r["vx"].get("DISCARD-MAX", "0") or 0) > 0, tail(console)
    assert r["vx"].get("TRIM") == "0" and r["expect"]["trimmed_zero"], tail(console)


def test_the_iso_mounts_from_sr0_and_its_files_read_back(lab):
    r, console = lab
    vx, exp = r["vx"], r["expect"]
    assert vx.get("MOUNT") == "0", tail(console)
    assert vx.get("HELLO") == HELLO.strip(), tail(console)
    assert vx.get("BLOB") == f"{exp['blob_md5']} {BLOB_SIZE}", tail(console)
    assert vx.get("CDW") not in (None, "0") and exp["iso_unchanged"], "the CD took a write" + tail(console)


def main():
    ap = argparse.ArgumentParser(description="inside L1: boot the guest with ahci-hd and ahci-cd")
    ap.add_argument("--l1", action="store_true", required=True)
    ap.add_argument("--iso", required=True)
    ap.add_argument("--tries", type=int, default=GUEST_TRIES)
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    run_l1(args.iso, tries=args.tries, timeout=args.timeout)


if __name__ == "__main__":
    main()
