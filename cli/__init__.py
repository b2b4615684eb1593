"""The ``trinity`` command. Each group of subcommands lives in its own module and registers
itself through ``add_parsers(subparsers)``; service commands import fastapi/celery only when run."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from cli import client, core, data, service

    parser = argparse.ArgumentParser(prog="trinity", description="Self-hosted fine-tuning for open models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (core, data, service, client):
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
