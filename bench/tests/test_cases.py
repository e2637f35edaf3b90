"""The benchmark's cases (bench/cases.py) compute what they time: the eager baselines against the ops'
references, and every variant of a case runs."""

import pytest
import torch

import neuronml_fast as nf
from bench.cases import _meta_case, published_plastic_rnn
from bench.runner import build_variants
from neuronml_fast.ops.plastic import plastic_rnn_reference

F64 = torch.float64


@pytest.mark.parametrize("rule,modulated,clip", [("hebb", False, None), ("oja", False, None), ("hebb", True, None),
                                                ("hebb", False, 0.1)], ids=["hebb", "oja", "modulated", "clip"])
def test_the_bench_eager_baseline_computes_the_plastic_rnn(rule, modulated, clip):
    # The benchmark times the published loop as the eager baseline: it must compute what the op does.
    gen = torch.Generator().manual_seed(0)
    x, weight, alpha = (torch.randn(s, generator=gen, dtype=F64) * c for s, c in (((7, 3, 6), 1.0), ((6, 6), 0.5),
                                                                                   ((6, 6), 0.5)))
    eta = torch.tensor(0.3, dtype=F64)
    modulation = torch.randn(x.shape[:2], generator=torch.Generator().manual_seed(2), dtype=F64) if modulated else None
    got = published_plastic_rnn(x, weight.t().contiguous(), alpha.t().contiguous(), eta, rule, modulation, clip)
    want, want_hebb = plastic_rnn_reference(x, weight, alpha, eta, modulation=modulation, rule=rule, clip=clip)
    if clip is not None:
        assert (want_hebb.abs() == clip).any()  # the clip binds
    torch.testing.assert_close(got, want, atol=1e-13, rtol=1e-12)


def test_meta_iteration_bench_case_runs_every_variant():
    case = _meta_case("tiny", "maml", tasks=2, ways=2, queries=1)
    _, variants = build_variants(case, "cpu", with_compile=False)
    assert {"eager", "torch.func", "cpu"} <= set(variants)
    for run in variants.values():
        stats = run(0)
        assert stats["loss"] > 0


@pytest.mark.parametrize("peer", ["higher", "torchopt"])
def test_meta_iteration_peers_compute_the_reference_meta_gradient(peer):
    from bench import peers
    from neuronml_fast.meta import MAML, Conv4
    from neuronml_fast.meta.tasks import random_episodes

    if not peers.installed(peer):
        pytest.skip(f"{peer} not installed")
    batch = random_episodes(3, 2, 1, 2)

    def grads(run):
        torch.manual_seed(0)
        learner = MAML(Conv4(2).double(), backend="reference")
        with nf.use_backend("reference"):
            run(learner, tuple(b.double() if b.is_floating_point() else b for b in batch))
        return {name: p.grad for name, p in learner.model.named_parameters()}

    want = grads(lambda learner, batch: learner.meta_backward(batch))
    got = grads(peers.PEERS[peer])
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-9, rtol=1e-7, msg=name)


def test_neuronml_meta_cases_sweep_the_active_fraction():
    from bench.cases import CASES

    actives = sorted(c.params["active"] for c in CASES if c.family == "meta_iteration"
                     and c.params["algo"] == "neuronml" and not c.full_only)
    assert actives == [0.25, 0.5, 0.75, 1.0]
    case = _meta_case("tiny", "neuronml", tasks=2, ways=2, queries=1, active=0.5)
    _, variants = build_variants(case, "cpu", with_compile=False)
    assert variants["cpu"](0)["active_fraction"] == pytest.approx(0.5, abs=0.1)
