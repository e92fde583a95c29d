"""The metrics that need no Ray cluster: the model's MoE load counts, the engine's snapshot of them, the engine
client's step statistics, the replica's new series (token latencies, steps, batches, preemptions, prefix cache,
device memory, expert load) and their mirror into Ray's metrics."""

from __future__ import annotations

import asyncio
import re
import time

import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from gptoss_serve.cluster.engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def counting_llm():
    from gptoss_serve.cluster.engine.llm import LLM

    return LLM(None, dtype="float32", kernels="torch", device="cpu", progress=False, max_num_seqs=4,
               kv_cache_memory_bytes=16 * 2 ** 20, count_expert_tokens=True)


def test_model_counts_routed_tokens_but_not_padding_rows():
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.model.batch import KVCache, build_forward_batch
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import random_model

    config = preset("tiny")
    kernels = get_kernels("torch")  # the Triton kernels' counts: tests/test_kernels_moe.py
    model = random_model(config, 3, torch.float32, "cpu", kernels)
    counts = model.count_expert_tokens()  # [num_layers, num_experts]
    routed = []  # each layer's expert ids [num_tokens, top_k], as the routing op returned them
    norm_and_route = kernels.norm_and_route

    def recording(*args):
        out = norm_and_route(*args)
        routed.append(out[3].clone())
        return out

    kernels.norm_and_route = recording
    kv = KVCache.allocate(config, 8, 8, torch.float32, "cpu")
    batch = build_forward_batch([[5, 6, 7], [8, 9]], [0, 0], [[0], [1]], 8)
    batch.slot_mapping[-1] = -1  # a CUDA-graph padding row: computed, not counted
    model(batch, kv)
    assert len(routed) == config.num_hidden_layers
    for layer, expert_ids in enumerate(routed):
        expected = torch.bincount(expert_ids[:-1].reshape(-1).long(), minlength=config.num_experts)
        assert counts[layer].tolist() == expected.tolist()
    assert counts.sum().item() == 4 * config.experts_per_token * config.num_hidden_layers


def test_engine_snapshots_and_resets_expert_counts(counting_llm):
    engine = counting_llm.engine
    config = engine.model.config
    counting_llm.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    counts = engine.take_expert_token_counts()
    # 5 prompt tokens and 5 fed-back samples pass every layer; the 6th sample is never computed.
    assert counts.shape == (config.num_hidden_layers, config.num_experts) and counts.dtype == np.int64
    assert (counts.sum(axis=1) == 10 * config.experts_per_token).all()
    assert engine.take_expert_token_counts().sum() == 0
    # Async scheduling: the final step() computes nothing, it only reads the last pending token.
    assert (engine.last_step_num_seqs, engine.last_step_num_tokens) == (0, 0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_replays_count_experts_without_padding_rows():
    from gptoss_serve.cluster.engine.config import EngineConfig
    from gptoss_serve.cluster.engine.llm import LLM
    from gptoss_serve.kernels.backend import get_kernels
    from gptoss_serve.model.config import preset
    from gptoss_serve.model.loader import random_model

    config = preset("tiny")
    model = random_model(config, seed=0, dtype=torch.bfloat16, device="cuda", kernels=get_kernels("triton"))
    engine_config = dict(block_size=16, num_kv_blocks=256, max_num_seqs=8, max_num_batched_tokens=128,
                         enable_prefix_caching=False, count_expert_tokens=True)
    prompts = [[(7 * i + j) % config.vocab_size for j in range(n)] for i, n in enumerate((5, 17, 30))]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    computed_tokens = sum(len(p) + params.max_tokens - 1 for p in prompts)  # the last sample is never fed back
    for enforce_eager in (True, False):
        llm = LLM.from_model(model, config=EngineConfig(enforce_eager=enforce_eager, **engine_config))
        assert (llm.engine.model_runner.graphs is None) == enforce_eager
        llm.generate(prompts, params)  # decodes of 3 sequences replay the 4-row graph: one padding row each
        counts = llm.engine.take_expert_token_counts()
        assert (counts.sum(axis=1) == computed_tokens * config.experts_per_token).all(), (enforce_eager, counts)


def test_engine_without_counting_has_no_counts():
    from gptoss_serve.cluster.engine.llm import LLM

    llm = LLM(None, dtype="float32", kernels="torch", device="cpu", progress=False, kv_cache_memory_bytes=2 ** 22)
    assert llm.engine.take_expert_token_counts() is None and llm.engine.model.expert_token_counts is None


def test_local_engine_client_publishes_step_histograms_memory_and_expert_totals(counting_llm):
    from gptoss_serve.cluster.serve.local_engine import LocalEngineClient

    async def scenario():
        client = LocalEngineClient(counting_llm.engine, max_queued_requests=4, loop=asyncio.get_running_loop())
        try:
            params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
            async for _ in client.generate("a", [1, 2, 3], params):
                pass
            # The idle loop reads expert counts and memory about once a second; a loaded machine takes longer.
            deadline, wanted = time.monotonic() + 15, 6 * counting_llm.engine.model.config.experts_per_token
            while (client.stats().device_memory_total_bytes == 0 or client.stats().num_steps < 4
                   or (await client.expert_token_counts()).sum() < wanted):
                assert time.monotonic() < deadline, client.stats()
                await asyncio.sleep(0.1)
            return client.stats(), await client.expert_token_counts()
        finally:
            await client.shutdown()

    stats, totals = asyncio.run(scenario())
    assert stats.num_steps == 4 and stats.batch_size.count == 4 and stats.batch_size.total == 4
    assert stats.tokens_per_step.total == 3 + 3  # the prompt, then three decodes
    assert stats.tokens_per_step.bucket_counts[0] == 3  # three steps of one token
    assert stats.device == "cpu" and 0 < stats.device_memory_used_bytes < stats.device_memory_total_bytes
    assert stats.num_prefix_queried_tokens >= 3
    assert totals.sum() >= 6 * counting_llm.engine.model.config.experts_per_token


def test_request_record_token_latencies():
    from gptoss_serve.cluster.serve.metrics import RequestRecord

    record = RequestRecord("completions")
    record.tokens_arrived(0)
    record.tokens_arrived(1)  # another sample's first token: no gap
    record.tokens_arrived(0)
    record.tokens_arrived(0)
    assert record.first_token_time is not None and len(record.inter_token_latencies_s) == 2


def test_replica_series_render(counting_llm):
    from gptoss_serve.cluster.serve.engine_client import CountHistogram, EngineStats
    from gptoss_serve.cluster.serve.metrics import ReplicaMetrics, RequestRecord, render

    metrics = ReplicaMetrics("m", "r1")
    record = RequestRecord("chat", outcome="stop", num_output_tokens=3)
    for _ in range(3):
        record.tokens_arrived()
    metrics.observe(record)
    histogram = CountHistogram.empty((1, 8)).add(1).add(5).add(20)
    metrics.set_engine_stats(EngineStats(num_steps=3, num_preemptions=2, batch_size=histogram,
                                         tokens_per_step=histogram, num_prefix_queried_tokens=10,
                                         num_prefix_hit_tokens=4, device="cuda:0", device_memory_used_bytes=5,
                                         device_memory_total_bytes=10))
    metrics.set_expert_token_counts(np.array([[1, 0, 2], [0, 3, 0]]))
    text = render([metrics.snapshot()]).decode()
    samples = {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model", "replica")))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    chat = (("endpoint", "chat"),)
    assert samples["gptoss_time_per_output_token_seconds_count", chat] == 1
    assert samples["gptoss_inter_token_latency_seconds_count", chat] == 2
    assert samples["gptoss_engine_steps_total", ()] == 3 and samples["gptoss_num_preemptions_total", ()] == 2
    assert samples["gptoss_batch_size_bucket", (("le", "8.0"),)] == 2
    assert samples["gptoss_tokens_per_step_bucket", (("le", "+Inf"),)] == 3
    assert samples["gptoss_tokens_per_step_sum", ()] == 26
    assert samples["gptoss_prefix_cache_hits_total", ()] == 4 and samples["gptoss_replica_up", ()] == 1
    assert samples["gptoss_device_memory_used_bytes", (("device", "cuda:0"),)] == 5
    assert samples["gptoss_expert_tokens_total", (("expert", "1"), ("layer", "1"))] == 3
    assert len(re.findall(r"^gptoss_expert_tokens_total\{", text, re.M)) == 6


def test_ray_mirror_sets_gauges_and_grows_counters(monkeypatch):
    from ray.util import metrics as ray_metrics

    from gptoss_serve.cluster.observability.ray_export import RayMetricsMirror

    recorded = []

    class Fake:
        def __init__(self, name, description, tag_keys):
            self.name, self.tag_keys = name, tag_keys

        def set(self, value, tags):
            recorded.append(("set", self.name, value, tags))

        def inc(self, value, tags):
            recorded.append(("inc", self.name, value, tags))

    monkeypatch.setattr(ray_metrics, "Counter", Fake)
    monkeypatch.setattr(ray_metrics, "Gauge", Fake)
    mirror = RayMetricsMirror()
    labels = {"model": "m", "replica": "r"}

    def snap(count):
        return [("gptoss_requests", "counter", "", [("gptoss_requests_total", labels, count),
                                                     ("gptoss_requests_created", labels, 1e9)]),
                ("gptoss_num_requests_running", "gauge", "", [("gptoss_num_requests_running", labels, 2.0)]),
                ("gptoss_time_to_first_token_seconds", "histogram", "", [])]

    mirror.update(snap(3.0))
    mirror.update(snap(5.0))
    mirror.update(snap(5.0))
    assert [r[:3] for r in recorded] == [("inc", "gptoss_requests", 3.0), ("set", "gptoss_num_requests_running", 2.0),
                                         ("inc", "gptoss_requests", 2.0), ("set", "gptoss_num_requests_running", 2.0),
                                         ("set", "gptoss_num_requests_running", 2.0)]
