"""The `gptoss-serve` command: one subcommand per job, each defined beside the code it drives."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from gptoss_serve.model.checkpoint_writer import add_make_checkpoint_parser

    parser = argparse.ArgumentParser(
        prog="gptoss-serve", description="Serve gpt-oss-20b and gpt-oss-120b on Ray Serve, PyTorch and Triton.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_make_checkpoint_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
