"""Independent oracles: each paper's update equations written the way the paper writes them, against
`nf.plastic_rnn` on every backend, in float64 (outputs, final trace and every gradient).

The package's own reference (`plastic_rnn_reference`) is written in the package's convention:
column vectors, ``weight[post, pre]``. The papers use row vectors and store every matrix
``[pre, post]`` ("each *column* of w targets a single output neuron"), so the step is
``y_out = tanh(y_in @ (w + alpha * hebb) + input)`` and the trace grows by the outer product
``y_in^T y_out``. The oracles below keep that convention, order of operations and transposes, so a
drift of the reference from the papers (a swapped transpose, a trace updated from the wrong
activity, a clip applied before the update) fails here even where kernels and reference agree.

* Miconi, Clune & Stanley, "Differentiable plasticity" (ICML 2018):
  ``x_j(t) = tanh(sum_i (w_ij + alpha_ij Hebb_ij(t)) x_i(t-1) + input_j(t))``,
  ``Hebb_ij(t+1) = eta x_i(t-1) x_j(t) + (1 - eta) Hebb_ij(t)``; the published simple.py learns eta,
  simplest.py fixes it at 0.01. Oja's rule as their maze code writes it:
  ``Hebb_ij(t+1) = Hebb_ij(t) + eta x_j(t) (x_i(t-1) - x_j(t) Hebb_ij(t))``.
* Miconi et al., "Backpropamine" (ICLR 2019), simple neuromodulation with a hard clip:
  ``Hebb_ij(t+1) = clip(Hebb_ij(t) + M(t) x_i(t-1) x_j(t))``; the modulation is one number per
  sequence and step, or (as their maze code fans it out) one per post-synaptic neuron j. Given
  (exogenous), or endogenous as their code computes it: a modulator neuron reads the step's new
  state, ``M(t) = tanh(h2mod . x(t) + b)``, fanned out to the post-synaptic neurons by a learned
  vector in the maze code (``modfanout``, a ``Linear(1, N)``; its bias term is not part of our op,
  so the oracle's is zero), or one number per sequence in the cue-reward code (``h2DA``, clip 1,
  with the matrices stored [post, pre] there, as ours).
"""

import pytest
import torch

import neuronml_fast as nf

from conftest import kernel_backends

F64 = torch.float64
BACKENDS = [pytest.param("reference", "cpu", id="reference-cpu")] + [
    p for p in kernel_backends() if p.values[0] in nf.backends.ops()["plastic"].dtypes]


# ---- the papers' equations, row-vector convention, matrices [pre, post] ---------------------


def miconi_step(yin, hebb, w, alpha, eta, inp):
    """simple.py's step for one sequence: ``yin`` [1, N], ``hebb``, ``w``, ``alpha`` [N, N] [pre, post]."""
    yout = torch.tanh(yin.mm(w + alpha * hebb) + inp)
    hebb = (1 - eta) * hebb + eta * torch.bmm(yin.unsqueeze(2), yout.unsqueeze(1))[0]
    return yout, hebb


def miconi_oja_step(yin, hebb, w, alpha, eta, inp):
    """The same step with Oja's rule: pre-synaptic activity down the rows, post-synaptic across the columns."""
    yout = torch.tanh(yin.mm(w + alpha * hebb) + inp)
    hebb = hebb + eta * (yin[0].unsqueeze(1) - hebb * yout[0].unsqueeze(0)) * yout[0].unsqueeze(0)
    return yout, hebb


def backpropamine_step(h, hebb, w, alpha, inp, m, clip):
    """The batched step: ``h`` [B, N], ``hebb`` [B, N, N] [pre, post], ``m`` [B, 1, 1] or [B, 1, N]
    (one per post-synaptic neuron)."""
    hactiv = torch.tanh(inp + h.unsqueeze(1).bmm(w + alpha * hebb).squeeze(1))
    deltahebb = torch.bmm(h.unsqueeze(2), hactiv.unsqueeze(1))
    hebb = torch.clamp(hebb + m * deltahebb, min=-clip, max=clip)
    return hactiv, hebb


def backpropamine_maze_step(h, hebb, w, alpha, inp, h2mod_w, h2mod_b, fanout, clip):
    """simplemaze/maze.py's step, [pre, post]: ``myeta = modfanout(tanh(h2mod(hactiv)))``."""
    hactiv = torch.tanh(inp + h.unsqueeze(1).bmm(w + alpha * hebb).squeeze(1))
    deltahebb = torch.bmm(h.unsqueeze(2), hactiv.unsqueeze(1))
    myeta = torch.tanh(hactiv.mm(h2mod_w.unsqueeze(1)) + h2mod_b).unsqueeze(2)  # h2mod = Linear(N, 1)
    myeta = myeta * fanout  # modfanout = Linear(1, N), its bias term zero: [B, 1, N], one per post neuron
    hebb = torch.clamp(hebb + myeta * deltahebb, min=-clip, max=clip)
    return hactiv, hebb


def backpropamine_cue_reward_step(hidden, hebb, w, alpha, inp, h2da_w, h2da_b):
    """sr/modul.py's step ("the *rows* of w and hebb are the inputs weights to a single neuron")."""
    B, HS = hidden.shape
    hactiv = torch.tanh(inp.view(B, HS, 1) + torch.matmul(w + alpha * hebb, hidden.view(B, HS, 1))).view(B, HS)
    DAout = torch.tanh(hactiv.mm(h2da_w.unsqueeze(1)) + h2da_b)  # h2DA = Linear(HS, 1)
    deltahebb = torch.bmm(hactiv.view(B, HS, 1), hidden.view(B, 1, HS))
    hebb = torch.clamp(hebb + DAout.view(B, 1, 1) * deltahebb, min=-1.0, max=1.0)
    return hactiv, hebb


def miconi_run(step, x, weight, alpha, eta, y0, hebb0):
    """The papers' batch of one, a sequence at a time; returns our layout: ([T, B, N], [B, post, pre])."""
    outputs, traces = [], []
    for b in range(x.shape[1]):
        y, hebb = y0[b:b + 1], hebb0[b].t()
        ys = []
        for t in range(x.shape[0]):
            y, hebb = step(y, hebb, weight.t(), alpha.t(), eta, x[t, b:b + 1])
            ys.append(y[0])
        outputs.append(torch.stack(ys))
        traces.append(hebb.t())
    return torch.stack(outputs, 1), torch.stack(traces)


def backpropamine_run(x, weight, alpha, y0, hebb0, modulation, clip):
    m = modulation[:, :, None, None] if modulation.dim() == 2 else modulation[:, :, None, :]
    h, hebb = y0, hebb0.transpose(1, 2)
    outputs = []
    for t in range(x.shape[0]):
        h, hebb = backpropamine_step(h, hebb, weight.t(), alpha.t(), x[t], m[t], clip)
        outputs.append(h)
    return torch.stack(outputs), hebb.transpose(1, 2)


# ---- the comparison --------------------------------------------------------------------------


def _inputs(T=7, B=3, N=6, device="cpu", seed=0, hebb_scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: (torch.randn(s, generator=gen, dtype=F64) * scale).to(device)  # noqa: E731
    return dict(input=r(T, B, N), weight=r(N, N, scale=0.5), alpha=r(N, N, scale=0.5), y0=r(B, N, scale=0.5),
                hebb=r(B, N, N, scale=hebb_scale))


def _leaves(values):
    return {k: v.detach().clone().requires_grad_() for k, v in values.items()}


def _compare(ours, theirs, leaves, atol, rtol):
    """Outputs, final trace, and the gradients of a random functional of both for every leaf."""
    (out, hebb), (want_out, want_hebb) = ours, theirs
    torch.testing.assert_close(out, want_out, atol=atol, rtol=rtol, msg=lambda m: f"output: {m}")
    torch.testing.assert_close(hebb, want_hebb, atol=atol, rtol=rtol, msg=lambda m: f"final trace: {m}")
    gen = torch.Generator().manual_seed(11)
    g_out = torch.randn(out.shape, generator=gen, dtype=F64).to(out.device)
    g_hebb = torch.randn(hebb.shape, generator=gen, dtype=F64).to(out.device)
    names = list(leaves)
    got = torch.autograd.grad((out * g_out).sum() + (hebb * g_hebb).sum(), list(leaves.values()))
    want = torch.autograd.grad((want_out * g_out).sum() + (want_hebb * g_hebb).sum(), list(leaves.values()))
    for name, g, w in zip(names, got, want):
        assert torch.count_nonzero(w) > 0, f"{name}: the oracle's gradient is zero, so this check could not fail"
        torch.testing.assert_close(g, w, atol=atol, rtol=rtol, msg=lambda m, n=name: f"gradient of {n}: {m}")


# The reference shares the oracles' float64 arithmetic up to the order of sums; the kernels
# reconstruct each trace from the next in the backward pass, which costs a few more roundings.
def _tolerance(backend):
    return (1e-12, 1e-11) if backend == "reference" else (1e-10, 1e-9)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("eta", ["learned", 0.01], ids=["simple.py-learned-eta", "simplest.py-fixed-eta"])
def test_miconi_plastic_step(backend, device, eta):
    values = _inputs(device=device)
    if eta == "learned":
        values["eta"] = torch.tensor(0.2, dtype=F64, device=device)
    leaves = _leaves(values)
    eta_value = leaves.get("eta", eta)
    args = {k: v for k, v in leaves.items() if k != "eta"}
    with nf.use_backend(backend):
        ours = nf.plastic_rnn(args["input"], args["weight"], args["alpha"], eta_value, y0=args["y0"],
                              hebb=args["hebb"])
    theirs = miconi_run(miconi_step, args["input"], args["weight"], args["alpha"], eta_value, args["y0"], args["hebb"])
    _compare(ours, theirs, leaves, *_tolerance(backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_miconi_oja_step(backend, device):
    leaves = _leaves({**_inputs(device=device), "eta": torch.tensor(0.3, dtype=F64, device=device)})
    a = leaves
    with nf.use_backend(backend):
        ours = nf.plastic_rnn(a["input"], a["weight"], a["alpha"], a["eta"], y0=a["y0"], hebb=a["hebb"], rule="oja")
    theirs = miconi_run(miconi_oja_step, a["input"], a["weight"], a["alpha"], a["eta"], a["y0"], a["hebb"])
    _compare(ours, theirs, leaves, *_tolerance(backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("per_neuron", [False, True], ids=["M-per-sequence", "M-per-post-neuron"])
def test_backpropamine_exogenous_modulation_with_clip(backend, device, per_neuron):
    T, B, N, clip = 7, 3, 6, 0.4
    values = _inputs(T, B, N, device=device)
    gen = torch.Generator().manual_seed(5)
    values["modulation"] = torch.randn((T, B, N) if per_neuron else (T, B), generator=gen, dtype=F64).to(device)
    a = _leaves(values)
    with nf.use_backend(backend):
        ours = nf.plastic_rnn(a["input"], a["weight"], a["alpha"], 0.0, y0=a["y0"], hebb=a["hebb"],
                              modulation=a["modulation"], clip=clip)
    theirs = backpropamine_run(a["input"], a["weight"], a["alpha"], a["y0"], a["hebb"], a["modulation"], clip)
    # The clip must bite for this to test it: some of the final trace sits on the bound, some inside.
    bound = theirs[1].detach().abs() == clip
    assert 0 < int(bound.sum()) < bound.numel(), "the clip never binds (or always does): choose other inputs"
    _compare(ours, theirs, a, *_tolerance(backend))


def _modulator_values(values, N, device, fanout):
    gen = torch.Generator().manual_seed(9)
    r = lambda *s, scale=1.0: (torch.randn(s, generator=gen, dtype=F64) * scale).to(device)  # noqa: E731
    values.update(mod_weight=r(N, scale=0.8), mod_bias=r(scale=0.3))
    if fanout:
        values["mod_fanout"] = r(N)
    return values


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backpropamine_endogenous_modulation_maze_code(backend, device):
    T, B, N, clip = 7, 3, 6, 0.4
    a = _leaves(_modulator_values(_inputs(T, B, N, device=device), N, device, fanout=True))
    with nf.use_backend(backend):
        ours = nf.plastic_rnn(a["input"], a["weight"], a["alpha"], 0.0, y0=a["y0"], hebb=a["hebb"], clip=clip,
                              mod_weight=a["mod_weight"], mod_bias=a["mod_bias"], mod_fanout=a["mod_fanout"])
    h, hebb, outputs = a["y0"], a["hebb"].transpose(1, 2), []
    for t in range(T):
        h, hebb = backpropamine_maze_step(h, hebb, a["weight"].t(), a["alpha"].t(), a["input"][t], a["mod_weight"],
                                          a["mod_bias"], a["mod_fanout"], clip)
        outputs.append(h)
    theirs = torch.stack(outputs), hebb.transpose(1, 2)
    bound = theirs[1].detach().abs() == clip
    assert 0 < int(bound.sum()) < bound.numel(), "the clip never binds (or always does): choose other inputs"
    _compare(ours, theirs, a, *_tolerance(backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_backpropamine_endogenous_modulation_cue_reward_code(backend, device):
    T, B, N = 7, 3, 6
    values = _modulator_values(_inputs(T, B, N, device=device, hebb_scale=0.6), N, device, fanout=False)
    values["input"] = values["input"] * 2  # drive the activity so the clip at 1 binds
    a = _leaves(values)
    with nf.use_backend(backend):
        ours = nf.plastic_rnn(a["input"], a["weight"], a["alpha"], 0.0, y0=a["y0"], hebb=a["hebb"], clip=1.0,
                              mod_weight=a["mod_weight"], mod_bias=a["mod_bias"])
    h, hebb, outputs = a["y0"], a["hebb"], []
    for t in range(T):
        h, hebb = backpropamine_cue_reward_step(h, hebb, a["weight"], a["alpha"], a["input"][t], a["mod_weight"],
                                                a["mod_bias"])
        outputs.append(h)
    theirs = torch.stack(outputs), hebb
    bound = theirs[1].detach().abs() == 1.0
    assert 0 < int(bound.sum()) < bound.numel(), "the clip never binds (or always does): choose other inputs"
    _compare(ours, theirs, a, *_tolerance(backend))


def test_the_oracles_use_the_papers_transposes():
    # A non-symmetric weight that connects only pre-synaptic neuron 0 to post-synaptic neuron 1:
    # in the papers' [pre, post] storage that is w[0, 1]; in ours weight[1, 0].
    N = 3
    weight = torch.zeros(N, N, dtype=F64)
    weight[1, 0] = 2.0
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=F64)
    x = torch.zeros(1, 1, N, dtype=F64)
    out, hebb = miconi_run(miconi_step, x, weight, torch.zeros_like(weight), 0.5, y0, torch.zeros(1, N, N, dtype=F64))
    assert out[0, 0].tolist() == pytest.approx([0.0, torch.tanh(torch.tensor(2.0)).item(), 0.0])
    # The trace of the one active pair (pre 0, post 1) is in our layout's [post, pre] = [1, 0].
    assert hebb[0, 1, 0] == pytest.approx(0.5 * torch.tanh(torch.tensor(2.0)).item())
    assert torch.count_nonzero(hebb) == 1
