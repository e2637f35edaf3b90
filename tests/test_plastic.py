"""nf.plastic_linear / nf.plastic_rnn (SPEC section 4): what is particular to the plastic ops and layers.

Against the reference on every backend (rules, activations, clipping, given and endogenous
modulation, empty sequences), random shapes, every subset of requires_grad, gradcheck, opcheck and
torch.compile: tests/test_oracle.py, over the rows plastic_linear and plastic_rnn of tests/oracle.py.
"""

import pytest
import torch
import neuronml_fast as nf
from neuronml_fast.ops.plastic import plastic_linear_reference, plastic_rnn_reference, trace_dtype

from neuronml_fast._memory import saved_bytes
from conftest import interpreted, kernel_backends
from oracle import plastic_linear_sample, plastic_rnn_sample

BACKENDS = [p for p in kernel_backends() if p.values[0] in nf.backends.ops()["plastic"].dtypes]
F64 = torch.float64


def _leaf(t):
    return t.detach().requires_grad_()


def _args(sample):
    return {k: None if v is None else _leaf(v) for k, v in sample.tensors.items()}


def _rnn_args(dtype=F64, device="cpu", **knobs):
    """The tensors of the oracle table's plastic_rnn sample, as leaves requiring grad."""
    return _args(plastic_rnn_sample(dtype, device, **knobs))


def _linear_args(dtype=F64, device="cpu", **knobs):
    return _args(plastic_linear_sample(dtype, device, **knobs))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("given", [(), ("mod_bias",), ("mod_fanout",)])
def test_endogenous_modulation_defaults(backend, device, given):
    # mod_bias defaults to 0 and mod_fanout to ones: the same as passing them explicitly (the oracle's
    # endogenous-defaults-* samples compare the defaults against the reference's own defaults).
    args = _rnn_args(modulation="endogenous", device=device)
    for name in ("mod_bias", "mod_fanout"):
        if name not in given:
            args.pop(name)
    with nf.use_backend(backend):
        got, _ = nf.plastic_rnn(**args)
    explicit = dict(args, mod_bias=torch.zeros((), dtype=F64, device=device),
                    mod_fanout=torch.ones(5, dtype=F64, device=device))
    explicit.update({k: args[k] for k in given})
    want, _ = plastic_rnn_reference(**explicit)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_endogenous_modulation_is_the_modulated_rule_with_the_modulators_output():
    # The oracle itself: feeding the modulation the modulator produced back in as a given
    # modulation reproduces the outputs and the trace.
    args = _rnn_args(modulation="endogenous")
    out, hebb = plastic_rnn_reference(**args)
    s = out @ args["mod_weight"] + args["mod_bias"]
    given = torch.tanh(s)[..., None] * args["mod_fanout"]
    plain = {k: v for k, v in args.items() if not k.startswith("mod_")}
    out2, hebb2 = plastic_rnn_reference(**plain, modulation=given)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(hebb2, hebb)
    # ... and the modulator matters: a zero modulator leaves the trace as it was
    zero = dict(args, mod_fanout=torch.zeros(5, dtype=F64))
    torch.testing.assert_close(plastic_rnn_reference(**zero)[1], args["hebb"])
    assert (hebb - args["hebb"]).abs().max() > 1e-3


def test_cpu_float32_tanh_is_correctly_rounded():
    # With zero weights and alpha, z = 0 + input, so the output is tanh(input) as the CPU kernel
    # computes it (from one double exp, not glibc's tanhf): it must equal the float64 tanh
    # rounded once to float32, for tiny, saturating and non-finite inputs too. (-0 becomes +0
    # in z = 0 + input, so the sign of zero is not compared.)
    gen = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(4000, generator=gen) * 4, torch.randn(500, generator=gen) * 1e-5,
                   torch.tensor([0.0, 1e-4, -1e-4, 9.01, -9.02, 20.0, 20.5, -40.0, float("inf"), float("-inf"),
                                 float("nan"), 1e-38, -1e-45])])
    n = 9
    x = torch.cat([x, torch.zeros((-x.numel()) % n)]).view(-1, 1, n)
    zeros = torch.zeros(n, n)
    with nf.use_backend("cpu"):
        y, _ = nf.plastic_rnn(x, zeros, zeros, torch.tensor(0.1))
    want = torch.tanh(x.double()).float()
    assert torch.equal(y.isnan(), want.isnan())
    ok = y.isnan() | (y == want)
    assert ok.all(), (x[~ok][:5], y[~ok][:5], want[~ok][:5])


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("clip", [None, 1.0])
def test_long_sequence_float32_gradients_stay_accurate(backend, device, clip):
    # Traces are reconstructed backwards in time (or recomputed from checkpoints under clip):
    # float32 gradients over T = 300 must stay close to a float64 reference.
    args64 = _rnn_args(T=300, B=2, N=16, seed=3, device=device)
    with torch.no_grad():
        args64["weight"].mul_(0.3)  # a non-chaotic network, so float32 itself is not the error
        args64["eta"].fill_(0.05)
    args32 = {k: (None if v is None else _leaf(v.float())) for k, v in args64.items()}
    with nf.use_backend(backend):
        out, hebb = nf.plastic_rnn(**args32, clip=clip)
        got = torch.autograd.grad(out.square().sum() + hebb.sum(), [args32["weight"], args32["alpha"], args32["eta"]])
    out64, hebb64 = plastic_rnn_reference(**args64, clip=clip)
    want = torch.autograd.grad(out64.square().sum() + hebb64.sum(), [args64["weight"], args64["alpha"], args64["eta"]])
    # The bar: no worse than eager float32 autograd (which stores every trace) plus a margin.
    args_eager = {k: (None if v is None else _leaf(v.float())) for k, v in args64.items()}
    out32, hebb32 = plastic_rnn_reference(**args_eager, clip=clip)
    eager = torch.autograd.grad(out32.square().sum() + hebb32.sum(),
                                [args_eager["weight"], args_eager["alpha"], args_eager["eta"]])
    for g, e, w in zip(got, eager, want):
        scale = w.abs().max()
        assert (g.double() - w).abs().max() <= 4 * (e.double() - w).abs().max() + 1e-4 * scale


@pytest.mark.skipif(not nf.backends.status("cpu").devices, reason="C++ CPU extension not built")
def test_cpu_clipped_backward_over_traces_larger_than_its_cache_budget():
    # A float64 trace of one 1030-unit sequence is 8.5 MB, past the backward's budget of recomputed
    # traces (csrc/cpu/plastic_kernels.inc, kRecomputeCacheBytes): each checkpoint interval (3 steps
    # at T = 10) is recomputed one step at a time, advancing each row from its checkpoint.
    gen = torch.Generator().manual_seed(4)
    n, steps = 1030, 10
    x = (torch.randn(steps, 1, n, generator=gen, dtype=F64) * 0.5).requires_grad_()
    w = (torch.randn(n, n, generator=gen, dtype=F64) / n**0.5).requires_grad_()
    a = (torch.randn(n, n, generator=gen, dtype=F64) * 0.1).requires_grad_()
    eta = torch.tensor(0.3, dtype=F64, requires_grad=True)
    leaves = (x, w, a, eta)
    with nf.use_backend("cpu"):
        out, hebb = nf.plastic_rnn(x, w, a, eta, clip=0.02)
        got = torch.autograd.grad(out.square().sum() + hebb.sum(), leaves)
    ref_out, ref_hebb = plastic_rnn_reference(x, w, a, eta, clip=0.02)
    assert (ref_hebb.abs() == 0.02).any()  # the clip binds
    want = torch.autograd.grad(ref_out.square().sum() + ref_hebb.sum(), leaves)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu"])
def test_training_memory_does_not_grow_with_sequence_length(backend, device):
    # What autograd keeps for the backward: O(B * N^2) for the fused op, whatever T (here up to
    # T = 500 at eta = 0.01; past ln(256) / -ln(1 - eta) = 550 steps one more trace is kept every
    # 550 steps, see checkpoint_every in neuronml_fast/ops/plastic/op.py).
    def saved(T):
        args = _rnn_args(T=T, B=4, N=64, dtype=torch.float32)
        with torch.no_grad():
            args["eta"].fill_(0.01)
        with nf.use_backend(backend):
            return saved_bytes(lambda: nf.plastic_rnn(**args))

    short, long = saved(50), saved(500)
    trace_bytes = 4 * 64 * 64 * 4
    per_step_outputs = 2 * 4 * 64 * 4  # input and output activations, O(T * B * N)
    assert long - short <= 450 * per_step_outputs
    assert long < 4 * trace_bytes + 500 * per_step_outputs
    reference = _rnn_args(T=50, B=4, N=64, dtype=torch.float32)
    assert short < saved_bytes(lambda: plastic_rnn_reference(**reference)) / 5


@pytest.mark.parametrize("backend,device", [p for p in BACKENDS if p.values[1] == "cpu"])
def test_endogenous_modulation_training_memory_does_not_grow_with_sequence_length(backend, device):
    # Beyond the O(T * B * N) activations (the input, the output and the M_t the modulator
    # computed, kept as the modulator's activity [T, B]), the backward keeps one trace, whatever T.
    # The Triton interpreter runs T = 1000 in minutes: it checks the same driver at T = 200.
    B, N, long_T = 4, 64, 200 if interpreted(backend, device) else 1000

    def saved(T):
        args = _rnn_args(T=T, B=B, N=N, modulation="endogenous", dtype=torch.float32)
        with nf.use_backend(backend):
            return saved_bytes(lambda: nf.plastic_rnn(**args))

    short, long = saved(long_T // 10), saved(long_T)
    trace_bytes = B * N * N * 4
    per_step = (2 * B * N + B) * 4  # input and output activations, the modulator's activity
    assert long - short <= (long_T - long_T // 10) * per_step
    assert long < 3 * trace_bytes + long_T * per_step


def test_bad_inputs_name_the_argument():
    a = _rnn_args(hebb=False, y0=False)
    x, w, alpha, eta = a["input"].detach(), a["weight"].detach(), a["alpha"].detach(), a["eta"].detach()
    cases = [
        (dict(input=x[0]), ValueError, "input: expected a 3-d tensor"),
        (dict(weight=w[:, :3]), ValueError, r"weight: expected a square \[N, N\]"),
        (dict(alpha=alpha[:2]), ValueError, r"alpha: expected a 0-d tensor or shape \[5, 5\]"),
        (dict(eta=torch.tensor(1.5, dtype=F64)), ValueError, "eta: expected 0 <= eta < 1"),
        (dict(eta=torch.tensor([0.1], dtype=F64)), ValueError, "eta: expected a 0-d tensor"),
        (dict(rule="stdp"), ValueError, "rule: expected one of"),
        (dict(activation="relu"), ValueError, "activation: expected one of"),
        (dict(y0=torch.zeros(2, 5, dtype=F64)), ValueError, r"y0: expected shape \[3, 5\]"),
        (dict(hebb=torch.zeros(3, 5, 4, dtype=F64)), ValueError, r"hebb: expected shape \[3, 5, 5\]"),
        (dict(modulation=torch.zeros(6, 2, dtype=F64)), ValueError, "modulation: expected shape"),
        (dict(clip=-1.0), ValueError, "clip: expected a positive number"),
        (dict(mod_weight=torch.zeros(4, dtype=F64)), ValueError, r"mod_weight: expected shape \[5\]"),
        (dict(mod_weight=torch.zeros(5, dtype=F64), modulation=torch.zeros(6, 3, dtype=F64)), ValueError,
         "mod_weight: expected None when modulation is given"),
        (dict(mod_weight=torch.zeros(5, dtype=F64), mod_bias=torch.zeros(1, dtype=F64)), ValueError,
         r"mod_bias: expected shape \[\]"),
        (dict(mod_weight=torch.zeros(5, dtype=F64), mod_fanout=torch.zeros(5)), TypeError,
         "mod_fanout: expected dtype torch.float64"),
        (dict(mod_weight=torch.zeros(5, dtype=F64), mod_activation="relu"), ValueError,
         "mod_activation: expected one of"),
        (dict(mod_fanout=torch.zeros(5, dtype=F64)), ValueError, "mod_weight: expected a tensor when"),
        (dict(weight=w.float()), TypeError, "weight: expected dtype torch.float64"),
    ]
    for change, error, message in cases:
        kwargs = dict(input=x, weight=w, alpha=alpha, eta=eta, **{k: v for k, v in change.items()
                                                                 if k not in ("input", "weight", "alpha", "eta")})
        for key in ("input", "weight", "alpha", "eta"):
            if key in change:
                kwargs[key] = change[key]
        with pytest.raises(error, match=message):
            nf.plastic_rnn(**kwargs)
    with pytest.raises(ValueError, match="input: expected 4 features"):
        la = _linear_args()
        nf.plastic_linear(la["input"].detach()[..., :3], la["weight"].detach(), la["alpha"].detach(), la["eta"])


def test_plastic_layers_carry_state_across_calls():
    torch.manual_seed(0)
    rnn = nf.nn.PlasticRNN(6).double()
    assert rnn.alpha.shape == (6, 6) and rnn.eta.item() == pytest.approx(0.01)
    x = torch.randn(10, 2, 6, dtype=F64)
    whole, (y_whole, h_whole) = rnn(x)
    first, state = rnn(x[:4])
    second, (y_split, h_split) = rnn(x[4:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole)
    torch.testing.assert_close(h_split, h_whole)
    torch.testing.assert_close(y_split, y_whole)
    (whole.sum() + h_whole.sum()).backward()
    assert rnn.eta_logit.grad is not None and rnn.alpha.grad is not None

    layer = nf.nn.PlasticLinear(3, 4, alpha="scalar").double()
    out, hebb = layer(torch.randn(5, 2, 3, dtype=F64))
    assert out.shape == (5, 2, 4) and hebb.shape == (2, 4, 3) and layer.alpha.dim() == 0
    with pytest.raises(ValueError, match="alpha: expected 'per_connection' or 'scalar'"):
        nf.nn.PlasticLinear(3, 4, alpha="matrix")


@pytest.mark.parametrize("modulator", ["sequence", "neuron"])
def test_plastic_rnn_layer_with_a_modulator_neuron(modulator):
    torch.manual_seed(0)
    rnn = nf.nn.PlasticRNN(6, clip=1.0, modulator=modulator).double()
    assert hasattr(rnn, "mod_fanout") == (modulator == "neuron") and "modulator='" in repr(rnn)
    x = torch.randn(7, 2, 6, dtype=F64)
    out, (y, hebb) = rnn(x)
    fanout = rnn.mod_fanout if modulator == "neuron" else None
    want, want_hebb = plastic_rnn_reference(x, rnn.weight, rnn.alpha, rnn.eta, clip=1.0, mod_weight=rnn.mod_weight,
                                            mod_bias=rnn.mod_bias, mod_fanout=fanout)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(hebb, want_hebb)
    (out.square().sum() + hebb.sum()).backward()
    for name in ("mod_weight", "mod_bias") + (("mod_fanout",) if modulator == "neuron" else ()):
        assert getattr(rnn, name).grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="modulator: expected one of"):
        nf.nn.PlasticRNN(6, modulator="global")
    with pytest.raises(ValueError, match="mod_activation: expected one of"):
        nf.nn.PlasticRNN(6, modulator="neuron", mod_activation="relu")


def test_plastic_rnn_learns_pattern_completion_where_a_fixed_network_cannot():
    # Miconi et al. (2018), scaled down: each episode shows 2 random binary patterns, then a
    # half-erased copy of one of them; the network must complete it. Only the Hebbian trace
    # can store the episode's patterns, so a plastic network learns, a non-plastic one cannot.
    torch.manual_seed(0)
    N, shows, B = 16, 3, 16

    def episode():
        patterns = torch.randint(0, 2, (B, 2, N)).double() * 2 - 1
        steps = [patterns[:, k] for _ in range(shows) for k in range(2)]
        pick = patterns[torch.arange(B), torch.randint(0, 2, (B,))]
        cue = pick.clone()
        cue[:, N // 2:] = 0
        steps += [torch.zeros(B, N), cue]
        return torch.stack(steps), pick

    def train(plastic):
        rnn = nf.nn.PlasticRNN(N, eta=0.3).double()
        if not plastic:
            rnn.alpha.requires_grad_(False).zero_()
            rnn.eta_logit.requires_grad_(False)
        opt = torch.optim.Adam([p for p in rnn.parameters() if p.requires_grad], lr=3e-2)
        for _ in range(400):
            x, target = episode()
            out, _ = rnn(x)
            loss = (out[-1] - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x, target = episode()
            out, _ = rnn(x)
            return (out[-1, :, N // 2:] - target[:, N // 2:]).square().mean().item()

    plastic_error, fixed_error = train(True), train(False)
    # Chance (output 0) is an error of 1.0; the fixed network stays near it (measured 0.80),
    # the plastic one completes most of the erased half (measured 0.53).
    assert plastic_error < 0.65 and plastic_error < 0.75 * fixed_error, (plastic_error, fixed_error)


# ---- the layers' learned eta ------------------------------------------------------------------


def _plastic_layer(kind, size=8, **kwargs):
    return nf.nn.PlasticRNN(size, **kwargs) if kind == "rnn" else nf.nn.PlasticLinear(size, size, **kwargs)


def _trace(kind, state):
    return state[1] if kind == "rnn" else state


@pytest.mark.parametrize("kind", ["rnn", "linear"])
def test_plastic_layers_keep_eta_valid_under_adam(kind):
    # A loss on the trace's size pushes eta down (a smaller eta, a smaller trace): Adam at lr 1e-2
    # takes an unconstrained eta from 0.01 below 0 within a few steps, and the op rejects it.
    torch.manual_seed(0)
    layer = _plastic_layer(kind)
    optimizer = torch.optim.Adam(layer.parameters(), lr=1e-2)
    x = torch.randn(5, 4, 8)
    for _ in range(80):
        out, state = layer(x)
        loss = _trace(kind, state).square().sum() + out.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert 0.0 <= layer.eta.item() < 1.0
    assert layer.eta.item() < 0.01  # trained: eta went down from 0.01, and stayed in [0, 1)


@pytest.mark.parametrize("kind", ["rnn", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plastic_layers_eta_stays_below_one_where_the_sigmoid_rounds_to_one(kind, dtype):
    layer = _plastic_layer(kind, 4).to(dtype)
    with torch.no_grad():
        layer.eta_logit.fill_(60.0)  # sigmoid(60) is 1.0 in float32 and float64
    assert layer.eta.item() < 1.0
    out, state = layer(torch.randn(3, 2, 4, dtype=dtype))
    (out.sum() + _trace(kind, state).sum()).backward()
    assert torch.isfinite(layer.eta_logit.grad)


@pytest.mark.parametrize("kind", ["rnn", "linear"])
def test_plastic_layers_eta_parameterization_and_state_dict(kind):
    layer = _plastic_layer(kind, 4, eta=0.3, dtype=F64)
    assert layer.eta.item() == pytest.approx(0.3, rel=1e-12)
    assert "eta_logit" in dict(layer.named_parameters()) and "eta" not in dict(layer.named_parameters())
    state = layer.state_dict()
    assert "eta_logit" in state and "eta" not in state
    other = _plastic_layer(kind, 4).double()
    other.load_state_dict(state)
    assert other.eta.item() == pytest.approx(0.3, rel=1e-12)
    # A state_dict that stores eta itself (the effective value) loads too.
    legacy = {k: v for k, v in state.items() if k != "eta_logit"}
    legacy["eta"] = torch.tensor(0.05, dtype=F64)
    other.load_state_dict(legacy)
    assert other.eta.item() == pytest.approx(0.05, rel=1e-12)
    with pytest.raises(ValueError, match=r"eta: expected 0 <= eta < 1 in the state_dict, got 1.5"):
        other.load_state_dict({**legacy, "eta": torch.tensor(1.5, dtype=F64)})
    # eta = 0 is a fixed point of every parameterization onto [0, 1): the layer keeps it frozen.
    frozen = _plastic_layer(kind, 4, eta=0.0)
    assert frozen.eta.item() == 0.0 and not frozen.eta_logit.requires_grad
    with pytest.raises(ValueError, match="eta: expected 0 <= eta < 1, got 1.0"):
        _plastic_layer(kind, 4, eta=1.0)


# ---- the trace's dtype (SPEC section 4, repository extension) --------------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _backends_for(dtype):
    """(backend, device) pairs that run the plastic ops in ``dtype`` here: the reference and auto always,
    each kernel backend in the dtypes it registers (16-bit runs the reference)."""
    kernels = nf.backends.ops()["plastic"].dtypes
    return [("reference", "cpu"), ("auto", "cpu")] + [p.values for p in BACKENDS if dtype in kernels[p.values[0]]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_returned_trace_is_accepted_back_in_every_dtype(dtype):
    # out, state = rnn(x); rnn(x, state): the trace comes back in the accumulation dtype (float32 for
    # 16-bit inputs) and the next call takes it, on every backend that runs the dtype, for the ops and
    # the layers alike.
    want = trace_dtype(dtype)
    assert want == (torch.float64 if dtype == F64 else torch.float32)
    for backend, device in _backends_for(dtype):
        torch.manual_seed(0)
        rnn = nf.nn.PlasticRNN(4).to(device=device, dtype=dtype)
        linear = nf.nn.PlasticLinear(3, 4).to(device=device, dtype=dtype)
        x = torch.randn(5, 2, 4, device=device, dtype=dtype)
        with nf.use_backend(backend):
            whole, (_, h_whole) = rnn(x)
            first, state = rnn(x[:2])
            assert state[1].dtype == want and state[0].dtype == dtype, backend
            second, (_, h_split) = rnn(x[2:], state)
            out, hebb = linear(x[..., :3])
            assert hebb.dtype == want, backend
            again, hebb = linear(x[..., :3], hebb)
            # the op itself, given the trace in the input's dtype or in the trace dtype
            for given in (hebb, hebb.to(dtype)):
                nf.plastic_rnn(x, rnn.weight, rnn.alpha, rnn.eta, hebb=state[1].to(given.dtype))
                nf.plastic_linear(x[..., :3], linear.weight, linear.alpha, linear.eta, hebb=given)
        assert again.dtype == out.dtype == dtype and hebb.dtype == want
        tol = dict(atol=0, rtol=0) if dtype == F64 else dict(atol=2e-2, rtol=0) if dtype.itemsize == 2 else {}
        torch.testing.assert_close(torch.cat([first, second]), whole, **tol)
        torch.testing.assert_close(h_split, h_whole, **tol)


def test_a_trace_of_another_dtype_names_both_accepted():
    x = torch.randn(3, 2, 4, dtype=torch.float16)
    w, alpha, eta = torch.zeros(4, 4, dtype=x.dtype), torch.zeros((), dtype=x.dtype), torch.tensor(0.1, dtype=x.dtype)
    with pytest.raises(TypeError, match=r"hebb: expected dtype torch.float16 \(the dtype of input\) or torch.float32 "
                                        r"\(the dtype of the trace the op returns\), got torch.float64"):
        nf.plastic_rnn(x, w, alpha, eta, hebb=torch.zeros(2, 4, 4, dtype=F64))
    with pytest.raises(TypeError, match=r"hebb: expected dtype torch.float64 \(the dtype of input\), "
                                        r"got torch.float32"):
        nf.plastic_rnn(x.double(), w.double(), alpha.double(), eta.double(), hebb=torch.zeros(2, 4, 4))


# ---- eta under neuromodulation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu"), *BACKENDS])
@pytest.mark.parametrize("modulation", ["sequence", "neuron", "endogenous"])
def test_eta_gets_no_gradient_under_modulation_on_every_backend(backend, device, modulation):
    # Modulated, the rule ignores eta: its gradient is None (an unused input), not zeros, on every
    # backend, so an optimizer's weight decay treats it alike everywhere.
    args = _rnn_args(modulation=modulation, device=device)
    with nf.use_backend(backend):
        out, hebb = nf.plastic_rnn(**args)
    (out.sum() + hebb.sum()).backward()
    assert args["eta"].grad is None
    assert args["weight"].grad is not None and args["alpha"].grad is not None

    plain = _rnn_args(device=device)  # unmodulated, eta is used and has its gradient
    with nf.use_backend(backend):
        out, hebb = nf.plastic_rnn(**plain)
    (out.sum() + hebb.sum()).backward()
    assert plain["eta"].grad is not None and plain["eta"].grad != 0


@pytest.mark.parametrize("backend,device", [pytest.param("reference", "cpu", id="reference-cpu"), *BACKENDS])
def test_a_modulated_layers_eta_logit_gets_no_gradient_on_every_backend(backend, device):
    torch.manual_seed(0)
    rnn = nf.nn.PlasticRNN(5, modulator="neuron", clip=1.0).to(device=device, dtype=F64)
    with nf.use_backend(backend):
        out, (_, hebb) = rnn(torch.randn(4, 2, 5, dtype=F64, device=device))
    (out.sum() + hebb.sum()).backward()
    assert rnn.eta_logit.grad is None and rnn.mod_weight.grad is not None


# ---- every GPU kernel design, at sizes a test runs ----------------------------------------------
#
# At the oracle's sizes each GPU backend takes its small-layer design (Triton: the trace in
# registers; CUDA: in shared memory, one block per sequence). These force the others: the Triton
# forward that streams the trace, with tiles small enough that every loop over row and column
# blocks turns; the CUDA kernels with the trace streamed by one block per sequence, and split over
# three blocks per sequence meeting at grid barriers (a cooperative launch). T = 19 crosses
# several checkpoints (every 8 steps at eta = 0.5; every 4 when segments are recomputed).

def _triton_streamed(monkeypatch):
    from neuronml_fast.ops.plastic import triton as launcher

    monkeypatch.setattr(launcher.TritonKernels, "resident_tile", staticmethod(lambda p: None))
    monkeypatch.setattr(launcher.TritonKernels, "tile", staticmethod(lambda p: (4, 8, 4)))


def _cuda_plan(parts, resident):
    def force(monkeypatch):
        from neuronml_fast.ops.plastic import cuda as launcher

        monkeypatch.setattr(launcher.CudaKernels, "requested_parts", parts)
        monkeypatch.setattr(launcher.CudaKernels, "requested_resident", resident)
    return force


GPU_DESIGNS = {"triton": {"streamed": _triton_streamed},
               "cuda": {"resident": _cuda_plan(1, 1), "streamed": _cuda_plan(1, 0), "cooperative": _cuda_plan(3, 0)}}
DESIGN_CASES = [pytest.param(backend, device, design, id=f"{backend}-{device}-{design}")
                for backend, device in (p.values for p in BACKENDS) for design in GPU_DESIGNS.get(backend, {})]
RNN_DESIGN_VARIANTS = {  # identity: small weights, or the activity overflows over 19 steps
    "hebb": dict(), "oja": dict(rule="oja"), "clip": dict(clip=0.1), "identity": dict(activation="identity", scale=0.3),
    "modulated-sequence": dict(modulation="sequence"), "modulated-neuron-clip": dict(modulation="neuron", clip=0.1),
    "endogenous": dict(modulation="endogenous"),
    "endogenous-clip-identity": dict(modulation="endogenous", clip=0.1, mod_activation="identity"),
    "alpha0d-no-state": dict(alpha_scalar=True, y0=False, hebb=False),
}


def _compare_with_reference(fn, reference, args, options, hebb_grad=True):
    leaves = {k: v for k, v in args.items() if torch.is_tensor(v) and v.requires_grad}
    got = fn(**args, **options)
    want = reference(**args, **options)
    assert all(t.isfinite().all() for t in want)
    gen = torch.Generator().manual_seed(5)
    upstream = [torch.randn(t.shape, generator=gen, dtype=F64) for t in want]
    if not hebb_grad:
        upstream[1] = None
    grads = [torch.autograd.grad([t for t, u in zip(outs, upstream) if u is not None], list(leaves.values()),
                                 [u for u in upstream if u is not None], allow_unused=True, materialize_grads=True)
             for outs in (got, want)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8)
    for name, g, w in zip(leaves, *grads):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-8, msg=name)


@pytest.mark.parametrize("backend,device,design", DESIGN_CASES)
@pytest.mark.parametrize("variant", sorted(RNN_DESIGN_VARIANTS))
def test_plastic_rnn_every_gpu_design_matches_the_reference(backend, device, design, variant, monkeypatch):
    GPU_DESIGNS[backend][design](monkeypatch)
    sample = plastic_rnn_sample(F64, device, T=19, B=2, N=13, **RNN_DESIGN_VARIANTS[variant])
    args = _args(sample)
    if sample.options["activation"] == "tanh":  # identity: unbounded activity, eta 0.5 would overflow
        with torch.no_grad():
            args["eta"].fill_(0.5)
    options = dict(sample.options)
    with nf.use_backend(backend):
        _compare_with_reference(nf.plastic_rnn, plastic_rnn_reference, args, options,
                                hebb_grad=variant != "alpha0d-no-state")


@pytest.mark.parametrize("backend,device,design", DESIGN_CASES)
@pytest.mark.parametrize("rule,activation", [("hebb", "tanh"), ("oja", "identity")])
def test_plastic_linear_every_gpu_design_matches_the_reference(backend, device, design, rule, activation,
                                                               monkeypatch):
    GPU_DESIGNS[backend][design](monkeypatch)
    sample = plastic_linear_sample(F64, device, T=19, B=2, d_in=11, d_out=13, rule=rule, activation=activation)
    args = _args(sample)
    if activation == "tanh":  # reconstructed traces: a checkpoint every 8 steps (identity: every 4, recomputed)
        with torch.no_grad():
            args["eta"].fill_(0.5)
    with nf.use_backend(backend):
        _compare_with_reference(nf.plastic_linear, plastic_linear_reference, args, dict(sample.options))


# ---- 16-bit inputs on the GPU kernels ------------------------------------------------------------
#
# float16 and bfloat16 inputs, weights and outputs; the trace, the state y_t the recurrence reads and
# every sum in float32. Against the reference in float64 on the same 16-bit values (the inputs and
# the upstream gradients rounded first): the output and the gradients off by little more than
# their final rounding to 16 bits, and the trace, never rounded, to float32's accuracy. Small
# sizes: the interpreter and the emulation run every step.

HALF = [torch.float16, torch.bfloat16]
HALF_BACKENDS = [p for p in BACKENDS if any(d in nf.backends.ops()["plastic"].dtypes[p.values[0]] for d in HALF)]
# Relative to the largest magnitude of the reference: a few units in the last place of the 16-bit
# result. (The Triton interpreter converts float32 to bfloat16 by truncation where a GPU rounds to
# nearest even: up to one unit, 2^-7 relative, which bfloat16's bound covers.)
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 2e-2}
TRACE_TOL = 1e-5  # the float32 trace: a 16-bit one would be off by 1e-3 (float16) or 1e-2 (bfloat16)
HALF_RNN_VARIANTS = {
    "hebb": dict(), "oja": dict(rule="oja"), "clip": dict(clip=0.1), "identity": dict(activation="identity", scale=0.3),
    "modulated-sequence": dict(modulation="sequence"), "modulated-neuron-clip": dict(modulation="neuron", clip=0.1),
    "endogenous": dict(modulation="endogenous"),
    "endogenous-clip-identity": dict(modulation="endogenous", clip=0.1, mod_activation="identity"),
    "alpha0d-no-state": dict(alpha_scalar=True, y0=False, hebb=False),
}
HALF_LINEAR_VARIANTS = {
    "hebb-tanh": dict(), "oja-identity": dict(rule="oja", activation="identity"),
    "alpha0d-no-state": dict(alpha_scalar=True, bias=False, drive=False, hebb=False),
}


def _rounded_leaves(sample, dtype, hebb_dtype):
    """(leaves in ``dtype``, the initial trace in ``hebb_dtype``; float64 leaves of the same values)."""
    low, high = {}, {}
    for k, v in sample.tensors.items():
        if v is None:
            low[k] = high[k] = None
            continue
        rounded = v.to(hebb_dtype if k == "hebb" else dtype)
        low[k], high[k] = _leaf(rounded), _leaf(rounded.double())
    return low, high


def _half_tolerance(got, want, tol, what):
    assert got.shape == want.shape, what
    scale = max(1.0, want.abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.detach().double(), want.detach(), atol=tol * scale, rtol=tol, msg=what)


def _check_half(fn, reference, sample, backend, dtype, hebb_dtype=torch.float32):
    """The 16-bit call on ``backend`` against the float64 reference; ``hebb=`` in ``hebb_dtype`` (the
    trace dtype, or the input's: both are taken)."""
    low, high = _rounded_leaves(sample, dtype, hebb_dtype)
    with nf.use_backend(backend), nf._alloc.poisoned():
        out, hebb = fn(**low, **sample.options)
    want_out, want_hebb = reference(**high, **sample.options)
    assert out.dtype == dtype and hebb.dtype == trace_dtype(dtype) == torch.float32
    _half_tolerance(out, want_out, HALF_TOL[dtype], "output")
    _half_tolerance(hebb, want_hebb, TRACE_TOL, "trace")
    gen = torch.Generator().manual_seed(7)
    upstream = [torch.randn(out.shape, generator=gen).to(dtype), torch.randn(hebb.shape, generator=gen)]
    names = [k for k, v in low.items() if v is not None]
    with nf.use_backend(backend), nf._alloc.poisoned():
        got = torch.autograd.grad((out, hebb), [low[k] for k in names], upstream, allow_unused=True)
    want = torch.autograd.grad((want_out, want_hebb), [high[k] for k in names], [u.double() for u in upstream],
                               allow_unused=True)
    for name, g, w in zip(names, got, want):
        if w is None:  # eta under modulation: unused
            assert g is None, name
            continue
        assert g is not None and g.dtype == low[name].dtype, (name, None if g is None else g.dtype)
        _half_tolerance(g, w, HALF_TOL[dtype], f"grad of {name}")


@pytest.mark.parametrize("backend,device", HALF_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", sorted(HALF_RNN_VARIANTS))
def test_plastic_rnn_in_16_bit_matches_the_float64_reference(backend, device, dtype, variant):
    sample = plastic_rnn_sample(F64, device, T=6, B=3, N=13, **HALF_RNN_VARIANTS[variant])
    _check_half(nf.plastic_rnn, plastic_rnn_reference, sample, backend, dtype)


@pytest.mark.parametrize("backend,device", HALF_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("variant", sorted(HALF_LINEAR_VARIANTS))
def test_plastic_linear_in_16_bit_matches_the_float64_reference(backend, device, dtype, variant):
    sample = plastic_linear_sample(F64, device, T=5, B=2, d_in=11, d_out=7, **HALF_LINEAR_VARIANTS[variant])
    _check_half(nf.plastic_linear, plastic_linear_reference, sample, backend, dtype,
                hebb_dtype=dtype if variant == "hebb-tanh" else torch.float32)


@pytest.mark.parametrize("backend,device,design", [p for p in DESIGN_CASES if p.values[2] != "resident"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_plastic_rnn_in_16_bit_on_every_gpu_design(backend, device, design, dtype, monkeypatch):
    # The streamed trace and the cooperative launch (the oracle sizes take the resident design).
    GPU_DESIGNS[backend][design](monkeypatch)
    for variant in ("oja", "endogenous-clip-identity"):
        sample = plastic_rnn_sample(F64, device, T=6, B=2, N=13, **HALF_RNN_VARIANTS[variant])
        _check_half(nf.plastic_rnn, plastic_rnn_reference, sample, backend, dtype)


@pytest.mark.parametrize("backend,device", HALF_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_a_16_bit_layers_trace_keeps_the_increments_a_16_bit_trace_would_round_away(backend, device, dtype):
    # A trace at 1 decaying towards y = tanh(2) = 0.964 at eta = 0.002: each step moves it by
    # 7e-5, under half a unit in the last place at 1 of float16 (2^-11) and bfloat16 (2^-8), so a
    # 16-bit trace would stay at 1. The float32 trace moves by 4.3e-4 in 6 steps, as in float64.
    T, B, N = 6, 1, 4
    x = torch.ones(T, B, N, dtype=dtype)
    w, alpha = torch.zeros(N, N, dtype=dtype), torch.zeros(N, N, dtype=dtype)
    eta, bias = torch.tensor(0.002, dtype=dtype), torch.full((N,), 2.0, dtype=dtype)
    hebb = torch.ones(B, N, N)
    with nf.use_backend(backend), nf._alloc.poisoned():
        _, got = nf.plastic_linear(x, w, alpha, eta, hebb=hebb, bias=bias)
    _, want = plastic_linear_reference(x.double(), w.double(), alpha.double(), eta.double(), hebb=hebb.double(),
                                       bias=bias.double())
    assert (1 - got).min() > 3e-4
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", HALF_BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_16_bit_training_memory_does_not_grow_with_sequence_length(backend, device, dtype):
    # What autograd keeps: the input (16-bit) and the output as the recurrence read it (float32),
    # O(T * B * N), and the traces, O(B * N^2) whatever T.
    B, N = 2, 16

    def saved(T):
        args = _rnn_args(T=T, B=B, N=N, dtype=dtype)
        with torch.no_grad():
            args["eta"].fill_(0.01)
        with nf.use_backend(backend):
            return saved_bytes(lambda: nf.plastic_rnn(**args))

    short, long = saved(10), saved(100)
    trace_bytes = B * N * N * 4
    per_step = B * N * (dtype.itemsize + 4)
    assert long - short <= 90 * per_step
    assert long < 4 * trace_bytes + 100 * per_step
