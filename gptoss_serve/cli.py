"""The `gptoss-serve` command: one subcommand per job, each defined beside the code it drives."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from gptoss_serve.cluster.engine.cli import add_bench_offline_parser, add_generate_parser
    from gptoss_serve.cluster.observability.dashboards import add_dashboards_parser
    from gptoss_serve.cluster.serve.bench_router import add_bench_router_parser
    from gptoss_serve.cluster.serve.cli import add_down_parser, add_up_parser
    from gptoss_serve.model.checkpoint_writer import add_make_checkpoint_parser

    parser = argparse.ArgumentParser(
        prog="gptoss-serve", description="Serve gpt-oss-20b and gpt-oss-120b on Ray Serve, PyTorch and Triton.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_up_parser(subparsers)
    add_down_parser(subparsers)
    add_generate_parser(subparsers)
    add_make_checkpoint_parser(subparsers)
    add_dashboards_parser(subparsers)
    bench = subparsers.add_parser("bench", help="benchmarks (offline engine, kernels)")
    bench_subparsers = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCHMARK")
    add_bench_offline_parser(bench_subparsers)
    add_bench_router_parser(bench_subparsers)
    # Listed for --help only: main() hands `bench kernels ...` to the kernel benchmark's own parser.
    bench_subparsers.add_parser("kernels", help="Triton kernels against the HBM and tensor-core ceilings (GPU)")
    bench_subparsers.add_parser("sharded", help="a sharded replica: control path, all-reduce, layouts, engine")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["bench", "kernels"]:  # its own parser takes every option, --help included
        from gptoss_serve.kernels.bench import main as bench_kernels

        return bench_kernels(argv[2:])
    if argv[:2] == ["bench", "sharded"]:
        from gptoss_serve.cluster.shard.bench import main as bench_sharded

        return bench_sharded(argv[2:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
