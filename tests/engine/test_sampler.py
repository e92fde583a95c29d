"""The sampler on hand-made logits: each parameter has its effect, seeds reproduce, greedy is argmax."""

from __future__ import annotations

import collections

import pytest
import torch

from gptoss_serve.cluster.engine.sampler import Sampler
from gptoss_serve.cluster.engine.sampling_params import SamplingParams, SamplingParamsError
from gptoss_serve.cluster.engine.sequence import Sequence

VOCAB = 50
sampler = Sampler("cpu")


def seqs_with(params: SamplingParams, num_rows: int, prompt=(1, 2, 3), output=()) -> list[Sequence]:
    rows = []
    for i in range(num_rows):
        seq = Sequence(f"r{i}", 0, list(prompt), params)
        seq.token_ids += list(output)
        rows.append(seq)
    return rows


def draw(params: SamplingParams, logits: torch.Tensor, num_draws: int = 2000, **seq_kwargs) -> collections.Counter:
    """Token counts over num_draws rows of the same logits, sampled as one batch."""
    rows = seqs_with(params, num_draws, **seq_kwargs)
    out = sampler(logits.expand(num_draws, -1).clone(), rows)
    return collections.Counter(out.token_ids)


@pytest.fixture
def logits() -> torch.Tensor:
    """A decaying distribution over 50 tokens: token i has logit -0.2 i (token 0 most likely)."""
    return -0.2 * torch.arange(VOCAB, dtype=torch.float32)


def test_greedy_is_argmax_and_deterministic(logits):
    shuffled = logits[torch.randperm(VOCAB, generator=torch.Generator().manual_seed(0))]
    counts = draw(SamplingParams(temperature=0), shuffled, num_draws=50)
    assert counts == {int(shuffled.argmax()): 50}


def test_temperature_spreads_or_sharpens(logits):
    cold = draw(SamplingParams(temperature=0.2, seed=None), logits)
    hot = draw(SamplingParams(temperature=5.0), logits)
    assert cold[0] > 1000 and len(hot) > len(cold)
    assert hot[0] < 300


def test_top_k_keeps_only_the_k_most_likely(logits):
    assert set(draw(SamplingParams(top_k=3), logits)) == {0, 1, 2}


def test_top_p_cuts_the_tail(logits):
    probs = torch.softmax(logits, dim=-1)
    mass_before = torch.cumsum(probs, 0) - probs
    kept = set(torch.nonzero(mass_before < 0.5).flatten().tolist())
    counts = draw(SamplingParams(top_p=0.5), logits)
    assert set(counts) <= kept and len(counts) >= len(kept) - 1
    assert max(counts) < max(draw(SamplingParams(), logits))


def test_min_p_drops_unlikely_tokens(logits):
    # token i has probability exp(-0.2 i) relative to token 0: min_p 0.5 keeps i <= 3 (exp(-0.6) = 0.55)
    assert set(draw(SamplingParams(min_p=0.5), logits)) == {0, 1, 2, 3}


def test_penalties_lower_repeated_tokens(logits):
    flat = torch.zeros(VOCAB)
    base = draw(SamplingParams(), flat, output=[7, 7, 7, 8])
    presence = draw(SamplingParams(presence_penalty=2.0), flat, output=[7, 7, 7, 8])
    frequency = draw(SamplingParams(frequency_penalty=1.0), flat, output=[7, 7, 7, 8])
    assert presence[7] < base[7] / 3 and presence[8] < base[8] / 3
    assert frequency[7] < frequency[8] < base[8]  # counted three times vs once
    peaked = torch.full((VOCAB,), 0.5)
    peaked[5], peaked[0] = 3.0, 0.6
    greedy = SamplingParams(temperature=0)
    assert draw(greedy, peaked, num_draws=1, prompt=[5]) == {5: 1}
    # 3.0 / 10 falls below the others; a repeated positive logit is divided, a negative one multiplied.
    assert draw(greedy.replace(repetition_penalty=10.0), peaked, num_draws=1, prompt=[5]) == {0: 1}
    assert draw(greedy.replace(repetition_penalty=10.0), peaked, num_draws=1, prompt=[5, 0]) == {1: 1}


def test_seed_reproduces_whatever_the_batch(logits):
    params = SamplingParams(seed=1234)
    alone = sampler(logits[None].clone(), seqs_with(params, 1)).token_ids
    mixed_rows = seqs_with(SamplingParams(), 3) + seqs_with(params, 1)
    mixed = sampler(logits.expand(4, -1).clone(), mixed_rows).token_ids
    assert mixed[3] == alone[0]
    many = [sampler(logits[None].clone(), seqs_with(SamplingParams(seed=s), 1)).token_ids[0] for s in range(40)]
    assert len(set(many)) > 5  # different seeds differ
    first_row = seqs_with(params, 1)[0]
    stream = [sampler(logits[None].clone(), [first_row]).token_ids[0] for _ in range(10)]
    again_row = seqs_with(params, 1)[0]
    assert [sampler(logits[None].clone(), [again_row]).token_ids[0] for _ in range(10)] == stream


def test_min_tokens_masks_stop_tokens():
    logits = torch.full((201088,), -5.0)
    logits[200002] = 10.0  # <|return|> by far the most likely
    rows = seqs_with(SamplingParams(temperature=0, min_tokens=2), 1)
    assert sampler(logits[None].clone(), rows).token_ids == [int(logits.topk(2).indices[1])]
    rows[0].token_ids += [5, 6]
    assert sampler(logits[None].clone(), rows).token_ids == [200002]


def test_logprobs_are_raw_log_softmax(logits):
    rows = seqs_with(SamplingParams(temperature=0.5, top_k=2, logprobs=3, presence_penalty=1.0), 1, output=[0])
    out = sampler(logits[None].clone(), rows)
    expected = torch.log_softmax(logits, dim=-1)
    entry = out.logprobs[0]
    assert list(entry)[0] == out.token_ids[0]
    for token_id, value in entry.items():
        assert value == pytest.approx(expected[token_id].item(), abs=1e-6)
    assert {0, 1, 2} <= set(entry)


def test_invalid_params_are_refused():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(n=0), dict(max_tokens=0),
                dict(min_tokens=5, max_tokens=2), dict(stop=[""]), dict(logprobs=21), dict(presence_penalty=3)):
        with pytest.raises(SamplingParamsError):
            SamplingParams(**bad)
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(top_k=-1).top_k == 0
