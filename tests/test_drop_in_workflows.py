"""The code researchers already run, on a converted model: each workflow against the same model
built from plain nn.Conv2d / nn.Linear with the same parameters, in float64.

Workflows: second-order MAML through torch.func.functional_call and torch.autograd.grad; torch.func
vmap over tasks (of a forward, and of torch.func.grad: MAML the functorch way); higher's
innerloop_ctx and torchopt's MetaSGD and functional sgd; torch.compile (default, dynamic=True,
fullgraph) and torch.export; copy.deepcopy and torch.save / torch.load; DistributedDataParallel
on 2 gloo processes; a torchvision ResNet-18 converted and exported back; a PlasticRNN inside a
module trained with torch.compile.

Where the math is the same the results are equal to float64 rounding (the kernels sum in another
order than ATen's convolutions, so not bit for bit): TIGHT below.
"""

import copy
import datetime
import io
import socket
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import neuronml_fast as nf
from conftest import gpu_backends
from neuronml_fast.nn import MaskedBatchNorm2d, MaskedConv2d, MaskedLinear

TIGHT = dict(rtol=1e-9, atol=1e-12)
BACKENDS = ["cpu", "reference"]
WAYS = 3


# ---- the models: written as researchers write them ---------------------------------------------


class Conv4(nn.Module):
    """MAML's Conv4 at a small size: [3x3 conv, BatchNorm, ReLU, 2x2 max-pool] blocks, then a linear
    classifier on ``x.view(x.size(0), -1)``."""

    def __init__(self, in_channels=3, hidden=4, blocks=2, image=8, ways=WAYS):
        super().__init__()
        layers = []
        for i in range(blocks):
            layers += [nn.Conv2d(in_channels if i == 0 else hidden, hidden, 3, padding=1), nn.BatchNorm2d(hidden),
                       nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(hidden * (image >> blocks) ** 2, ways)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class SmallNet(nn.Module):
    """A BatchNorm-free CNN (DDP without SyncBatchNorm: each rank's batch statistics would differ)."""

    def __init__(self, in_channels=3, ways=WAYS):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.fc = nn.Linear(6 * 3 * 3, ways)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


def twins(make, **options):
    """``(plain, converted)``: a float64 model and its converted copy, with equal parameters."""
    torch.manual_seed(0)
    plain = make(**options).double()
    converted = nf.nn.convert(copy.deepcopy(plain))
    masked = [m for m in converted.modules() if isinstance(m, (MaskedConv2d, MaskedLinear))]
    assert masked and not any(isinstance(m, (MaskedConv2d, MaskedLinear)) for m in plain.modules())
    return plain, converted


def images(n, channels=3, size=8, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=gen, dtype=torch.float64)


def labels(n, seed=2):
    return torch.randint(0, WAYS, (n,), generator=torch.Generator().manual_seed(seed))


def episode(tasks=2, shots=2, queries=3, channels=3, size=8):
    """(xs, ys, xq, yq) with a leading task dimension."""
    return (torch.stack([images(WAYS * shots, channels, size, seed=10 + t) for t in range(tasks)]),
            torch.stack([labels(WAYS * shots, seed=20 + t) for t in range(tasks)]),
            torch.stack([images(WAYS * queries, channels, size, seed=30 + t) for t in range(tasks)]),
            torch.stack([labels(WAYS * queries, seed=40 + t) for t in range(tasks)]))


def assert_all_close(got, want, **tolerance):
    tolerance = tolerance or TIGHT
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    else:
        assert len(got) == len(want)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **tolerance)


# ---- second-order MAML: torch.func.functional_call + torch.autograd.grad(create_graph=True) -------


def maml_meta_gradients(model, batch, inner_steps, inner_lr=0.3):
    """Finn et al.'s MAML as learn2learn-free research code writes it: fast weights in a dict, the
    model called with torch.func.functional_call, second order through create_graph=True."""
    params = dict(model.named_parameters())
    meta_loss = 0.0
    for xs, ys, xq, yq in zip(*batch):
        fast = params
        for _ in range(inner_steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs,)), ys)
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - inner_lr * g for (name, p), g in zip(fast.items(), grads)}
        meta_loss = meta_loss + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    meta_loss = meta_loss / len(batch[0])
    return float(meta_loss.detach()), dict(zip(params, torch.autograd.grad(meta_loss, list(params.values()))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("inner_steps", [1, 2])
def test_second_order_maml_with_functional_call(backend, inner_steps):
    plain, converted = twins(Conv4)
    batch = episode()
    want_loss, want = maml_meta_gradients(plain, batch, inner_steps)
    with nf.use_backend(backend):
        loss, got = maml_meta_gradients(converted, batch, inner_steps)
    assert loss == pytest.approx(want_loss, rel=1e-12)
    assert_all_close(got, want)
    # BatchNorm in train mode: both models' running statistics moved the same way.
    want_buffers, got_buffers = dict(plain.named_buffers()), dict(converted.named_buffers())
    assert_all_close({name: got_buffers[name] for name in want_buffers}, want_buffers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_order_maml_on_one_channel_images(backend):
    # Omniglot's first layer: an [N, 1, H, W] input is contiguous and channels_last at once, and the
    # model's x.view(x.size(0), -1) needs the contiguous output F.conv2d gives it.
    plain, converted = twins(Conv4, in_channels=1)
    batch = episode(channels=1)
    want = maml_meta_gradients(plain, batch, 1)[1]
    with nf.use_backend(backend):
        got = maml_meta_gradients(converted, batch, 1)[1]
    assert_all_close(got, want)


# ---- torch.func.vmap over tasks ---------------------------------------------------------------


def stacked(model, tasks):
    """Per-task copies of the parameters, stacked on a leading task dimension (perturbed per task)."""
    gen = torch.Generator().manual_seed(5)
    return {name: (p.detach().unsqueeze(0) + 0.1 * torch.randn(tasks, *p.shape, generator=gen, dtype=p.dtype))
            .requires_grad_() for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_over_task_parameters_and_data(backend):
    # An ensemble (or a batch of adapted learners): one functional_call per task, each with its own
    # parameters and images, vmapped; the outer loss backpropagates to every task's parameters.
    plain, converted = twins(Conv4)
    plain.eval(), converted.eval()
    xs, ys = episode()[:2]

    def run(model):
        params = stacked(model, len(xs))
        logits = torch.func.vmap(lambda p, x: functional_call(model, p, (x,)))(params, xs)
        loss = F.cross_entropy(logits.flatten(0, 1), ys.flatten())
        return [logits.detach(), *torch.autograd.grad(loss, list(params.values()))]

    want = run(plain)
    with nf.use_backend(backend):
        got = run(converted)
    assert_all_close(got, want)


def functorch_maml_meta_gradients(model, batch, inner_lr=0.3):
    """MAML the functorch way: vmap over tasks of a query loss after a torch.func.grad inner step,
    differentiated by torch.func.grad. BatchNorm with batch statistics (no running statistics,
    which a transform cannot update in place)."""
    params = {name: p.detach() for name, p in model.named_parameters()}

    def support_loss(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    def query_loss(p, xs, ys, xq, yq):
        g = torch.func.grad(support_loss)(p, xs, ys)
        fast = {name: p[name] - inner_lr * g[name] for name in p}
        return F.cross_entropy(functional_call(model, fast, (xq,)), yq)

    def meta_loss(p):
        return torch.func.vmap(query_loss, in_dims=(None, 0, 0, 0, 0))(p, *batch).mean()

    return torch.func.grad(meta_loss)(params)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make", [Conv4, SmallNet], ids=["conv4", "no-batch-norm"])
def test_functorch_maml_vmap_of_grad_over_tasks(backend, make):
    plain, converted = twins(make, **({"blocks": 1} if make is Conv4 else {}))
    for model in (plain, converted):
        torch.func.replace_all_batch_norm_modules_(model)
    batch = episode()
    want = functorch_maml_meta_gradients(plain, batch)
    with nf.use_backend(backend):
        got = functorch_maml_meta_gradients(converted, batch)
    assert_all_close(got, want)
    if make is SmallNet:
        # Second order indeed: the meta-gradient of torch.autograd's MAML. (Through BatchNorm,
        # torch.func's own second-order gradients differ from it by about 2 %, with plain layers too.)
        assert_all_close(got, maml_meta_gradients(plain, batch, 1)[1])


# ---- higher and torchopt ------------------------------------------------------------------------


def higher_meta_gradients(model, batch, inner_steps, inner_lr=0.3):
    """MAML with higher (Grefenstette et al.): innerloop_ctx around a plain torch.optim.SGD."""
    higher = pytest.importorskip("higher")
    inner_opt = torch.optim.SGD(model.parameters(), lr=inner_lr)
    model.zero_grad(set_to_none=True)
    tasks = len(batch[0])
    for xs, ys, xq, yq in zip(*batch):
        with higher.innerloop_ctx(model, inner_opt, copy_initial_weights=False) as (fmodel, diffopt):
            for _ in range(inner_steps):
                diffopt.step(F.cross_entropy(fmodel(xs), ys))
            (F.cross_entropy(fmodel(xq), yq) / tasks).backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_maml_with_higher_innerloop_ctx(backend):
    plain, converted = twins(Conv4)
    batch = episode()
    want = higher_meta_gradients(plain, batch, 2)
    with nf.use_backend(backend):
        got = higher_meta_gradients(converted, batch, 2)
    assert_all_close(got, want)


def test_maml_with_higher_on_a_gated_model_equals_functional_call():
    """higher's innerloop_ctx rebuilds the module tree without copy's memo: its masked BatchNorms keep
    the reference to the original layers, and must still apply the masks the fast gates give."""
    torch.manual_seed(0)
    model = nf.nn.convert(Conv4().double(), gate=True)
    batch = episode()
    with nf.use_backend("reference"):
        want = maml_meta_gradients(model, batch, 2)[1]
        got = higher_meta_gradients(model, batch, 2)
    assert_all_close(got, want)


def torchopt_meta_sgd_gradients(model, batch, inner_steps, inner_lr=0.3):
    """MAML with torchopt's MetaSGD: the module's parameters are replaced by the differentiable
    update, and restored after each task (torchopt's own MAML example)."""
    torchopt = pytest.importorskip("torchopt")
    inner_opt = torchopt.MetaSGD(model, lr=inner_lr)
    model.zero_grad(set_to_none=True)
    model_state = torchopt.extract_state_dict(model, by="reference", detach_buffers=True)
    opt_state = torchopt.extract_state_dict(inner_opt)
    tasks = len(batch[0])
    for xs, ys, xq, yq in zip(*batch):
        for _ in range(inner_steps):
            inner_opt.step(F.cross_entropy(model(xs), ys))
        (F.cross_entropy(model(xq), yq) / tasks).backward()
        torchopt.recover_state_dict(model, model_state)
        torchopt.recover_state_dict(inner_opt, opt_state)
    return {name: p.grad for name, p in model.named_parameters()}


def torchopt_functional_gradients(model, batch, inner_steps, inner_lr=0.3):
    """MAML with torchopt's functional optimizer: torchopt.sgd's update, torchopt.apply_updates
    (inplace=False) and torch.func.functional_call."""
    torchopt = pytest.importorskip("torchopt")
    params = dict(model.named_parameters())
    optimizer = torchopt.sgd(lr=inner_lr)
    meta_loss = 0.0
    for xs, ys, xq, yq in zip(*batch):
        fast, state = params, optimizer.init(params)
        for _ in range(inner_steps):
            loss = F.cross_entropy(functional_call(model, fast, (xs,)), ys)
            grads = dict(zip(fast, torch.autograd.grad(loss, list(fast.values()), create_graph=True)))
            updates, state = optimizer.update(grads, state, inplace=False)
            fast = torchopt.apply_updates(fast, updates, inplace=False)
        meta_loss = meta_loss + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    grads = torch.autograd.grad(meta_loss / len(batch[0]), list(params.values()))
    return dict(zip(params, grads))


def test_maml_with_torchopt_on_a_gated_model_equals_functional_call():
    # NeuronML's set-up: gates learned in the inner loop too (no plain twin to compare with).
    torch.manual_seed(0)
    model = nf.nn.convert(Conv4().double(), gate=True)
    batch = episode()
    with nf.use_backend("cpu"):
        want = maml_meta_gradients(model, batch, 2)[1]
        got = torchopt_meta_sgd_gradients(model, batch, 2)
    assert any(name.endswith("gate.logits") for name in got)
    assert_all_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("api", ["MetaSGD", "functional"])
def test_maml_with_torchopt(backend, api):
    run = torchopt_meta_sgd_gradients if api == "MetaSGD" else torchopt_functional_gradients
    plain, converted = twins(Conv4)
    batch = episode()
    want = run(plain, batch, 2)
    with nf.use_backend(backend):
        got = run(converted, batch, 2)
    assert_all_close(got, want)
    # And the same meta-gradient as plain second-order MAML (the libraries are not a no-op).
    assert_all_close(want, maml_meta_gradients(twins(Conv4)[0], batch, 2)[1])


# ---- torch.compile and torch.export ---------------------------------------------------------------


def outputs_and_gradients(model, x, y):
    """The logits, and the gradients of the loss to the input and to every parameter."""
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    F.cross_entropy(logits, y).backward()
    return [logits.detach(), x.grad, *(p.grad for p in model.parameters())]


# Inductor takes 20-70 s a case here with a cold cache: one case in the quick run, the rest marked slow.
COMPILE_CASES = [pytest.param({"fullgraph": True}, True, id="fullgraph-train")] + [
    pytest.param(options, train, id=f"{name}-{'train' if train else 'eval'}", marks=pytest.mark.slow)
    for name, options in [("default", {}), ("dynamic", {"dynamic": True}), ("fullgraph", {"fullgraph": True})]
    for train in (True, False) if (name, train) != ("fullgraph", True)]


@pytest.mark.parametrize("options, train", COMPILE_CASES)
def test_torch_compile_of_a_converted_model(options, train):
    plain, converted = twins(Conv4)
    plain.train(train), converted.train(train)
    torch._dynamo.reset()
    compiled = torch.compile(converted, **options)
    with nf.use_backend("cpu"):
        for n in (6, 9):  # a second batch size: recompiles, or runs the dynamic graph
            x, y = images(n), labels(n)
            assert_all_close(outputs_and_gradients(compiled, x, y), outputs_and_gradients(plain, x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_export_of_a_converted_model(backend):
    plain, converted = twins(Conv4)
    plain.eval(), converted.eval()
    x, y = images(6), labels(6)
    with nf.use_backend(backend):
        exported = torch.export.export(converted, (x,))
        # A batch size other than the traced one needs a dynamic dimension.
        dynamic = torch.export.export(converted, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
        module = exported.module()
        got = outputs_and_gradients(module, x, y)
        got_dynamic = dynamic.module()(images(9))
    want = outputs_and_gradients(plain, x, y)
    assert_all_close(got[:2], want[:2])  # the exported module's parameters are its own: compare by name
    assert_all_close({name: p.grad for name, p in module.named_parameters()},
                     {name: p.grad for name, p in plain.named_parameters()})
    assert_all_close([got_dynamic], [plain(images(9)).detach()])


# ---- copy.deepcopy, torch.save / torch.load ----------------------------------------------------------


def prune(layer, neuron):
    """Prunes ``neuron`` of ``layer`` where its mask comes from: its gate, else its mask buffer."""
    with torch.no_grad():
        if layer.gate is not None:
            layer.gate.logits[neuron] = -10.0
        else:
            layer.mask[neuron] = 0.0


def pruned(model):
    """``model`` with one neuron of its first conv pruned: the link from that conv to its BatchNorm matters."""
    prune(model.features[0], 1)
    return model


def assert_same_model(copied, original):
    """Equal outputs (train and eval), and the copy's BatchNorms follow the copy's own layers."""
    x = images(6)
    for train in (True, False):
        copied.train(train), original.train(train)
        torch.testing.assert_close(copied(x), original(x), rtol=0, atol=0)
    for name, norm in copied.named_modules():
        if isinstance(norm, MaskedBatchNorm2d):
            source = norm.mask_source
            assert any(source is m for m in copied.modules()), f"{name} follows a layer outside the copy"
    # The copy's link is live: pruning another neuron in the copy silences it after its BatchNorm.
    prune(copied.features[0], 2)
    assert (copied.features[:3](x)[:, 2] == 0).all()
    assert not (original.features[:3](x)[:, 2] == 0).all()


@pytest.mark.parametrize("gate", [False, True])
def test_deepcopy_of_a_converted_model(gate):
    torch.manual_seed(0)
    original = pruned(nf.nn.convert(Conv4().double(), gate=gate))
    assert_same_model(copy.deepcopy(original), original)


@pytest.mark.parametrize("gate", [False, True])
def test_torch_save_and_load_of_the_whole_module(gate):
    torch.manual_seed(0)
    original = pruned(nf.nn.convert(Conv4().double(), gate=gate))
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    assert_same_model(torch.load(buffer, weights_only=False), original)


@pytest.mark.parametrize("gate", [False, True])
def test_torch_save_and_load_of_the_state_dict(gate):
    torch.manual_seed(0)
    original = pruned(nf.nn.convert(Conv4().double(), gate=gate))
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer)  # weights_only=True, torch's default
    torch.manual_seed(1)
    fresh = nf.nn.convert(Conv4().double())
    fresh.load_state_dict(state, strict=True)
    assert_same_model(fresh, original)


def test_a_plain_state_dict_loads_into_the_converted_model():
    plain, _ = twins(Conv4)
    buffer = io.BytesIO()
    torch.save(plain.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    converted = nf.nn.convert(Conv4().double())
    converted.load_state_dict(torch.load(buffer), strict=True)
    x = images(6)
    for train in (True, False):
        plain.train(train), converted.train(train)
        assert_all_close([converted(x)], [plain(x)])


# ---- DistributedDataParallel, 2 gloo processes ----------------------------------------------------

DDP_STEPS, DDP_BATCH, DDP_LR = 3, 8, 0.5
DDP_DEADLINE_S = 120  # 2 fresh processes importing torch on a busy 2-core machine


def ddp_data():
    return images(DDP_BATCH, seed=7), labels(DDP_BATCH, seed=8)


def train_steps(model, x, y, on_loss=None):
    """Plain SGD steps; the loss of each step, before its update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=DDP_LR)
    losses = []
    for _ in range(DDP_STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach() if on_loss is None else on_loss(loss.detach()))
    return torch.stack(losses)


def ddp_worker(rank, world_size, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=30))
    try:
        _, converted = twins(SmallNet)
        model = nn.parallel.DistributedDataParallel(converted)
        x, y = ddp_data()
        share = DDP_BATCH // world_size
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]

        def global_loss(loss):  # the mean of the ranks' losses: the loss of the whole batch
            dist.all_reduce(loss)
            return loss / world_size

        with nf.use_backend("cpu"):
            losses = train_steps(model, x, y, global_loss)
        if rank == 0:
            torch.save({"losses": losses, "state": converted.state_dict()}, out)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_data_parallel_on_two_gloo_processes_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "ddp.pt")
    context = mp.spawn(ddp_worker, args=(2, free_port(), out), nprocs=2, join=False)
    deadline = time.monotonic() + DDP_DEADLINE_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the DDP processes ran past {DDP_DEADLINE_S} s: a hang")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    result = torch.load(out)
    plain, _ = twins(SmallNet)
    want = train_steps(plain, *ddp_data())
    assert bool(want[-1] < want[0])  # it trains
    assert_all_close([result["losses"]], [want])
    state = {name: t for name, t in result["state"].items() if not name.endswith(".mask")}
    assert_all_close(state, plain.state_dict())


# ---- torchvision's ResNet-18 --------------------------------------------------------------------


def resnet18():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.resnet18(weights=None, num_classes=10)


def test_convert_of_a_torchvision_resnet18():
    plain, converted = twins(resnet18)
    assert sum(isinstance(m, MaskedConv2d) for m in converted.modules()) == 20
    assert sum(isinstance(m, MaskedBatchNorm2d) and m.mask_source is not None for m in converted.modules()) == 20
    with nf.use_backend("cpu"):
        plain.eval(), converted.eval()
        x = images(2, size=32)
        assert_all_close([converted(x)], [plain(x)])
        # Training: one step's gradients equal the original's, and a few SGD steps lower the loss. A batch
        # of 4: layer4's BatchNorm normalizes N values per channel (1x1 images), which for N = 2 turns the
        # rounding differences of the convolutions into relative errors of 1e-9.
        plain.train(), converted.train()
        x, y = images(4, size=32), labels(4)
        assert_all_close(outputs_and_gradients(converted, x, y), outputs_and_gradients(plain, x, y))
        optimizer = torch.optim.SGD(converted.parameters(), lr=0.05)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.cross_entropy(converted(x), y)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0]


def test_export_of_a_converted_resnet18_gives_a_plain_model_back():
    torch.manual_seed(0)
    original = resnet18().double()
    converted = nf.nn.convert(copy.deepcopy(original), gate=True)
    x = images(2, size=32)
    exported = nf.nn.export(converted.eval(), prune=False)
    assert not any(type(m).__module__.startswith("neuronml_fast") for m in exported.modules())
    assert type(exported) is type(original)
    original.eval()
    assert_all_close([exported(x)], [original(x)])
    # Pruning needs a chain; a residual network is refused with a message that says what to do.
    with pytest.raises(ValueError, match=r"'model' \(ResNet\) is a container other than nn.Sequential.*"
                                         r"residual.*prune=False"):
        nf.nn.export(converted, prune=True)


# ---- a PlasticRNN inside a module, trained with torch.compile -------------------------------------


class PlasticClassifier(nn.Module):
    def __init__(self, inputs=5, size=8, classes=3):
        super().__init__()
        self.encoder = nn.Linear(inputs, size)
        self.rnn = nf.nn.PlasticRNN(size, eta=0.1)
        self.readout = nn.Linear(size, classes)

    def forward(self, x):
        out, _ = self.rnn(self.encoder(x))
        return self.readout(out[-1])


@pytest.mark.parametrize("backend", ["cpu", pytest.param("reference", marks=pytest.mark.slow)])
def test_a_plastic_rnn_in_a_module_trains_with_torch_compile(backend):
    torch.manual_seed(0)
    eager = PlasticClassifier().double()
    compiled_model = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(compiled_model)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 4, 5, generator=gen, dtype=torch.float64)  # [T, B, inputs]
    y = torch.randint(0, 3, (4,), generator=gen)

    def train(model, parameters):
        optimizer = torch.optim.Adam(parameters, lr=0.05)
        losses = []
        for _ in range(4):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        return torch.stack(losses)

    with nf.use_backend(backend):
        want = train(eager, eager.parameters())
        got = train(compiled, compiled_model.parameters())
    assert bool(want[-1] < want[0])
    assert_all_close([got], [want])
    assert_all_close(dict(compiled_model.named_parameters()), dict(eager.named_parameters()))


# ---- the GPU backends: one small case each (interpreted Triton, emulated CUDA without a GPU) ----------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, WAYS)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


@pytest.mark.parametrize("backend, device", gpu_backends())
def test_second_order_maml_with_functional_call_on_the_gpu_backends(backend, device):
    plain, converted = twins(TinyNet)
    plain, converted = plain.to(device), converted.to(device)
    batch = [t[:1, :WAYS].to(device) for t in episode(size=6)]
    want = maml_meta_gradients(plain, batch, 1)[1]
    with nf.use_backend(backend):
        got = maml_meta_gradients(converted, batch, 1)[1]
    assert_all_close(got, want)
