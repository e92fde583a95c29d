"""The prefix-affinity request router: its pieces on plain data, then 3 replicas of the tiny model on the session's
Ray cluster (multi-turn chats stay with the replica holding their prefix; uniform traffic spreads evenly)."""

from __future__ import annotations

import collections
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gptoss_serve.cluster.serve.prefix_summary import (
    BloomFilter,
    PrefixSummary,
    RoutedPrefixes,
    key_hash,
    matched_blocks,
    prefix_block_hashes,
)
from gptoss_serve.cluster.serve.router import (
    REASON_CONVERSATION,
    REASON_LEAST_LOADED,
    REASON_OVERLOADED,
    REASON_PREFIX,
    DecayingCounts,
    ReplicaView,
    RoutingPolicy,
)
from gptoss_serve.cluster.serve.routing_hint import RoutingHint

APP_NAME = "router_test"
MODEL = "gpt-oss-default"
NUM_REPLICAS = 3
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()


# Prefix fingerprints ------------------------------------------------------------------------------------------
def test_block_hashes_chain_over_the_whole_prefix():
    tokens = list(range(1000))
    hashes = prefix_block_hashes(tokens)
    assert len(hashes) == 62 and prefix_block_hashes(tokens[:500]) == hashes[:31]
    assert prefix_block_hashes([7] + tokens[1:])[5] != hashes[5]  # block 5 names blocks 0..5
    assert prefix_block_hashes(tokens, max_blocks=10) == hashes[:10]


def test_bloom_filter_has_no_false_negatives_and_few_false_positives():
    keys = [random.Random(0).getrandbits(64) for _ in range(1)] + list(range(1, 5000))
    bloom = BloomFilter.build(keys)
    assert all(key in bloom for key in keys)
    rng = random.Random(1)
    assert sum(rng.getrandbits(64) in bloom for _ in range(20000)) < 20000 * 0.02
    assert BloomFilter(bloom.bits).bits == bloom.bits  # what crosses the wire is the bytes


def test_prefix_match_survives_a_false_positive():
    hashes = list(range(100))
    held = set(hashes[:10]) | {hashes[50]}  # a false positive where the binary search looks first
    assert matched_blocks(hashes, held.__contains__) == 10
    assert matched_blocks(hashes, set(hashes).__contains__) == 100 and matched_blocks([], held.__contains__) == 0


def test_summary_evicts_a_prompt_from_its_tail():
    first = prefix_block_hashes(list(range(640)))  # 40 blocks
    summary = PrefixSummary(capacity=50)
    summary.add_prompt(first)
    summary.add([key_hash("resp_1")])
    assert matched_blocks(first, summary.bloom().__contains__) == 40 and key_hash("resp_1") in summary.bloom()
    summary.add_prompt(prefix_block_hashes(list(range(5000, 5160))))  # 10 more: the first prompt loses 1 block
    assert len(summary) == 50 and matched_blocks(first, summary.bloom().__contains__) == 39


def test_routed_prefixes_per_replica_and_expiry():
    clock = [0.0]
    memory = RoutedPrefixes(max_keys=100, ttl_s=10, clock=lambda: clock[0])
    hashes = prefix_block_hashes(list(range(320)))  # 20 blocks
    memory.record(hashes, "A", keys=[key_hash("resp_a")])
    memory.record(hashes[:3], "B")  # a shared system prompt moves to B's name; A still holds the rest
    assert memory.matched_blocks(hashes) == {"B": 3, "A": 20} and memory.owner(key_hash("resp_a")) == "A"
    clock[0] = 11
    assert memory.matched_blocks(hashes) == {} and memory.owner(key_hash("resp_a")) is None


# The policy -------------------------------------------------------------------------------------------------
def _hint(num_blocks: int = 20, previous_response_id: str | None = None) -> RoutingHint:
    return RoutingHint(tuple(range(num_blocks)), num_blocks * 16, previous_response_id)


def test_policy_prefers_the_longest_prefix_unless_much_busier():
    policy = RoutingPolicy(imbalance_threshold=4, min_prefix_match_tokens=64, rng=random.Random(0))
    views = [ReplicaView("A", load=3, matched_blocks=20), ReplicaView("B", load=0, matched_blocks=3),
             ReplicaView("C", load=1, matched_blocks=3)]
    decision = policy.choose(views, _hint())
    assert (decision.replica, decision.reason, decision.matched_blocks) == ("A", REASON_PREFIX, 20)
    assert decision.fallbacks == ("B", "C")
    busy = [ReplicaView("A", load=5, matched_blocks=20), *views[1:]]
    assert policy.choose(busy, _hint()).reason == REASON_OVERLOADED
    same = [ReplicaView(r, load=0, matched_blocks=3) for r in "ABC"]  # only the shared system prompt
    assert policy.choose(same, _hint()).reason == REASON_LEAST_LOADED
    short = [ReplicaView("A", load=0, matched_blocks=6), ReplicaView("B", load=0, matched_blocks=3)]
    assert policy.choose(short, _hint()).reason == REASON_LEAST_LOADED  # 48 tokens ahead: below 64
    template = [ReplicaView("A", load=0, matched_blocks=8), ReplicaView("B", load=0, matched_blocks=0)]
    assert policy.choose(template, _hint()).reason == REASON_LEAST_LOADED  # 8 of 20 blocks: below half
    assert policy.choose(template, _hint(num_blocks=16)).reason == REASON_PREFIX


def test_policy_follows_the_conversation_then_balances():
    policy = RoutingPolicy(imbalance_threshold=4, rng=random.Random(0))
    views = [ReplicaView("A", load=2), ReplicaView("B", load=0, holds_conversation=True), ReplicaView("C", load=1)]
    assert policy.choose(views, _hint(0, "resp_x")).replica == "B"
    assert policy.choose(views, _hint(0, "resp_x")).reason == REASON_CONVERSATION
    # Power of two choices: never the busiest of three; equal loads go to the one sent fewer requests lately.
    counts = collections.Counter(policy.choose(views, None).replica for _ in range(300))
    assert counts["A"] == 0 and counts["B"] > counts["C"] > 0
    idle = [ReplicaView(r, load=0, recent_requests=n) for r, n in (("A", 3.0), ("B", 1.0), ("C", 2.0))]
    assert policy.choose(idle[1:], None).replica == "B"


def test_decaying_counts_halve_every_half_life():
    clock = [0.0]
    counts = DecayingCounts(half_life_s=10, clock=lambda: clock[0])
    counts.add("A")
    counts.add("A")
    clock[0] = 10
    assert counts.get("A") == pytest.approx(1.0) and counts.get("B") == 0.0
    counts.add("A")
    clock[0] = 20
    assert counts.get("A") == pytest.approx(1.0)


# On Serve -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base_url(deploy_app) -> str:
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app

    app = build_app({"num_replicas": NUM_REPLICAS, "dtype": "float32", "kernels": "torch", "device": "cpu",
                     "max_num_seqs": 16, "max_queued_requests": 16, "kv_cache_memory_bytes": 32 * 2 ** 20,
                     "router": {"stats_period_s": 0.5}})
    url = deploy_app(app, APP_NAME, timeout_s=180)
    yield url
    serve.delete(APP_NAME)


def _chat(client: httpx.Client, messages: list[dict]) -> tuple[str, dict]:
    response = client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 6,
                                                          "temperature": 0})
    assert response.status_code == 200, response.text
    return response.headers["x-gptoss-replica"], response.json()


def _text(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


def _conversation(base_url: str, seed: int, num_turns: int) -> list[tuple[str, int, int]]:
    """(replica, prompt tokens, cached prompt tokens) of each turn of one chat with its own long opening."""
    rng = random.Random(seed)
    messages = [{"role": "user", "content": f"Conversation {seed}. {_text(rng, 150)} Summarize this."}]
    turns = []
    with httpx.Client(base_url=base_url, timeout=60) as client:
        for _ in range(num_turns):
            replica, body = _chat(client, messages)
            usage = body["usage"]
            turns.append((replica, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]))
            messages += [{"role": "assistant", "content": body["choices"][0]["message"]["content"] or "ok"},
                         {"role": "user", "content": f"And {_text(rng, 8)}?"}]
    return turns


def _metric(page: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_uniform_traffic_spreads_within_20_percent(base_url):
    # First of the tests on the deployed app: ties between equally loaded replicas go to the one sent fewer
    # requests lately (a 30 s half-life), so traffic from a test just before (conversations kept on their
    # replicas) would be evened out here, skewing this test's own counts by design.
    def one(i: int) -> str:
        with httpx.Client(base_url=base_url, timeout=60) as client:
            return _chat(client, [{"role": "user", "content": f"Question {i}: {_text(random.Random(i), 12)}?"}])[0]

    with ThreadPoolExecutor(max_workers=6) as pool:
        counts = collections.Counter(pool.map(one, range(90)))
    mean = 90 / NUM_REPLICAS
    assert len(counts) == NUM_REPLICAS and all(abs(n - mean) <= 0.2 * mean for n in counts.values()), counts


def test_follow_ups_stay_with_the_replica_holding_their_prefix(base_url):
    before = httpx.get(f"{base_url}/metrics").text
    with ThreadPoolExecutor(max_workers=3) as pool:
        conversations = list(pool.map(lambda seed: _conversation(base_url, seed, 4), range(12)))
    follow_ups = [(turn, previous) for turns in conversations for previous, turn in zip(turns, turns[1:])]
    same_replica = sum(turn[0] == previous[0] for turn, previous in follow_ups)
    assert same_replica >= 0.9 * len(follow_ups), conversations
    # The engines saw it: each follow-up found its previous prompt's full blocks in the prefix cache.
    hits = sum(turn[2] >= previous[1] // 16 * 16 - 16 for turn, previous in follow_ups)
    assert hits >= 0.9 * len(follow_ups), conversations
    assert len({turns[0][0] for turns in conversations}) == NUM_REPLICAS  # the conversations were spread out
    deadline = time.monotonic() + 30  # the router pushes its series every 2 s; a loaded machine takes longer
    while True:
        after = httpx.get(f"{base_url}/metrics").text
        routed_by_prefix = (_metric(after, "gptoss_router_decisions_total", reason=REASON_PREFIX)
                            - _metric(before, "gptoss_router_decisions_total", reason=REASON_PREFIX))
        if routed_by_prefix >= 0.9 * len(follow_ups) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert routed_by_prefix >= 0.9 * len(follow_ups)
    assert _metric(after, "gptoss_router_prefix_matched_tokens_total") > 0
    hit_ratios = [float(v) for v in re.findall(r"^gptoss_prefix_cache_hit_ratio\{[^}]*\} (\S+)$", after, re.M)]
    assert len(hit_ratios) == NUM_REPLICAS and min(hit_ratios) > 0.3


def test_responses_follow_ups_go_to_the_replica_that_stored_the_conversation(base_url):
    def conversation(seed: int) -> list[str]:
        replicas, previous = [], None
        with httpx.Client(base_url=base_url, timeout=60) as client:
            for turn in range(3):
                body = {"model": MODEL, "input": f"Chat {seed}, turn {turn}: {_text(random.Random(seed), 20)}",
                        "max_output_tokens": 6, "temperature": 0, "previous_response_id": previous}
                response = client.post("/v1/responses", json=body)
                assert response.status_code == 200, response.text
                replicas.append(response.headers["x-gptoss-replica"])
                previous = response.json()["id"]
        return replicas

    with ThreadPoolExecutor(max_workers=3) as pool:
        conversations = list(pool.map(conversation, range(6)))
    follow_ups = [(a, b) for replicas in conversations for a, b in zip(replicas, replicas[1:])]
    assert sum(a == b for a, b in follow_ups) >= 0.9 * len(follow_ups), conversations
