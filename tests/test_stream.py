"""BufferPool: computed tensors reuse released memory instead of mapping fresh pages."""

import torch

from weightops.stream import BufferPool


def test_released_buffers_are_reused_smallest_fit_first():
    pool = BufferPool(keep=2)
    big, t_big = pool.take((1000,), torch.float32)
    small, t_small = pool.take((10, 10), torch.bfloat16)
    assert t_big.shape == (1000,) and t_big.dtype == torch.float32 and t_small.shape == (10, 10)
    pool.give(big)
    pool.give(small)
    again, t = pool.take((50,), torch.float16)  # 100 bytes: the 200-byte buffer fits best
    assert again.data_ptr() == small.data_ptr() and t.data_ptr() == small.data_ptr()
    again2, _ = pool.take((1000,), torch.float32)
    assert again2.data_ptr() == big.data_ptr()
    fresh, _ = pool.take((1000,), torch.float32)  # nothing free: new memory
    assert fresh.data_ptr() not in (big.data_ptr(), small.data_ptr())


def test_keeps_at_most_keep_free_buffers_dropping_the_smallest():
    pool = BufferPool(keep=2)
    buffers = [pool.take((n,), torch.uint8)[0] for n in (10, 30, 20)]
    for b in buffers:
        pool.give(b)
    kept = {pool.take((1,), torch.uint8)[0].data_ptr(), pool.take((1,), torch.uint8)[0].data_ptr()}
    assert kept == {buffers[1].data_ptr(), buffers[2].data_ptr()}
