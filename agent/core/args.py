"""Command-line parsing shared by agentd, agentctl and their sub-tools (pure)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

__all__ = ["EXIT_USAGE", "parse"]

EXIT_USAGE = 2  # a usage error (docs/cli.md)


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None
          ) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status argparse chose (0 after ``--help``,
    :data:`EXIT_USAGE` on a usage error) instead of raising SystemExit."""
    try:
        return parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
