"""Inside L1: virtio I/O of the default guest under vmmshim and under QEMU (``-accel kvm -machine
pc,kernel_irqchip=off``), alternating, on the same image and tap. Run by ``bench/io_bench.py``; by hand in L1:
``python3 -m bench.io_l2 --rounds 1 --quick``.

The guest (its script is :data:`GUEST`) times each step itself with ``/proc/uptime`` (10 ms resolution; busybox's
``date`` has no ``%N`` and its ``dd`` prints no timing line) and prints ``VB-<STEP> <status> <start> <end>``:

- SEQW / SEQR: ``dd`` of the region (256 MiB; 64 MiB with ``--quick``) in 1 MiB requests, ``oflag=direct`` /
  ``iflag=direct`` (busybox dd has both);
- SEQ4K: ``dd`` of ``--seq4k`` 4 KiB requests, one at a time, ``iflag=direct`` (one process: the device's
  request rate at queue depth 1);
- RAND4K: a shell loop of single 4 KiB ``dd iflag=direct`` reads at random offsets in the region (``$RANDOM``);
  LOOP4K: the same loop reading /dev/zero, the cost of starting ``dd`` that RAND4K includes;
- NETTX / NETRX: ``nc`` to / from L1 (a Sink / Source on 10.0.2.1), ``--net-mib`` MiB each way.

The VMMs take turns at going first: the first guest in a fresh L1 runs slower (L1's kernel paths not yet
translated by TCG; the A/B that showed it is in docs/lab.md, "Serving at HLT"), so even rounds run vmmshim first
and odd rounds QEMU.

One ``IO {json}`` line per boot: ``vmm``, ``round``, ``first`` (the round's first boot), ``marker_s``,
``failed_boots``, and per step ``{status, seconds}``. QEMU's drive is ``cache=writeback``: the image is on L1's
tmpfs, where ``cache=none`` (O_DIRECT) cannot open it; vmmshim's virtio-blk also goes through L1's page cache.
"""

import argparse
import json
import os
import re

from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

MiB = 1 << 20
SINK_PORT, SOURCE_PORT = 5000, 5001

GUEST = """\
now(){{ read u _ </proc/uptime; echo $u; }}
ifconfig eth0 {guest_ip} netmask 255.255.255.0 up
a=$(now); dd if=/dev/zero of=/dev/vda bs=1M count={mib} oflag=direct 2>/dev/null; echo VB-SEQW $? $a $(now)
a=$(now); dd if=/dev/vda of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; echo VB-SEQR $? $a $(now)
a=$(now); dd if=/dev/vda of=/dev/null bs=4k count={seq4k} iflag=direct 2>/dev/null; echo VB-SEQ4K $? $a $(now)
a=$(now); i=0; while [ $i -lt {rand} ]; do dd if=/dev/vda of=/dev/null bs=4k count=1 \
skip=$(( ((RANDOM<<1)^RANDOM) % {blocks} )) iflag=direct 2>/dev/null || echo VB-RERR; i=$((i+1)); done
echo VB-RAND4K 0 $a $(now)
a=$(now); i=0; while [ $i -lt {rand} ]; do dd if=/dev/zero of=/dev/null bs=4k count=1 2>/dev/null; \
i=$((i+1)); done; echo VB-LOOP4K 0 $a $(now)
ping -c 1 -w 10 {host_ip} >/dev/null
a=$(now); dd if=/dev/zero bs=65536 count={net16} 2>/dev/null | nc {host_ip} {sink}; echo VB-NETTX $? $a $(now)
a=$(now); nc {host_ip} {source} </dev/null | dd of=/dev/null bs=65536 2>/dev/null; echo VB-NETRX $? $a $(now)
"""

STEPS = ("SEQW", "SEQR", "SEQ4K", "RAND4K", "LOOP4K", "NETTX", "NETRX")


def guest_script(mib, rand, net_mib, seq4k):
    return GUEST.format(guest_ip=l2vm.GUEST_IP, host_ip=l2vm.HOST_IP, mib=mib, seq4k=seq4k, rand=rand,
                        blocks=mib * 256, net16=net_mib * 16, sink=SINK_PORT, source=SOURCE_PORT)


def parse_steps(console):
    out = {}
    # a kernel message may land on the same console line, before or after ours
    for m in re.finditer(r"(?<![\w-])VB-([A-Z0-9]+) (\d+) ([\d.]+) ([\d.]+)(?![\d.])", console):
        out[m.group(1)] = {"status": int(m.group(2)), "seconds": round(float(m.group(4)) - float(m.group(3)), 2)}
    if "VB-RERR" in console and "RAND4K" in out:
        out["RAND4K"]["status"] = 1
    return out


def boot_order(vmms, rnd):
    """The round's VMMs in boot order: as given in even rounds, reversed in odd ones (the first guest in a fresh L1
    runs slower, so the VMMs take turns at it)."""
    return list(reversed(vmms)) if rnd % 2 else list(vmms)


def run_one(vmm, rnd, args, image, append, first=False):
    console = f"{args.workdir}/console-{vmm}.txt"
    sink = l2vm.Sink(SINK_PORT)
    source = l2vm.Source(SOURCE_PORT, l2vm.pattern(MiB, b"net"), args.net_mib)
    make = l2vm.vmmshim_argv if vmm == "vmmshim" else l2vm.qemu_argv
    try:
        res, failed = l2vm.boot_retry(lambda: make(append, console, disks=[l2vm.Disk(image)], tap=l2vm.TAP),
                                      console, tries=args.tries, timeout=args.boot_timeout)
    finally:
        sink.close()
        source.close()
    steps = parse_steps(res.console)
    rec = dict(vmm=vmm, round=rnd, first=first, marker_s=res.marker_s, failed_boots=failed, status=res.status,
               timed_out=res.timed_out, steps=steps,
               l1_sink=sink.results[-1] if sink.results else None,
               l1_source=source.results[-1] if source.results else None)
    if len(steps) < len(STEPS):
        rec["console_tail"] = res.console[-1500:]
        rec["stderr_tail"] = res.stderr[-800:]
    print("IO " + json.dumps(rec), flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--first-round", type=int, default=0, help="number of the first round (for the records)")
    ap.add_argument("--quick", action="store_true", help="64 MiB region, 256 + 100 4 KiB reads, 1 MiB of network")
    ap.add_argument("--mib", type=int, help="region size in MiB (default 256; 64 quick)")
    ap.add_argument("--seq4k", type=int, help="4 KiB reads in one dd (default 1024; 256 quick)")
    ap.add_argument("--rand", type=int, help="random 4 KiB reads (default 200; 100 quick)")
    ap.add_argument("--net-mib", type=int, help="MiB each way over the network (default 2; 1 quick)")
    ap.add_argument("--vmms", default="vmmshim,qemu")
    ap.add_argument("--append", default="", help="more guest kernel parameters (both VMMs)")
    ap.add_argument("--tries", type=int, default=3, help="boots per measurement while boots hang early")
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default="/tmp/io")
    args = ap.parse_args(argv)
    args.mib = args.mib or (64 if args.quick else 256)
    args.seq4k = args.seq4k or (256 if args.quick else 1024)
    args.rand = args.rand or (100 if args.quick else 200)
    args.net_mib = args.net_mib or (1 if args.quick else 2)
    os.makedirs(args.workdir, exist_ok=True)
    image = f"{args.workdir}/disk.img"
    l2vm.write_image(image, args.mib + 16)
    l2vm.tap_up()
    script = guest_script(args.mib, args.rand, args.net_mib, seq4k=args.seq4k)
    append = f"{l2vm.BASE_APPEND} {args.append} {encode_run(script)}".replace("  ", " ")
    print("IO-CONFIG " + json.dumps(dict(mib=args.mib, rand=args.rand, net_mib=args.net_mib, seq4k=args.seq4k,
                                         rounds=args.rounds, append=args.append)), flush=True)
    for rnd in range(args.first_round, args.first_round + args.rounds):
        vmms = boot_order(args.vmms.split(","), rnd)
        for vmm in vmms:
            run_one(vmm, rnd, args, image, append, first=vmm == vmms[0])


if __name__ == "__main__":
    main()
