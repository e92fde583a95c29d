"""`gptoss-serve bench router` on the session's Ray cluster: one policy's run on fresh replicas of the embedded
model, its summary and report. The whole command (which starts and stops its own Ray) is not run here."""

import argparse

import pytest

from gptoss_serve.cluster.serve.bench_router import (ROUTERS, add_bench_router_parser, bench_one_router,
                                                     make_conversations, print_report, summarize)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_router_parser(parser.add_subparsers())
    return parser.parse_args(["router", *argv])


def test_parser_takes_gpu_replicas_and_warmup():
    args = parse("--random-weights", "gpt-oss-20b", "--device", "cuda", "--warmup", "--rounds", "2")
    assert args.random_weights == "gpt-oss-20b" and args.warmup and args.rounds == 2 and args.model is None
    assert not parse().warmup


def test_conversations_are_reproducible_and_ramped():
    a = make_conversations(4, 3, 50, 1.0, 2, 4.0, seed=1)
    assert a == make_conversations(4, 3, 50, 1.0, 2, 4.0, seed=1)
    assert [len(c.follow_ups) for c in a] == [2] * 4 and all(0.5 <= t <= 1.5 for c in a for t in c.think_times_s)
    assert [c.start_delay_s for c in a] == [0.0, 2.0, 0.0, 0.0]  # two users arrive 2 s apart, then reuse


@pytest.mark.timeout(600)
def test_one_router_run_on_two_replicas(serve_http, capsys):
    args = parse("--replicas", "2", "--max-tokens", "2", "--concurrency", "3", "--kv-cache-mib", "16",
                 "--device", "cpu")
    conversations = make_conversations(3, 2, 120, 0.1, 3, 0.2, seed=3)
    run = bench_one_router("prefix_affinity", args, conversations, serve_http)
    turns, wall_s, hit_rate, decisions = run
    assert len(turns) == 6 and wall_s > 0 and all(t.ttft_s > 0 and t.num_prompt_tokens > 100 for t in turns)
    assert 0 < hit_rate <= 1  # follow-ups find their opening in the cache
    assert decisions.get("prefix_affinity", 0) >= 3
    summary = summarize("prefix_affinity", [run])
    assert summary["follow_ups_on_previous_replica"] == 1.0 and summary["num_requests"] == 6
    other = dict(summary, router="serve_default", ttft_mean_s=2 * summary["ttft_mean_s"])
    print_report([summary, other])
    assert "2.00x lower with prefix_affinity" in capsys.readouterr().out
    assert set(ROUTERS) == {"prefix_affinity", "serve_default"}
