"""The benchmark report: the markdown table, with the do_bench column only where a GPU run has it."""

from bench.report import table
from bench.runner import Row


def _row(variant, extra=None):
    return Row(case="f/case", family="f", params={}, variant=variant, median_ms=2.0, q1_ms=1.9, q3_ms=2.1,
               speedup_vs_eager=1.5, speedup_vs_compile=float("nan"), roofline_fraction=0.25, extra=extra or {})


def test_table_lists_speedups_and_spreads():
    text = table([_row("eager"), _row("cpu")])
    assert "| f/case | cpu | 1.50x | - | 2.000 | 1.900-2.100 | 25.0% |" in text
    assert "do_bench" not in text


def test_table_adds_the_do_bench_cross_check_when_present():
    text = table([_row("eager", {"do_bench_ms": 2.25}), _row("cuda")])
    assert text.splitlines()[0].endswith("do_bench ms |")
    assert "| 2.250 |" in text and text.splitlines()[-1].endswith("| - |")
