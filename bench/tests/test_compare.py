"""`python -m bench.compare` times the same cases in two checkouts, alternating: here one checkout
against itself, so both columns exist and their ratio is a number."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_compare_alternates_two_checkouts_and_reports_a_ratio_per_case():
    result = subprocess.run(
        [sys.executable, "-m", "bench.compare", ROOT, ROOT, "--cases", "neuron_sensitivity/head", "--rounds", "3",
         "--sample-s", "0.01"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| neuron_sensitivity/head")]
    assert len(rows) == 1, result.stdout
    before, after, ratio = (float(v) for v in re.findall(r"\| ([0-9.]+)", rows[0]))
    # The table rounds to 3 decimals: the ratio agrees with its columns to that rounding.
    assert before > 0 and after > 0 and abs(ratio - after / before) < 0.03 * ratio
    assert "medians of 3 samples" in result.stdout
