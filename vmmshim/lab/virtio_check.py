"""Inside L1: Linux guests exercise virtio-blk (read-write and ``ro``), virtio-net and virtio-rnd, and L1 checks
what they did: ``python3 -m vmmshim.lab.virtio_check [--case main|intx] [--vmm vmmshim|qemu] [--tries N]``.

Case ``main`` (MSI-X, the modern interface): vda a 64 MiB read-write image (its first MiB filled by L1), vdb an
8 MiB read-only image (random), eth0 on ``tap0`` (L1 is 10.0.2.1, the guest 10.0.2.15), the RNG. The guest
(:data:`GUEST_SCRIPT`, passed with ``vmmshim.run=``) prints ``VX-*`` lines:

- ``VX-RNG-CUR`` the hw_random driver in use, ``VX-RNG-BYTES`` how many of 4096 asked-for bytes came back,
  ``VX-RNG-OD`` 64 of them in hex;
- ``VX-RO-FLAG`` /sys/block/vdb/ro, ``VX-RO-SUM`` the md5 of all of vdb, ``VX-RO-W`` dd's status writing vdb
  (its error message precedes it);
- ``VX-RW-READ`` the md5 of vda's first MiB (O_DIRECT), ``VX-RW-W`` dd's status writing 1 MiB of ``seq`` output
  at 2 MiB with O_DIRECT, ``VX-RW-BACK`` the md5 read back and the md5 of what was written;
- ``VX-PING`` the status of 3 pings to L1; ``VX-GATE`` L1's answer after it pinged the guest (``rc= received=``);
  ``VX-SEND`` nc's status sending vdb's first MiB to L1's Sink; ``VX-RECV`` the md5 of 1 MiB read from L1's
  Source.

Case ``intx`` (``-o virtio_msix=false``: no MSI-X capability, so Linux falls back to INTx through the IOAPIC;
and ``-o vmmshim.doorbells=false``: KVM's ioeventfd is not used, so every queue notification exits and the
transport rings the device's thread itself, ``vmmshim/fastpaths.py``; :data:`INTX_SCRIPT`): vda, eth0 and the RNG are used through the modern interface (``VX-MODERN-*``: vda's first
MiB, 64 bytes of RNG, a ping, a 64 KiB write at 1 MiB, VERSION_1 per device), then ``VX-SIZE`` (sectors, logical
block size), ``VX-SERIAL`` (GET_ID), ``VX-DISCARD`` (``blkdiscard`` of 3-4 MiB), ``VX-MAC`` (address, carrier);
then virtio_pci is removed (every device is reset) and loaded again with ``force_legacy=1``, and the same checks
run through the legacy I/O BAR (``VX-LEGACY-*``, the write at 2 MiB).

Case ``smp``: ``main`` with two vCPUs (MSI-X vectors spread over both, the block worker and the receive thread
interrupting either).

Each guest powers off (vmmshim status 1) and L1 reads the images back. The result is one line
``VIRTIO-RESULT {json}`` per case (:func:`parse_result`) with the boot, the facts L1 checked (``expect``), what
the guest said (``vx``: the last value of each ``VX-`` key) and its virtio interrupt lines (``irqs``); the
console follows, each line prefixed with ``<case>| ``.
"""

import argparse
import hashlib
import json
import os
import re

from bhyve_devices.virtio.blk import bhyve_ident
from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

MiB = 1 << 20
SINK_PORT, SOURCE_PORT, GATE_PORT = 5000, 5001, 5002

GUEST_SCRIPT = f"""\
m5(){{ md5sum | cut -d' ' -f1; }}
echo VX-RNG-CUR $(cat /sys/class/misc/hw_random/rng_current)
echo VX-RNG-BYTES $(dd if=/dev/hwrng bs=1024 count=4 iflag=fullblock 2>/dev/null | wc -c)
echo VX-RNG-OD $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | od -An -tx1 | tr -d ' \\n')
echo VX-RO-FLAG $(cat /sys/block/vdb/ro)
echo VX-RO-SUM $(m5 </dev/vdb)
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct; echo VX-RO-W $?
echo VX-RW-READ $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | m5)
seq 1 200000 | head -c 1048576 >/tmp/p
dd if=/tmp/p of=/dev/vda bs=65536 seek=32 oflag=direct; echo VX-RW-W $?
sync
echo VX-RW-BACK $(dd if=/dev/vda bs=65536 skip=32 count=16 iflag=direct 2>/dev/null | m5) $(m5 </tmp/p)
grep virtio /proc/interrupts
ifconfig eth0 {l2vm.GUEST_IP} netmask 255.255.255.0 up
ping -c 3 -w 10 {l2vm.HOST_IP}; echo VX-PING $?
echo VX-GATE $(nc {l2vm.HOST_IP} {GATE_PORT} </dev/null)
dd if=/dev/vdb bs=65536 count=16 2>/dev/null | nc {l2vm.HOST_IP} {SINK_PORT}; echo VX-SEND $?
echo VX-RECV $(nc {l2vm.HOST_IP} {SOURCE_PORT} </dev/null | m5)
cat /proc/net/dev
"""


def seq_pattern(n=MiB):
    """What ``seq 1 200000 | head -c N`` prints."""
    return "".join(f"{i}\n" for i in range(1, 200001)).encode()[:n]


def vx_lines(console):
    """``{key: value}`` of the guest's ``VX-KEY value`` lines (the last one of each key wins)."""
    out = {}
    for m in re.finditer(r"^VX-([A-Za-z0-9-]+) ?(.*?)\r?$", console, re.M):
        out[m.group(1)] = m.group(2).strip()
    return out


def parse_result(stdout, case="main"):
    """``(result dict, console text)`` of ``case`` from the output of this module; ``(None, '')`` if absent."""
    for m in re.finditer(r"^VIRTIO-RESULT (\{.*\})$", stdout, re.M):
        result = json.loads(m.group(1))
        if result.get("case") == case:
            prefix = f"{case}| "
            console = "\n".join(line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix))
            return result, console
    return None, ""


INTX_OPTS = ("-o", "virtio_msix=false", "-o", "vmmshim.doorbells=false")
INTX_SCRIPT = f"""\
m5(){{ md5sum | cut -d' ' -f1; }}
chk(){{ echo VX-$1-BLK $(dd if=/dev/vda bs=65536 count=16 iflag=direct 2>/dev/null | m5)
echo VX-$1-RNG $(cat /sys/class/misc/hw_random/rng_current) $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | wc -c)
ifconfig eth0 {l2vm.GUEST_IP} netmask 255.255.255.0 up; ping -c 2 -w 10 {l2vm.HOST_IP} >/dev/null; echo VX-$1-PING $?
seq $2 99999 | head -c 65536 | dd of=/dev/vda bs=65536 seek=$3 oflag=direct 2>/dev/null; echo VX-$1-W $?
for d in /sys/bus/virtio/devices/*; do echo VX-$1-V1-$(cat $d/device) $(cut -c33 $d/features); done
grep virtio /proc/interrupts; }}
chk MODERN 11 16
echo VX-SIZE $(cat /sys/block/vda/size) $(cat /sys/block/vda/queue/logical_block_size)
echo VX-SERIAL $(cat /sys/block/vda/serial)
blkdiscard -o 3145728 -l 1048576 /dev/vda; echo VX-DISCARD $?
echo VX-MAC $(cat /sys/class/net/eth0/address) $(cat /sys/class/net/eth0/carrier)
cd /lib/modules/*/
rmmod virtio_rng virtio_net virtio_blk virtio_pci; echo VX-RMMOD $?
insmod virtio_pci.ko force_legacy=1 && insmod virtio_blk.ko && insmod virtio_net.ko && insmod virtio-rng.ko
echo VX-INSMOD $?
sleep 1
chk LEGACY 22 32
dmesg | grep -i virtio | tail -5
"""


def _seq_from(first, n=65536):
    return "".join(f"{i}\n" for i in range(first, 100000)).encode()[:n]


def _irq_counts(console):
    """``{irq line name: total count}`` of the guest's ``/proc/interrupts`` lines naming virtio (last seen)."""
    out = {}
    for m in re.finditer(r"^\s*\d+:\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\r?$", console, re.M):
        out[m.group(4)] = dict(count=int(m.group(1)), chip=m.group(2), how=m.group(3))
    return out


def run_case(case, vmm="vmmshim", tries=3, workdir="/tmp/vx", timeout=240.0):
    """Boots one guest for ``case`` ('main': MSI-X, modern; 'smp': the same with two vCPUs; 'intx': ``-o
    virtio_msix=false``, modern, then the legacy interface after reloading virtio_pci with ``force_legacy=1``)
    and prints its result."""
    os.makedirs(workdir, exist_ok=True)
    rw, ro, console = f"{workdir}/rw.img", f"{workdir}/ro.img", f"{workdir}/console-{case}.txt"
    rw_head, ro_data, src = l2vm.pattern(MiB, b"rw"), l2vm.pattern(8 * MiB, b"ro"), l2vm.pattern(MiB, b"src")

    def prepare():
        with open(rw, "wb") as f:
            f.write(rw_head)
            f.seek(3 * MiB)
            f.write(rw_head)         # blkdiscard'ed by the intx case
            f.truncate(64 * MiB)
        with open(ro, "wb") as f:
            f.write(ro_data)

    l2vm.tap_up()
    servers = [l2vm.Sink(SINK_PORT), l2vm.Source(SOURCE_PORT, src), l2vm.Gate(GATE_PORT, l2vm.l1_ping)]
    main = case in ("main", "smp")
    if main:
        script, opts, disks = GUEST_SCRIPT, (), [l2vm.Disk(rw), l2vm.Disk(ro, ro=True)]
    else:
        script, opts, disks = INTX_SCRIPT, INTX_OPTS, [l2vm.Disk(rw)]
    append = f"{l2vm.BASE_APPEND} {encode_run(script)}"
    make = l2vm.vmmshim_argv if vmm == "vmmshim" else l2vm.qemu_argv
    devs = dict(disks=disks, tap=l2vm.TAP, rnd=True, opts=opts, ncpus=2 if case == "smp" else 1)
    try:
        res, hangs = l2vm.boot_retry(lambda: make(append, console, **devs), console, tries=tries,
                                     prepare=prepare, timeout=timeout)
    finally:
        for s in servers:
            s.close()
    with open(rw, "rb") as f:
        rw_now = f.read(4 * MiB)
    with open(ro, "rb") as f:
        ro_now = f.read()
    md5 = lambda b: hashlib.md5(b).hexdigest()  # noqa: E731
    sink = servers[0].results
    expect = dict(rw_head_md5=md5(rw_head), rw_head_intact=rw_now[:MiB] == rw_head)
    if main:
        expect.update(
            ro_md5=md5(ro_data), seq_md5=md5(seq_pattern()), src_md5=md5(src),
            ro_sent_sha256=hashlib.sha256(ro_data[:MiB]).hexdigest(),
            rw_pattern_on_disk=rw_now[2 * MiB:3 * MiB] == seq_pattern(), ro_unchanged=ro_now == ro_data)
    else:
        expect.update(modern_write_on_disk=rw_now[MiB:MiB + 65536] == _seq_from(11),
                      legacy_write_on_disk=rw_now[2 * MiB:2 * MiB + 65536] == _seq_from(22),
                      discarded_zero=rw_now[3 * MiB:4 * MiB] == bytes(MiB), serial=bhyve_ident(rw))
    result = dict(
        case=case, vmm=vmm, status=res.status, up=res.up, powered_off=res.powered_off, hangs=hangs,
        hung=res.hung, timed_out=res.timed_out, marker_s=res.marker_s, total_s=res.total_s,
        stderr=res.stderr[-1500:], expect=expect, sink=sink[-1] if sink else None, vx=vx_lines(res.console),
        irqs=_irq_counts(res.console))
    print("VIRTIO-RESULT " + json.dumps(result), flush=True)
    for line in res.console.splitlines():
        print(f"{case}| " + line)
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vmm", choices=("vmmshim", "qemu"), default="vmmshim")
    ap.add_argument("--case", action="append", choices=("main", "intx", "smp"), help="default: all three")
    ap.add_argument("--tries", type=int, default=3, help="boots to try while they hang before the marker")
    ap.add_argument("--timeout", type=float, default=240.0)
    args = ap.parse_args()
    for case in args.case or ("main", "intx", "smp"):
        run_case(case, args.vmm, args.tries, timeout=args.timeout)


if __name__ == "__main__":
    main()
