"""bench/snap_bench.py's table from made-up records (medians, the ratio, a round with nothing)."""

from bench.snap_bench import parse, table


def test_table_medians_and_ratio():
    out = ("noise\nSNAP " + '{"cold_s": 20.0, "suspend_s": 8.0, "paused_s": 6.0, "restore_s": [4.0, 5.0, 6.0], '
           '"memory": [536870912, 104857600]}\nSNAP {"cold_s": 22.0, "suspend_s": null, "paused_s": null, '
           '"restore_s": []}\n')
    _, recs = parse(out)
    text = table(recs)
    assert "21.00" in text and "5.00" in text and "0.24x" in text and "512 MiB, 100 MiB" in text
    assert "8.00" in text and "6.00" in text


def test_no_restores_leaves_dashes():
    text = table([{"cold_s": None, "suspend_s": None, "paused_s": None, "restore_s": []}])
    assert sum(line.endswith(" -") for line in text.splitlines()) == 4 and "x the time" not in text
