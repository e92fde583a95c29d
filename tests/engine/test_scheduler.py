"""Scheduler and block manager alone (no model): budgets, chunking, prefix hits, sliding-window freeing,
preemption, and no block leaked after thousands of random aborts."""

from __future__ import annotations

import random

import pytest

from gptoss_serve.cluster.engine.block_manager import BlockManager, BlockPool
from gptoss_serve.cluster.engine.sampling_params import SamplingParams
from gptoss_serve.cluster.engine.scheduler import Scheduler
from gptoss_serve.cluster.engine.sequence import NO_BLOCK, FinishReason, Sequence

BS, WINDOW = 4, 16


def seq(n: int, request_id: str = "r", first_token: int = 0, **params) -> Sequence:
    return Sequence(request_id, 0, list(range(first_token, first_token + n)), SamplingParams(**params))


def fake_step(scheduler: Scheduler, next_token: int = 7):
    """Runs a schedule as if the model sampled `next_token` for every sequence that samples."""
    batch = scheduler.schedule()
    scheduler.update(batch, [next_token if s else None for s in batch.samples])
    return batch


def held_blocks(seqs, sliding: bool) -> int:
    return sum(sum(b != NO_BLOCK for b in (s.sliding_block_ids if sliding else s.block_ids)) for s in seqs)


def test_pool_lru_eviction_of_cached_blocks():
    pool = BlockPool(3)
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, b"a")
    pool.register(b, b"b")
    pool.release(b)
    pool.release(a)  # a freed last: most recently used
    assert pool.num_free == 3 and pool.lookup(b"a") == a
    pool.allocate()  # the never-used block first
    pool.allocate()  # then the least recently used cached one: b
    assert pool.lookup(b"b") is None and pool.lookup(b"a") == a
    pool.acquire(a)
    assert pool.num_free == 0 and pool.ref_counts[a] == 1


def test_token_budget_mixes_decodes_with_prefill_chunks():
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=100)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=10)
    scheduler.add([seq(3, "a")])
    scheduler.add([seq(30, "b")])
    first = fake_step(scheduler)
    assert first.num_new_tokens == [3, 7] and first.samples == [True, False]
    second = fake_step(scheduler)  # a decodes, b continues its prompt
    assert second.num_new_tokens == [1, 9] and second.samples == [True, False]
    while scheduler.running[1].num_computed_tokens < 30:
        fake_step(scheduler)
    assert scheduler.running[1].num_tokens == 31  # the prompt's last chunk sampled a token


def test_long_prefill_threshold_leaves_room_for_a_short_prompt():
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=100)
    uncapped = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    uncapped.add([seq(100, "long")])
    fake_step(uncapped)
    uncapped.add([seq(5, "short", first_token=500)])
    assert fake_step(uncapped).num_new_tokens == [32]  # the long prompt's chunk takes the whole budget

    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=100)
    capped = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32, long_prefill_token_threshold=12)
    capped.add([seq(100, "long")])
    assert fake_step(capped).num_new_tokens == [12]
    capped.add([seq(5, "short", first_token=500)])
    second = fake_step(capped)
    assert second.num_new_tokens == [12, 5] and second.samples == [False, True]  # the short one samples at once


def test_sliding_blocks_behind_the_window_are_freed():
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=12)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    s = seq(40)
    scheduler.add([s])
    for _ in range(20):
        fake_step(scheduler)
        first_needed = max(0, s.num_computed_tokens - WINDOW + 1) // BS
        held = [i for i, b in enumerate(s.sliding_block_ids) if b != NO_BLOCK]
        assert held[0] >= first_needed - 2  # freed lazily, at the next allocation
        assert len(held) <= 7
    assert len(s.block_ids) == -(-s.num_computed_tokens // BS)  # the full pool keeps everything


def test_prefix_hit_needs_the_window_on_the_sliding_pool():
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=30)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    first = seq(41)
    scheduler.add([first])
    fake_step(scheduler)
    scheduler.finish([first], FinishReason.STOP)
    again = seq(41)
    hit = bm.find_prefix(again)
    assert hit.num_tokens == 40 and len(hit.full_blocks) == 10
    assert sorted(hit.sliding_blocks) == list(range((40 - WINDOW + 1) // BS, 10))
    bm.sliding.forget_free_cached()
    assert bm.find_prefix(again).num_tokens == 0


def test_a_finished_sequences_window_outlives_other_prefills_churn():
    """A follow-up turn hits the end of the previous one; the sliding blocks that later long prefills pass
    behind their window must be evicted before that window (they go to the LRU's front)."""
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=30)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    turn = seq(41)
    scheduler.add([turn])
    fake_step(scheduler)  # the whole prompt in one chunk: blocks 0..10 held at once
    scheduler.finish([turn], FinishReason.STOP)
    scheduler.max_num_batched_tokens = 8
    other = seq(120, "other", first_token=1000)  # passes 30 sliding blocks through a 30-block pool
    scheduler.add([other])
    while other.num_computed_tokens < 120:
        fake_step(scheduler)
    assert bm.sliding.num_cached > 4  # the churn did evict cached blocks...
    hit = bm.find_prefix(seq(45))
    assert hit.num_tokens == 40  # ...but not the window before the turn's last full block
    assert sorted(hit.sliding_blocks) == list(range((40 - WINDOW + 1) // BS, 10))


def test_preemption_frees_the_newest_and_recomputes_it():
    bm = BlockManager(10, BS, WINDOW, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    old, new = seq(16, "old"), seq(16, "new")
    scheduler.add([old])
    scheduler.add([new])
    fake_step(scheduler)  # both prefilled: 8 of 10 blocks; at 21 tokens each would need 6
    for _ in range(5):
        fake_step(scheduler)
    assert scheduler.num_preemptions == 1 and new.num_preemptions == 1 and old.num_preemptions == 0
    assert list(scheduler.waiting) == [new] and new.num_computed_tokens == 0 and not new.block_ids
    assert new.num_tokens == 21  # its generated tokens stay, to be recomputed as if prompt


def test_no_block_leaks_after_thousands_of_aborts():
    rng = random.Random(0)
    bm = BlockManager(40, BS, WINDOW, num_sliding_blocks=40)
    scheduler = Scheduler(bm, max_num_seqs=6, max_num_batched_tokens=24)
    live: dict[str, list[Sequence]] = {}
    for i in range(3000):
        n = rng.choice([1, 1, 2])
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]  # few distinct tokens: many hits
        params = SamplingParams(n=n, max_tokens=20)
        seqs = [Sequence(str(i), j, prompt, params) for j in range(n)]
        live[str(i)] = seqs
        scheduler.add(seqs)
        for _ in range(rng.randrange(3)):
            fake_step(scheduler, next_token=rng.randrange(3))
        if rng.random() < 0.7:  # abort a random request, in whatever state it is
            victim = rng.choice(list(live))
            scheduler.finish(live.pop(victim), FinishReason.ABORT)
        for request_id, seqs in list(live.items()):  # finish the long ones
            done = [s for s in seqs if s.num_output_tokens >= 20 and not s.is_finished]
            scheduler.finish(done, FinishReason.LENGTH)
            if all(s.is_finished for s in seqs):
                del live[request_id]
        everyone = [s for seqs in live.values() for s in seqs]
        assert sum(bm.full.ref_counts) == held_blocks(everyone, sliding=False)
        assert sum(bm.sliding.ref_counts) == held_blocks(everyone, sliding=True)
    assert scheduler.num_preemptions > 0 and bm.num_prefix_hit_tokens > 0
    for seqs in live.values():
        scheduler.finish(seqs, FinishReason.ABORT)
    assert not scheduler.has_unfinished()
    assert bm.full.num_used == 0 and bm.sliding.num_used == 0
    assert all(c == 0 for c in bm.full.ref_counts + bm.sliding.ref_counts)


@pytest.mark.parametrize("sliding", [True, False])
def test_a_sequence_larger_than_the_cache_is_rejected(sliding):
    """The engine refuses such prompts up front; the scheduler still must not loop recomputing one."""
    bm = BlockManager(4, BS, WINDOW, num_sliding_blocks=8 if sliding else None)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    big = seq(40)
    scheduler.add([big])
    rejected = []
    for _ in range(10):
        rejected += fake_step(scheduler).rejected
    assert rejected == [big] and big.finish_reason == FinishReason.LENGTH
    assert not scheduler.has_unfinished() and bm.full.num_used == 0


def test_the_window_before_the_prompts_end_outlives_churn_for_the_next_turn():
    """A chat's next turn matches the previous prompt (the reply is re-rendered, so the match ends there): the
    window before the prompt's end is kept even after decoding moved past it, while mid-prompt blocks go first."""
    bm = BlockManager(100, BS, WINDOW, num_sliding_blocks=24)
    turn = seq(40)
    chat = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=8)
    chat.add([turn])
    while turn.num_output_tokens < 12:  # the window moves 12 tokens past the prompt
        fake_step(chat)
    chat.finish([turn], FinishReason.STOP)
    assert bm.sliding.num_cached == 12
    burst = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=80)
    burst.add([seq(72, "other", first_token=1000)])
    fake_step(burst)  # 18 sliding blocks at once: the 12 never used, then 6 of the turn's cached ones
    assert bm.sliding.num_cached == 6 + 18
    follow_up = seq(40)
    follow_up.token_ids += [555] * 9  # a different reply, then the new user message
    assert bm.find_prefix(follow_up).num_tokens == 40


def test_the_sliding_pool_keeps_a_share_of_the_budget_for_prefix_hits(tiny_model):
    from gptoss_serve.cluster.engine.config import EngineConfig
    from gptoss_serve.cluster.engine.kv_plan import SLIDING_CACHE_SHARE, plan_kv_cache, sliding_blocks_wanted
    from gptoss_serve.model.batch import KVCache

    config = EngineConfig(block_size=4, max_num_seqs=2, max_num_batched_tokens=16, kv_cache_memory_bytes=64 * 2**20)
    plan = plan_kv_cache(tiny_model, config)
    sliding_layers = sum(tiny_model.config.is_sliding_layer(n) for n in range(tiny_model.config.num_hidden_layers))
    per_block = KVCache.bytes_per_block(tiny_model.config, 4, tiny_model.dtype, num_layers=sliding_layers)
    assert plan.num_sliding_blocks == int(64 * 2**20 * SLIDING_CACHE_SHARE) // per_block
    assert plan.num_sliding_blocks > sliding_blocks_wanted(tiny_model, config)
