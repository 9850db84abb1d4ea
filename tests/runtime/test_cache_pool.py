"""One KV-cache pool per model: every block runner decodes into views of the same buffers, which are
reallocated only for a larger size, and a block's result does not depend on what used them before."""

import pytest
import torch

from sejd.core.errors import InputError
from sejd.runtime.decoders import decode_block
from sejd.runtime.plan import BlockPlan
from sejd.runtime.runner import Conditioning, KVCachePool
from sejd.runtime.torch_runner import torch_runners
from tests.conftest import make_model

PLANS = [BlockPlan("sequential"), BlockPlan("jacobi", tau=1e-3, freeze=True), BlockPlan("gs-jacobi", segments=3),
         BlockPlan("jacobi", tau=0.5, max_iters=3)]  # the last one finishes exactly over the cached prefix


def decode(runners, k, batch, plan, guidance=0.0, seed=0):
    """Decode block k of a batch from seeded noise with `plan`."""
    T, D = runners[k].num_tokens, runners[k].token_dim
    z = torch.randn(batch, T, D, generator=torch.Generator().manual_seed(seed))
    cond = Conditioning.build(batch, T, torch.arange(batch) % 3, guidance=guidance)
    runners[k].begin(batch, cond)
    return decode_block(runners[k], z, plan, z, cond=cond).x


def caches_of(runner):
    return [t for pair in runner.cache for t in pair]


def test_torch_runners_of_one_model_share_the_pool():
    runners = torch_runners(make_model())
    cond = Conditioning.build(2, runners[0].num_tokens)
    pointers = []
    for r in runners:
        r.begin(2, cond)
        pointers.append([t.data_ptr() for t in caches_of(r)])
    assert all(p == pointers[0] for p in pointers)
    assert len(set(pointers[0])) == len(pointers[0])  # one block's layers use distinct buffers


def assert_block_unaffected_by_others(runners):
    """Block 1 decoded, then block 2 (more rows: guidance, a larger batch), then block 1 again."""
    for plan in PLANS:
        first = decode(runners, 1, 2, plan)
        decode(runners, 2, 3, plan, guidance=1.5, seed=5)
        decode(runners, 1, 1, plan, seed=7)  # fewer rows over the larger buffers
        torch.testing.assert_close(decode(runners, 1, 2, plan), first, atol=0, rtol=0)


def test_a_block_decodes_the_same_after_another_block_used_the_pool():
    assert_block_unaffected_by_others(torch_runners(make_model()))


def test_pool_grows_only_for_a_larger_size_and_keeps_its_addresses_otherwise():
    pool = KVCachePool()
    small = pool.caches(4, (2, 2, 8, 4))
    gen = pool.generation
    assert [t.data_ptr() for t in pool.caches(4, (1, 2, 8, 4))] == [t.data_ptr() for t in small]
    assert pool.generation == gen and pool.nbytes == 4 * 2 * 2 * 8 * 4 * 4
    pool.caches(4, (3, 2, 8, 4))
    assert pool.generation == gen + 1 and pool.nbytes == 4 * 3 * 2 * 8 * 4 * 4
    assert len(pool.caches(2, (1, 2, 8, 4))) == 2 and pool.generation == gen + 1


def test_caches_larger_than_memory_are_refused_before_allocating():
    pool = KVCachePool()
    with pytest.raises(InputError, match=r"KV caches for this batch .* needs about [0-9.]+ [KMGT]?B, more than .*smaller batch"):
        pool.caches(16, (10**6, 12, 1024, 64))
    assert pool.nbytes == 0
