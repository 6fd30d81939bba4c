"""Host-side tests that boot the box themselves (a power cut is the host killing QEMU):
root is needed to build the box, and ``AGENT_SKIP_GUEST=1`` skips them with the guest tier."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/powercut/" not in str(item.path):
            continue
        item.add_marker(pytest.mark.guest)
        if os.environ.get("AGENT_SKIP_GUEST") == "1":
            item.add_marker(pytest.mark.skip(reason="box tests skipped (AGENT_SKIP_GUEST=1)"))
        elif os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(reason="power cuts: building the box needs root"))
