"""Stock Linux mounts vmmshim's virtio-9p shares inside the nested lab (issue 21): in L1, :data:`L1_SCRIPT` (put
in L1 as ``/lab/files/p9_check.py``) prepares a share, a read-only share and a directory beside them, boots the
default guest with ``-s 4,virtio-9p,share=...`` and ``-s 5,virtio-9p,rosh=...,ro`` and checks afterwards what the
guest did to the host's files. The guest (:data:`GUEST_SCRIPT`) mounts with ``trans=virtio,version=9p2000.L``
(``cache=none``, then again with ``cache=loose``) and prints ``VX-*`` lines:

- ``VX-HOSTSUM`` the sha256 of the file L1 wrote; ``VX-W``/``VX-MKDIR``/``VX-MV``/``VX-RM``/``VX-LN`` the status of
  writing a file (``seq``), ``mkdir``, ``mv`` of that file into the new directory, ``rm`` of a file L1 made,
  ``ln -s``; ``VX-LNREAD`` the sha256 read through the new symlink;
- ``VX-ABS``, ``VX-UP``, ``VX-PWN``: reading the secret beside the share through a symlink with an absolute target
  and through one to ``..``, and writing through the first: all must fail (the guest resolves symlinks itself,
  in its own tree; the server never follows them);
- ``VX-RO-W``, ``VX-RO-MKDIR``, ``VX-RO-RM`` must fail on the read-only share, ``VX-RO-SUM`` reads it;
- ``VX-LOOSE`` the ``cache=loose`` mount, ``VX-DD`` an 8 MiB ``dd`` through it with ``conv=fsync``, ``VX-DDSUM``
  its sha256 read back.

L1 prints ``P9-RESULT {json}`` (the guest's ``vx``, what it found on the host: ``host``) and the console prefixed
with ``p9| ``. Each run is its own L1 boot, booted up to four times (``run_in_lab(retry_killed=True)``).
"""

import hashlib
import json
import re

import pytest

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(2400)]

SEQ_SHA256 = hashlib.sha256("".join(f"{i}\n" for i in range(1, 50001)).encode()).hexdigest()
ZEROS_8M_SHA256 = hashlib.sha256(bytes(8 << 20)).hexdigest()

GUEST_SCRIPT = """\
s(){ sha256sum "$1" | cut -d' ' -f1; }
mkdir -p /mnt/s /mnt/r; M="-t 9p -o trans=virtio,version=9p2000.L"
mount $M,cache=none share /mnt/s; echo VX-MOUNT $?
echo VX-HOSTSUM $(s /mnt/s/host.bin)
seq 1 50000 >/mnt/s/guest.txt; echo VX-W $?
mkdir /mnt/s/newdir; echo VX-MKDIR $?
mv /mnt/s/guest.txt /mnt/s/newdir/moved.txt; echo VX-MV $?
rm /mnt/s/todelete; echo VX-RM $?
ln -s moved.txt /mnt/s/newdir/link; echo VX-LN $?
echo VX-LNREAD $(s /mnt/s/newdir/link)
cat /mnt/s/abs/secret; echo VX-ABS $?
cat /mnt/s/up/outside/secret; echo VX-UP $?
echo pwned >/mnt/s/abs/pwned; echo VX-PWN $?
ls -la /mnt/s /mnt/s/newdir
mount $M rosh /mnt/r; echo VX-RMOUNT $?
echo x >/mnt/r/new; echo VX-RO-W $?
mkdir /mnt/r/d; echo VX-RO-MKDIR $?
rm /mnt/r/ro.bin; echo VX-RO-RM $?
echo VX-RO-SUM $(s /mnt/r/ro.bin)
umount /mnt/s; mount $M,cache=loose share /mnt/s; echo VX-LOOSE $?
dd if=/dev/zero of=/mnt/s/big bs=1M count=8 conv=fsync; echo VX-DD $?
echo VX-DDSUM $(s /mnt/s/big)
umount /mnt/s /mnt/r; echo VX-UMOUNT $?
"""

#: Run inside L1 (``/lab/project`` on PYTHONPATH); prints P9-RESULT and the console.
L1_SCRIPT = r'''
import hashlib, json, os, re, secrets, shutil, sys
from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

GUEST = open(sys.argv[1]).read()
TRIES, TIMEOUT = int(sys.argv[2]), float(sys.argv[3])
W = "/tmp/p9"
share, rosh, outside, console = f"{W}/share", f"{W}/rosh", f"{W}/outside", f"{W}/console.txt"
token = "P9SECRET-" + secrets.token_hex(8)
host_bin, ro_bin = l2vm.pattern(1 << 20, b"p9host"), l2vm.pattern(65536, b"p9ro")
sha = lambda b: hashlib.sha256(b).hexdigest()

def tree(root):
    out = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = os.path.join(d, n)
            st = os.lstat(p)
            body = os.readlink(p) if os.path.islink(p) else sha(open(p, "rb").read()) if os.path.isfile(p) else ""
            out[os.path.relpath(p, root)] = [st.st_mode, st.st_size, body]
    return out

def prepare():
    shutil.rmtree(W, ignore_errors=True)
    for d in (share, rosh, outside):
        os.makedirs(d)
    open(f"{share}/host.bin", "wb").write(host_bin)
    open(f"{share}/todelete", "wb").write(b"bye\n")
    open(f"{outside}/secret", "w").write(token + "\n")
    os.symlink(outside, f"{share}/abs")
    os.symlink("..", f"{share}/up")
    open(f"{rosh}/ro.bin", "wb").write(ro_bin)

append = f"{l2vm.BASE_APPEND} {encode_run(GUEST)}"

def argv():
    a = l2vm.vmmshim_argv(append, console)
    i = a.index("-l")
    return a[:i] + ["-s", f"4,virtio-9p,share={share}", "-s", f"5,virtio-9p,rosh={rosh},ro"] + a[i:]

before_out, before_ro = None, None
def prep():
    global before_out, before_ro
    prepare()
    before_out, before_ro = tree(outside), tree(rosh)

res, hangs = l2vm.boot_retry(argv, console, tries=TRIES, prepare=prep, timeout=TIMEOUT)
vx = {}
for m in re.finditer(r"^VX-([A-Za-z0-9-]+) ?(.*?)\r?$", res.console, re.M):
    vx[m.group(1)] = m.group(2).strip()
moved = f"{share}/newdir/moved.txt"
host = dict(
    host_sha=sha(host_bin), ro_sha=sha(ro_bin),
    moved_sha=sha(open(moved, "rb").read()) if os.path.isfile(moved) else None,
    guest_txt_gone=not os.path.lexists(f"{share}/guest.txt"),
    newdir=os.path.isdir(f"{share}/newdir"), todelete_gone=not os.path.lexists(f"{share}/todelete"),
    link=os.readlink(f"{share}/newdir/link") if os.path.islink(f"{share}/newdir/link") else None,
    big_size=os.path.getsize(f"{share}/big") if os.path.isfile(f"{share}/big") else None,
    big_sha=sha(open(f"{share}/big", "rb").read()) if os.path.isfile(f"{share}/big") else None,
    outside_unchanged=tree(outside) == before_out, ro_unchanged=tree(rosh) == before_ro,
    secret_leaked=token in res.console, pwned=os.path.lexists(f"{outside}/pwned"))
result = dict(status=res.status, up=res.up, powered_off=res.powered_off, hangs=hangs, total_s=res.total_s,
              stderr=res.stderr[-1500:], vx=vx, host=host)
print("P9-RESULT " + json.dumps(result), flush=True)
for line in res.console.splitlines():
    print("p9| " + line)
'''


def _run(tmp_path_factory):
    from vmmshim.lab import run_in_lab
    d = tmp_path_factory.mktemp("p9lab")
    (d / "p9_check.py").write_text(L1_SCRIPT)
    (d / "guest.sh").write_text(GUEST_SCRIPT)
    res = run_in_lab("python3 /lab/files/p9_check.py /lab/files/guest.sh 3 200", timeout=450,
                     boot_timeout=120, retries=3, retry_killed=True,
                     extra_files={"p9_check.py": str(d / "p9_check.py"), "guest.sh": str(d / "guest.sh")})
    m = re.search(r"^P9-RESULT (\{.*\})$", res.stdout, re.M)
    assert m, f"no P9-RESULT (status {res.status}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    console = "\n".join(line[4:] for line in res.stdout.splitlines() if line.startswith("p9| "))
    result = json.loads(m.group(1))
    assert result["up"], f"the guest never came up ({result['hangs']} tries):\n{console[-2000:]}"
    return result, console


@pytest.fixture(scope="module")
def p9(lab_ready, tmp_path_factory):
    return _run(tmp_path_factory)


def tail(console, n=2500):
    return "\n--- guest console (tail) ---\n" + console[-n:]


def test_guest_powers_off_after_using_the_shares(p9):
    r, console = p9
    assert r["powered_off"] and r["status"] == 1, (r["status"], r["stderr"], tail(console))
    assert r["vx"].get("MOUNT") == "0" and r["vx"].get("RMOUNT") == "0", tail(console)
    assert r["vx"].get("UMOUNT") == "0", tail(console)


def test_guest_reads_what_the_host_wrote(p9):
    r, console = p9
    assert r["vx"].get("HOSTSUM") == r["host"]["host_sha"], tail(console)


def test_host_reads_what_the_guest_wrote_moved_and_linked(p9):
    r, console = p9
    vx, host = r["vx"], r["host"]
    assert [vx.get(k) for k in ("W", "MKDIR", "MV", "RM", "LN")] == ["0"] * 5, tail(console)
    assert host["moved_sha"] == SEQ_SHA256 and host["guest_txt_gone"] and host["newdir"], (host, tail(console))
    assert host["todelete_gone"] and host["link"] == "moved.txt", host
    assert vx.get("LNREAD") == SEQ_SHA256, tail(console)


def test_symlinks_out_of_the_share_are_not_followed(p9):
    r, console = p9
    vx, host = r["vx"], r["host"]
    assert vx.get("ABS") not in (None, "0") and vx.get("UP") not in (None, "0"), tail(console)
    assert vx.get("PWN") not in (None, "0"), tail(console)
    assert not host["secret_leaked"] and not host["pwned"] and host["outside_unchanged"], host


def test_a_readonly_share_refuses_writes(p9):
    r, console = p9
    vx, host = r["vx"], r["host"]
    for k in ("RO-W", "RO-MKDIR", "RO-RM"):
        assert vx.get(k) not in (None, "0"), (k, tail(console))
    assert vx.get("RO-SUM") == host["ro_sha"] and host["ro_unchanged"], (host, tail(console))


def test_cache_loose_writes_and_reads_back(p9):
    r, console = p9
    vx, host = r["vx"], r["host"]
    assert vx.get("LOOSE") == "0" and vx.get("DD") == "0", tail(console)
    assert host["big_size"] == 8 << 20 and host["big_sha"] == ZEROS_8M_SHA256, host
    assert vx.get("DDSUM") == ZEROS_8M_SHA256, tail(console)
