"""The GPU backends' launch paths read no tensor on the host (each read is a device-to-host sync
on a GPU), but for the one documented exception: a device-tensor eta whose value sets the plastic
trace reconstruction's checkpoint interval. Checked on CPU tensors through the emulated CUDA and
interpreted Triton backends, which run the same Python launch path, by counting every host read.
"""

import contextlib

import pytest
import torch

import neuronml_fast as nf

from conftest import interpreted, kernel_backends

GPU_BACKENDS = [p for p in kernel_backends() if p.values[0] in ("triton", "cuda")]
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__index__", "__bool__")


@contextlib.contextmanager
def counting_host_reads():
    reads = []
    originals = {name: getattr(torch.Tensor, name) for name in READS}

    def recorder(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        setattr(torch.Tensor, name, recorder(name))
    try:
        yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _rnn(T=4, B=2, N=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    leaf = lambda *shape, scale=1.0: (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).requires_grad_()  # noqa: E731
    return dict(input=leaf(T, B, N), weight=leaf(N, N, scale=0.3), alpha=leaf(N, N, scale=0.3),
                eta=torch.tensor(0.2, dtype=torch.float64, requires_grad=True))


CASES = {  # plastic_rnn keyword changes -> host reads allowed in forward and backward
    "modulated": (lambda a: dict(modulation=torch.rand(4, 2, dtype=torch.float64)), 0),
    "clip": (lambda a: dict(clip=0.5), 0),
    "identity": (lambda a: dict(activation="identity"), 0),
    "eta-number": (lambda a: dict(eta=0.2), 0),
    "hebb-tanh": (lambda a: {}, 1),  # the checkpoint interval depends on eta
    "oja-tanh": (lambda a: dict(rule="oja"), 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_plastic_reads_eta_only_for_the_checkpoint_interval(backend, device, case):
    args = _rnn()
    change, allowed = CASES[case]
    args.update(change(args))
    with nf.use_backend(backend), counting_host_reads() as reads:
        out, hebb = nf.plastic_rnn(**args)
        (out.sum() + hebb.sum()).backward()
    assert len(reads) <= allowed, f"host reads on the {backend} launch path: {reads}"


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_plastic_checks_eta_on_the_device_without_reading_it(backend, device):
    args = _rnn()
    args["eta"] = torch.tensor(1.5, dtype=torch.float64)
    with nf.use_backend(backend), pytest.raises(RuntimeError, match="eta: expected 0 <= eta < 1"):
        nf.plastic_rnn(**args, clip=0.5)


@pytest.mark.parametrize("backend,device", GPU_BACKENDS)
def test_masked_layers_read_nothing_on_the_host(backend, device):
    if interpreted(backend, device):
        pytest.skip("the Triton interpreter itself reads its arguments on the host")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    linear = torch.randn(4, 75, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([1.0, 0.0, 0.5, 2.0], dtype=torch.float64, requires_grad=True)
    with nf.use_backend(backend), counting_host_reads() as reads:
        nf.masked_conv2d(x, weight, mask, None, padding=(1, 1)).sum().backward()
        nf.masked_linear(x.flatten(1), linear, mask).sum().backward()
    assert not reads, f"host reads on the {backend} launch path: {reads}"
