"""The engine on the tiny random model (float32, CPU): batching, prefix caching, chunking, preemption and the
sliding-window pool change how tokens are computed, never which tokens come out."""

from __future__ import annotations

import pytest
import torch

from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams
from gptoss_serve.model.batch import KVCache, build_forward_batch

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def prompts(random_prompts):
    return random_prompts([5, 23, 40, 9, 61], seed=1)


@pytest.fixture(scope="module")
def reference(make_llm, prompts):
    """One prompt at a time, whole prefills, no prefix cache, no sliding pool, a roomy cache."""
    llm = make_llm(enable_prefix_caching=False, sliding_window_pool=False, max_num_seqs=1)
    return [tokens_of(llm.generate([p], GREEDY))[0] for p in prompts]


def test_batched_equals_one_at_a_time(make_llm, prompts, reference):
    llm = make_llm()
    outputs = llm.generate(prompts, GREEDY)
    assert tokens_of(outputs) == reference
    assert all(o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 12 for o in outputs)


def test_chunked_prefill_equals_whole_prefill(make_llm, prompts, reference):
    llm = make_llm(max_num_batched_tokens=7)  # prompts of 23..61 tokens take several steps, mixed with decodes
    assert tokens_of(llm.generate(prompts, GREEDY)) == reference


def test_capped_prefill_chunks_equal_whole_prefill(make_llm, prompts, reference):
    llm = make_llm(long_prefill_token_threshold=9)  # each prompt at most 9 tokens a step, several prompts a step
    assert tokens_of(llm.generate(prompts, GREEDY)) == reference


def test_prefix_cache_hits_give_the_same_tokens(make_llm, prompts, reference, random_prompts):
    llm = make_llm()
    llm.generate(prompts, GREEDY)
    again = llm.generate(prompts, GREEDY)  # every prompt's full blocks are cached now
    assert tokens_of(again) == reference
    assert all(o.metrics.num_cached_prompt_tokens == (len(p) - 1) // 4 * 4 for o, p in zip(again, prompts))
    # A longer prompt sharing the 61-token prefix: the hit reaches back into blocks freed long ago on the
    # sliding layers (they fell out of the window) but kept findable in the sliding pool.
    longer = prompts[4] + random_prompts([6], seed=7)[0]
    hit = llm.generate([longer], GREEDY)[0]
    assert hit.metrics.num_cached_prompt_tokens == 60
    plain = make_llm(enable_prefix_caching=False).generate([longer], GREEDY)[0]
    assert hit.outputs[0].token_ids == plain.outputs[0].token_ids
    assert llm.engine.stats().prefix_cache_hit_rate > 0.5


def test_prefix_hit_is_shortened_when_sliding_blocks_are_gone(make_llm, prompts, reference):
    llm = make_llm()
    llm.generate([prompts[4]], GREEDY)
    llm.engine.block_manager.sliding.forget_free_cached()  # the full-attention pool still has them all
    again = llm.generate([prompts[4]], GREEDY)[0]
    assert again.metrics.num_cached_prompt_tokens == 0  # full blocks alone are not a usable hit
    assert again.outputs[0].token_ids == reference[4]


def test_preempted_requests_resume_with_the_same_tokens(make_llm, prompts, reference):
    for caching in (True, False):
        # 5 sequences of up to 73 tokens in 40 blocks of 4 tokens: they cannot all stay.
        llm = make_llm(num_kv_blocks=40, enable_prefix_caching=caching)
        assert tokens_of(llm.generate(prompts, GREEDY)) == reference
        assert llm.engine.stats().num_preemptions > 0
        assert llm.engine.block_manager.full.num_used == 0


def test_seeded_sampling_survives_preemption(make_llm, prompts):
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=100 + i, max_tokens=12, ignore_eos=True)
              for i in range(len(prompts))]
    roomy = tokens_of(make_llm().generate(prompts, params))
    tight = make_llm(num_kv_blocks=40)
    assert tokens_of(tight.generate(prompts, params)) == roomy
    assert tight.engine.stats().num_preemptions > 0


def test_sliding_pool_matches_unpooled_and_uses_fewer_blocks(make_llm, random_prompts):
    prompt = random_prompts([90], seed=3)[0]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)  # 130 tokens: 8 windows of 16
    unpooled = make_llm(sliding_window_pool=False, max_num_batched_tokens=32)
    expected = unpooled.generate([prompt], params)[0].outputs[0].token_ids

    # 9 sliding blocks hold one window (16 tokens) plus a chunk of 16 with room to spare.
    pooled = make_llm(num_sliding_kv_blocks=12, max_num_batched_tokens=16)
    engine = pooled.engine
    engine.add_request("long", prompt, params)
    peak_sliding, peak_full, outputs = 0, 0, []
    while engine.has_unfinished_requests():
        outputs += engine.step()
        peak_sliding = max(peak_sliding, engine.block_manager.sliding.num_used)
        peak_full = max(peak_full, engine.block_manager.full.num_used)
    assert outputs[-1].outputs[0].token_ids == expected
    assert engine.stats().num_preemptions == 0
    assert peak_full >= 128 // 4  # every computed token, on the full-attention layers
    assert peak_sliding <= 8  # a 16-token chunk and the 15 keys before it, on the sliding layers


def test_logprobs_equal_log_softmax_of_the_full_forward(make_llm, tiny_model, prompts):
    llm = make_llm()
    out = llm.generate([prompts[1]], SamplingParams(temperature=0.8, seed=5, max_tokens=6, logprobs=3,
                                                    ignore_eos=True))[0].outputs[0]
    tokens = prompts[1] + out.token_ids
    cache = KVCache.allocate(tiny_model.config, 32, 4, torch.float32)
    batch = build_forward_batch([tokens], [0], [list(range(32))], 4, all_logits=True)
    logprobs = torch.log_softmax(tiny_model.compute_logits(tiny_model(batch, cache)), dim=-1)
    for i, (token_id, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = logprobs[len(prompts[1]) - 1 + i]
        assert next(iter(entry)) == token_id  # the sampled token comes first
        assert entry[token_id] == pytest.approx(row[token_id].item(), abs=1e-4)
        top_values, top_ids = row.topk(3)
        for value, top_id in zip(top_values.tolist(), top_ids.tolist()):
            assert entry[top_id] == pytest.approx(value, abs=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_n_samples_share_the_prompt_blocks(make_llm, prompts):
    llm = make_llm()
    params = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=8, ignore_eos=True)
    out = llm.generate([prompts[2]], params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # different samples
    # Samples 1 and 2 waited for sample 0's prefill and found the 40-token prompt's 9 full blocks cached.
    assert llm.engine.block_manager.num_prefix_hit_tokens == 2 * 36
    again = llm.generate([prompts[2]], params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate([prompts[2]], GREEDY.replace(n=2))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_streaming_deltas_add_up_and_abort_frees_everything(make_llm, prompts):
    llm = make_llm()
    engine = llm.engine
    stream = GREEDY.replace(output_kind=OutputKind.DELTA)
    final = llm.generate([prompts[0]], GREEDY)[0].outputs[0].token_ids
    engine.add_request("streamed", prompts[0], stream)
    engine.add_request("aborted", prompts[3], stream)
    collected = []
    for _ in range(3):
        for out in engine.step():
            if out.request_id == "streamed":
                collected += out.outputs[0].token_ids
    engine.abort_request("aborted")
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == "streamed"
            collected += out.outputs[0].token_ids
    assert collected == final
    assert engine.block_manager.full.num_used == 0 and engine.block_manager.sliding.num_used == 0


def test_stop_token_and_min_tokens(make_llm, prompts, reference):
    llm = make_llm()
    stop_at = reference[1][3]
    out = llm.generate([prompts[1]], GREEDY.replace(stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == reference[1][:reference[1].index(stop_at) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at
    longer = llm.generate([prompts[1]], GREEDY.replace(stop_token_ids=[stop_at], min_tokens=6))[0].outputs[0]
    assert len(longer.token_ids) >= 6 and stop_at not in longer.token_ids[:6]


def test_text_prompts_and_stop_strings(make_llm):
    from gptoss_serve.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer()
    llm = make_llm(tokenizer=tokenizer)
    out = llm.generate("The quick brown fox", GREEDY)[0]
    text = out.outputs[0].text
    assert out.prompt_token_ids == tokenizer.encode("The quick brown fox")
    assert text == tokenizer.decode(out.outputs[0].token_ids)
    stop = text[5:8]
    cut = llm.generate("The quick brown fox", GREEDY.replace(stop=[stop]))[0].outputs[0]
    assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop" and cut.stop_reason == stop


def test_requests_that_cannot_fit_are_rejected(make_llm, random_prompts):
    llm = make_llm(num_kv_blocks=8, num_sliding_kv_blocks=8)  # 32 tokens at most
    with pytest.raises(ValueError):
        llm.generate(random_prompts([40])[0], GREEDY)
    out = llm.generate(random_prompts([20])[0], GREEDY.replace(max_tokens=30))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 12


class _EagerReplay:
    """Stands in for a captured CUDA graph on CPU: 'replay' runs the model on the graphs' static buffers."""

    replayed: list[int] = []

    def __init__(self, graphs, size: int):
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        self.replayed.append(self.size)
        graphs = self.graphs
        graphs.outputs[self.size] = graphs.model(graphs._batch(self.size), graphs.kv_cache)


def test_decode_graph_inputs_padding_and_buckets(make_llm, prompts, reference):
    """The CUDA-graph path's static buffers, padding rows and bucket choice, checked on CPU (the GPU test
    checks the capture itself)."""
    from gptoss_serve.cluster.engine.cuda_graphs import DecodeGraphs

    llm = make_llm()
    runner = llm.engine.model_runner
    graphs = DecodeGraphs(runner.model, runner.kv_cache, 4, runner.max_blocks_per_seq, runner.sliding_pool)
    assert graphs.sizes == [1, 2, 4]
    graphs.graphs = {size: _EagerReplay(graphs, size) for size in graphs.sizes}
    runner.graphs = graphs
    # 5 prompts: decode steps of 5 run eagerly, then 3 (padded to 4), ... as requests finish at different times
    params = [GREEDY.replace(max_tokens=m) for m in (12, 3, 12, 6, 9)]
    outputs = llm.generate(prompts, params)
    assert tokens_of(outputs) == [r[:m] for r, m in zip(reference, (12, 3, 12, 6, 9))]
    assert set(_EagerReplay.replayed) == {2, 4}  # 4 and 3 (padded) sequences, then 2


def test_a_bad_prompt_leaves_no_request_behind(make_llm, prompts):
    llm = make_llm()
    with pytest.raises(ValueError):
        llm.generate([prompts[0], [-1]], GREEDY)
    assert not llm.engine.has_unfinished_requests()
