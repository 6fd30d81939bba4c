"""Test tiers (see docs/testing.md):

* ``tests/unit``        host, no root, the pure core;
* ``tests/privileged``  host, root: real namespaces, seccomp notify, fanotify,
                        the cgroup-v1 backend; skipped with a reason when not root;
* ``tests/guest``       inside the emulated ARM box; on the host these items are
                        run by proxy in the box (see tests/guest/conftest.py).
"""

from __future__ import annotations

import os

import pytest

try:
    # Imported here, at a shallow import depth: Python 3.11.2 (Debian 12) raises
    # "SystemError: AST constructor recursion depth mismatch" when pytest's assertion
    # rewriter parses a module (hypothesis is a pytest plugin) deep inside a chain of
    # imports, as test modules importing the daemon make it (CPython bug, fixed in 3.11.4).
    import hypothesis

    # No per-example deadline: CI machines are shared and a loaded one made a property
    # test fail on time alone (DeadlineExceeded), which says nothing about the product.
    # Speed is measured by bench/, never asserted by a test.
    hypothesis.settings.register_profile("agent", deadline=None)
    hypothesis.settings.load_profile("agent")
except ImportError:  # the guest tier runs without it
    pass

IN_GUEST = os.environ.get("AGENT_IN_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "/tests/privileged/" in path:
            item.add_marker(pytest.mark.privileged)
            if os.geteuid() != 0:
                item.add_marker(pytest.mark.skip(reason="host privileged test: needs root"))
        elif "/tests/guest/" in path:
            item.add_marker(pytest.mark.guest)


def pytest_report_header(config: pytest.Config) -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for dist in ("pyroute2", "cbor2", "pynacl", "cgroupspy"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} (not installed)")
    where = "in the emulated box" if IN_GUEST else "on the host"
    return f"agent dependencies ({where}): " + ", ".join(parts)
