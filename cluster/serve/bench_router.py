"""`gptoss-serve bench router`: multi-turn chats against N model replicas, our router against Serve's default
router in the same run, on the same conversations.

Each conversation opens with a long user message of its own (a document), then asks short follow-ups after a
think time (the user reads the answer); every turn sends the whole conversation so far, as chat clients do.
`--concurrency` users each hold one conversation at a time; they arrive one by one over `--ramp-s`. The prompts
are rendered here with the harmony chat format and sent as token ids to /v1/completions, which streams each
token as it is sampled (the chat endpoint streams parsed harmony text, which the embedded random-weight model
never produces in order), so the time to the first streamed event is the time to first token.

Per router: mean, p50 and p99 TTFT (all turns, and follow-ups only), follow-ups served by the replica of the
previous turn, and the engines' prefix-cache hit rate (tokens found in the cache over prompt tokens, from the
replicas' metrics). With `--rounds`, the routers take
turns (A B, B A, ...) on fresh replicas, and each router's turns of all rounds are pooled: a busy machine then
weighs on both alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

ROUTERS = ("prefix_affinity", "serve_default")
_WORDS = ("the of and to in is that for it as with was on be at by this had not are but from or have an they "
          "which one you were all we her she there would their will when who him been has more if no out so "
          "said what up its about into than them can only other new some could time these two may then do "
          "first any my now such like our over man me even most made after also did many before must through "
          "back years where much your way well down should because each just those people how too little state "
          "good very make world still own see men work long get here between both life being under never day "
          "same another know while last might us great old year off come since against go came right used take "
          "three").split()


@dataclasses.dataclass(frozen=True)
class Conversation:
    opening: str  # the first user message: a document of its own and a question
    follow_ups: tuple[str, ...]
    think_times_s: tuple[float, ...]  # before each follow-up
    start_delay_s: float = 0.0  # before the opening: the first users arrive one by one


@dataclasses.dataclass(frozen=True)
class TurnResult:
    conversation: int
    turn: int
    ttft_s: float
    replica: str
    num_prompt_tokens: int


def make_conversations(num_conversations: int, num_turns: int, context_words: int, think_time_s: float,
                       num_users: int, ramp_s: float, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    conversations = []
    for i in range(num_conversations):
        document = " ".join(rng.choice(_WORDS) for _ in range(context_words))
        follow_ups = tuple(f"Now tell me about point {j}: " + " ".join(rng.choice(_WORDS) for _ in range(12))
                           for j in range(1, num_turns))
        think_times_s = tuple(think_time_s * rng.uniform(0.5, 1.5) for _ in follow_ups)
        start_delay_s = i * ramp_s / num_users if i < num_users else 0.0
        conversations.append(Conversation(f"Document {i}:\n{document}\n\nSummarize the document.", follow_ups,
                                          think_times_s, start_delay_s))
    return conversations


def run_conversation(base_url: str, model_id: str, index: int, conversation: Conversation, max_tokens: int,
                     tokenizer) -> list[TurnResult]:
    import httpx

    from gptoss_serve.model.harmony.chat import conversation_from_chat
    from gptoss_serve.model.harmony.render import render_conversation_for_completion

    messages = [{"role": "system", "content": "You are a careful assistant who answers from the document."},
                {"role": "user", "content": conversation.opening}]
    results = []
    time.sleep(conversation.start_delay_s)
    with httpx.Client(base_url=base_url, timeout=600) as client:
        for turn in range(1 + len(conversation.follow_ups)):
            prompt = render_conversation_for_completion(conversation_from_chat(messages), tokenizer=tokenizer)
            body = {"model": model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                    "stream": True}
            start, ttft_s, text = time.perf_counter(), None, []
            with client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"HTTP {response.status_code}: {response.read().decode()[:300]}")
                replica = response.headers["x-gptoss-replica"]
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ttft_s = ttft_s if ttft_s is not None else time.perf_counter() - start
                    text += [choice["text"] for choice in json.loads(line[6:])["choices"]]
            results.append(TurnResult(index, turn, ttft_s, replica, len(prompt)))
            if turn < len(conversation.follow_ups):
                time.sleep(conversation.think_times_s[turn])
                messages += [{"role": "assistant", "content": "".join(text) or "(no answer)"},
                             {"role": "user", "content": conversation.follow_ups[turn]}]
    return results


class RouterRun(NamedTuple):
    """One router's run on fresh replicas."""

    turns: list[TurnResult]
    wall_s: float
    prefix_cache_hit_rate: float  # the engines', over this run's prompt tokens
    decisions: dict[str, float]  # our router's decisions by reason (empty under Serve's default)


def bench_one_router(policy: str, args: argparse.Namespace, conversations: list[Conversation],
                     http_url: str) -> RouterRun:
    import httpx
    from ray import serve

    from gptoss_serve.cluster.serve.app import build_app
    from gptoss_serve.cluster.serve.shared_actors import kill_shared_actors
    from gptoss_serve.model.tokenizer import load_tokenizer

    app_name = f"bench_router_{policy}"
    config = {"num_replicas": args.replicas, "dtype": args.dtype, "device": args.device,
              "max_num_seqs": args.max_num_seqs, "kv_cache_memory_bytes": args.kv_cache_mib * 2 ** 20,
              "long_prefill_token_threshold": args.long_prefill_token_threshold, "router": {"policy": policy}}
    if args.model is not None:
        config["model"] = args.model
    if args.random_weights is not None:
        config["random_weights"] = args.random_weights
    serve.run(build_app(config), name=app_name, route_prefix=f"/{app_name}")
    base_url = f"{http_url}/{app_name}"
    try:
        deadline = time.monotonic() + 600
        while httpx.get(f"{base_url}/health", timeout=10).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{app_name} did not become healthy")
            time.sleep(1)
        model_id = httpx.get(f"{base_url}/v1/models").json()["data"][0]["id"]
        tokenizer = load_tokenizer()
        warm_up = Conversation("Hello there.", (), ())
        with ThreadPoolExecutor(max_workers=args.replicas) as pool:  # load every replica's lazy paths
            list(pool.map(lambda i: run_conversation(base_url, model_id, -1, warm_up, 4, tokenizer),
                          range(2 * args.replicas)))
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            turns = [turn for result in pool.map(
                lambda item: run_conversation(base_url, model_id, item[0], item[1], args.max_tokens, tokenizer),
                enumerate(conversations)) for turn in result]
        wall_s = time.perf_counter() - start
        time.sleep(2.5)  # the replicas push their metrics every second, the router every 2 s
        page = httpx.get(f"{base_url}/metrics").text
        hit_rate, decisions = engine_prefix_hit_rate(page), router_decisions(page)
    finally:
        serve.delete(app_name)
        kill_shared_actors(app_name)
    return RouterRun(turns, wall_s, hit_rate, decisions)


def engine_prefix_hit_rate(page: str) -> float:
    """Prompt tokens found in the engines' prefix caches over all prompt tokens, weighting each replica's
    `gptoss_prefix_cache_hit_ratio` by its `gptoss_prompt_tokens_total`."""
    def by_replica(name: str) -> dict[str, float]:
        pattern = rf'^{name}\{{[^}}]*replica="([^"]+)"[^}}]*\}} (\S+)$'
        return {replica: float(value) for replica, value in re.findall(pattern, page, re.M)}

    ratios, tokens = by_replica("gptoss_prefix_cache_hit_ratio"), by_replica("gptoss_prompt_tokens_total")
    total = sum(tokens.get(replica, 0.0) for replica in ratios)
    return sum(ratio * tokens.get(replica, 0.0) for replica, ratio in ratios.items()) / total if total else 0.0


def router_decisions(page: str) -> dict[str, float]:
    """Our router's decisions by reason (none under Serve's default router); warm-up and probes included."""
    decisions: dict[str, float] = {}
    for reason, value in re.findall(r'^gptoss_router_decisions_total\{[^}]*reason="([^"]+)"[^}]*\} (\S+)$', page, re.M):
        decisions[reason] = decisions.get(reason, 0.0) + float(value)
    return decisions


def summarize(policy: str, runs: list[RouterRun]) -> dict[str, Any]:
    by_conversation: dict[tuple[int, int], list[TurnResult]] = {}
    for run_index, run in enumerate(runs):
        for turn in run.turns:
            by_conversation.setdefault((run_index, turn.conversation), []).append(turn)
    turns = [turn for run in runs for turn in run.turns]
    wall_s = sum(run.wall_s for run in runs)
    hit_rate = statistics.fmean(run.prefix_cache_hit_rate for run in runs)
    pairs = [(a, b) for results in by_conversation.values() for a, b in zip(results, results[1:])]
    follow_ups = [b.ttft_s for _, b in pairs]
    ttfts = [turn.ttft_s for turn in turns]
    return {
        "router": policy, "num_rounds": len(runs), "num_requests": len(turns), "wall_s": wall_s,
        "ttft_mean_s_per_round": [statistics.fmean(t.ttft_s for t in run.turns) for run in runs],
        "ttft_mean_s": statistics.fmean(ttfts), "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p99_s": _percentile(ttfts, 99),
        "follow_up_ttft_mean_s": statistics.fmean(follow_ups) if follow_ups else 0.0,
        "follow_up_ttft_p99_s": _percentile(follow_ups, 99) if follow_ups else 0.0,
        "follow_ups_on_previous_replica": sum(a.replica == b.replica for a, b in pairs) / len(pairs) if pairs else 0.0,
        "prefix_cache_hit_rate": hit_rate,
        "requests_per_replica_per_round": [sorted(_count(t.replica for t in run.turns).values()) for run in runs],
        "router_decisions_per_round": [run.decisions for run in runs],
        "mean_prompt_tokens": statistics.fmean(turn.num_prompt_tokens for turn in turns),
    }


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def _count(items) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def print_report(results: list[dict[str, Any]]) -> None:
    print(f"{'router':<16} {'reqs':>5} {'TTFT mean':>10} {'p50':>8} {'p99':>8} {'follow-up mean':>15} "
          f"{'p99':>8} {'same replica':>13} {'prefix hit':>11} {'wall s':>7}")
    for r in results:
        print(f"{r['router']:<16} {r['num_requests']:>5} {r['ttft_mean_s'] * 1e3:>8.1f}ms "
              f"{r['ttft_p50_s'] * 1e3:>6.1f}ms {r['ttft_p99_s'] * 1e3:>6.1f}ms "
              f"{r['follow_up_ttft_mean_s'] * 1e3:>13.1f}ms {r['follow_up_ttft_p99_s'] * 1e3:>6.1f}ms "
              f"{r['follow_ups_on_previous_replica']:>12.0%} {r['prefix_cache_hit_rate']:>10.1%} {r['wall_s']:>7.1f}")
    by_router = {r["router"]: r for r in results}
    if set(ROUTERS) <= set(by_router):
        ours, theirs = by_router["prefix_affinity"], by_router["serve_default"]
        print(f"\nmean TTFT: {theirs['ttft_mean_s'] / ours['ttft_mean_s']:.2f}x lower with prefix_affinity "
              f"(p99 {theirs['ttft_p99_s'] / ours['ttft_p99_s']:.2f}x; follow-ups "
              f"{theirs['follow_up_ttft_mean_s'] / ours['follow_up_ttft_mean_s']:.2f}x)")


# CLI -----------------------------------------------------------------------------------------------------------
def add_bench_router_parser(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "router", help="multi-turn chats: our prefix-affinity router vs Serve's default router, one run",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory or HF id (default: the embedded tiny model)")
    parser.add_argument("--random-weights", metavar="PRESET", default=None,
                        help="instead of --model: random weights of this shape made on each replica's GPU "
                             "(e.g. gpt-oss-20b)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4, help="turns per conversation (default %(default)s)")
    parser.add_argument("--context-words", type=int, default=2000,
                        help="words in each conversation's opening document (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per turn")
    parser.add_argument("--concurrency", type=int, default=8, help="users, each in one conversation at a time")
    parser.add_argument("--think-time-s", type=float, default=1.0,
                        help="mean pause before each follow-up, uniform in [0.5, 1.5] x this (default %(default)s)")
    parser.add_argument("--ramp-s", type=float, default=4.0,
                        help="the users arrive evenly over this many seconds (default %(default)s)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-cache-mib", type=int, default=64, help="KV cache of each replica, MiB")
    parser.add_argument("--long-prefill-token-threshold", type=int, default=None,
                        help="the replicas' cap on one prompt's prefill tokens per step (both routers)")
    parser.add_argument("--routers", default=",".join(ROUTERS), help="comma-separated, run in this order")
    parser.add_argument("--rounds", type=int, default=2, help="runs per router, taking turns (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", action="store_true",
                        help="first an untimed run of a few conversations on fresh replicas, so that kernel "
                             "compiles (on GPUs) fall outside the timed rounds")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    parser.add_argument("--json", help="also write the results here")
    parser.set_defaults(func=run_bench_router)
    return parser


def run_bench_router(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local cluster bound to 127.0.0.1
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    if not set(routers) <= set(ROUTERS):
        print(f"gptoss-serve bench router: --routers takes {', '.join(ROUTERS)}", file=sys.stderr)
        return 2
    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, args.replicas + 2), include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    conversations = make_conversations(args.conversations, args.turns, args.context_words, args.think_time_s,
                                       args.concurrency, args.ramp_s, args.seed)
    runs: dict[str, list] = {policy: [] for policy in routers}
    try:
        if args.warmup:  # untimed: the first prompts of each shape compile kernels (a cache later replicas share)
            warm = make_conversations(min(4, args.conversations), 2, args.context_words, 0.1,
                                      min(4, args.concurrency), 0.5, args.seed + 1)
            bench_one_router(routers[0], args, warm, f"http://127.0.0.1:{port}")
        for round_index in range(args.rounds):
            for policy in routers if round_index % 2 == 0 else routers[::-1]:
                runs[policy].append(bench_one_router(policy, args, conversations, f"http://127.0.0.1:{port}"))
        results = [summarize(policy, policy_runs) for policy, policy_runs in runs.items()]
    finally:
        serve.shutdown()
        ray.shutdown()
    print_report(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args) | {"func": None}, "results": results}, f, indent=2)
    return 0


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="bench_router")
    _args = add_bench_router_parser(_parser.add_subparsers(required=True)).parse_args()
    sys.exit(_args.func(_args))
