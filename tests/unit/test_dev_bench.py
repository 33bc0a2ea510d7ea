"""The device benchmark's own arithmetic and argv (``bench/dev_bench.py``, ``bench/dev_l2.py``,
``vmmshim/lab/l2vm.py``): per device and step the medians, and the share is QEMU's time over vmmshim's."""

import json

import pytest

from bench import dev_bench, dev_l2
from vmmshim.lab import l2vm


def _rec(vmm, device, step, seconds, status=0):
    return dict(vmm=vmm, device=device, round=0, steps={step: {"status": status, "seconds": seconds}})


def test_table_gives_each_device_its_rows_and_the_share_of_qemu():
    cfg = dict(mib=32, seq4k=256)
    recs = [_rec("vmmshim", "nvme", "SEQW", s) for s in (2.0, 4.0, 3.0)]
    recs += [_rec("qemu", "nvme", "SEQW", s) for s in (1.5, 9.0)] + [_rec("qemu", "nvme", "SEQW", 0.1, status=1)]
    recs += [_rec("vmmshim", "virtio-9p", "P9R", 1.0)]
    out = dev_bench.table(cfg, recs).splitlines()
    nvme = next(line for line in out if line.startswith("nvme"))
    assert "3.00 s" in nvme and "5.25 s" in nvme and nvme.rstrip().endswith("1.75x")   # 5.25 / 3.0
    assert "10.7" in nvme                                # 32 MiB in 3 s
    p9 = next(line for line in out if line.startswith("virtio-9p"))
    assert "file read" in p9 and p9.rstrip().endswith("-")    # one VMM only: no share
    assert not any(line.startswith("ahci-hd") for line in out)


def test_parse_reads_config_and_records():
    rec = _rec("qemu", "ahci-hd", "SEQR", 1.0)
    out = "noise\nDEV-CONFIG " + json.dumps(dict(mib=32, seq4k=256)) + "\nDEV " + json.dumps(rec) + "\n"
    cfg, recs = dev_bench.parse(out)
    assert cfg["mib"] == 32 and recs == [rec]


@pytest.mark.parametrize("device,node", [("virtio-blk", "/dev/vda"), ("nvme", "/dev/nvme0n1"),
                                         ("ahci-hd", "/dev/sda")])
def test_each_disk_is_benchmarked_on_its_own_node(device, node):
    script = dev_l2.guest_script(device, 32, 256)
    assert script.count(f"of={node} ") + script.count(f"if={node} ") == 3
    assert "VB-SEQ4K" in script


def test_the_same_devices_on_both_vmms():
    disks = [l2vm.Disk("/i.img", kind="nvme"), l2vm.Disk("/j.img", kind="ahci-hd")]
    v = " ".join(l2vm.vmmshim_argv("x", "/c", disks=disks, share="/sh"))
    assert "-s 4,nvme,/i.img" in v and "-s 5,ahci-hd,/j.img" in v and "-s 6,virtio-9p,share=/sh" in v
    q = " ".join(l2vm.qemu_argv("x", "/c", disks=disks, share="/sh"))
    assert "nvme,drive=d0,serial=VMMSHIM-NVME" in q and "ide-hd,drive=d1,bus=ahci1.0" in q
    assert "-virtfs local,path=/sh,mount_tag=share,security_model=none" in q
