"""The network benchmark's own arithmetic, guest scripts and argv (``bench/net_bench.py``, ``bench/net_l2.py``,
``vmmshim/lab/l2vm.py``): per config and direction the medians, the share is QEMU's time over vmmshim's, and each
config's guest reaches L1 where L1's servers listen."""

import json

import pytest

from bench import net_bench, net_l2
from vmmshim.lab import l2vm


def _rec(vmm, config, step, seconds, status=0, **kw):
    return dict(vmm=vmm, config=config, round=0, steps={step: {"status": status, "seconds": seconds}}, **kw)


def _row(lines, head):
    return next(line for line in lines if line.startswith(head))


def test_table_gives_each_config_and_direction_medians_and_the_share_of_qemu():
    cfg = dict(net_mib=8)
    recs = [_rec("vmmshim", "tap", "NETTX", s) for s in (2.0, 4.0, 3.0)]
    recs += [_rec("qemu", "tap", "NETTX", s) for s in (1.0, 2.0)] + [_rec("qemu", "tap", "NETTX", 0.1, status=1)]
    recs += [_rec("vmmshim", "slirp", "NETRX", 8.0), _rec("qemu", "slirp", "NETRX", 2.0)]
    recs += [_rec("vmmshim", "slirp", "NETTX", 1.0)]
    out = net_bench.table(cfg, recs).splitlines()
    assert "vmmshim" in out[0] and "QEMU" in out[0] and "share" in out[0]
    tx = _row(out, "tap guest -> L1")
    assert "3.00 s" in tx and "2.67 MiB/s" in tx                # 8 MiB in 3 s
    assert "1.50 s" in tx and "5.33 MiB/s" in tx                # the failed QEMU step is left out
    assert tx.rstrip().endswith("0.50x")                         # 1.5 / 3.0
    rx = _row(out, "slirp L1 -> guest")
    assert "8.00 s" in rx and "2.00 s" in rx and rx.rstrip().endswith("0.25x")
    assert _row(out, "slirp guest -> L1").rstrip().endswith("-")  # one VMM only: no share
    assert _row(out, "tap L1 -> guest").rstrip().endswith("-")    # no measurement at all
    assert [line.split("  ")[0] for line in out[1:]] == ["tap guest -> L1", "tap L1 -> guest",
                                                         "slirp guest -> L1", "slirp L1 -> guest"]


def test_table_leaves_out_a_config_that_was_not_run():
    out = net_bench.table(dict(net_mib=2), [_rec("qemu", "slirp", "NETTX", 1.0)])
    assert "tap" not in out and "slirp guest -> L1" in out


def test_parse_reads_config_and_records():
    rec = _rec("qemu", "slirp", "NETRX", 1.0)
    out = "noise\nNET-CONFIG " + json.dumps(dict(net_mib=8)) + "\nNET " + json.dumps(rec) + "\nNETX {}\n"
    cfg, recs = net_bench.parse(out)
    assert cfg["net_mib"] == 8 and recs == [rec]


def test_short_transfers_names_the_boots_that_moved_too_little():
    want = 2 << 20
    good = _rec("vmmshim", "tap", "NETTX", 1.0, l1_sink={"bytes": want}, l1_source={"bytes": want})
    short = _rec("qemu", "slirp", "NETTX", 1.0, l1_sink={"bytes": 10}, l1_source=None)
    lines = net_bench.short_transfers(dict(net_mib=2), [good, short])
    assert len(lines) == 2 and all("qemu slirp" in line for line in lines)


def test_tap_script_sets_the_static_address_and_talks_to_the_tap_end():
    script = net_l2.guest_script("tap", 8)
    assert f"ifconfig eth0 {l2vm.GUEST_IP} netmask 255.255.255.0 up" in script
    assert f"count=128 2>/dev/null | nc {l2vm.HOST_IP} {net_l2.SINK_PORT}; echo VB-NETTX" in script
    assert f"nc {l2vm.HOST_IP} {net_l2.SOURCE_PORT} </dev/null | dd of=/dev/null bs=65536" in script
    assert "udhcpc" not in script and "{" not in script.replace("now(){", "").replace("; }", "")


def test_slirp_script_takes_a_lease_and_talks_to_the_vmm_host_address():
    script = net_l2.guest_script("slirp", 2)
    assert "udhcpc -i eth0 -q -n -t 5 -s /tmp/dhcp.sh; echo VB-UP" in script
    assert 'ip route add default via "$router"' in script and "ifconfig" not in script
    assert "count=32 2>/dev/null | nc 10.0.2.2 5000; echo VB-NETTX" in script
    assert "nc 10.0.2.2 5001 </dev/null | dd of=/dev/null" in script
    assert net_l2.L1_BIND["slirp"] == "0.0.0.0" and net_l2.L1_BIND["tap"] == l2vm.HOST_IP


@pytest.mark.parametrize("config", net_l2.CONFIGS)
def test_each_config_prints_every_step(config):
    script = net_l2.guest_script(config, 8)
    assert all(f"echo VB-{step} $? $a $(now)" in script for step in net_l2.STEPS)


def test_a_record_fails_on_a_missing_or_nonzero_step():
    ok = {s: {"status": 0, "seconds": 1.0} for s in net_l2.STEPS}
    assert not net_l2.failed(dict(steps=ok))
    assert net_l2.failed(dict(steps={**ok, "NETRX": {"status": 1, "seconds": 1.0}}))
    assert net_l2.failed(dict(steps={"UP": ok["UP"]}))


def test_slirp_on_both_vmms():
    v = l2vm.vmmshim_argv("x", "/c", disks=[l2vm.Disk("/i.img")], **net_l2.nic_kwargs("slirp"))
    assert "-s 5,virtio-net,slirp" in " ".join(v) and "tap0" not in " ".join(v)
    q = " ".join(l2vm.qemu_argv("x", "/c", **net_l2.nic_kwargs("slirp")))
    assert "-netdev user,id=n0 -device virtio-net-pci,netdev=n0" in q and "tap" not in q
    q = " ".join(l2vm.qemu_argv("x", "/c", net="slirp", opts=("-o", "virtio_msix=false")))
    assert "virtio-net-pci,netdev=n0,vectors=0" in q


def test_tap_and_slirp_together_take_the_next_slot_and_id():
    v = " ".join(l2vm.vmmshim_argv("x", "/c", tap="tap0", net="slirp", rnd=True))
    assert "-s 4,virtio-net,tap0 -s 5,virtio-net,slirp -s 6,virtio-rnd" in v
    q = " ".join(l2vm.qemu_argv("x", "/c", tap="tap0", net="slirp"))
    assert "netdev=n0" in q and "-netdev user,id=n1 -device virtio-net-pci,netdev=n1" in q


def test_tap_argv_is_unchanged_without_net():
    v = l2vm.vmmshim_argv("x", "/c", **net_l2.nic_kwargs("tap"))
    assert v[v.index("-l") - 2:v.index("-l")] == ["-s", "4,virtio-net,tap0"]
    q = l2vm.qemu_argv("x", "/c", tap="tap0")
    assert q[-4:] == ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no", "-device",
                      "virtio-net-pci,netdev=n0"]


def test_an_unknown_net_is_refused():
    with pytest.raises(ValueError):
        l2vm.vmmshim_argv("x", "/c", net="vde")
    with pytest.raises(ValueError):
        l2vm.qemu_argv("x", "/c", net="vde")
