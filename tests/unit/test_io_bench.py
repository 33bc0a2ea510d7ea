"""The virtio I/O benchmark's own arithmetic (``bench/io_bench.py``, ``bench/io_l2.py``): the guest's timing lines
become steps, the steps medians, and the table's ratio is vmmshim's time over QEMU's."""

import json

from bench import io_bench, io_l2


def test_guest_lines_become_steps():
    console = "VB-SEQW 0 10.00 12.50\r\nVB-SEQR 0 12.50 13.00\nVB-RERR\nVB-RAND4K 0 13.00 15.00\nVB-NETTX 1 1 2\n"
    steps = io_l2.parse_steps(console)
    assert steps["SEQW"] == {"status": 0, "seconds": 2.5}
    assert steps["SEQR"]["seconds"] == 0.5
    assert steps["RAND4K"]["status"] == 1          # a failed read marks the step failed
    assert steps["NETTX"]["status"] == 1


def test_guest_lines_glued_to_kernel_messages_still_count():
    console = ("VB-SEQW 0 12.55 13.23[   16.732676] IPv6: ADDRCONF(NETDEV_CHANGE): eth0: link becomes ready\n"
               "[   17.1] x VB-SEQR 0 13.32 13.98\nXVB-SEQ4K 0 1.00 2.00\n")
    steps = io_l2.parse_steps(console)
    assert steps["SEQW"] == {"status": 0, "seconds": 0.68} and steps["SEQR"]["seconds"] == 0.66
    assert "SEQ4K" not in steps


def test_table_takes_medians_and_the_time_ratio():
    cfg = dict(mib=64, seq4k=256, rand=100, net_mib=1)
    recs = [dict(vmm="vmmshim", steps={"SEQW": {"status": 0, "seconds": s}}) for s in (4.0, 6.0, 5.0)]
    recs += [dict(vmm="qemu", steps={"SEQW": {"status": 0, "seconds": s}}) for s in (1.0, 3.0, 2.0)]
    recs.append(dict(vmm="qemu", steps={"SEQW": {"status": 1, "seconds": 0.1}}))   # failed: not counted
    out = io_bench.table(cfg, recs)
    row = next(line for line in out.splitlines() if line.startswith("seq write"))
    assert "5.00 s" in row and "2.00 s" in row and row.rstrip().endswith("2.5x")
    assert "12.8" in row                            # 64 MiB in 5 s
    seqr = next(line for line in out.splitlines() if line.startswith("seq read"))
    assert seqr.rstrip().endswith("-")             # no samples: no ratio


def test_parse_reads_config_and_records():
    rec = dict(vmm="vmmshim", round=0, steps={})
    text = "IO-CONFIG " + json.dumps(dict(mib=1)) + "\nnoise\nIO " + json.dumps(rec) + "\n"
    cfg, recs = io_bench.parse(text)
    assert cfg == {"mib": 1} and recs == [rec]


def test_first_and_second_boots_are_told_apart_and_rounds_take_turns():
    def rec(vmm, first, seqw):
        return dict(vmm=vmm, first=first, steps={"SEQW": {"status": 0, "seconds": seqw},
                                                 "SEQR": {"status": 1, "seconds": 9.0}})
    recs = [rec("vmmshim", True, 2.0), rec("qemu", False, 1.0), rec("qemu", True, 1.5), rec("vmmshim", False, 1.6)]
    lines = io_bench.first_second(recs).splitlines()
    assert lines[0] == ("vmmshim: SEQW first 2.00 s (1), SEQW second 1.60 s (1), SEQR first -, SEQR second -")
    assert lines[1].startswith("qemu: SEQW first 1.50 s (1), SEQW second 1.00 s (1)")
    assert [io_l2.boot_order(["vmmshim", "qemu"], r)[0] for r in range(4)] == ["vmmshim", "qemu"] * 2
