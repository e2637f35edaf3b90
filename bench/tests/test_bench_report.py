"""The benchmark: the markdown table (the do_bench column only where a GPU run has it), where a run
writes its results, and roofline fractions that cannot read above 100 %."""

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

import bench.__main__ as bench_main
from bench import report as bench_report
from bench.cases import Case, Setup
from bench.ceilings import METHOD as ROOFLINE_METHOD
from bench.ceilings import Ceilings, roofline_fraction
from bench.report import ABOVE_CEILING_NOTE, table
from bench.runner import Row, run_case


def _row(variant, extra=None, fraction=0.25):
    return Row(case="f/case", family="f", params={}, variant=variant, median_ms=2.0, q1_ms=1.9, q3_ms=2.1,
               speedup_vs_eager=1.5, speedup_vs_compile=float("nan"), roofline_fraction=fraction, extra=extra or {})


def test_table_lists_speedups_and_spreads():
    text = table([_row("eager"), _row("cpu")])
    assert "| f/case | cpu | 1.50x | - | 2.000 | 1.900-2.100 | 25.0% |" in text
    assert "do_bench" not in text


def test_table_adds_the_do_bench_cross_check_when_present():
    text = table([_row("eager", {"do_bench_ms": 2.25}), _row("cuda")])
    assert text.splitlines()[0].endswith("do_bench ms |")
    assert "| 2.250 |" in text and text.splitlines()[-1].endswith("| - |")


# ---- where results go ---------------------------------------------------------------------------

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_default_run_writes_to_an_untracked_folder():
    out = os.path.relpath(bench_main.parse([]).out, REPO)
    assert out == os.path.join("bench", "out")
    if shutil.which("git") and os.path.isdir(os.path.join(REPO, ".git")):
        ignored = subprocess.run(["git", "check-ignore", "-q", os.path.join(out, "cpu.json")], cwd=REPO)
        assert ignored.returncode == 0, f"{out} must be in .gitignore"
    assert os.path.relpath(bench_main.parse(["--out", "bench/results"]).out) == os.path.join("bench", "results")


def test_a_run_writes_only_into_its_out_folder(tmp_path, capsys):
    committed = os.path.join(REPO, "bench", "results")

    def committed_cpu_results():  # what a CPU run would overwrite there
        return {name: os.path.getmtime(os.path.join(committed, name)) for name in os.listdir(committed)
                if name.startswith("cpu")}

    before = committed_cpu_results()
    assert bench_main.main(["--cases", "head 5x1600", "--no-compile", "--rounds", "1", "--out", str(tmp_path)]) == 0
    assert {"cpu.json", "cpu.csv", "cpu.md"} <= set(os.listdir(tmp_path))
    assert committed_cpu_results() == before
    results = json.load(open(tmp_path / "cpu.json"))
    assert results["meta"]["roofline"] == ROOFLINE_METHOD
    assert all(r["roofline_fraction"] <= 1 for r in results["results"])


# ---- roofline ---------------------------------------------------------------------------------


def test_roofline_fraction_is_at_most_one_and_flags_what_ran_past_the_ceiling():
    assert roofline_fraction(1.0, 4.0) == (0.25, None)
    assert roofline_fraction(1.24, 1.0) == (1.0, 1.24)
    fraction, above = roofline_fraction(0.0, 1.0)
    assert math.isnan(fraction) and above is None
    text = table([_row("eager", {"roofline_above_ceiling": 1.24}, fraction=1.0), _row("cpu")])
    assert "| f/case | eager | 1.50x | - | 2.000 | 1.900-2.100 | 100.0%* |" in text
    assert "| f/case | cpu | 1.50x | - | 2.000 | 1.900-2.100 | 25.0% |" in text
    assert text.splitlines()[-2] == ABOVE_CEILING_NOTE
    assert text.splitlines()[-1] == "ceiling defects: f/case / eager (124 %)"


def test_a_row_past_its_ceiling_is_reported_as_a_defect_of_the_ceiling(tmp_path):
    rows = [_row("eager", {"roofline_above_ceiling": 1.3}, fraction=1.0), _row("cpu")]
    assert bench_report.ceiling_defects(rows) == [("f/case", "eager", 1.3)]
    assert bench_report.ceiling_defects([_row("cpu")]) == []
    bench_report.write(rows, bench_report.metadata("cpu", measure_stub()), str(tmp_path), "t")
    written = json.load(open(tmp_path / "t.json"))
    assert written["ceiling_defects"] == [["f/case", "eager", 1.3]]
    assert all(r["roofline_fraction"] <= 1 for r in written["results"])
    assert "ceiling defects: f/case / eager (130 %)" in open(tmp_path / "t.md").read()


def test_the_matmul_ceiling_is_the_best_of_the_square_and_the_case_gemms():
    from bench.ceilings import PROBE_PREFIX, probes
    from bench.timing import Timing

    fns, to_ceilings = probes("cpu", 1 << 20, gemm_shapes=[(64, 576, 16), (256, 64, 64), (64, 576, 16)])
    gemms = sorted(name for name in fns if name.startswith(PROBE_PREFIX + "matmul"))
    assert gemms == sorted(PROBE_PREFIX + f"matmul {s}" for s in ("1024x1024x1024", "64x576x16", "256x64x64"))

    def timing(seconds):
        return Timing(seconds, seconds, seconds, 1, 1)

    # The case's own 64x576x16 GEMM runs at 2 * 64 * 576 * 16 / 1e-6 s = 1.18 TFLOP/s, above the
    # square one's 2.1 GFLOP/s: it sets the ceiling.
    timings = {name: timing(1.0) for name in fns}
    timings[PROBE_PREFIX + "matmul 64x576x16"] = timing(1e-6)
    ceilings = to_ceilings(timings)
    assert ceilings.matmul_tflops["float32"] == pytest.approx(2 * 64 * 576 * 16 / 1e-6 / 1e12)


def test_the_read_probe_rereads_a_small_working_set_in_one_call():
    from bench.ceilings import MIN_READ_BYTES_PER_CALL, probes
    from bench.timing import Timing

    fns, to_ceilings = probes("cpu", 64 << 10)
    timings = {name: Timing(1.0, 1.0, 1.0, 1, 1) for name in fns}
    # One call streams at least MIN_READ_BYTES_PER_CALL: at 1 s per call, that many bytes per second.
    assert to_ceilings(timings).read_gbps * 1e9 >= MIN_READ_BYTES_PER_CALL * 0.99


def _case(flops, nbytes, resident_bytes=None):
    def build(device):
        x = torch.ones(256, device=device)
        return Setup(torch.neg, torch.neg, [(x,)], flops=flops, nbytes=nbytes, resident_bytes=resident_bytes)

    return Case("probe", "tiny", build, {})


def test_a_case_faster_than_its_ceiling_reads_100_percent_flagged():
    rows = run_case(_case(flops=1e15, nbytes=0), "cpu", rounds=1, with_compile=False)
    assert rows and all(r.roofline_fraction == 1.0 for r in rows)
    assert all(r.extra["roofline_above_ceiling"] > 1 for r in rows)


def test_the_bandwidth_ceiling_is_probed_on_the_case_working_set():
    rows = run_case(_case(flops=0, nbytes=1 << 20), "cpu", rounds=1, with_compile=False)
    assert rows[0].extra["ceiling"]["probe_bytes"] == 1 << 20  # cache-resident case, cache-resident probe
    rows = run_case(_case(flops=0, nbytes=1 << 30, resident_bytes=4 << 20), "cpu", rounds=1, with_compile=False)
    assert rows[0].extra["ceiling"]["probe_bytes"] == 4 << 20
    assert all(0 < r.roofline_fraction <= 1 for r in rows)


def test_committed_results_name_their_roofline_method():
    # Every results file says how its roofline column was computed (results written with
    # whole-run ceilings carried no "roofline" key), so no reader mixes the two methods.
    committed = json.load(open(os.path.join(REPO, "bench", "results", "cpu.json")))
    assert committed["meta"]["roofline"] == ROOFLINE_METHOD
    assert bench_report.metadata("cpu", measure_stub())["roofline"] == ROOFLINE_METHOD


def measure_stub():
    return Ceilings("cpu", copy_gbps=10.0, read_gbps=12.0, matmul_tflops={"float32": 0.1})
