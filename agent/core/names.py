"""TODO docstring."""

from __future__ import annotations

import re

from agent.core.errors import ConfigError

__all__ = ["CELL_NAME_RE", "check_cell_name"]

CELL_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}")


def check_cell_name(cell: str) -> str:
    """A cell name is also a directory name: refuse anything that could escape."""
    if not CELL_NAME_RE.fullmatch(cell) or ".." in cell:
        raise ConfigError(
            "E_CELL_NAME",
            f"cell name {cell!r} is not valid",
            "use 1-63 characters from a-z, 0-9, '_', '.', '-', starting with a letter or digit",
        )
    return cell
