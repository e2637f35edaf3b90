"""Launch-level properties of the Triton kernels that the interpreter tests cannot see: grid limits
on large problems, the device a launch runs on, and that every launch goes through one helper.
Large problems use meta tensors and a recording stand-in for the launch: no memory, no GPU."""

import ast
import contextlib
import pathlib

import pytest
import torch

from neuronml_fast.kernels import masked, plastic
from neuronml_fast.ops import _triton_launch
from neuronml_fast.ops.masked import triton as masked_launchers
from neuronml_fast.ops.plastic import triton as plastic_launchers

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The Triton kernels, their launchers and the one launch helper.
TRITON_SOURCES = [*sorted((ROOT / "kernels").glob("*.py")), *sorted((ROOT / "neuronml_fast" / "ops").glob("*/triton.py")),
                  ROOT / "neuronml_fast" / "ops" / "_triton_launch.py"]


@pytest.fixture
def launches(monkeypatch):
    """Records (kernel name, grid) of every Triton launch instead of running it."""
    recorded = []
    for module in (masked, plastic):
        for name in dir(module):
            kernel = getattr(module, name)
            if name.endswith("_kernel"):
                monkeypatch.setattr(kernel, "run", lambda *a, grid, warmup, _n=name, **k: recorded.append((_n, grid)),
                                    raising=False)
    return recorded


def _conv(tasks, batch, channels, hw, groups, k=3, dtype=torch.float32):
    meta = dict(device="meta", dtype=dtype)
    x = torch.empty(tasks, batch, channels, hw, hw, **meta)
    w = torch.empty(tasks, channels, channels // groups, k, k, **meta)
    mask = torch.empty(tasks, channels, **meta)
    conv = ((1, 1), (k // 2, k // 2), (1, 1), groups, True)
    out, pre = masked_launchers.conv2d_forward(x, w, mask, mask, *conv)
    masked_launchers.conv2d_backward(out, None, x, w, mask, pre, *conv, True, True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [
    dict(tasks=4, batch=16, channels=256, hw=128, groups=256),  # tasks x groups x splits = 65536
    dict(tasks=64, batch=1, channels=2048, hw=8, groups=2048),  # tasks x groups = 131072
    dict(tasks=1, batch=64, channels=16, hw=1024, groups=1),  # 2^26 pixels: 2^21 pixel blocks
], ids=["depthwise-4-tasks-262k-pixels", "131072-tasks-x-groups", "2^26-pixels"])
def test_masked_conv_grids_stay_within_cuda_limits(launches, shape, dtype):
    _conv(**shape, dtype=dtype)
    kernels = {name for name, _ in launches}
    # The sum of the weight gradient's partial sums runs where its pixels are split (the large images).
    assert {"_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel"} <= kernels
    assert kernels - {"_conv_forward_kernel", "_conv_input_grad_kernel", "_conv_weight_grad_kernel"} == (
        {"_sum_splits_kernel"} if shape["hw"] > 8 else set())
    for name, grid in launches:
        assert all(size <= limit for size, limit in zip(grid, _triton_launch.MAX_GRID)), (name, grid)


def test_too_many_blocks_for_one_launch_is_a_clear_error(launches):
    with pytest.raises(ValueError, match="over the CUDA limit"):
        _conv(tasks=32, batch=1, channels=65536, hw=256, groups=65536)  # 2^32 blocks


def test_pixels_past_32_bit_indexing_is_a_clear_error(launches):
    with pytest.raises(ValueError, match="index in 32 bits"):
        _conv(tasks=1, batch=2**15, channels=1, hw=256, groups=1)


def test_plastic_matrix_past_32_bit_indexing_is_a_clear_error(launches):
    meta = dict(device="meta", dtype=torch.float32)
    n = 2**16
    x, w, eta = torch.empty(2, 1, n, **meta), torch.empty(n, n, **meta), torch.empty((), **meta)
    with pytest.raises(ValueError, match="index in 32 bits"):
        plastic_launchers.plastic_forward(x, w, w, eta, None, None, None, None, None, None, True, "hebb", "tanh", 2)


class _DeviceRecorder:
    """Stands in for torch.cuda.device: records which device is entered and when."""

    def __init__(self, events):
        self.events = events

    def __call__(self, device):
        events = self.events

        @contextlib.contextmanager
        def entered():
            events.append(("enter", torch.device(device)))
            yield
            events.append(("exit",))

        return entered()


class _OnSecondGpu(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda", 1)


def test_launch_runs_on_the_device_of_its_tensors(monkeypatch):
    events = []
    monkeypatch.setattr(torch.cuda, "device", _DeviceRecorder(events))

    class Kernel:
        __name__ = "kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: events.append(("launch", grid))

    x = torch.Tensor._make_subclass(_OnSecondGpu, torch.zeros(2))
    _triton_launch.launch(Kernel(), (3,), x, 5, FLAG=True)
    assert events == [("enter", torch.device("cuda", 1)), ("launch", (3,)), ("exit",)]

    events.clear()
    _triton_launch.launch(Kernel(), (3,), torch.zeros(2))  # CPU tensors (the interpreter): no CUDA device entered
    assert events == [("launch", (3,))]


def test_an_intercepted_launch_goes_to_the_handler_and_not_to_the_kernel():
    launched, handled = [], []

    class Kernel:
        __name__ = "kernel"

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(grid)

    x = torch.zeros(2)
    with _triton_launch.intercepted(lambda kernel, grid, args, kwargs: handled.append((kernel, grid, args, kwargs))):
        _triton_launch.launch(Kernel(), (3,), x, 5, FLAG=True)
        with _triton_launch.intercepted(None):  # what a handler that also runs the kernel does
            _triton_launch.launch(Kernel(), (4,), x)
    _triton_launch.launch(Kernel(), (5,), x)
    assert [(type(k).__name__, g, a[1:], kw) for k, g, a, kw in handled] == [("Kernel", (3,), (5,), {"FLAG": True})]
    assert handled[0][2][0] is x
    assert launched == [(4,), (5,)]
    with pytest.raises(ValueError, match="over the CUDA limit"), _triton_launch.intercepted(handled.append):
        _triton_launch.launch(Kernel(), (2**31,), x)  # the grid is checked before any handler


def _subscript_calls(tree):
    """`something[grid](...)` calls: direct Triton launches."""
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)]


def test_every_triton_launch_goes_through_the_launch_helper():
    for path in TRITON_SOURCES:
        tree = ast.parse(path.read_text())
        if path.name == "_triton_launch.py":
            helper = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "launch")
            assert len(_subscript_calls(helper)) == len(_subscript_calls(tree)) == 1
            continue
        direct = [f"{path.name}:{n.lineno}" for n in _subscript_calls(tree)]
        assert not direct, f"launch these through neuronml_fast/ops/_triton_launch.py: {direct}"
