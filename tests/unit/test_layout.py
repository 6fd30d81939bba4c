"""The test tree stays collectable: pytest's default import mode needs unique basenames."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_test_module_basenames_are_unique_across_tiers() -> None:
    names = Counter(p.name for p in TESTS.rglob("*.py") if p.name != "conftest.py"
                    and "__pycache__" not in p.parts)
    dupes = sorted(n for n, c in names.items() if c > 1)
    assert not dupes, f"same file name in two test directories (rename one): {dupes}"
