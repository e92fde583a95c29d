"""Which sequences run in the next step, and how many tokens each: continuous batching with chunked prefill.

Each step has a token budget. Running sequences go first, oldest first: a decode takes one token, an unfinished
prefill takes the next chunk that fits (at most `long_prefill_token_threshold` tokens, if set, so that one long
prompt cannot hold the whole budget while short ones wait). Waiting sequences are admitted after them, first come
first served, starting after their cached prefix. When the KV cache is full, the newest running sequence is
preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed later (its tokens so
far become its prompt, and the prefix cache usually hands most of them back).
"""

from __future__ import annotations

import collections
import dataclasses

from gptoss_serve.cluster.engine.block_manager import BlockManager
from gptoss_serve.cluster.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclasses.dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence, the tokens computed in this step
    samples: list[bool]  # per sequence, whether the step ends at its last token, so it samples a new one
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    rejected: list[Sequence] = dataclasses.field(default_factory=list)  # finished: larger than the whole cache

    def __len__(self) -> int:
        return len(self.seqs)

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        self.samples.append(seq.num_computed_tokens + num_new_tokens == seq.num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_decode_only(self) -> bool:
        return all(n == 1 for n in self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 long_prefill_token_threshold: int | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        # n > 1: the other samples wait until the first has computed the prompt, then find it in the prefix
        # cache instead of computing it again.
        self._held_siblings: dict[int, list[Sequence]] = {}
        self.num_preemptions = 0

    def add(self, seqs: list[Sequence]) -> None:
        """The samples of one request; they share its prompt."""
        first, rest = seqs[0], seqs[1:]
        self.waiting.append(first)
        if rest and self.block_manager.enable_prefix_caching:
            self._held_siblings[first.seq_id] = rest
        else:
            self.waiting.extend(rest)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._held_siblings)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + sum(len(s) for s in self._held_siblings.values())

    # The step ------------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch([], [], [])
        budget = self.max_num_batched_tokens
        max_chunk = self.long_prefill_token_threshold or budget  # one sequence's tokens in this step
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.ends_with_pending_token:  # nothing more to compute: it ends when the engine reads that token
                i += 1
                continue
            num_new = min(seq.num_uncomputed_tokens, budget, max_chunk)
            while not self.block_manager.allocate(seq, num_new):
                if num_new > 1:  # a shorter prefill chunk may fit without preempting anyone
                    num_new //= 2
                elif len(self.running) == 1:  # alone and still short: it can never fit
                    self.finish([seq], FinishReason.LENGTH)
                    batch.rejected.append(seq)
                    break
                else:
                    victim = self.running.pop()
                    self._preempt(victim)
                    batch.preempted.append(victim)
                    if victim is seq:
                        break
            else:
                batch.add(seq, num_new)
                budget -= num_new
                i += 1
                continue
            break
        if batch.preempted:  # memory is short: admit nothing new
            return batch
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hit = self.block_manager.find_prefix(seq)
            num_new = self._fit_chunk(seq, min(seq.num_tokens - hit.num_tokens, budget, max_chunk), hit)
            if num_new == 0:
                if self.running:
                    break
                self.waiting.popleft()  # not even one token fits in an empty cache: it never will
                self.finish([seq], FinishReason.LENGTH)
                batch.rejected.append(seq)
                continue
            self.block_manager.record_admission(seq, hit)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, num_new)
            budget -= num_new
        return batch

    def _fit_chunk(self, seq: Sequence, num_new: int, hit) -> int:
        """Allocates blocks for the chunk, or, when nothing else runs, for the largest halving of it that fits
        (a long prefill chunk needs many sliding-pool blocks at once). 0 if nothing fits."""
        while not self.block_manager.allocate(seq, num_new, hit):
            if self.running or num_new == 1:
                return 0
            num_new //= 2
        return num_new

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def update(self, batch: ScheduledBatch, sampled_token_ids: list[int | None]) -> None:
        """After the step was launched: the computed tokens enter the prefix cache; sampled tokens (or
        PENDING_TOKEN, for the engine to fill in later) are appended. Sequences that finished meanwhile (aborted,
        or stopped by the token before) are left alone."""
        for seq, num_new, token_id in zip(batch.seqs, batch.num_new_tokens, sampled_token_ids):
            if seq.is_finished:
                continue
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if token_id is not None:
                seq.token_ids.append(token_id)
            if seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._release_siblings(seq)

    def _release_siblings(self, seq: Sequence) -> None:
        siblings = self._held_siblings.pop(seq.seq_id, None)
        if siblings:
            self.waiting.extendleft(reversed(siblings))

    # Leaving ------------------------------------------------------------------------------------------------
    def finish(self, seqs: list[Sequence], reason: FinishReason) -> None:
        """Ends sequences in any state (running, waiting or held), freeing their blocks."""
        if not seqs:
            return
        gone = {seq.seq_id for seq in seqs}
        for seq in seqs:
            if seq.is_finished:
                continue
            self.block_manager.free(seq)
            seq.status = SequenceStatus.FINISHED
            seq.finish_reason = seq.finish_reason or reason
            self._release_siblings(seq)
        self.running = [s for s in self.running if s.seq_id not in gone]
        if any(s.seq_id in gone for s in self.waiting):
            self.waiting = collections.deque(s for s in self.waiting if s.seq_id not in gone)
        for leader_id, siblings in list(self._held_siblings.items()):
            kept = [s for s in siblings if s.seq_id not in gone]
            if kept:
                self._held_siblings[leader_id] = kept
            else:
                del self._held_siblings[leader_id]
