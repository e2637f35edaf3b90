"""The launch counter (bench/launches.py) and the launch budgets it holds the GPU backends to.

The counter runs once, in a child process (it picks the Triton interpreter and the CUDA emulation
when it first imports the package), over every case; each budget is then a test, so a change that
adds a launch to a call fails here.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from bench import launches

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """{case name: row} of `python -m bench.launches --check` over every case."""
    out = tmp_path_factory.mktemp("launches") / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "NEURONML_FAST_POISON"}
    done = subprocess.run([sys.executable, "-m", "bench.launches", "--check", "--model", "--json", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| case |" in done.stdout and "H100 model us" in done.stdout
    return {row["case"]: row for row in json.loads(out.read_text())["rows"]}


def _gpu_path(row, backend):
    entry = row["paths"].get(backend)
    if entry is None:
        pytest.skip(f"the {backend} backend cannot run here")
    return entry


BUDGETED = [pytest.param(case.name, marks=pytest.mark.xfail(strict=True, reason=case.budget_xfail)
                         if case.budget_xfail else (), id=case.name)
            for case in launches.CASES if case.budget is not None]


@pytest.mark.parametrize("backend", launches.GPU_BACKENDS)
@pytest.mark.parametrize("name", BUDGETED)
def test_forward_and_backward_launch_within_the_budget(counted, name, backend):
    row = counted[name]
    total = _gpu_path(row, backend)["fwd+bwd"]
    assert total["launches"] <= row["budget"], f"{total['launches']} launches: {total['ops']}"


@pytest.mark.parametrize("backend", launches.GPU_BACKENDS)
@pytest.mark.parametrize("name", [c.name for c in launches.CASES if c.family == "masked"])
def test_masked_layers_never_wait_for_the_device(counted, name, backend):
    for part in ("fwd", "fwd+bwd"):
        assert _gpu_path(counted[name], backend)[part]["syncs"] == 0


def test_every_case_is_counted_on_every_path(counted):
    assert set(counted) == {c.name for c in launches.CASES}
    for case in launches.CASES:
        row = counted[case.name]
        assert "eager" in row["paths"], case.name
        for path, entry in row["paths"].items():
            total = entry["fwd+bwd"]
            assert total["launches"] == total["kernels"] + total["aten"] > 0, (case.name, path)
            assert total["bytes"] > 0 and total["model_us"] >= total["launches"] * launches.LAUNCH_S * 1e6 - 1e-6
            if entry["fwd"] is not None:
                assert entry["fwd"]["launches"] <= total["launches"], (case.name, path)
            if path in launches.GPU_BACKENDS:
                assert total["kernels"] > 0, (case.name, path)  # the kernels were seen, not only ATen ops


def test_recorded_launches_equal_run_ones(counted):
    """--check counted the cases that run their kernels again with the kernels recorded instead:
    the stub the large cases are counted with changes no count."""
    checked = [(name, path) for name, row in counted.items() for path, e in row["paths"].items()
               if "recorded_agrees" in e]
    assert checked, "no case was counted both ways"
    assert all(counted[name]["paths"][path]["recorded_agrees"] for name, path in checked), checked


def test_eager_masked_conv_launches_per_task(counted):
    """The eager baseline of a task-batched layer is a Python loop: its launches grow with the tasks."""
    one = counted["masked_conv2d 64->64 3x3, one task"]["paths"]["eager"]["fwd+bwd"]["launches"]
    tasks = counted["masked_conv2d 64->64 3x3, 32 tasks"]["paths"]["eager"]["fwd+bwd"]["launches"]
    assert tasks > 16 * one


# ---- the counting rule ---------------------------------------------------------------------------


def _aten_launches(fn):
    tally = launches.Tally()
    with launches.AtenCounter(tally):
        fn()
    return tally


def test_views_and_allocations_launch_nothing_and_writes_launch_one():
    x = torch.randn(4, 6)
    assert _aten_launches(lambda: (x.view(6, 4), x.t(), x[1:], x.unsqueeze(0), x.contiguous(), x.to(x.dtype),
                                   torch.empty(5), x.new_empty(3), x.expand(2, 4, 6))).launches == 0
    writes = [lambda: torch.zeros(3), lambda: x.t().contiguous(), lambda: x.double(), lambda: x.sum(0),
              lambda: x * 2, lambda: x.clone(), lambda: x.argsort(1), lambda: x.new_zeros(2).fill_(1.0)]
    for fn in writes:
        tally = _aten_launches(fn)
        assert tally.launches == (2 if fn is writes[-1] else 1), dict(tally.ops)


@torch.library.custom_op("neuronml_fast::launch_counter_probe", mutates_args=())
def _probe(x: torch.Tensor) -> torch.Tensor:
    # Below autograd `to`, `contiguous` and `reshape` reach the counter undecomposed: a copy or not.
    x.contiguous(), x.reshape(-1), x.to(x.dtype)  # the input itself, or a view of it
    x.t().contiguous(), x.t().reshape(-1), x.to(torch.float64)  # copies
    return x * 2


def test_the_counter_descends_into_our_custom_ops_and_counts_their_copies():
    x = torch.randn(3, 4)
    tally = _aten_launches(lambda: _probe(x))
    assert dict(tally.ops) == {"aten:contiguous": 1, "aten:reshape": 1, "aten:to": 1, "aten:mul": 1}


def test_host_reads_are_syncs_not_launches():
    x = torch.randn(3)
    tally = _aten_launches(lambda: (x.sum().item(), float(x[0])))
    assert (tally.syncs, tally.aten) == (2, 1), dict(tally.ops)


def test_bytes_count_each_tensor_once_and_expanded_memory_once():
    x = torch.randn(256, 256)
    tally = _aten_launches(lambda: x + 1)
    assert tally.bytes == 2 * x.numel() * 4
    row = torch.randn(256).expand(256, 256)
    assert launches.tensor_bytes(row) == 256 * 4
    assert _aten_launches(lambda: torch.mm(x, x)).flops == 2 * 256**3


def test_model_is_launch_bound_for_small_calls_and_bandwidth_bound_for_large():
    small = launches.Tally(kernels=3, bytes=1e3)
    assert launches.model_seconds(small) == pytest.approx(3 * launches.LAUNCH_S)
    large = launches.Tally(kernels=1, bytes=3.35e9, flops=67e9)
    assert launches.model_seconds(large) == pytest.approx(1e-3 + 1e-3)
