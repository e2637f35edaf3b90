"""The meta-learner: fused (task-batched, our ops) against the reference loop, second order against
torch.func, NeuronML's structure terms, the plastic head, learning on sinusoids, and the CLI."""

import json
import os

import pytest
import torch

import neuronml_fast as nf
from neuronml_fast.meta import MAML, MLP, Conv4, NeuronML, PlasticHead, SinusoidTasks
from neuronml_fast.meta import cli, functorch_maml
from neuronml_fast.meta.learners import frugality, plasticity, sensitivity_disagreement

from conftest import emulated_gpu, kernel_backends
from test_meta_tasks import _tiny_omniglot

WAYS = 3


def _episode(tasks=3, shots=1, queries=2, size=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    xs = torch.rand(tasks, WAYS * shots, 1, size, size, generator=gen, dtype=dtype)
    xq = torch.rand(tasks, WAYS * queries, 1, size, size, generator=gen, dtype=dtype)
    ys = torch.arange(WAYS).repeat_interleave(shots).repeat(tasks, 1)
    yq = torch.arange(WAYS).repeat_interleave(queries).repeat(tasks, 1)
    return xs, ys, xq, yq


def _tiny_conv4(dtype=torch.float64, seed=1, downsample="stride"):
    torch.manual_seed(seed)
    return Conv4(WAYS, hidden=6, layers=2, image_size=8, downsample=downsample).to(dtype)


def _meta_gradients(learner, batch):
    learner.module.zero_grad(set_to_none=True)
    stats = learner.meta_backward(batch)
    grads = {name: p.grad.clone() for name, p in learner.module.named_parameters() if p.grad is not None}
    return grads, stats


def _assert_same_gradients(got, want, rtol=1e-9):
    assert got.keys() == want.keys()
    scale = max(float(g.abs().max()) for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * scale, msg=name)


def _conditioned_neuronml(model, **options):
    learner = NeuronML(model, **options)
    with torch.no_grad():
        model.structure_scale.fill_(2.0)  # task-conditioned masks (beta starts at 0)
    return learner


def _both(make, batch, backend, **options):
    """Meta-gradients of the same learner on the reference loop and on the fused layers."""
    reference = _meta_gradients(make(_tiny_conv4(), backend="reference", **options), batch)
    with nf.use_backend(backend):
        fused = _meta_gradients(make(_tiny_conv4(), backend="fused", **options), batch)
    return fused, reference


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("make", [MAML, _conditioned_neuronml], ids=["maml", "neuronml"])
def test_fused_meta_gradients_match_the_reference_loop(backend, device, first_order, make):
    if device != "cpu":
        pytest.skip("covered on the CPU; the GPU run uses the same code path")
    if emulated_gpu(backend, device) and (make is not MAML or first_order):
        pytest.skip("the Triton interpreter and the CUDA emulation are slow: one configuration is enough")
    batch = _episode()
    (fused, fused_stats), (reference, reference_stats) = _both(make, batch, backend, first_order=first_order,
                                                               inner_steps=2)
    assert fused_stats["loss"] == pytest.approx(reference_stats["loss"], rel=1e-10)
    assert fused_stats["active_fraction"] == reference_stats["active_fraction"]
    _assert_same_gradients(fused, reference)


def test_float32_meta_gradients_agree_within_float32_tolerance():
    batch = tuple(t.float() if t.is_floating_point() else t for t in _episode(tasks=4, queries=3))
    grads = []
    for backend in ("reference", "fused"):
        learner = MAML(_tiny_conv4(torch.float32), backend=backend)
        grads.append(_meta_gradients(learner, batch)[0])
    _assert_same_gradients(grads[1], grads[0], rtol=2e-4)


def test_neuronml_prunes_per_task_and_trains_its_structure():
    batch = _episode(tasks=4)
    learner = NeuronML(_tiny_conv4(), backend="fused", target_active=0.5)
    shared, _ = learner.structure(batch)
    assert all(bool((m == m[0]).all()) and float(m.detach().mean()) == 0.5 for m in shared)  # beta = 0 at the start
    with torch.no_grad():
        learner.model.structure_scale.fill_(3.0)
    masks, regularizer = learner.structure(batch)
    assert [tuple(m.shape) for m in masks] == [(4, 6), (4, 6)]
    assert all(bool(((m == 0) | (m == 1)).all()) for m in masks)  # hard masks: the kernels skip the zeros
    assert any(bool((m[0] != m[1]).any()) for m in masks)  # task-conditioned
    grads, stats = _meta_gradients(learner, batch)
    assert stats["active_fraction"] < 1.0
    assert grads["structure_gates.0.logits"].abs().sum() > 0 and grads["structure_scale"].abs().sum() > 0
    assert "convs.0.weight" in grads and regularizer.ndim == 0


def test_pruned_neurons_are_silent_through_conv_bn_relu():
    model = _tiny_conv4()
    params = {k: p.unsqueeze(0).expand(2, *p.shape) for k, p in model.named_parameters()}
    mask = torch.ones(2, 6, dtype=torch.float64)
    mask[0, 1] = mask[1, 4] = 0
    x = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64)
    h = model._block(params, 0, x, mask, batched=True)
    assert bool((h[0, :, 1] == 0).all()) and bool((h[1, :, 4] == 0).all())
    assert bool((h[0, :, 4] != 0).any())
    single = model._block(dict(model.named_parameters()), 0, x[0], mask[0], batched=False)
    torch.testing.assert_close(h[0], single)


def test_structure_terms_follow_their_definitions():
    p = [torch.tensor([[0.9, 0.1, 0.8], [0.9, 0.1, 0.8]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]])]
    assert float(frugality(p, 0.5)) == pytest.approx(max(0.0, (0.9 + 0.1 + 0.8) * 2 / 10 + 2 / 10 - 0.5))
    assert float(frugality(p, 0.9)) == 0.0
    # identical masks across tasks: similarity 1; disjoint: 0
    assert float(plasticity(p)) == pytest.approx(0.5)
    assert float(plasticity([p[0][:1]])) == 0.0
    importance = [3 * p[0] + 1, 2 * p[1]]  # perfectly correlated with the masks
    assert float(sensitivity_disagreement(p, importance)) == pytest.approx(0.0, abs=1e-5)
    flipped = [-i for i in importance]
    assert float(sensitivity_disagreement(p, flipped)) == pytest.approx(2.0, abs=1e-5)


def _sinusoid_learner(backend, **options):
    torch.manual_seed(3)
    return MAML(MLP().double(), kind="regression", inner_lr=0.05, backend=backend, **options)


def _sinusoid_batch(tasks=3):
    return tuple(t.double() for t in SinusoidTasks(seed=5).sample(tasks, 5, 4))


def test_second_order_matches_torch_func_and_differs_from_first_order():
    batch = _sinusoid_batch()
    ours = _meta_gradients(_sinusoid_learner("fused", inner_steps=2), batch)[0]
    learner = _sinusoid_learner("reference", inner_steps=2)
    learner.module.zero_grad()
    functorch_maml.meta_backward(learner, batch)
    theirs = {n: p.grad for n, p in learner.module.named_parameters()}
    _assert_same_gradients(ours, theirs)
    first = _meta_gradients(_sinusoid_learner("fused", inner_steps=2, first_order=True), batch)[0]
    assert not torch.allclose(first["layers.0.weight"], ours["layers.0.weight"])


def test_conv4_second_order_matches_finite_differences():
    # Through BatchNorm, torch.func (vmap of grad, torch 2.14) gives second-order gradients that
    # differ from finite differences by a few percent; ours agree with them, so they are the oracle here.
    batch = _episode(tasks=2)
    learner = MAML(_tiny_conv4(), backend="fused")
    grads = _meta_gradients(learner, batch)[0]
    weight = learner.model.convs[0].weight

    def objective():
        xs, ys, xq, yq = batch
        params = learner.adapt(learner._initial(2), xs, ys, None, 1, create_graph=False)
        with torch.no_grad():
            out = learner.model.functional(params, xq, None, True)
            return float(torch.nn.functional.cross_entropy(out.flatten(0, 1), yq.flatten(), reduction="none")
                         .view(2, -1).mean(1).mean())

    for index in [(0, 0, 0, 0), (3, 0, 1, 2)]:
        eps = 1e-6
        with torch.no_grad():
            weight[index] += eps
        up = objective()
        with torch.no_grad():
            weight[index] -= 2 * eps
        down = objective()
        with torch.no_grad():
            weight[index] += eps
        assert grads["convs.0.weight"][index] == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("downsample", ["stride", "pool"])
def test_conv4_shapes_and_the_module_forward(downsample):
    model = _tiny_conv4(downsample=downsample)
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    assert model(x).shape == (5, WAYS)
    params = {k: p.unsqueeze(0).expand(2, *p.shape) for k, p in model.named_parameters()}
    batched = model.functional(params, torch.stack([x, x]), None, batched=True)
    torch.testing.assert_close(batched[1], model(x))
    with pytest.raises(ValueError, match="downsample"):
        Conv4(WAYS, downsample="avg")
    with pytest.raises(ValueError, match="image_size"):
        Conv4(WAYS, image_size=4, layers=4, downsample="pool")


def test_plastic_head_fused_matches_reference_and_learns_from_the_support_set():
    batch = _episode(tasks=3, queries=2)
    grads = []
    for backend in ("reference", "fused"):
        learner = PlasticHead(_tiny_conv4(), WAYS, backend=backend)
        grads.append(_meta_gradients(learner, batch)[0])
    _assert_same_gradients(grads[1], grads[0])
    assert grads[0]["head.eta_logit"].abs() > 0 and grads[0]["head.alpha"].abs().sum() > 0
    # The readout comes from the trace: with no fixed weights, relabelling the support set
    # permutes the query logits the same way, and without plasticity (alpha = 0) nothing is learned.
    learner = PlasticHead(_tiny_conv4(), WAYS, backend="fused")
    with torch.no_grad():
        learner.head.weight.zero_()
        learner.head.bias.zero_()
    xs, ys, xq, yq = batch
    permutation = torch.tensor([2, 0, 1])
    logits = learner.logits(batch).detach()
    relabelled = learner.logits((xs, permutation[ys], xq, yq)).detach()
    torch.testing.assert_close(relabelled[..., permutation], logits)
    assert logits.abs().max() > 0
    with torch.no_grad():
        learner.head.alpha.zero_()
    assert learner.logits(batch).abs().max() == 0


@pytest.mark.slow  # 500 meta-iterations: the longest test outside the emulated backends
def test_sinusoid_maml_improves_after_adaptation():
    torch.manual_seed(0)
    learner = MAML(MLP(), kind="regression", inner_lr=0.01, backend="fused")
    optimizer = torch.optim.Adam(learner.module.parameters(), lr=3e-3)
    tasks = SinusoidTasks(seed=0)
    for _ in range(500):
        optimizer.zero_grad()
        learner.meta_backward(tasks.sample(25, 10, 10))
        optimizer.step()
    test = SinusoidTasks(seed=123).sample(100, 10, 10)
    before, _ = learner.evaluate(test, steps=0)
    after, _ = learner.evaluate(test, steps=10)
    assert float(after.mean()) < 0.35 * float(before.mean())  # measured: 3.01 -> 0.53


def test_learners_reject_bad_arguments():
    model = _tiny_conv4()
    with pytest.raises(ValueError, match="backend"):
        MAML(model, backend="fast")
    with pytest.raises(ValueError, match="inner_lr"):
        MAML(model, inner_lr=0)
    with pytest.raises(ValueError, match="inner_steps"):
        MAML(model, inner_steps=-1)
    with pytest.raises(ValueError, match="kind"):
        MAML(model, kind="ranking")
    with pytest.raises(ValueError, match="target_active"):
        NeuronML(model, target_active=1.5)
    with pytest.raises(ValueError, match="lambda_plasticity"):
        NeuronML(model, lambda_plasticity=-1)


# ---- CLI ------------------------------------------------------------------------------------


def test_cli_trains_sinusoids_writes_results_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    common = ["train", "--dataset", "sinusoid", "--meta-batch", "4", "--eval-every", "2", "--eval-tasks", "4",
              "--test-tasks", "8", "--checkpoint-every", "2", "--out", out]
    cli.main(common + ["--iterations", "2"])
    results = json.load(open(os.path.join(out, "results.json")))
    assert results["iterations"] == 2 and "test_accuracy" not in results and results["test_mse"] > 0
    assert {"ci95", "active_fraction", "sec_per_iter"} <= results.keys()
    cli.main(common + ["--iterations", "4", "--resume"])
    resumed = json.load(open(os.path.join(out, "results.json")))
    assert resumed["iterations"] == 4
    rows = open(os.path.join(out, "curve.csv")).read().strip().splitlines()
    assert len(rows) == 1 + 4  # the curve continues instead of restarting


@pytest.mark.parametrize("algo", ["maml", "neuronml", "plastic"])
def test_cli_trains_on_a_tiny_omniglot_archive(tmp_path, algo):
    root = str(tmp_path)
    _tiny_omniglot(root, "background")
    _tiny_omniglot(root, "evaluation")
    out = str(tmp_path / algo)
    results = cli.main(["train", "--algo", algo, "--data-root", root, "--ways", "3", "--queries", "2",
                        "--meta-batch", "2", "--iterations", "2", "--eval-every", "1", "--eval-tasks", "2",
                        "--test-tasks", "4", "--out", out])
    assert 0 <= results["test_accuracy"] <= 1 and results["test_tasks"] == 4
    assert os.path.exists(os.path.join(out, "curve.png")) and os.path.exists(os.path.join(out, "checkpoint.pt"))
    if algo == "neuronml":
        assert results["active_fraction"] < 1


def test_cli_errors_name_the_argument(tmp_path, capsys):
    for argv, expected in (
        (["train", "--out", str(tmp_path)], "--data-root: expected the folder"),
        (["train", "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path)], "--data-root: expected a folder"),
        (["train", "--data-root", str(tmp_path), "--out", str(tmp_path)], "images_background"),
        (["train", "--algo", "plastic", "--dataset", "sinusoid", "--out", str(tmp_path)], "--algo plastic"),
        (["train", "--backend", "fast", "--out", str(tmp_path)], "argument --backend: invalid choice: 'fast'"),
    ):
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
        assert stop.value.code == 2 and expected in capsys.readouterr().err


def test_cli_compare_times_every_backend(capsys):
    medians = cli.main(["compare", "--synthetic", "--ways", "2", "--queries", "1", "--meta-batch", "2",
                        "--repeats", "1", "--warmup", "0"])
    assert set(medians) == {"reference", "fused", "torch.func vmap"}
    assert "reference/this" in capsys.readouterr().out
