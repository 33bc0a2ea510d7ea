"""Stock Linux drives vmmshim's NVMe controller (``-s N,nvme,IMG``) inside the nested lab (issue 21): its
``nvme`` driver probes the controller, writes patterns to ``/dev/nvme0n1`` and reads them back, and L1 finds
them in the image after the guest powered off, with every other block as L1 wrote it. One L1 boot runs both
cases, each guest booted up to three times while it stops before ``VMMSHIM-GUEST-UP``:

- ``main``: two vCPUs, MSI-X (one vector per queue), KVM's doorbells (Linux configures the shadow doorbell
  buffer, so the I/O queues' doorbells are taken by ioeventfd): 1 MiB written at 2 MiB (O_DIRECT, 64 KiB
  requests), at 8 MiB (one 1 MiB request: a PRP list), at 12 MiB through the page cache with ``fsync`` (Flush),
  1 MiB discarded at 16 MiB (Dataset Management), the serial and size as Linux sees them, the queues' interrupts.
- ``intx``: ``pci=nomsi`` (INTx through the IOAPIC, level-triggered, held while a completion queue has entries),
  ``-o vmmshim.doorbells=false`` (every doorbell write exits and rings the device's thread), 4 KiB sectors
  (``sectsz=4096``), and a second controller on a read-only image (``ro``): Linux marks it read-only, a write to
  it fails and the image stays as it was.

The result is one ``NVME-RESULT {json}`` line per case, the guest's console follows with each line prefixed.
"""

import json
import re

import pytest

from vmmshim.lab.guest import encode_run

pytestmark = [pytest.mark.lab, pytest.mark.linux_boot, pytest.mark.timeout(1800)]
BOOT_TRIES = 3
MiB = 1 << 20

VMM = ("timeout -k 5 {t} python3 -m vmmshim {args} -m 512M -s 0:0,hostbridge -s 31,lpc -l com1,stdio "
       "-f kexec,/lab/guest/vmlinuz,/lab/guest/initramfs.gz,'console=ttyS0 panic=-1 {append}' "
       "</dev/null >/tmp/{name}.txt")

#: Shell helpers of both guest scripts: the read-write and the read-only namespace found by their ro flag.
FIND = ("m5(){ md5sum | cut -d' ' -f1; }; for b in /sys/block/nvme*n1; do n=${b##*/}; "
        "if [ \"$(cat $b/ro)\" = 1 ]; then RO=$n; else RW=$n; fi; done; D=/dev/$RW; C=${RW%n1}\n"
        "echo VX-SIZE $(cat /sys/block/$RW/size) $(cat /sys/block/$RW/queue/logical_block_size)\n"
        "echo VX-SERIAL $(cat /sys/class/nvme/$C/serial)\n"
        "echo VX-READ $(dd if=$D bs=65536 count=16 iflag=direct 2>/dev/null | m5)\n"
        "seq 1 200000 | head -c 1048576 >/tmp/p\n"
        "dd if=/tmp/p of=$D bs=65536 seek=32 oflag=direct; echo VX-W $?\n")
GUEST_MAIN = FIND + """dd if=/tmp/p of=$D bs=1048576 seek=8 oflag=direct; echo VX-W1M $?
dd if=/tmp/p of=$D bs=4096 seek=3072 conv=fsync; echo VX-WSYNC $?
sync
echo VX-BACK $(dd if=$D bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | m5) $(m5 </tmp/p)
echo VX-BACK1M $(dd if=$D bs=1048576 skip=8 count=1 iflag=direct 2>/dev/null | m5)
blkdiscard -o 16777216 -l 1048576 $D; echo VX-DISCARD $?
grep nvme /proc/interrupts | sed 's/^/VX-IRQLINE /'
"""
GUEST_INTX = FIND + """sync
echo VX-BACK $(dd if=$D bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | m5) $(m5 </tmp/p)
echo VX-RO-FLAG $(cat /sys/block/$RO/ro)
echo VX-RO-SUM $(m5 </dev/$RO)
dd if=/dev/zero of=/dev/$RO bs=4096 count=1 oflag=direct; echo VX-RO-W $?
grep nvme /proc/interrupts | sed 's/^/VX-IRQLINE /'
"""
CASES = {
    "main": ("-A -c 2 -s 4,nvme,/tmp/main.img,ser=VMMSHIM-NVME", encode_run(GUEST_MAIN)),
    "intx": ("-A -c 1 -o vmmshim.doorbells=false -s 4,nvme,/tmp/intx.img,sectsz=4096,maxq=2,qsz=64 "
             "-s 5,nvme,/tmp/ro.img,ro", "pci=nomsi " + encode_run(GUEST_INTX)),
}

#: Inside L1: ``make CASE`` writes the images, ``check CASE`` prints what the images hold after the run.
L1_TOOL = r'''
import hashlib, json, struct, sys
MiB = 1 << 20
def block(i):
    return struct.pack("<Q", i) * 512
def image(size):
    return b"".join(block(i) for i in range(size // 4096))
seq = "".join(f"{i}\n" for i in range(1, 200001)).encode()[:MiB]
case = sys.argv[2]
if sys.argv[1] == "make":
    open(f"/tmp/{case}.img", "wb").write(image(64 * MiB))
    if case == "intx":
        open("/tmp/ro.img", "wb").write(image(8 * MiB))
    sys.exit(0)
data = open(f"/tmp/{case}.img", "rb").read()
written = {2: seq, 8: seq, 12: seq} if case == "main" else {2: seq}
zeroed = {16} if case == "main" else set()
out = dict(case=case, seq_md5=hashlib.md5(seq).hexdigest(), head_md5=hashlib.md5(image(MiB)).hexdigest())
out["written"] = {str(m): data[m * MiB:(m + 1) * MiB] == s for m, s in written.items()}
out["discarded_zero"] = all(data[m * MiB:(m + 1) * MiB] == bytes(MiB) for m in zeroed)
skip = set(written) | zeroed
out["others_intact"] = all(data[i * 4096:(i + 1) * 4096] == block(i) for i in range(len(data) // 4096)
                           if i * 4096 // MiB not in skip)
if case == "intx":
    ro = open("/tmp/ro.img", "rb").read()
    out["ro_unchanged"] = ro == image(8 * MiB)
    out["ro_md5"] = hashlib.md5(ro).hexdigest()
print("NVME-FACTS " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def runs(lab_ready):
    from vmmshim.lab import run_in_lab
    script = "cd /lab/project\ncat >/tmp/nvme_lab.py <<'PYEOF'\n" + L1_TOOL + "PYEOF\n" + "\n".join(
        f"for try in $(seq 1 {BOOT_TRIES}); do python3 /tmp/nvme_lab.py make {n}; s=$(date +%s); "
        f"{VMM.format(t=300, args=a, name=n, append=x)} 2>/tmp/{n}.err; st=$?; "
        f"grep -q VMMSHIM-GUEST-UP /tmp/{n}.txt && break; "
        f"echo \"{n}: try $try did not reach the shell (status $st)\" >&2; tail -5 /tmp/{n}.txt >&2; done; "
        f"echo \"CASE {n} status=$st seconds=$(( $(date +%s) - s )) tries=$try\"; "
        f"python3 /tmp/nvme_lab.py check {n}; sed 's/^/{n}| /' /tmp/{n}.txt; tail -3 /tmp/{n}.err | sed 's/^/{n}! /'"
        for n, (a, x) in CASES.items())
    res = run_in_lab(script, timeout=1500, retries=2, retry_killed=True)
    print(re.findall(r"^CASE .*$", res.stdout, re.M), res.stderr[-3000:])
    out = {}
    for name in CASES:
        m = re.search(rf"^CASE {name} status=(\d+) seconds=(\d+) tries=(\d+)", res.stdout, re.M)
        facts = re.search(rf'^NVME-FACTS (\{{"case": "{name}".*)$', res.stdout, re.M)
        console = "\n".join(line[len(name) + 2:] for line in res.stdout.splitlines() if line.startswith(f"{name}| "))
        vx = {}
        for line in console.splitlines():
            if line.startswith("VX-"):
                key, _, value = line[3:].partition(" ")
                vx.setdefault(key, []).append(value.strip())
        out[name] = dict(status=int(m.group(1)) if m else None, facts=json.loads(facts.group(1)) if facts else {},
                         console=console, vx={k: v[-1] for k, v in vx.items()}, irqs=vx.get("IRQLINE", []))
        print(f"nvme lab case {name}: {m.group(0) if m else 'no CASE line'}")
    return out


def tail(r, n=2500):
    return "\n--- guest console (tail) ---\n" + r["console"][-n:]


def _common(r):
    vx, facts = r["vx"], r["facts"]
    assert "VMMSHIM-GUEST-UP" in r["console"], tail(r)
    assert r["status"] == 1 and "VMMSHIM-RUN-STATUS=0" in r["console"], (r["status"], tail(r))
    assert vx.get("READ") == facts["head_md5"], "the first MiB read back differs from what L1 wrote" + tail(r)
    assert vx.get("W") == "0", "dd to the namespace failed" + tail(r)
    back, written = (vx.get("BACK", "") + " ? ?").split()[:2]
    assert written == facts["seq_md5"] and back == written, "reading the pattern back gave other bytes" + tail(r)
    assert facts["written"]["2"], "the pattern is not in the image at 2 MiB" + tail(r)
    assert facts["others_intact"], "a block nobody wrote changed in the image" + tail(r)
    assert "Traceback" not in r["console"] and "nvme nvme0: I/O" not in r["console"], tail(r)
    assert r["irqs"] and sum(int(x) for line in r["irqs"] for x in line.split()[1:3] if x.isdigit()) > 0, r["irqs"]


def test_main_writes_land_in_the_image(runs):
    r = runs["main"]
    _common(r)
    vx, facts = r["vx"], r["facts"]
    assert vx.get("SIZE") == f"{64 * MiB // 512} 512" and vx.get("SERIAL") == "VMMSHIM-NVME", tail(r)
    assert vx.get("W1M") == "0" and vx.get("BACK1M") == facts["seq_md5"] and facts["written"]["8"], tail(r)
    assert vx.get("WSYNC") == "0" and facts["written"]["12"], "the fsync'd write is not in the image" + tail(r)
    assert vx.get("DISCARD") == "0" and facts["discarded_zero"], "the discarded MiB is not zeros" + tail(r)
    assert len(r["irqs"]) >= 2 and all("PCI-MSI" in line or "PCI-MSIX" in line for line in r["irqs"]), r["irqs"]


def test_intx_without_doorbells_4k_sectors_and_a_read_only_controller(runs):
    r = runs["intx"]
    _common(r)
    vx, facts = r["vx"], r["facts"]
    assert vx.get("SIZE") == f"{64 * MiB // 512} 4096", tail(r)      # /sys/block/*/size counts 512-byte units
    assert vx.get("RO-FLAG") == "1", "Linux did not see the namespace write protected" + tail(r)
    assert vx.get("RO-W") not in (None, "0"), "a write to the read-only controller succeeded" + tail(r)
    assert vx.get("RO-SUM") == facts["ro_md5"] and facts["ro_unchanged"], tail(r)
    assert r["irqs"] and all("IO-APIC" in line for line in r["irqs"]), r["irqs"]
