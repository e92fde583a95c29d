"""The engine: requests in, one step at a time, outputs out. No Ray, no HTTP, no threads.

A step is: schedule (which sequences, how many tokens each), run (forward and sample on the device),
postprocess (append tokens, detokenize, check stops, free finished sequences, build outputs). The serving
layer calls add_request / abort_request between steps and streams what step() returns.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Iterable

import numpy as np
import torch

from gptoss_serve.cluster.engine.block_manager import BlockManager
from gptoss_serve.cluster.engine.config import EngineConfig
from gptoss_serve.cluster.engine.kv_plan import KVPlan, plan_kv_cache
from gptoss_serve.cluster.engine.model_runner import LaunchedStep, ModelRunner
from gptoss_serve.cluster.engine.outputs import CompletionOutput, EngineStats, RequestMetrics, RequestOutput
from gptoss_serve.cluster.engine.sampling_params import OutputKind, SamplingParams
from gptoss_serve.cluster.engine.scheduler import ScheduledBatch, Scheduler
from gptoss_serve.cluster.engine.sequence import PENDING_TOKEN, FinishReason, Sequence
from gptoss_serve.cluster.engine.step_broadcast import StepBroadcaster, agree_kv_plan
from gptoss_serve.cluster.engine.stop import TextState, check_token_stop, length_stop
from gptoss_serve.model.batch import KVCache
from gptoss_serve.model.transformer import GptOssModel


@dataclasses.dataclass
class _PendingStep:
    launched: LaunchedStep
    seqs: list[Sequence]  # those whose last token is this step's PENDING_TOKEN


@dataclasses.dataclass
class _Request:
    request_id: str
    params: SamplingParams
    seqs: list[Sequence]
    texts: list[TextState | None]
    prompt: str | None
    num_sent_tokens: list[int]  # per sample, for DELTA outputs
    num_sent_chars: list[int]

    @property
    def finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


def build_model_runner(model: GptOssModel, config: EngineConfig, broadcaster: StepBroadcaster | None = None
                       ) -> tuple[KVPlan, int, ModelRunner]:
    """(KV plan, max_model_len, runner): the device side of an engine. Every rank of a sharded model builds it at
    the same time (planning and graph capture run collectives) and agrees on the smallest plan."""
    plan = agree_kv_plan(plan_kv_cache(model, config), broadcaster)
    device = next(model.parameters()).device
    kv_cache = KVCache.allocate(model.config, plan.num_blocks, config.block_size, model.dtype, device,
                                num_kv_heads=model.layout.num_kv_heads(model.config),
                                num_sliding_blocks=plan.num_sliding_blocks)
    max_model_len = min(config.max_model_len or model.config.max_context_length, plan.num_blocks * config.block_size)
    runner = ModelRunner(model, kv_cache, config.max_num_seqs, max_model_len, use_cuda_graphs=not config.enforce_eager,
                         max_graph_batch_size=config.max_graph_batch_size, broadcaster=broadcaster)
    return plan, max_model_len, runner


def run_follower(model: GptOssModel, config: EngineConfig, broadcaster: StepBroadcaster) -> int:
    """The loop of every rank but the engine's in a sharded replica: runs the steps it receives until told to
    stop; returns the number of steps."""
    _, _, runner = build_model_runner(model, config, broadcaster)
    return runner.follow()


class LLMEngine:
    def __init__(self, model: GptOssModel, config: EngineConfig | None = None, tokenizer=None,
                 broadcaster: StepBroadcaster | None = None):
        """model: a loaded GptOssModel (on its device), or this rank's shard of one, whose other ranks run
        run_follower() with `broadcaster`'s group; tokenizer: for text and stop strings (None: token ids
        only, text is '')."""
        self.model = model
        self.config = config = config or EngineConfig()
        self.tokenizer = tokenizer
        # Before the runner captures CUDA graphs, so that graph replays count too.
        self._expert_token_counts = model.count_expert_tokens() if config.count_expert_tokens else None
        plan, self.max_model_len, self.model_runner = build_model_runner(model, config, broadcaster)
        self.take_expert_token_counts()  # drops the memory-profiling forward's dummy tokens
        self.kv_cache = self.model_runner.kv_cache
        self.block_manager = BlockManager(plan.num_blocks, config.block_size, model.config.sliding_window,
                                          plan.num_sliding_blocks, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.long_prefill_token_threshold)
        self.requests: dict[str, _Request] = {}
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.last_step_num_seqs = 0  # sequences in the latest step's batch
        self.last_step_num_tokens = 0  # tokens it computed (decodes plus prefill chunks)
        # Async scheduling: the latest launched step, whose sampled tokens are not read yet.
        self._async = config.async_scheduling
        self._pending: _PendingStep | None = None

    # Requests ------------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, prompt: str | None = None) -> None:
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request {request_id!r} is already running")
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if not all(0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"the prompt has {len(prompt_token_ids)} tokens; this engine holds at most "
                             f"{self.max_model_len} per sequence, output included")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        seqs = [Sequence(request_id, i, prompt_token_ids, params, arrival_time) for i in range(params.n)]
        texts = [TextState(self.tokenizer, params.stop, params.include_stop_str_in_output,
                           params.skip_special_tokens) if params.detokenize else None for _ in seqs]
        self.requests[request_id] = _Request(request_id, params, seqs, texts, prompt, [0] * params.n,
                                             [0] * params.n)
        self.scheduler.add(seqs)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Ends requests now, in whatever state; unknown (or finished) ids are ignored."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.pop(request_id, None)
            if request is not None:
                self.scheduler.finish(request.seqs, FinishReason.ABORT)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # The step ------------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedules and launches a step. With async scheduling the outputs returned are those of the step
        before, read while this one runs on the device (the last call with nothing left to launch returns the
        final ones); otherwise this step's own, after waiting for it."""
        touched: dict[str, _Request] = {}
        if self._pending is not None and not self._can_overlap():
            self._read_pending(touched)
        batch = self.scheduler.schedule()
        self.last_step_num_seqs, self.last_step_num_tokens = len(batch), batch.num_tokens
        touched.update((seq.request_id, self.requests[seq.request_id]) for seq in batch.rejected)
        previous = self._pending.launched if self._pending is not None else None
        launched = self.model_runner.launch(batch, previous) if len(batch) else None
        if launched is not None and not self._async:
            self._advance(batch, launched)  # and read right below
        if self._pending is not None:  # async: the previous step's tokens, read while this one runs
            self._read_pending(touched)
        outputs = self._make_outputs(touched)
        if launched is not None and self._async:
            self._advance(batch, launched)
        return outputs

    @property
    def async_scheduling(self) -> bool:
        return self._async

    @async_scheduling.setter
    def async_scheduling(self, enabled: bool) -> None:
        """Switches between steps (benchmarks); a pending step's tokens are read at the next step either way."""
        self._async = enabled

    def _can_overlap(self) -> bool:
        """Whether the next step may launch before the pending tokens are read: not in sync mode, nor where the
        sampler needs the latest tokens' values (repetition penalties)."""
        return self._async and not any(seq.params.has_penalties for seq in self._pending.seqs)

    def _advance(self, batch: ScheduledBatch, launched: LaunchedStep) -> None:
        """The launched step's effect on the sequences, without its token values: computed tokens, and a
        PENDING_TOKEN for each sampled one."""
        self.num_prompt_tokens += sum(n for n, s in zip(batch.num_new_tokens, batch.samples) if not s or n > 1)
        seqs = [seq for seq, s in zip(batch.seqs, batch.samples) if s and not seq.is_finished]
        self.scheduler.update(batch, [PENDING_TOKEN if s else None for s in batch.samples])
        for seq in seqs:
            seq.ends_with_pending_token = length_stop(seq, self.max_model_len)
        self._pending = _PendingStep(launched, seqs)

    def _read_pending(self, touched: dict[str, _Request]) -> None:
        """Waits for the pending step's tokens, puts them in place of their PENDING_TOKENs (each sequence's last
        token: the next step's advance comes after this), and postprocesses them (stops, text, finishing)."""
        pending, self._pending = self._pending, None
        result = pending.launched.host_copy.wait() if pending.launched.host_copy is not None else None
        now = time.perf_counter()
        finished = []
        for seq in pending.seqs:
            if seq.is_finished:  # aborted while its step ran
                continue
            row = pending.launched.sample_rows[seq.seq_id]
            seq.token_ids[-1] = result.token_ids[row]
            seq.ends_with_pending_token = False
            self.num_generated_tokens += 1
            request = self.requests[seq.request_id]
            touched[seq.request_id] = request
            if self._postprocess_token(request, seq, result.logprobs[row], now):
                finished.append(seq)
        self.scheduler.finish(finished, FinishReason.STOP)

    def _make_outputs(self, touched: dict[str, _Request]) -> list[RequestOutput]:
        outputs = []
        for request in touched.values():
            output = self._make_output(request)
            if output is not None:
                outputs.append(output)
            if request.finished:
                del self.requests[request.request_id]
        return outputs

    def _postprocess_token(self, request: _Request, seq: Sequence, logprobs, now: float) -> bool:
        """The token just appended to seq: record it, detokenize it, and say whether seq stops here."""
        if seq.first_token_time is None:
            seq.first_token_time = now
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        stop = check_token_stop(seq, self.max_model_len)
        text = request.texts[seq.index]
        if text is not None:
            if stop is not None and stop[0] == FinishReason.STOP:
                text.flush()  # a stop token adds no text
            else:
                stop_string = text.append(seq.token_ids[-1])
                if stop_string is not None:
                    stop = (FinishReason.STOP, stop_string)
                elif stop is not None:
                    text.flush()
        if stop is None:
            return False
        seq.finish_reason, seq.stop_reason = stop
        return True

    def _make_output(self, request: _Request) -> RequestOutput | None:
        kind, finished = request.params.output_kind, request.finished
        if kind == OutputKind.FINAL_ONLY and not finished:
            return None
        completions = []
        for seq in request.seqs:
            text = request.texts[seq.index]
            full_text = "" if text is None else text.text[:text.stable_len(seq.is_finished)]
            token_ids, logprobs = seq.output_token_ids, seq.logprobs if request.params.logprobs is not None else None
            if kind == OutputKind.DELTA:
                sent_tokens, sent_chars = request.num_sent_tokens[seq.index], request.num_sent_chars[seq.index]
                if len(token_ids) == sent_tokens and len(full_text) == sent_chars and not seq.is_finished:
                    continue
                request.num_sent_tokens[seq.index], request.num_sent_chars[seq.index] = len(token_ids), len(full_text)
                token_ids, full_text = token_ids[sent_tokens:], full_text[sent_chars:]
                logprobs = logprobs[sent_tokens:] if logprobs is not None else None
            completions.append(CompletionOutput(
                index=seq.index, text=full_text, token_ids=list(token_ids),
                logprobs=list(logprobs) if logprobs is not None else None,
                finish_reason=seq.finish_reason.value if seq.finish_reason else None, stop_reason=seq.stop_reason))
        first = request.seqs[0]
        first_token_times = [s.first_token_time for s in request.seqs if s.first_token_time is not None]
        metrics = RequestMetrics(
            arrival_time=first.arrival_time, first_token_time=min(first_token_times, default=None),
            finished_time=time.perf_counter() if finished else None, num_prompt_tokens=first.num_prompt_tokens,
            num_cached_prompt_tokens=first.num_prefix_hit_tokens,
            num_preemptions=sum(s.num_preemptions for s in request.seqs))
        return RequestOutput(request.request_id, first.prompt_token_ids, completions, finished, metrics,
                             request.prompt)

    # Metrics -------------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage, sliding_kv_cache_usage=bm.sliding_usage,
            prefix_cache_hit_rate=bm.prefix_hit_rate, num_preemptions=self.scheduler.num_preemptions,
            num_kv_blocks=bm.full.num_blocks, num_sliding_kv_blocks=bm.sliding.num_blocks if bm.sliding else None,
            num_prompt_tokens=self.num_prompt_tokens, num_generated_tokens=self.num_generated_tokens)

    def take_expert_token_counts(self) -> np.ndarray | None:
        """Tokens the router sent to each expert of each layer since the previous call, [num_layers, num_experts]
        int64; None unless config.count_expert_tokens. Waits for the device: call it now and then, not per step."""
        if self._expert_token_counts is None:
            return None
        with torch.inference_mode():
            counts = self._expert_token_counts.to("cpu", copy=True).numpy()
            self._expert_token_counts.zero_()
        return counts
