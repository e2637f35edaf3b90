"""The oracle harness: one table of the package's ops and one comparator.

Every op has a plain-PyTorch reference. Each row of `OPS` names the public function, that
reference, a sample generator (dtype, device and shape knobs, with named variants: odd sizes,
empty batches, non-contiguous and channels-last inputs, op-specific settings), the inputs that
are differentiable and the tolerances per dtype. tests/test_oracle.py runs the cross-cutting
families (against the reference, random shapes, every subset of requires_grad, gradcheck, opcheck,
vmap, torch.compile) over every row, backend and dtype; `assert_close` is the one comparator.

Only the ops' public homes are imported (neuronml_fast and neuronml_fast.ops.*): the backend
modules behind them move, the tests of the contract should not move with them.
"""

import itertools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from hypothesis import strategies as st

import neuronml_fast as nf
from neuronml_fast import _alloc
from neuronml_fast.ops import batch_norm as bn_ops
from neuronml_fast.ops import masked as masked_ops
from neuronml_fast.ops import plastic as plastic_ops
from neuronml_fast.ops import sensitivity as sensitivity_ops

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16


# ---- samples ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """Keyword arguments of one call: ``tensors`` (None allowed) and non-tensor ``options``."""

    tensors: dict
    options: dict = field(default_factory=dict)

    def differentiable(self, names):
        return tuple(n for n in names if self.tensors.get(n) is not None)


def _randn(gen, *shape, scale=1.0):
    return torch.randn(shape, generator=gen, dtype=F64) * scale


def _place(values, dtype, device):
    return {k: None if v is None else v.to(device=device, dtype=dtype) for k, v in values.items()}


# ---- masked_conv2d / masked_linear -------------------------------------------------------------


def _mask(gen, shape, zeros):
    m = torch.rand(shape, generator=gen, dtype=F64) + 0.5
    m[torch.rand(shape, generator=gen) < zeros] = 0.0
    return m


CONV_BASE = dict(tasks=None, batch=3, c_in=4, c_out=6, h=6, w=5, k=(3, 3), stride=(1, 1), padding=(1, 1),
                 dilation=1, groups=1, bias=True, zeros=0.4, skip_zero=True, seed=3, layout="contiguous", mask=None)


def conv_sample(dtype=F64, device="cpu", **knobs):
    p = {**CONV_BASE, **knobs}
    gen = torch.Generator().manual_seed(p["seed"])
    t = () if p["tasks"] is None else (p["tasks"],)
    values = dict(input=_randn(gen, *t, p["batch"], p["c_in"], p["h"], p["w"]),
                  weight=_randn(gen, *t, p["c_out"], p["c_in"] // p["groups"], *p["k"]),
                  mask=_mask(gen, (*t, p["c_out"]), p["zeros"]) if p["mask"] is None else
                  torch.tensor(p["mask"], dtype=F64),
                  bias=_randn(gen, *t, p["c_out"]) if p["bias"] else None)
    v = _place(values, dtype, device)
    x, w, m, b = v["input"], v["weight"], v["mask"], v["bias"]
    if p["layout"] == "channels_last":
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    elif p["layout"] == "sliced":
        x, m, b = torch.cat([x, x], 1)[:, ::2], torch.stack([m, m], 1)[:, 0], torch.stack([b, b], 1)[:, 1]
    elif p["layout"] == "transposed_weight":
        w = w.transpose(2, 3).contiguous().transpose(2, 3)
    return Sample(dict(input=x, weight=w, mask=m, bias=b),
                  dict(stride=p["stride"], padding=p["padding"], dilation=p["dilation"], groups=p["groups"],
                       skip_zero=p["skip_zero"]))


def _conv_fits(p):
    return all(size + 2 * p["padding"][i] >= p["dilation"] * (p["k"][i] - 1) + 1
               for i, size in enumerate((p["h"], p["w"])))


@st.composite
def conv_knobs(draw):
    groups = draw(st.sampled_from([1, 1, 2]))
    return dict(
        tasks=draw(st.sampled_from([None, 1, 3])), batch=draw(st.integers(0, 3)), c_in=groups * draw(st.integers(1, 3)),
        c_out=groups * draw(st.integers(1, 4)), h=draw(st.integers(1, 7)), w=draw(st.integers(1, 6)),
        k=(draw(st.integers(1, 3)), draw(st.integers(1, 3))), stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 1))), dilation=draw(st.integers(1, 2)),
        groups=groups, bias=draw(st.booleans()), zeros=draw(st.sampled_from([0.0, 0.4, 1.0])),
        skip_zero=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )


LINEAR_BASE = dict(tasks=None, lead=(4,), d_in=5, d_out=6, bias=True, zeros=0.4, skip_zero=True, seed=3,
                   layout="contiguous", mask=None)


def linear_sample(dtype=F64, device="cpu", **knobs):
    p = {**LINEAR_BASE, **knobs}
    gen = torch.Generator().manual_seed(p["seed"])
    t = () if p["tasks"] is None else (p["tasks"],)
    values = dict(input=_randn(gen, *t, *p["lead"], p["d_in"]), weight=_randn(gen, *t, p["d_out"], p["d_in"]),
                  mask=_mask(gen, (*t, p["d_out"]), p["zeros"]) if p["mask"] is None else
                  torch.tensor(p["mask"], dtype=F64),
                  bias=_randn(gen, *t, p["d_out"]) if p["bias"] else None)
    v = _place(values, dtype, device)
    if p["layout"] == "transposed":
        v["input"], v["weight"] = v["input"].t().contiguous().t(), v["weight"].t().contiguous().t()
    return Sample(v, dict(skip_zero=p["skip_zero"]))


@st.composite
def linear_knobs(draw):
    return dict(tasks=draw(st.sampled_from([None, 1, 4])), lead=draw(st.sampled_from([(0,), (1,), (5,), (2, 3)])),
                d_in=draw(st.integers(1, 9)), d_out=draw(st.integers(1, 9)), bias=draw(st.booleans()),
                zeros=draw(st.sampled_from([0.0, 0.5, 1.0])), skip_zero=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


# ---- plastic_linear / plastic_rnn ----------------------------------------------------------------


def plastic_linear_sample(dtype=F64, device="cpu", T=6, B=3, d_in=4, d_out=5, alpha_scalar=False, bias=True,
                          drive=True, hebb=True, rule="hebb", activation="tanh", scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: _randn(gen, *s, scale=scale)  # noqa: E731
    values = dict(input=r(T, B, d_in), weight=r(d_out, d_in, scale=0.3 * scale),
                  alpha=r(scale=0.3 * scale) if alpha_scalar else r(d_out, d_in, scale=0.3 * scale),
                  eta=torch.tensor(0.1, dtype=F64), hebb=r(B, d_out, d_in, scale=0.1 * scale) if hebb else None,
                  bias=r(d_out) if bias else None, drive=r(T, B, d_out) if drive else None)
    return Sample(_place(values, dtype, device), dict(rule=rule, activation=activation))


def plastic_rnn_sample(dtype=F64, device="cpu", T=6, B=3, N=5, alpha_scalar=False, modulation=None, y0=True,
                       hebb=True, rule="hebb", activation="tanh", clip=None, mod_activation=None, mod_given=None,
                       scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s, scale=1.0: _randn(gen, *s, scale=scale)  # noqa: E731
    values = dict(input=r(T, B, N), weight=r(N, N, scale=0.5 * scale),
                  alpha=r(scale=0.4 * scale) if alpha_scalar else r(N, N, scale=0.4 * scale),
                  eta=torch.tensor(0.2, dtype=F64), y0=r(B, N) if y0 else None,
                  hebb=r(B, N, N, scale=0.1 * scale) if hebb else None)
    options = dict(rule=rule, activation=activation, clip=clip)
    if modulation == "sequence":
        values["modulation"] = r(T, B)
    elif modulation == "neuron":
        values["modulation"] = r(T, B, N)
    elif modulation == "endogenous":  # backpropamine's modulator neuron
        values.update(mod_weight=r(N, scale=0.8), mod_bias=r(scale=0.3), mod_fanout=r(N, scale=0.7))
        if mod_given is not None:  # only these of mod_bias, mod_fanout: the others take their defaults
            for name in {"mod_bias", "mod_fanout"} - set(mod_given):
                values.pop(name)
        if mod_activation is not None:
            options["mod_activation"] = mod_activation
    return Sample(_place(values, dtype, device), options)


def _plastic_rnn_variants():
    variants = {}
    for rule, modulation, clip, alpha_scalar in itertools.product(["hebb", "oja"], [None, "sequence", "neuron"],
                                                                  [None, 0.05], [False, True]):
        name = f"{rule}-{modulation or 'plain'}-clip{clip}-{'alpha0d' if alpha_scalar else 'alpha2d'}"
        variants[name] = dict(rule=rule, modulation=modulation, clip=clip, alpha_scalar=alpha_scalar)
    for clip, alpha_scalar, mod_act, act in itertools.product([None, 0.05], [False, True], ["tanh", "identity"],
                                                              ["tanh", "identity"]):
        name = f"endogenous-clip{clip}-{'alpha0d' if alpha_scalar else 'alpha2d'}-mod_{mod_act}-{act}"
        variants[name] = dict(modulation="endogenous", clip=clip, alpha_scalar=alpha_scalar,
                              mod_activation=mod_act, activation=act)
    for given in [(), ("mod_bias",), ("mod_fanout",)]:  # mod_bias defaults to 0, mod_fanout to ones
        variants["endogenous-defaults-" + ("+".join(given) or "none")] = dict(modulation="endogenous", mod_given=given)
    variants.update(
        odd=dict(T=5, B=7, N=37),
        empty_T=dict(T=0), empty_B=dict(B=0), empty_T_no_state=dict(T=0, y0=False, hebb=False),
        no_state=dict(y0=False, hebb=False),
        # A moderate trace keeps tanh away from saturation (float32 is compared too).
        subsets=dict(T=3, B=2, N=4, scale=0.4 / 0.5),
        subsets_modulated=dict(T=3, B=2, N=4, modulation="neuron", scale=0.4 / 0.5),
        gradcheck_hebb=dict(T=4, B=2, N=3), gradcheck_oja=dict(T=4, B=2, N=3, rule="oja"),
        gradcheck_neuron=dict(T=4, B=2, N=3, modulation="neuron"),
        gradcheck_endogenous=dict(T=4, B=2, N=3, modulation="endogenous"),
    )
    return variants


def _plastic_linear_variants():
    variants = {}
    for rule, act, alpha_scalar in itertools.product(["hebb", "oja"], ["tanh", "identity"], [False, True]):
        variants[f"{rule}-{act}-{'alpha0d' if alpha_scalar else 'alpha2d'}"] = dict(
            rule=rule, activation=act, alpha_scalar=alpha_scalar)
    variants.update(odd=dict(T=5, B=7, d_in=37, d_out=3), empty_T=dict(T=0), empty_B=dict(B=0),
                    bare=dict(bias=False, drive=False, hebb=False), subsets=dict(T=3, B=2, d_in=3, d_out=4))
    return variants


@st.composite
def plastic_rnn_knobs(draw):
    # B up to 9 and N up to 40: the CPU kernels take the sequences of a neuron in groups (4 forward,
    # 2 backward) and the connections in vector-wide chunks; these sizes reach full groups, partial
    # groups, the chunked loops and their tails. Identity activation lets activity explode (1e68
    # in one example): those traces are recomputed from checkpoints, so this stays exact too.
    return dict(T=draw(st.integers(0, 9)), B=draw(st.integers(0, 9)), N=draw(st.integers(1, 40)),
                y0=draw(st.booleans()), hebb=draw(st.booleans()),
                activation=draw(st.sampled_from(["tanh", "identity"])), seed=draw(st.integers(0, 2**16)))


@st.composite
def plastic_endogenous_knobs(draw):
    return dict(T=draw(st.integers(0, 9)), B=draw(st.integers(0, 9)), N=draw(st.integers(1, 40)),
                y0=draw(st.booleans()), hebb=draw(st.booleans()), clip=draw(st.sampled_from([None, 0.2])),
                modulation="endogenous", seed=draw(st.integers(0, 2**16)))


@st.composite
def plastic_linear_knobs(draw):
    return dict(T=draw(st.integers(0, 7)), B=draw(st.integers(0, 9)), d_in=draw(st.integers(1, 40)),
                d_out=draw(st.integers(1, 6)), bias=draw(st.booleans()), drive=draw(st.booleans()),
                hebb=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


# ---- neuron_sensitivity --------------------------------------------------------------------------


def sensitivity_sample(dtype=F64, device="cpu", shape=(4, 3, 2), bias=True, layout="contiguous", batch_dims=0,
                       seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = shape[:1 + batch_dims]  # batch_dims: leading dims of a batch of layers (vmap), the bias has them too
    values = dict(weight=_randn(gen, *shape), grad_weight=_randn(gen, *shape),
                  bias=_randn(gen, *rows) if bias else None, grad_bias=_randn(gen, *rows) if bias else None)
    v = _place(values, dtype, device)
    w, g, b, gb = v["weight"], v["grad_weight"], v["bias"], v["grad_bias"]
    if layout == "transposed":
        w, g = w.flatten(1).t().contiguous().t(), g.flatten(1).t().contiguous().t()
    elif layout == "sliced":
        w, g, b, gb = w[::2, :, 1:], g[::2, :, 1:], b[::2], gb[::2]
    elif layout == "channels_last":
        w, g = w.contiguous(memory_format=torch.channels_last), g.contiguous(memory_format=torch.channels_last)
    elif layout == "mixed":  # the weight channels-last, its gradient not
        w = w.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded_bias":
        b = torch.tensor(0.5, dtype=b.dtype, device=device).expand(shape[0])
    return Sample(dict(weight=w, grad_weight=g, bias=b, grad_bias=gb))


@st.composite
def sensitivity_knobs(draw):
    return dict(shape=tuple(draw(st.lists(st.integers(0, 7), min_size=2, max_size=5))), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


# ---- batch_norm_rows / its fused double backward ---------------------------------------------------


def batch_norm_sample(dtype=F64, device="cpu", rows=37, channels=6, layout="contiguous", seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, rows, channels) * 3 + 1
    values = _place(dict(input=x, weight=_randn(gen, channels), bias=_randn(gen, channels)), dtype, device)
    if layout == "transposed":
        values["input"] = values["input"].t().contiguous().t()
    return Sample(values)


def batch_norm_eager(input, weight, bias, eps=1e-5):
    return F.batch_norm(input, None, None, weight, bias, training=True, eps=eps)


def batch_norm_double_backward_sample(dtype=F64, device="cpu", rows=37, channels=6, layout="contiguous",
                                      parts=(True, True, True), seed=3):
    gen = torch.Generator().manual_seed(seed)
    x = _randn(gen, rows, channels) * 3 + 1
    mean = x.mean(0)
    invstd = ((x - mean).pow(2).mean(0) + 1e-5).rsqrt()
    values = dict(u=_randn(gen, rows, channels), u_gamma=_randn(gen, channels), u_beta=_randn(gen, channels),
                  grad_out=_randn(gen, rows, channels), input=x, weight=_randn(gen, channels), mean=mean,
                  invstd=invstd)
    for name, present in zip(("u", "u_gamma", "u_beta"), parts):
        if not present:
            values[name] = None
    values = _place(values, dtype, device)
    if layout == "transposed":
        values["input"] = values["input"].t().contiguous().t()
    return Sample(values)


@st.composite
def batch_norm_double_backward_knobs(draw):
    return dict(rows=draw(st.integers(2, 40)), channels=draw(st.integers(1, 19)), seed=draw(st.integers(0, 2**16)),
                layout=draw(st.sampled_from(["contiguous", "transposed"])),
                parts=tuple(draw(st.lists(st.booleans(), min_size=3, max_size=3))))


# ---- opcheck arguments (the custom ops' own signatures) -------------------------------------------


def _masked_opchecks(backend, device):
    s = conv_sample(F32, device, tasks=2)
    x, w, m, b = (s.tensors[k] for k in ("input", "weight", "mask", "bias"))
    conv_args = (x, w, m, b, [1, 1], [1, 1], [1, 1], 1, False, False, True, backend)
    out, pre = masked_ops.masked_conv2d_op(*conv_args)
    go = torch.randn_like(out).requires_grad_()
    yield masked_ops.masked_conv2d_op, conv_args
    yield masked_ops.masked_conv2d_backward_op, (go, None, x, w, m, pre.detach(), [1, 1], [1, 1], [1, 1], 1, False,
                                                 True, True, True, backend)
    # the input gradient in the caller's layout
    yield masked_ops.masked_conv2d_backward_op, (go, None, x, w, m, pre.detach(), [1, 1], [1, 1], [1, 1], 1, True,
                                                 True, True, True, backend)
    s = linear_sample(F32, device, tasks=2)
    x, w, m, b = (s.tensors[k] for k in ("input", "weight", "mask", "bias"))
    out, pre = masked_ops.masked_linear_op(x, w, m, b, True, backend)
    go = torch.randn_like(out).requires_grad_()
    yield masked_ops.masked_linear_op, (x, w, m, b, True, backend)
    yield masked_ops.masked_linear_backward_op, (go, go, x, w, m, pre.detach(), False, True, False, backend)


def _leaves(tensors):
    return {k: None if v is None else v.detach().requires_grad_() for k, v in tensors.items()}


def _plastic_opchecks(backend, device):
    a = _leaves(plastic_rnn_sample(F32, device, T=3, B=2, N=3).tensors)
    yield plastic_ops.plastic_op, (a["input"], a["weight"], a["alpha"], a["eta"], a["hebb"], None, None, a["y0"],
                                   None, None, True, "hebb", "tanh", 2, None, None, None, True, backend)
    a = _leaves(plastic_linear_sample(F32, device, T=3, B=2).tensors)
    yield plastic_ops.plastic_op, (a["input"], a["weight"], a["alpha"], a["eta"], None, a["bias"], a["drive"], None,
                                   None, None, False, "oja", "identity", 16, None, None, None, True, backend)
    a = _leaves(plastic_rnn_sample(F32, device, T=3, B=2, N=3, modulation="endogenous").tensors)
    yield plastic_ops.plastic_op, (a["input"], a["weight"], a["alpha"], a["eta"], a["hebb"], None, None, a["y0"],
                                   None, 0.5, True, "hebb", "tanh", 2, a["mod_weight"], a["mod_bias"],
                                   a["mod_fanout"], False, backend)


def _sensitivity_opchecks(backend, device):
    for bias in (True, False):
        t = sensitivity_sample(F32, device, shape=(6, 3, 2), bias=bias).tensors
        yield sensitivity_ops.neuron_sensitivity_op, (t["weight"].requires_grad_(), t["grad_weight"], t["bias"],
                                                      t["grad_bias"], backend)


def _batch_norm_opchecks(backend, device):
    for parts in ((True, True, True), (False, True, False)):
        t = batch_norm_double_backward_sample(F32, device, rows=7, channels=3, parts=parts).tensors
        yield bn_ops.batch_norm_rows_double_backward_op, (*t.values(), backend)


# ---- the table ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    name: str
    fn: Callable  # the public function, called as fn(**tensors, **options)
    reference: Callable  # plain PyTorch, same signature
    sample: Callable  # sample(dtype, device, **knobs) -> Sample
    registry: str  # its entry in nf.backends.ops(): which backend runs it in which dtype
    grad_inputs: tuple = ()
    variants: dict = field(default_factory=lambda: {"base": {}})
    # Variants also compared in every other dtype the backend supports (the rest: float64 only).
    dtype_variants: tuple = ("base",)
    dtypes: tuple = (F64, F32, F16, BF16)
    tol: dict = field(default_factory=dict)
    # Random shapes: name -> (hypothesis strategy of knobs, max_examples).
    strategies: dict = field(default_factory=dict)
    subsets_variants: tuple = ()
    gradcheck_variants: tuple = ()
    gradgradcheck: bool = False
    # Second order against the reference: (variant, every subset of the first-order gradients weighted?)
    second_order: tuple = ()
    second_order_dtypes: tuple = (F64,)
    opchecks: Optional[Callable] = None
    # vmap: (variant, in_dims per tensor name; the rest unbatched)
    vmap: tuple = ()
    # torch.compile(fullgraph=True): (variant, compiler, backends or None for every backend)
    compile: tuple = ()
    # torch.func.grad, first and second order: variants
    functorch: tuple = ()
    # The Triton interpreter and the CUDA emulation are slow: gradcheck random directions there (fast_mode)
    fast_gradcheck_emulated: bool = False
    # "reference" as a backend too: the public op on the reference backend is not the reference itself
    reference_backend: bool = False
    out_dtype: Callable = staticmethod(lambda dtype: dtype)
    skip: Callable = staticmethod(lambda backend, device, dtype, variant: None)


def _triton_bf16_dot(backend, device, dtype, variant):
    if backend == "triton" and device == "cpu" and dtype == BF16:
        return "the Triton interpreter's tl.dot multiplies bfloat16 bit patterns (triton-lang/triton#11584)"
    return None


TOL = {F64: (1e-10, 1e-10), F32: (1e-4, 1e-4), F16: (2e-2, 2e-2), BF16: (1e-1, 1e-1)}

_MASKED_COMMON = dict(
    grad_inputs=("input", "weight", "mask", "bias"), registry="masked_conv2d", tol=TOL, dtype_variants=("base",),
    gradgradcheck=True, skip=_triton_bf16_dot, fast_gradcheck_emulated=True,
)

OPS = {
    "masked_conv2d": Op(
        "masked_conv2d", nf.masked_conv2d, masked_ops.masked_conv2d_reference, conv_sample,
        variants=dict(
            base={}, odd=dict(batch=1, c_in=3, c_out=5, h=7, w=5, k=(3, 1), stride=(2, 1), padding=(1, 0), dilation=2),
            groups=dict(groups=2), tasks=dict(tasks=3), empty=dict(batch=0), zero_mask=dict(zeros=1.0),
            no_skip=dict(skip_zero=False), channels_last=dict(layout="channels_last"), sliced=dict(layout="sliced"),
            transposed_weight=dict(layout="transposed_weight"),
            wide=dict(tasks=3, batch=2, c_in=16, c_out=32, h=7, w=7, zeros=0.5, bias=True),
            # one pruned neuron (exact 0, skipped) and one fractional mask value
            subsets=dict(batch=2, c_in=2, c_out=3, h=4, w=4, mask=[1.0, 0.0, 0.6]),
            **{f"gradcheck-tasks{t}-skip{s}": dict(tasks=t, skip_zero=s, batch=2, h=4, w=4, c_out=4)
               for t in (None, 2) for s in (True, False)},
            maml=dict(tasks=2, zeros=0.3),
        ),
        dtype_variants=("base", "wide"),
        strategies={"random": (conv_knobs().filter(_conv_fits), 20)},
        subsets_variants=("subsets",),
        gradcheck_variants=tuple(f"gradcheck-tasks{t}-skip{s}" for t in (None, 2) for s in (True, False)),
        second_order=(("maml", False),),
        functorch=("maml",),
        vmap=(("tasks", dict(input=0, weight=0, mask=0, bias=0)),),
        compile=(("base", "inductor", ("cpu",)),),
        opchecks=_masked_opchecks,  # the conv's and the linear's ops
        **{k: v for k, v in _MASKED_COMMON.items() if k != "dtype_variants"},
    ),
    "masked_linear": Op(
        "masked_linear", nf.masked_linear, masked_ops.masked_linear_reference, linear_sample,
        variants=dict(
            base={}, odd=dict(lead=(2, 3), d_in=7, d_out=3), tasks=dict(tasks=4), empty=dict(lead=(0,)),
            zero_mask=dict(zeros=1.0), no_skip=dict(skip_zero=False), transposed=dict(lead=(6,), layout="transposed"),
            subsets=dict(lead=(4,), d_in=5, d_out=3, mask=[1.0, 0.0, 0.6]),
            **{f"gradcheck-tasks{t}-skip{s}": dict(tasks=t, skip_zero=s, lead=(3,), d_out=4)
               for t in (None, 2) for s in (True, False)},
        ),
        strategies={"random": (linear_knobs(), 20)},
        subsets_variants=("subsets",),
        gradcheck_variants=tuple(f"gradcheck-tasks{t}-skip{s}" for t in (None, 2) for s in (True, False)),
        second_order=(("tasks", False),),
        functorch=("tasks",),
        vmap=(("tasks", dict(input=0, weight=0, mask=0, bias=0)),),
        compile=(("base", "inductor", ("cpu",)),),
        **_MASKED_COMMON,
    ),
    "plastic_linear": Op(
        "plastic_linear", nf.plastic_linear, plastic_ops.plastic_linear_reference, plastic_linear_sample,
        registry="plastic", grad_inputs=("input", "weight", "alpha", "eta", "hebb", "bias", "drive"),
        variants=_plastic_linear_variants(), dtype_variants=("hebb-tanh-alpha2d", "subsets"), dtypes=(F64, F32),
        tol={F64: (1e-10, 1e-8), F32: (1e-4, 1e-4)},
        strategies={"random": (plastic_linear_knobs(), 10)}, subsets_variants=("subsets",),
        opchecks=_plastic_opchecks,
    ),
    "plastic_rnn": Op(
        "plastic_rnn", nf.plastic_rnn, plastic_ops.plastic_rnn_reference, plastic_rnn_sample, registry="plastic",
        grad_inputs=("input", "weight", "alpha", "eta", "y0", "hebb", "modulation", "mod_weight", "mod_bias",
                     "mod_fanout"),
        variants=_plastic_rnn_variants(), dtype_variants=("subsets", "subsets_modulated"), dtypes=(F64, F32),
        tol={F64: (1e-10, 1e-8), F32: (1e-4, 1e-4)},
        strategies={"random": (plastic_rnn_knobs(), 10), "endogenous": (plastic_endogenous_knobs(), 8)},
        subsets_variants=("subsets", "subsets_modulated"),
        gradcheck_variants=("gradcheck_hebb", "gradcheck_oja", "gradcheck_neuron", "gradcheck_endogenous"),
        compile=(("gradcheck_hebb", "inductor", ("cpu",)),),
    ),
    "neuron_sensitivity": Op(
        "neuron_sensitivity", nf.neuron_sensitivity, sensitivity_ops.neuron_sensitivity_reference,
        sensitivity_sample, registry="neuron_sensitivity",
        grad_inputs=("weight", "grad_weight", "bias", "grad_bias"),
        variants=dict(
            base={}, unit=dict(shape=(1, 1)), conv=dict(shape=(64, 64, 3, 3)), wide=dict(shape=(37, 1001)),
            five_d=dict(shape=(5, 3, 7, 1, 2)), tall=dict(shape=(300, 2)), half=dict(shape=(256, 64, 3, 3)),
            matrix=dict(shape=(5, 7)), no_bias=dict(bias=False),
            transposed=dict(shape=(6, 5, 3, 3), layout="transposed"), sliced=dict(shape=(6, 5, 3, 3), layout="sliced"),
            channels_last=dict(shape=(6, 5, 3, 3), layout="channels_last"),
            expanded_bias=dict(shape=(6, 5, 3, 3), layout="expanded_bias"),
            mixed=dict(shape=(4, 3, 2, 5), layout="mixed"),
            empty_rows=dict(shape=(0, 3)), empty_cols=dict(shape=(3, 0)), empty_conv=dict(shape=(0, 0, 3, 3)),
            empty_kernel=dict(shape=(2, 0, 3, 3)),
            layers=dict(shape=(3, 5, 4, 2), batch_dims=1), compile=dict(shape=(8, 4, 3, 3)),
            compile_backward=dict(shape=(5, 3, 2)),
        ),
        dtype_variants=("unit", "conv", "wide", "five_d", "tall", "half"),
        tol={F64: (1e-12, 1e-12), F32: (1e-4, 1e-4), F16: (1e-2, 1e-3), BF16: (1e-2, 1e-3)},
        strategies={"random": (sensitivity_knobs(), 20)}, subsets_variants=("base",),
        gradcheck_variants=("base", "no_bias"), gradgradcheck=True, second_order=(("base", False),),
        opchecks=_sensitivity_opchecks,
        vmap=(("layers", dict(weight=0, grad_weight=0, bias=0, grad_bias=0)),
              ("layers", dict(weight=0, bias=0))),  # one gradient shared by every layer
        compile=(("compile", "inductor", ("cpu",)), ("compile_backward", "aot_eager", None)),
        # 16-bit inputs give the float32 accumulator (README)
        out_dtype=staticmethod(_alloc.accumulation_dtype),
    ),
    "batch_norm_rows": Op(
        "batch_norm_rows", bn_ops.batch_norm_rows, batch_norm_eager, batch_norm_sample,
        registry="batch_norm_rows_double_backward", grad_inputs=("input", "weight", "bias"),
        variants=dict(base={}, transposed=dict(layout="transposed"), odd=dict(rows=2, channels=1),
                      gradcheck=dict(rows=6, channels=3, seed=11), compile=dict(rows=9, channels=4, seed=2)),
        dtypes=(F64, F32), tol={F64: (1e-10, 1e-10), F32: (2e-5, 2e-5)},
        subsets_variants=("base",), gradcheck_variants=("gradcheck",), gradgradcheck=True,
        second_order=(("base", True),), second_order_dtypes=(F64, F32),
        compile=(("compile", "inductor", ("cpu", "reference")),), reference_backend=True,
        opchecks=_batch_norm_opchecks,
    ),
    "batch_norm_rows_double_backward": Op(
        "batch_norm_rows_double_backward", bn_ops.batch_norm_rows_double_backward,
        bn_ops.batch_norm_rows_double_backward_reference, batch_norm_double_backward_sample,
        registry="batch_norm_rows_double_backward",
        variants={f"{layout}-{''.join('ugb'[i] if p else '_' for i, p in enumerate(parts))}":
                  dict(layout=layout, parts=parts)
                  for layout in ("contiguous", "transposed") for parts in itertools.product([True, False], repeat=3)},
        dtype_variants=("contiguous-ugb",), dtypes=(F64, F32), tol={F64: (1e-10, 1e-10), F32: (2e-5, 2e-5)},
        strategies={"random": (batch_norm_double_backward_knobs(), 20)},
    ),
}


def backends_of(op):
    """(backend, device) pairs that run ``op`` here (the reference backend where the op is not the reference)."""
    from conftest import kernel_backends

    supported = nf.backends.ops()[op.registry].dtypes
    pairs = [(p.values[0], p.values[1]) for p in kernel_backends() if p.values[0] in supported]
    if op.reference_backend:
        pairs.insert(0, ("reference", "cpu"))
    return pairs


def dtypes_of(op, backend):
    supported = nf.backends.ops()[op.registry].dtypes[backend]
    return [d for d in op.dtypes if d in supported]


# ---- running and comparing -------------------------------------------------------------------------


def leaves(sample, wanted, dtype=None, device=None):
    """The sample's tensors as fresh leaves (strides kept), ``wanted`` requiring grad; cast if asked."""
    out = {}
    for k, v in sample.tensors.items():
        if v is None:
            out[k] = None
            continue
        v = v.detach()
        if dtype is not None and v.dtype != dtype:
            v = v.to(dtype)
        if device is not None:
            v = v.to(device)
        out[k] = v.requires_grad_(k in wanted)
    return out


def _flat(outputs):
    return outputs if isinstance(outputs, (tuple, list)) else (outputs,)


def upstream(outputs, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=F64).to(o) for o in _flat(outputs)]


def gradients(outputs, args, wanted, seed=11, create_graph=False, weights=None):
    """Gradients of a random projection of ``outputs`` w.r.t. ``args[wanted]`` (None where unused)."""
    outs = _flat(outputs)
    weights = upstream(outs, seed) if weights is None else weights
    loss = sum((o * u).sum() for o, u in zip(outs, weights))
    inputs = [args[k] for k in wanted]
    if not inputs:
        return []
    if not (isinstance(loss, torch.Tensor) and loss.requires_grad):
        return [None] * len(inputs)
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph))


def call(op, backend, args, options):
    with nf.use_backend(backend), _alloc.poisoned():
        return op.fn(**args, **options)


def assert_close(got, want, *, op, backend, dtype, what, tol=None, scale_atol=None):
    """``got`` against ``want`` (nested tuples, lists, dicts of tensors; None where a gradient is
    absent, which matches an all-zero tensor), compared in float64. The message names the op, the
    backend, the dtype and which output differs. float64 tolerances are absolute; in the lower
    precisions atol is relative to the largest magnitude of the reference."""
    op_name = op if isinstance(op, str) else op.name
    if tol is None:
        tol = OPS[op_name].tol.get(dtype, TOL[dtype]) if op_name in OPS else TOL[dtype]
    atol, rtol = tol
    scale_atol = dtype not in (F64,) if scale_atol is None else scale_atol
    where = f"{op_name} on {backend} ({str(dtype).replace('torch.', '')}): {what}"
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys {sorted(got)} != {sorted(want)}"
        for k in want:
            assert_close(got[k], want[k], op=op_name, backend=backend, dtype=dtype, what=f"{what}[{k!r}]", tol=tol,
                         scale_atol=scale_atol)
        return
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), \
            f"{where}: {len(got)} outputs, want {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, op=op_name, backend=backend, dtype=dtype, what=f"{what}[{i}]", tol=tol,
                         scale_atol=scale_atol)
        return
    if want is None or got is None:
        present = want if got is None else got
        assert present is None or torch.count_nonzero(present) == 0, f"{where}: a gradient where the other has none"
        return
    assert got.shape == want.shape, f"{where}: shape {list(got.shape)}, want {list(want.shape)}"
    g, w = got.detach().cpu().double(), want.detach().cpu().double()
    if scale_atol and w.numel():
        atol = atol * max(1.0, w.abs().nan_to_num().max().item())
    torch.testing.assert_close(g, w, atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{where} differs: {m}")


def well_posed(op, sample):
    """Whether the reference's outputs and gradients on ``sample`` are finite. A random draw can
    overflow float64 (an identity activation under Hebbian growth compounds past 1e308 in a few
    steps), and where the oracle itself is inf or NaN there is nothing to compare."""
    wanted = sample.differentiable(op.grad_inputs)
    args = leaves(sample, wanted, dtype=F64)
    want = op.reference(**args, **sample.options)
    grads = gradients(want, args, wanted) if wanted else []
    return all(bool(torch.isfinite(t).all()) for t in (*_flat(want), *grads) if t is not None)


def check_against_reference(op, backend, device, dtype, sample, wanted=None, grads=True, what=""):
    """The op on ``backend`` against its reference on float64 copies of the same inputs: the outputs
    (NaN-poisoned buffers, so an unwritten element fails) and, where ``grads``, the gradients of a
    random projection w.r.t. ``wanted`` (default: every differentiable input). Returns the outputs."""
    wanted = sample.differentiable(op.grad_inputs) if wanted is None else tuple(wanted)
    wanted = wanted if grads else ()
    args = leaves(sample, wanted)
    out = call(op, backend, args, sample.options)
    ref_args = leaves(sample, wanted, dtype=F64)
    want = op.reference(**ref_args, **sample.options)
    label = f"{what} " if what else ""
    for o in _flat(out):
        assert o.dtype == op.out_dtype(dtype), \
            f"{op.name} on {backend}: {label}output dtype {o.dtype}, want {op.out_dtype(dtype)}"
    assert_close(out, want, op=op, backend=backend, dtype=dtype, what=f"{label}output")
    if wanted:
        with nf.use_backend(backend), _alloc.poisoned():
            got_g = gradients(out, args, wanted)
        want_g = gradients(want, ref_args, wanted)
        assert_close(dict(zip(wanted, got_g)), dict(zip(wanted, want_g)), op=op, backend=backend, dtype=dtype,
                     what=f"{label}grad with {'+'.join(wanted)} requiring grad")
    return out
