"""Meta-training on torch.distributed, 2 gloo processes on this machine: meta-gradients of 2 ranks equal
1 rank (MAML first and second order, NeuronML with its batch-coupled structure terms), a run resumes
at another world size, and a rank that dies or stalls ends the job with an error instead of a hang.

Every process start and every collective is bounded: the processes run under a deadline and are
killed past it, and the process group has a timeout of a few seconds.
"""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from neuronml_fast.meta import MAML, MLP, Conv4, NeuronML, cli
from neuronml_fast.meta.distributed import DistributedError, World, shard, task_seed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
DEADLINE_S = 120  # a launch of 2 processes on a busy 2-core machine: imports take most of it
COLLECTIVE_TIMEOUT_S = 20
WAYS, TASKS = 3, 4

# name: (algorithm, first order, learner backend, structure terms gathered across ranks)
CASES = {
    "maml-first-order": ("maml", True, "fused", True),
    "maml-second-order": ("maml", False, "fused", True),
    "neuronml-second-order": ("neuronml", False, "fused", True),
    "neuronml-reference-loop": ("neuronml", False, "reference", True),
    # Structure terms computed per rank: must differ from one process (the test's power check).
    "neuronml-terms-per-rank": ("neuronml", False, "fused", False),
}


# ---- launching -----------------------------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank, size, port, timeout_s=COLLECTIVE_TIMEOUT_S):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    return World.from_environment("cpu", timeout_s)


def _spawn(target, *args, size=2, wait_for=None, deadline_s=DEADLINE_S):
    """Exit codes of ``target(rank, size, port, *args)`` in ``size`` fresh processes.

    Waits for the ranks ``wait_for`` (all by default) until the deadline and kills every process
    still running then; a waited-for rank that ran past the deadline fails the test.
    """
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, size, port, *args)) for rank in range(size)]
    for process in processes:
        process.start()
    end = time.monotonic() + deadline_s
    waited = range(size) if wait_for is None else wait_for
    for rank in waited:
        processes[rank].join(max(0.0, end - time.monotonic()))
    hung = [rank for rank in waited if processes[rank].is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
        process.join()
    assert not hung, f"rank(s) {hung} still running after {deadline_s} s: a hang"
    return [process.exitcode for process in processes]


def _torchrun(argv, **popen):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p),
           "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--standalone", "--nproc_per_node=2", "--monitor-interval=0.5", "-m", "neuronml_fast.meta",
               *argv]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def _finish(process, deadline_s=DEADLINE_S):
    try:
        output, _ = process.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"torchrun ran past {deadline_s} s: a hang\n{output[-4000:]}")
    return process.returncode, output


# ---- meta-gradients of 2 ranks equal 1 rank --------------------------------------------------------


def _episode(tasks=TASKS, shots=1, queries=2, size=8):
    gen = torch.Generator().manual_seed(0)
    xs = torch.rand(tasks, WAYS * shots, 1, size, size, generator=gen, dtype=torch.float64)
    xq = torch.rand(tasks, WAYS * queries, 1, size, size, generator=gen, dtype=torch.float64)
    ys = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
    yq = torch.arange(WAYS).repeat_interleave(queries).repeat(tasks, 1)
    return xs, ys, xq, yq


def _learner(case):
    algo, first_order, backend, _ = CASES[case]
    torch.manual_seed(1)
    model = Conv4(WAYS, hidden=6, layers=2, image_size=8).double()
    options = dict(first_order=first_order, inner_steps=2, backend=backend)
    if algo == "maml":
        return MAML(model, **options)
    # Every term active: the soft masks' mean (about 1/2) is above the target, the masks differ per task.
    learner = NeuronML(model, target_active=0.3, lambda_frugality=1.0, lambda_plasticity=0.5, lambda_sensitivity=0.5,
                       **options)
    with torch.no_grad():
        model.structure_scale.fill_(2.0)
    return learner


def _meta_gradient(case, world, batch):
    learner = _learner(case)
    if CASES[case][3]:
        learner.task_gather = world.gather_tasks
    learner.module.zero_grad(set_to_none=True)
    stats = world.average_gradients(learner.module.parameters(), learner.meta_backward(batch))
    return {name: p.grad.clone() for name, p in learner.module.named_parameters() if p.grad is not None}, stats


def _gradients_worker(rank, size, port, out):
    world = _join(rank, size, port)
    mine = shard(TASKS, size, rank)
    batch = tuple(part[mine.start:mine.stop] for part in _episode())
    results = {case: _meta_gradient(case, world, batch) for case in CASES}
    if rank == 0:
        torch.save(results, out)
    world.close()


@pytest.fixture(scope="module")
def two_rank_gradients(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("gradients") / "two_ranks.pt")
    assert _spawn(_gradients_worker, out) == [0, 0]
    return torch.load(out)


def _max_error(got, want):
    assert got.keys() == want.keys()
    return max(float((got[name] - want[name]).abs().max()) for name in want)


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][3]])
def test_meta_gradients_of_two_ranks_equal_one_rank(two_rank_gradients, case):
    want, want_stats = _meta_gradient(case, World(), _episode())
    got, got_stats = two_rank_gradients[case]
    scale = max(float(g.abs().max()) for g in want.values())
    error = _max_error(got, want)
    print(f"{case}: max abs error of the 2-rank meta-gradient {error:.3g} (largest entry {scale:.3g})")
    assert error <= 1e-12 * scale
    assert got_stats["loss"] == pytest.approx(want_stats["loss"], rel=1e-12)
    assert got_stats["active_fraction"] == pytest.approx(want_stats["active_fraction"], rel=1e-12)


def test_structure_terms_per_rank_would_not_equal_one_rank(two_rank_gradients):
    """The equality above is a real check: the per-rank approximation of the batch-coupled terms fails it."""
    want, _ = _meta_gradient("neuronml-second-order", World(), _episode())
    got, _ = two_rank_gradients["neuronml-terms-per-rank"]
    scale = max(float(g.abs().max()) for g in want.values())
    assert _max_error(got, want) > 1e-6 * scale


# ---- tasks, world size and data root -------------------------------------------------------------


def test_a_rank_draws_its_share_of_the_tasks_one_process_draws():
    assert [list(shard(10, 3, r)) for r in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert task_seed(0, "train", 5, 1) == task_seed(0, "train", 5, 1) != task_seed(0, "train", 5, 2)
    assert task_seed(0, "train", 5, 1) != task_seed(0, "train", 6, 1) != task_seed(1, "train", 6, 1)
    args = cli._defaults(cli.build_parser().parse_args(["train", "--dataset", "sinusoid", "--out", "unused"]))
    sampler = cli._Sampler(args, "train")
    whole = sampler.sample(3, range(4))
    halves = [sampler.sample(3, range(0, 2)), sampler.sample(3, range(2, 4))]
    for part, first, second in zip(whole, *halves):
        assert torch.equal(part, torch.cat([first, second]))


def _torchrun_environment(monkeypatch, rank, size):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(size))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")  # never reached: the refusal comes before joining


@pytest.mark.parametrize("rank", [0, 1])
def test_a_world_size_that_does_not_divide_the_meta_batch_is_refused(monkeypatch, capsys, tmp_path, rank):
    _torchrun_environment(monkeypatch, rank, 3)
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--dataset", "sinusoid", "--meta-batch", "4", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2
    if rank == 0:
        assert "--meta-batch: expected a multiple of the world size 3" in err and "got 4" in err
    else:
        assert err == ""  # one copy of the message, on rank 0


def test_compare_refuses_to_run_on_ranks(monkeypatch, capsys):
    _torchrun_environment(monkeypatch, 0, 2)
    with pytest.raises(SystemExit) as stop:
        cli.main(["compare", "--dataset", "sinusoid", "--meta-batch", "2"])
    assert stop.value.code == 2 and "compare: expected one process, got WORLD_SIZE=2" in capsys.readouterr().err


def _data_root_worker(rank, size, port, roots, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    err = os.path.join(out, f"stderr{rank}.txt")
    with open(err, "w") as f:
        os.dup2(f.fileno(), 2)
        sys.stderr = f
        cli.main(["train", "--data-root", roots[rank], "--iterations", "1", "--dist-timeout",
                  str(COLLECTIVE_TIMEOUT_S), "--out", os.path.join(out, "run")])


def test_the_data_root_is_checked_on_every_rank(tmp_path):
    """A root missing on rank 1 only stops both ranks with a usage error naming rank 1, not a hang."""
    from test_meta_tasks import _tiny_omniglot

    good = str(tmp_path / "omniglot")
    os.makedirs(good)
    _tiny_omniglot(good, "background")
    _tiny_omniglot(good, "evaluation")
    assert _spawn(_data_root_worker, [good, str(tmp_path / "missing")], str(tmp_path)) == [2, 2]
    err = (tmp_path / "stderr0.txt").read_text()
    assert "--data-root: expected a folder holding the Omniglot archives" in err
    assert "missing" in err and "(on rank 1, host" in err
    assert (tmp_path / "stderr1.txt").read_text() == ""


# ---- checkpoints and results -----------------------------------------------------------------------

RUN = ["train", "--dataset", "sinusoid", "--algo", "neuronml", "--meta-batch", "4", "--eval-every", "2",
       "--eval-tasks", "3", "--test-tasks", "5", "--dist-timeout", str(COLLECTIVE_TIMEOUT_S)]


def _curve(out):
    with open(os.path.join(out, "curve.csv")) as f:
        header, *rows = [line.split(",") for line in f.read().strip().splitlines()]
    return [float(row[header.index("meta_loss")]) for row in rows]


def test_a_run_resumes_at_another_world_size(tmp_path):
    """1 rank for 2 iterations, 2 ranks to 4 (torchrun), then 1 rank to 6: the uninterrupted 1-rank run
    up to the float32 rounding of the all-reduce."""
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    want = cli.main([*RUN, "--iterations", "6", "--out", whole])
    cli.main([*RUN, "--iterations", "2", "--out", split])
    code, output = _finish(_torchrun([*RUN, "--iterations", "4", "--resume", "--out", split]))
    assert code == 0, output[-4000:]
    assert "resumed from" in output and "written by 1 rank(s), continued by 2" in output
    assert output.count("resumed from") == 1 and output.count('"test_mse"') == 1  # logs on rank 0 only
    with open(os.path.join(split, "results.json")) as f:
        on_two = json.load(f)
    assert on_two["world_size"] == 2 and on_two["dist_backend"] == "gloo" and on_two["iterations"] == 4
    assert on_two["command"].startswith("torchrun --nnodes=1 --nproc_per_node=2 -m neuronml_fast.meta train")
    assert torch.load(os.path.join(split, "checkpoint.pt"), weights_only=False)["world_size"] == 2
    got = cli.main([*RUN, "--iterations", "6", "--resume", "--out", split])
    assert got["world_size"] == 1 and got["dist_backend"] is None
    assert _curve(split) == pytest.approx(_curve(whole), rel=1e-5)
    assert got["test_mse"] == pytest.approx(want["test_mse"], rel=1e-5)


# ---- faults ----------------------------------------------------------------------------------------


def _worker_pid(launcher, rank):
    """The pid of torchrun's worker of ``rank`` (a child of the launcher with RANK=rank), or None."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if parent == launcher and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds torchrun's workers in /proc")
def test_a_killed_rank_is_reported_not_hung(tmp_path):
    out = str(tmp_path / "run")
    launcher = _torchrun([*RUN, "--iterations", "1000000", "--checkpoint-every", "2", "--out", out])
    end = time.monotonic() + DEADLINE_S
    while not os.path.exists(os.path.join(out, "checkpoint.pt")):  # both ranks are training
        if launcher.poll() is not None or time.monotonic() > end:
            launcher.kill()
            pytest.fail(f"the run did not start training:\n{launcher.communicate()[0][-4000:]}")
        time.sleep(0.2)
    victim = _worker_pid(launcher.pid, 1)
    assert victim is not None, "torchrun's rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    killed = time.monotonic()
    code, output = _finish(launcher, deadline_s=COLLECTIVE_TIMEOUT_S + 30)
    assert code != 0 and time.monotonic() - killed < COLLECTIVE_TIMEOUT_S + 30
    assert "Signal 9 (SIGKILL)" in output and "local_rank: 1" in output, output[-4000:]


def _stall_worker(rank, size, port, out):
    world = _join(rank, size, port, timeout_s=3)
    world.barrier()
    if rank == 1:
        time.sleep(DEADLINE_S)  # stalls; the test kills it
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.ones(2)
    began = time.monotonic()
    try:
        world.average_gradients([param], {"loss": 1.0})
        outcome = {"error": None}
    except DistributedError as error:
        outcome = {"error": str(error)}
    outcome["seconds"] = time.monotonic() - began
    with open(out, "w") as f:
        json.dump(outcome, f)


def test_a_stalled_collective_ends_with_an_error_naming_the_rank(tmp_path):
    out = str(tmp_path / "outcome.json")
    _spawn(_stall_worker, out, wait_for=[0], deadline_s=DEADLINE_S / 2)
    with open(out) as f:
        outcome = json.load(f)
    assert outcome["error"] is not None and outcome["seconds"] < 3 + 10
    assert outcome["error"].startswith("rank 0 of 2 (gloo, host ")
    assert "all-reduce of the meta-gradient failed" in outcome["error"] and "3 s timeout" in outcome["error"]


# ---- scaling ---------------------------------------------------------------------------------------


def test_scaling_times_one_rank_against_two(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    medians = cli.main(["scaling", "--dataset", "sinusoid", "--backend", "reference", "--meta-batch", "4",
                        "--repeats", "2", "--warmup", "0", "--dist-timeout", str(COLLECTIVE_TIMEOUT_S),
                        "--json", str(out)])
    assert list(medians) == ["1 rank x 2 threads", "2 ranks x 1 thread"]
    assert all(0 < seconds < COLLECTIVE_TIMEOUT_S for seconds in medians.values())
    printed = capsys.readouterr().out
    assert "1 rank x 2 threads" in printed and "speed-up of 2 ranks over 1 rank" in printed
    assert json.loads(out.read_text())["speedup"] > 0
