"""Inside L1: virtio-net under vmmshim and under QEMU, on a tap and on user-mode networking (slirp).
vmmshim's ``slirp`` backend faces QEMU's ``-netdev user``. Run by ``bench/net_bench.py``; by hand in L1:
``python3 -m bench.net_l2 --quick``.

One boot per config and VMM (the VMMs take turns at going first, as in ``bench/io_l2.py``). The guest gets its
address, then times two transfers with ``/proc/uptime`` and prints ``VB-<STEP> <status> <start> <end>``:

- UP: ``tap``: ``ifconfig eth0 10.0.2.15/24`` (then one untimed ping of L1, for ARP); ``slirp``: busybox ``udhcpc``
  with a script of its own (as ``vmmshim/lab/slirp_check.py``: the guest image has no default script), which sets
  the lease's address and route and prints ``NET-LEASE <ip> <router>``;
- NETTX: ``dd`` of ``--net-mib`` MiB of zeros through ``nc`` to a :class:`~vmmshim.lab.l2vm.Sink` on L1;
- NETRX: ``nc`` from a :class:`~vmmshim.lab.l2vm.Source` on L1, ``--net-mib`` MiB, into ``dd``.

L1's end: on ``tap`` 10.0.2.1 (``tap0``, the servers bound to it); on ``slirp`` 10.0.2.2, which both VMMs map to
L1's loopback, so the servers bind to every address of L1.

A ``NET-CONFIG {json}`` line first, then one ``NET {json}`` line per boot: ``vmm``, ``config``, ``round``,
``first``, ``marker_s``, ``failed_boots``, ``status``, per step ``{status, seconds}``, what L1's Sink and Source
saw (``l1_sink``, ``l1_source``), the DHCP lease under ``slirp``, and after a failed step the console's and the
VMM's last output.
"""

import argparse
import json
import os
import re

from bench.io_l2 import boot_order, parse_steps
from vmmshim.lab import l2vm
from vmmshim.lab.guest import encode_run

MiB = 1 << 20
SINK_PORT, SOURCE_PORT = 5000, 5001
NETMASK = "255.255.255.0"
ANY = "0.0.0.0"
SLIRP_HOST_IP = "10.0.2.2"          # libslirp's (and QEMU's) address of the host: L1's loopback
CONFIGS = ("tap", "slirp")
#: Per config: where the guest finds L1, and the address L1's servers bind to.
L1_ADDR = {"tap": l2vm.HOST_IP, "slirp": SLIRP_HOST_IP}
L1_BIND = {"tap": l2vm.HOST_IP, "slirp": ANY}
STEPS = ("UP", "NETTX", "NETRX")
DEFAULT_MIB, QUICK_MIB = 8, 2

NOW = "now(){{ read u _ </proc/uptime; echo $u; }}\n"
TAP_UP = """\
a=$(now); ifconfig eth0 {guest_ip} netmask {netmask} up; echo VB-UP $? $a $(now)
ping -c 1 -w 10 {l1} >/dev/null
"""
SLIRP_UP = """\
cat >/tmp/dhcp.sh <<'EOF'
#!/bin/sh
case "$1" in bound|renew)
  ip addr add "$ip/$mask" dev "$interface"; ip link set "$interface" up
  ip route add default via "$router"; echo "NET-LEASE $ip $router" ;;
esac
EOF
chmod +x /tmp/dhcp.sh
ip link set eth0 up
a=$(now); udhcpc -i eth0 -q -n -t 5 -s /tmp/dhcp.sh; echo VB-UP $? $a $(now)
"""
TRANSFERS = """\
a=$(now); dd if=/dev/zero bs=65536 count={n16} 2>/dev/null | nc {l1} {sink}; echo VB-NETTX $? $a $(now)
a=$(now); nc {l1} {source} </dev/null | dd of=/dev/null bs=65536 2>/dev/null; echo VB-NETRX $? $a $(now)
"""
LEASE_RE = re.compile(r"NET-LEASE ([\d.]+) ([\d.]+)")


def guest_script(config, net_mib):
    """The guest's shell script for ``config`` (``tap`` or ``slirp``), ``net_mib`` MiB each way."""
    up = TAP_UP if config == "tap" else SLIRP_UP
    return (NOW + up + TRANSFERS).format(guest_ip=l2vm.GUEST_IP, netmask=NETMASK, l1=L1_ADDR[config],
                                         n16=net_mib * 16, sink=SINK_PORT, source=SOURCE_PORT)


def nic_kwargs(config):
    """The NIC arguments of :func:`~vmmshim.lab.l2vm.vmmshim_argv` / :func:`~vmmshim.lab.l2vm.qemu_argv`."""
    return {"tap": l2vm.TAP} if config == "tap" else {"net": l2vm.NET_SLIRP}


def failed(rec):
    """Whether a step is missing or exited non-zero."""
    return len(rec["steps"]) < len(STEPS) or any(s["status"] != 0 for s in rec["steps"].values())


def run_one(vmm, config, rnd, args, first=False):
    console = f"{args.workdir}/console-{vmm}-{config}.txt"
    append = f"{l2vm.BASE_APPEND} {encode_run(guest_script(config, args.net_mib))}"
    make = l2vm.vmmshim_argv if vmm == "vmmshim" else l2vm.qemu_argv
    sink = l2vm.Sink(SINK_PORT, host=L1_BIND[config])
    source = l2vm.Source(SOURCE_PORT, l2vm.pattern(MiB, b"net"), args.net_mib, host=L1_BIND[config])
    try:
        res, hangs = l2vm.boot_retry(lambda: make(append, console, **nic_kwargs(config)), console,
                                     tries=args.tries, timeout=args.boot_timeout)
    finally:
        sink.close()
        source.close()
    lease = LEASE_RE.search(res.console)
    rec = dict(vmm=vmm, config=config, round=rnd, first=first, marker_s=res.marker_s, failed_boots=hangs,
               status=res.status, timed_out=res.timed_out, steps=parse_steps(res.console),
               l1_sink=sink.results[-1] if sink.results else None,
               l1_source=source.results[-1] if source.results else None,
               lease=list(lease.groups()) if lease else None)
    if failed(rec):
        rec["console_tail"] = res.console[-1500:]
        rec["stderr_tail"] = res.stderr[-800:]
    print("NET " + json.dumps(rec), flush=True)
    return rec


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--first-round", type=int, default=0, help="number of the first round (for the records)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_MIB} MiB each way")
    ap.add_argument("--net-mib", type=int, help=f"MiB each way (default {DEFAULT_MIB}; {QUICK_MIB} quick)")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--vmms", default="vmmshim,qemu")
    ap.add_argument("--tries", type=int, default=3, help="boots per measurement while boots hang early")
    ap.add_argument("--boot-timeout", type=float, default=300.0)
    ap.add_argument("--workdir", default="/tmp/net")
    args = ap.parse_args(argv)
    args.net_mib = args.net_mib or (QUICK_MIB if args.quick else DEFAULT_MIB)
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        ap.error(f"unknown config(s) {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    os.makedirs(args.workdir, exist_ok=True)
    if "tap" in configs:
        l2vm.tap_up()
    print("NET-CONFIG " + json.dumps(dict(net_mib=args.net_mib, rounds=args.rounds, configs=configs)), flush=True)
    for rnd in range(args.first_round, args.first_round + args.rounds):
        vmms = boot_order(args.vmms.split(","), rnd)
        for config in configs:
            for vmm in vmms:
                run_one(vmm, config, rnd, args, first=vmm == vmms[0])


if __name__ == "__main__":
    main()
