"""The CPU buffer pool (csrc/cpu/buffer_pool.h) behind `neuronml_fast._alloc` on the CPU."""

import io
import threading

import pytest
import torch

import neuronml_fast.cpu as nf_cpu
from neuronml_fast import _alloc, _extensions

pytestmark = pytest.mark.skipif(_extensions.cpu() is None, reason="C++ CPU extension not built")

BIG = (1 << 18,)  # 1 MiB of float32: pooled
SMALL = (1 << 10,)  # 4 KiB: from torch.empty


@pytest.fixture(autouse=True)
def fresh_pool():
    limit = nf_cpu.pool_stats()["limit_bytes"]
    nf_cpu.empty_cache()
    yield
    nf_cpu.set_pool_limit(limit)
    nf_cpu.empty_cache()


def _new(shape=BIG, dtype=torch.float32):
    return _alloc.empty(shape, dtype=dtype, device="cpu")


def test_a_released_buffer_is_handed_out_again():
    first = _new()
    address = first.data_ptr()
    del first
    before = nf_cpu.pool_stats()
    assert before["cached_blocks"] == 1 and before["cached_bytes"] == 4 << 18
    again = _new()
    after = nf_cpu.pool_stats()
    assert again.data_ptr() == address
    assert after["hits"] == before["hits"] + 1 and after["cached_blocks"] == 0
    # Same byte size, another dtype and shape: the same block.
    del again
    assert _new((1 << 17,), torch.float64).data_ptr() == address


def test_small_buffers_bypass_the_pool():
    before = nf_cpu.pool_stats()
    _new(SMALL)  # dropped at once
    after = nf_cpu.pool_stats()
    assert (after["hits"], after["misses"], after["cached_blocks"]) == (before["hits"], before["misses"], 0)


def test_limit_zero_turns_caching_off_and_empty_cache_releases():
    _new()  # dropped at once
    assert nf_cpu.pool_stats()["cached_bytes"] > 0
    nf_cpu.empty_cache()
    assert nf_cpu.pool_stats()["cached_bytes"] == 0
    nf_cpu.set_pool_limit(0)
    _new()  # dropped at once
    assert nf_cpu.pool_stats() | {"hits": 0, "misses": 0} == {"hits": 0, "misses": 0, "cached_bytes": 0,
                                                              "cached_blocks": 0, "limit_bytes": 0}


def test_set_pool_limit_rejects_bad_values():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="nbytes: expected a non-negative int"):
            nf_cpu.set_pool_limit(bad)


def test_pooled_tensors_behave_like_torch_tensors():
    t = _new((256, 1024))
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view_as(t))
    assert t.sum().item() == float(t.numel() * (t.numel() - 1) // 2)
    t.resize_(512, 1024)  # the storage grows through the pool's allocator
    assert t[:256].flatten()[-1].item() == 256 * 1024 - 1
    buffer = io.BytesIO()
    torch.save(t[:256], buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer), t[:256])
    x = _new((1 << 16,)).fill_(2.0).requires_grad_()
    (x * x).sum().backward()
    assert bool((x.grad == 4.0).all())


def test_poisoning_fills_reused_blocks():
    _new().fill_(0.0)  # dropped at once
    with _alloc.poisoned():
        assert torch.isnan(_new()).all()
    assert bool((_alloc.zeros(BIG, dtype=torch.float32, device="cpu") == 0).all())


def test_negative_size_is_an_error():
    with pytest.raises(RuntimeError, match="size: expected non-negative sizes"):
        _extensions.cpu().pooled_empty([4, -1], torch.float32)


def test_threads_share_the_pool_safely():
    errors = []

    def work(seed):
        try:
            for i in range(200):
                t = _new(((1 << 15) * (1 + (seed + i) % 3),)).fill_(seed)
                if not bool((t == seed).all()):
                    errors.append(seed)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert nf_cpu.pool_stats()["hits"] > 0


def test_a_forked_child_can_allocate():
    import multiprocessing

    _new()  # a cached block the child inherits
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as workers:
        assert workers.apply(_child_sum) == float(1 << 18)


def _child_sum():
    torch.set_num_threads(1)  # as DataLoader workers do: GNU OpenMP's team does not survive a fork
    return _new().fill_(1.0).sum().item()
