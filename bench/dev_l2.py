"""Inside L1: the disk and folder devices of issue 21 (NVMe, AHCI, virtio-9p) and virtio-blk beside them, each
under vmmshim and under QEMU on the same image or folder. Run by ``bench/dev_bench.py``; by hand in L1:
``python3 -m bench.dev_l2 --quick``.

One boot per device and VMM (the VMMs take turns at going first, as in ``bench/io_l2.py``). The guest times each
step with ``/proc/uptime`` and prints ``VB-<STEP> <status> <start> <end>``:

- a disk (``virtio-blk`` /dev/vda, ``nvme`` /dev/nvme0n1, ``ahci-hd`` /dev/sda): SEQW and SEQR, ``dd`` of the
  region in 1 MiB requests with ``oflag=direct`` / ``iflag=direct``; SEQ4K, 4 KiB reads one at a time in one ``dd``;
- ``virtio-9p`` (tag ``share``, ``msize=524288,cache=none``): P9W writes a file of the region's size in 1 MiB
  writes and fsyncs it; P9R drops the guest's caches and reads it back.

QEMU's devices: ``nvme`` (serial ``VMMSHIM-NVME``), ``ahci`` + ``ide-hd``, ``virtio-blk-pci``, all on the same raw
image with ``cache=writeback`` (the image is on L1's tmpfs), and ``-virtfs local,security_model=none``.

One ``DEV {json}`` line per boot: ``vmm``, ``device``, ``round``, ``first``, ``marker_s``, ``failed_boots`` and
per step ``{status, seconds}``.
"""

import argparse
import json
import os
import shutil

from bench.io_l2 import boot_order, parse_steps
from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

DISKS = ("virtio-blk", "nvme", "ahci-hd")
DEVICES = DISKS + ("virtio-9p",)

NOW = "now(){{ read u _ </proc/uptime; echo $u; }}\n"
DISK_SCRIPT = NOW + """\
a=$(now); dd if=/dev/zero of={node} bs=1M count={mib} oflag=direct 2>/dev/null; echo VB-SEQW $? $a $(now)
a=$(now); dd if={node} of=/dev/null bs=1M count={mib} iflag=direct 2>/dev/null; echo VB-SEQR $? $a $(now)
a=$(now); dd if={node} of=/dev/null bs=4k count={seq4k} iflag=direct 2>/dev/null; echo VB-SEQ4K $? $a $(now)
"""
P9_SCRIPT = NOW + """\
mkdir -p /mnt/s; mount -t 9p -o trans=virtio,version=9p2000.L,msize=524288,cache=none {tag} /mnt/s || echo VB-MOUNT 1 0 0
a=$(now); dd if=/dev/zero of=/mnt/s/big bs=1M count={mib} conv=fsync 2>/dev/null; echo VB-P9W $? $a $(now)
sync; echo 3 >/proc/sys/vm/drop_caches
a=$(now); dd if=/mnt/s/big of=/dev/null bs=1M 2>/dev/null; echo VB-P9R $? $a $(now)
umount /mnt/s
"""
STEPS = {d: ("SEQW", "SEQR", "SEQ4K") for d in DISKS} | {"virtio-9p": ("P9W", "P9R")}


def guest_script(device, mib, seq4k):
    if device == "virtio-9p":
        return P9_SCRIPT.format(tag=l2vm.SHARE_TAG, mib=mib)
    return DISK_SCRIPT.format(node=l2vm.DISK_NODES[device], mib=mib, seq4k=seq4k)


def run_one(vmm, device, rnd, args, image, first=False):
    console = f"{args.workdir}/console-{vmm}-{device}.txt"
    append = f"{l2vm.BASE_APPEND} {encode_run(guest_script(device, args.mib, args.seq4k))}"
    share = f"{args.workdir}/share" if device == "virtio-9p" else None
    if share:
        shutil.rmtree(share, ignore_errors=True)
        os.makedirs(share)
    disks = [] if share else [l2vm.Disk(image, kind=device)]
    make = l2vm.vmmshim_argv if vmm == "vmmshim" else l2vm.qemu_argv
    res, failed = l2vm.boot_retry(lambda: make(append, console, disks=disks, share=share), console,
                                  tries=args.tries, timeout=args.boot_timeout)
    steps = parse_steps(res.console)
    rec = dict(vmm=vmm, device=device, round=rnd, first=first, marker_s=res.marker_s, failed_boots=failed,
               status=res.status, timed_out=res.timed_out, steps=steps)
    if share:
        big = os.path.join(share, "big")
        rec["share_bytes"] = os.path.getsize(big) if os.path.exists(big) else None
    if len(steps) < len(STEPS[device]):
        rec["console_tail"] = res.console[-1500:]
        rec["stderr_tail"] = res.stderr[-800:]
    print("DEV " + json.dumps(rec), flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--first-round", type=int, default=0, help="number of the first round (for the records)")
    ap.add_argument("--quick", action="store_true", help="a 32 MiB region and 256 4 KiB reads")
    ap.add_argument("--mib", type=int, help="region size in MiB (default 128; 32 quick)")
    ap.add_argument("--seq4k", type=int, help="4 KiB reads in one dd (default 1024; 256 quick)")
    ap.add_argument("--devices", default=",".join(DEVICES))
    ap.add_argument("--vmms", default="vmmshim,qemu")
    ap.add_argument("--tries", type=int, default=3, help="boots per measurement while boots hang early")
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default="/tmp/dev")
    args = ap.parse_args(argv)
    args.mib = args.mib or (32 if args.quick else 128)
    args.seq4k = args.seq4k or (256 if args.quick else 1024)
    devices = args.devices.split(",")
    unknown = set(devices) - set(DEVICES)
    if unknown:
        ap.error(f"unknown device(s) {sorted(unknown)}; known: {', '.join(DEVICES)}")
    os.makedirs(args.workdir, exist_ok=True)
    image = f"{args.workdir}/disk.img"
    l2vm.write_image(image, args.mib + 16)
    print("DEV-CONFIG " + json.dumps(dict(mib=args.mib, seq4k=args.seq4k, rounds=args.rounds)), flush=True)
    for rnd in range(args.first_round, args.first_round + args.rounds):
        vmms = boot_order(args.vmms.split(","), rnd)
        for device in devices:
            for vmm in vmms:
                run_one(vmm, device, rnd, args, image, first=vmm == vmms[0])


if __name__ == "__main__":
    main()
