"""Async scheduling: each step is launched before the previous step's sampled tokens are read (they reach the next
step's inputs on the device). It must change when outputs arrive, never what they are."""

from __future__ import annotations

import random

import pytest

from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams
from gptoss_serve.cluster.engine.sequence import PENDING_TOKEN

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(random_prompts):
    return random_prompts([5, 23, 40, 9, 61, 17], seed=3)


def run(llm, prompts, params):
    outputs = llm.generate(prompts, params)
    return [[(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outputs]


SCENARIOS = {
    "greedy, different lengths": [GREEDY.replace(max_tokens=m) for m in (10, 1, 7, 3, 10, 2)],
    "seeded top-p with logprobs": [SamplingParams(temperature=0.9, top_p=0.8, seed=s, max_tokens=8, logprobs=3,
                                                  ignore_eos=True) for s in range(6)],
    "n = 2, min-p": [SamplingParams(n=2, temperature=1.0, min_p=0.05, seed=s, max_tokens=6, ignore_eos=True)
                     for s in range(6)],
    "penalties (read before each step)": [SamplingParams(temperature=0, repetition_penalty=1.3,
                                                         frequency_penalty=0.5, max_tokens=8, ignore_eos=True)] * 6,
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_async_gives_what_sync_gives(make_llm, prompts, scenario):
    params = SCENARIOS[scenario]
    sync = make_llm(async_scheduling=False, max_num_batched_tokens=32)
    overlapped = make_llm(max_num_batched_tokens=32)  # chunked prefills mixed with decodes
    assert overlapped.engine._async and not sync.engine._async
    assert run(overlapped, prompts, params) == run(sync, prompts, params)
    assert run(overlapped, prompts, params) == run(sync, prompts, params)  # again, on prefix-cache hits


def test_a_stop_token_read_late_ends_the_sequence_there(make_llm, prompts):
    reference = make_llm(async_scheduling=False).generate([prompts[1]], GREEDY)[0].outputs[0].token_ids
    stop_at = reference[4]  # by the time it is read, the next step (with it as input) is already launched
    llm = make_llm()
    out = llm.generate([prompts[1]], GREEDY.replace(stop_token_ids=[stop_at]))[0].outputs[0]
    assert out.token_ids == reference[:reference.index(stop_at) + 1] and out.finish_reason == "stop"
    assert llm.engine.block_manager.full.num_used == 0 and llm.engine.block_manager.sliding.num_used == 0


def test_outputs_arrive_one_step_later_and_no_step_is_wasted_on_length(make_llm, prompts):
    steps = {}
    for mode in (False, True):
        engine = make_llm(async_scheduling=mode).engine
        engine.add_request("r", prompts[0], GREEDY.replace(max_tokens=3, output_kind=OutputKind.DELTA))
        seqs, tokens = [], []
        while engine.has_unfinished_requests():
            outputs = engine.step()
            seqs.append(engine.last_step_num_seqs)
            tokens.append([t for o in outputs for t in o.outputs[0].token_ids])
        steps[mode] = seqs, tokens
    sync_seqs, sync_tokens = steps[False]
    async_seqs, async_tokens = steps[True]
    assert sync_seqs == [1, 1, 1] and [len(t) for t in sync_tokens] == [1, 1, 1]
    # The third token is known to be the last before it is read: no fourth step is computed for it.
    assert async_seqs == [1, 1, 1, 0] and async_tokens == [[]] + sync_tokens


def test_pending_tokens_never_show_and_aborts_leak_nothing(make_llm, random_prompts):
    """Hundreds of requests arriving and aborted at random between steps, while their tokens are pending."""
    llm = make_llm(max_num_seqs=8, max_num_batched_tokens=48)
    engine, rng = llm.engine, random.Random(0)
    pool = random_prompts([rng.randint(3, 40) for _ in range(60)], seed=4)
    params = SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, output_kind=OutputKind.DELTA)
    next_id, live = 0, set()
    for _ in range(300):
        while len(live) < 10:
            engine.add_request(f"r{next_id}", pool[next_id % len(pool)], params)
            live.add(f"r{next_id}")
            next_id += 1
        for output in engine.step():
            assert PENDING_TOKEN not in output.outputs[0].token_ids
            if output.finished:
                live.discard(output.request_id)
        for request_id in [r for r in sorted(live) if rng.random() < 0.15]:
            engine.abort_request(request_id)
            live.discard(request_id)
    for request_id in live:
        engine.abort_request(request_id)
    while engine.has_unfinished_requests():
        engine.step()
    engine.step()  # reads the last pending step, if any
    assert engine._pending is None and next_id > 150
    bm = engine.block_manager
    assert bm.full.num_used == 0 and bm.sliding.num_used == 0
    assert all(c == 0 for c in bm.full.ref_counts + bm.sliding.ref_counts)


def test_switching_modes_between_steps(make_llm, prompts):
    expected = run(make_llm(async_scheduling=False), prompts[:2], GREEDY)
    engine = make_llm().engine
    for i, prompt in enumerate(prompts[:2]):
        engine.add_request(str(i), prompt, GREEDY)
    outputs, step = {}, 0
    while engine.has_unfinished_requests():
        engine.async_scheduling = step % 3 != 2  # a pending step is read first when switching to sync
        outputs.update((o.request_id, o) for o in engine.step() if o.finished)
        step += 1
    got = [[(c.token_ids, c.logprobs, c.finish_reason, c.stop_reason) for c in outputs[str(i)].outputs]
           for i in range(2)]
    assert got == expected
