"""Batched sampling on the logits' device: penalties, temperature, top-k, top-p, min-p, per-request seeds.

Every row can have different parameters. Work that no row asks for is skipped, so an all-greedy batch is one
argmax. Sampling draws exponential noise and takes argmax(probs / noise), which picks token i with probability
probs[i]; rows with a seed draw their noise from their own generator, so a seeded request gives the same
tokens whatever else shares its batch. Logprobs are those of the model: log_softmax of the raw logits, in
float32, over the whole vocabulary.

`sample` leaves its results on the device (nothing waits for the GPU), `DeviceSamples.copy_to_host` starts
their copy into pinned memory, and `HostCopy.wait` turns them into lists once that copy is done: the engine
runs the next step in between.
"""

from __future__ import annotations

import dataclasses

import torch

from gptoss_serve.cluster.engine.sequence import Sequence


@dataclasses.dataclass
class SamplerOutput:
    token_ids: list[int]  # per row
    logprobs: list[dict[int, float] | None]  # per row: {sampled: lp, top alternatives...}, None if not asked


@dataclasses.dataclass
class DeviceSamples:
    """A step's samples, still on the device."""
    token_ids: torch.Tensor  # [rows] int64
    logprob_values: torch.Tensor | None  # [rows, 1 + k] float32: the sampled token's, then the top k
    logprob_ids: torch.Tensor | None  # [rows, 1 + k] int64
    num_logprobs: list[int | None]  # per row: alternatives asked for (None: no logprobs)

    def copy_to_host(self) -> "HostCopy":
        """Starts copying the samples to the host without waiting for the device."""
        tensors = [t for t in (self.token_ids, self.logprob_values, self.logprob_ids) if t is not None]
        if self.token_ids.device.type != "cuda":
            return HostCopy(tensors, None, self.num_logprobs)
        copies = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
        for copy, tensor in zip(copies, tensors):
            copy.copy_(tensor, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return HostCopy(copies, done, self.num_logprobs)


@dataclasses.dataclass
class HostCopy:
    tensors: list[torch.Tensor]  # token ids, then logprob values and ids if asked for
    done: torch.cuda.Event | None  # recorded after the copies (None: CPU tensors, already there)
    num_logprobs: list[int | None]

    def wait(self) -> SamplerOutput:
        if self.done is not None:
            self.done.synchronize()
        token_ids = self.tensors[0].tolist()
        if len(self.tensors) == 1:
            return SamplerOutput(token_ids, [None] * len(token_ids))
        return SamplerOutput(token_ids, _logprob_dicts(self.tensors[1].tolist(), self.tensors[2].tolist(),
                                                       self.num_logprobs))


def to_device(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor, through pinned memory: a copy from pageable memory can make the
    host wait for the device's queue, which would undo async scheduling."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _request_generator(seq: Sequence, device: torch.device) -> torch.Generator:
    """The sequence's own generator; sample i of a seeded request gets its own stream."""
    generator = seq.generator
    if generator is None:
        seed = seq.params.seed if seq.index == 0 else hash((seq.params.seed, seq.index)) & (2 ** 63 - 1)
        generator = torch.Generator(device=device).manual_seed(seed)
        seq.generator = generator
    return generator


class Sampler:
    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits [num_seqs, vocab] float32, one row per sequence that samples. Waits for the device."""
        return self.sample(logits, seqs).copy_to_host().wait()

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> DeviceSamples:
        """Like __call__, but the results stay on the device."""
        params = [seq.params for seq in seqs]
        num_logprobs = [p.logprobs for p in params]
        want_logprobs = any(k is not None for k in num_logprobs)
        raw_logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None  # before any processing

        banned = [(row, sorted(seq.params.all_stop_token_ids)) for row, seq in enumerate(seqs)
                  if seq.num_output_tokens < seq.params.min_tokens]
        if banned or any(p.has_penalties for p in params):
            logits = logits.clone()  # the caller's logits stay raw
            if any(p.has_penalties for p in params):
                self._apply_penalties(logits, seqs)
            if banned:  # min_tokens: no stop token yet
                rows = to_device([r for r, ids in banned for _ in ids], torch.int64, self.device)
                cols = to_device([t for _, ids in banned for t in ids], torch.int64, self.device)
                logits[rows, cols] = float("-inf")

        token_ids = logits.argmax(dim=-1)  # [num_seqs]
        if not all(p.greedy for p in params):
            token_ids = torch.where(self._greedy_mask(params), token_ids, self._sample(logits, seqs))

        if not want_logprobs:
            return DeviceSamples(token_ids, None, None, num_logprobs)
        values, ids = self._gather_logprobs(raw_logprobs, token_ids, num_logprobs)
        return DeviceSamples(token_ids, values, ids, num_logprobs)

    def _greedy_mask(self, params) -> torch.Tensor:
        return to_device([p.greedy for p in params], torch.bool, self.device)

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        temperature = to_device([p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32,
                                self.device)
        logits = logits / temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1 for p in params):
            logits = self._top_k_top_p(logits, params)
        probs = torch.softmax(logits, dim=-1)  # [num_seqs, vocab]
        if any(p.min_p > 0 for p in params):
            min_p = to_device([p.min_p for p in params], torch.float32, self.device)
            probs = probs.masked_fill(probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True), 0.0)
        noise = torch.empty_like(probs).exponential_()
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None and not seq.params.greedy:
                noise[row].exponential_(generator=_request_generator(seq, self.device))
        return (probs / noise).argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor, params) -> torch.Tensor:
        vocab = logits.shape[-1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [num_seqs, vocab]
        top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, self.device)
        drop = torch.arange(vocab, device=self.device)[None, :] >= top_k[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        top_p = to_device([p.top_p for p in params], torch.float32, self.device)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the better tokens
        drop = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1)  # the first token is always kept
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(-1, order, sorted_logits)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> None:
        """In place. Presence and frequency penalties count generated tokens; the repetition penalty also the prompt's."""
        rows = [row for row, seq in enumerate(seqs) if seq.params.has_penalties]
        vocab = logits.shape[-1]
        output_counts = self._token_counts([seqs[r].output_token_ids for r in rows], vocab)  # [rows, vocab]
        seen = self._token_counts([seqs[r].prompt_token_ids for r in rows], vocab) > 0
        seen |= output_counts > 0
        row_index = to_device(rows, torch.int64, self.device)
        rows_logits = logits[row_index]
        as_tensor = lambda name: to_device(  # noqa: E731
            [getattr(seqs[r].params, name) for r in rows], torch.float32, self.device)[:, None]
        repetition = as_tensor("repetition_penalty")
        penalized = torch.where(rows_logits > 0, rows_logits / repetition, rows_logits * repetition)
        rows_logits = torch.where(seen, penalized, rows_logits)
        rows_logits -= as_tensor("frequency_penalty") * output_counts
        rows_logits -= as_tensor("presence_penalty") * (output_counts > 0)
        logits[row_index] = rows_logits

    def _token_counts(self, token_lists: list[list[int]], vocab: int) -> torch.Tensor:
        """[len(token_lists), vocab] float32: how often each id occurs in each list."""
        width = max((len(t) for t in token_lists), default=0)
        padded = torch.full((len(token_lists), width + 1), vocab, dtype=torch.int64)  # vocab = padding
        for row, tokens in enumerate(token_lists):
            padded[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.int64)
        padded = padded.to(self.device, non_blocking=True)
        counts = torch.zeros(len(token_lists), vocab + 1, dtype=torch.float32, device=self.device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
        return counts[:, :vocab]

    def _gather_logprobs(self, logprobs: torch.Tensor, token_ids: torch.Tensor, num_logprobs: list[int | None]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, 1 + k] values, [rows, 1 + k] ids): the sampled token's logprob, then the top k's."""
        k = max(n for n in num_logprobs if n is not None)
        sampled = logprobs.gather(1, token_ids[:, None])  # [num_seqs, 1]
        if k == 0:
            return sampled, token_ids[:, None]
        top_values, top_ids = logprobs.topk(k, dim=-1)
        return torch.cat((sampled, top_values), dim=1), torch.cat((token_ids[:, None], top_ids), dim=1)


def _logprob_dicts(values: list[list[float]], ids: list[list[int]], num_logprobs: list[int | None]
                   ) -> list[dict[int, float] | None]:
    result: list[dict[int, float] | None] = []
    for row, n in enumerate(num_logprobs):
        if n is None:
            result.append(None)
            continue
        entry = {ids[row][0]: values[row][0]}  # the sampled token first, even if outside the top n
        for token_id, value in zip(ids[row][1:n + 1], values[row][1:n + 1]):
            entry.setdefault(token_id, value)
        result.append(entry)
    return result
