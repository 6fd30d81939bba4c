"""The guest tier: tests that run inside the emulated ARM box.

Inside the box (``AGENT_IN_GUEST=1``, set by ``qemu/box``) these are ordinary
pytest tests; each outcome is also written as a JSON line to
``$AGENT_GUEST_REPORT`` so that the host can report it.

On the host each collected guest test is replaced by a proxy item.  The first
proxy to run boots the box once and runs all selected guest tests there; each
proxy then passes, fails (with the guest's traceback) or skips (with the
guest's reason) exactly as its test did in the box.  A guest test that failed
therefore fails the host run, and its failure is shown there.

``AGENT_SKIP_GUEST=1`` skips the tier on the host, with that reason shown.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

IN_GUEST = os.environ.get("AGENT_IN_GUEST") == "1"
REPO = Path(__file__).resolve().parents[2]
RESULTS = pytest.StashKey[dict[str, Any]]()


# --- inside the box -----------------------------------------------------------------------

def _guest_record(report: pytest.TestReport) -> dict[str, Any] | None:
    if report.when == "call" or report.outcome != "passed" or report.duration >= 0.5:
        # (a passing setup or teardown is kept when slow: the host sums each test's
        # phases for its "slowest in the box" summary)
        rec: dict[str, Any] = {"nodeid": report.nodeid, "when": report.when,
                               "outcome": report.outcome, "duration": report.duration}
        if hasattr(report, "wasxfail"):  # xfail(strict) scenarios of what is to come
            rec["xfail"] = str(report.wasxfail) or "expected to fail"
        elif report.skipped and isinstance(report.longrepr, tuple):
            rec["reason"] = str(report.longrepr[2]).removeprefix("Skipped: ")
        elif report.failed:
            rec["longrepr"] = report.longreprtext
            if report.capstdout or report.capstderr:
                rec["longrepr"] += ("\n--- captured stdout (guest) ---\n" + report.capstdout
                                    + "\n--- captured stderr (guest) ---\n" + report.capstderr)
        return rec
    return None


if IN_GUEST:

    def pytest_runtest_logreport(report: pytest.TestReport) -> None:
        path = os.environ.get("AGENT_GUEST_REPORT")
        rec = _guest_record(report)
        if path and rec:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")


# --- on the host --------------------------------------------------------------------------

class GuestFailure(Exception):
    pass


class GuestProxy(pytest.Item):
    """Stands on the host for one test that runs in the box."""

    def runtest(self) -> None:
        results = _results(self.session)
        recs = results["by_id"].get(self.nodeid)
        if recs is None:
            raise GuestFailure(
                f"not run in the box: {results['problem'] or 'no report for this test'}\n"
                f"guest console log: {results['console']}\n" + results["tail"])
        for rec in recs:
            if rec["outcome"] == "failed":
                raise GuestFailure(f"[in the box, {rec['when']}]\n{rec.get('longrepr', '')}")
        for rec in recs:
            if "xfail" in rec:
                pytest.xfail(f"in the box: {rec['xfail']}")
        for rec in recs:
            if rec["outcome"] == "skipped":
                pytest.skip(f"in the box: {rec.get('reason', '')}")

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException],
                     style: Any = None) -> str:
        if isinstance(excinfo.value, GuestFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[Path, int, str]:
        return self.path, 0, f"{self.name} (in the box)"


def _results(session: pytest.Session) -> dict[str, Any]:
    stash = session.config.stash
    if RESULTS in stash:
        return stash[RESULTS]
    sys.path.insert(0, str(REPO / "qemu"))
    import box  # the launcher in qemu/box.py

    ids = [it.nodeid for it in session.items if isinstance(it, GuestProxy)]
    hostio = Path(tempfile.mkdtemp(prefix="guest-tier-"))
    console = REPO / ".guest-console.log"
    problem = ""
    with console.open("w") as out:
        try:
            rc = box.run_in_box(
                box.guest_pytest_script(["-q", "-rfEs", *ids], "/mnt/host/report.jsonl"),
                timeout=float(os.environ.get("AGENT_GUEST_TIMEOUT", "3600")),
                cpus=int(os.environ.get("AGENT_BOX_CPUS", "2")),
                mem=int(os.environ.get("AGENT_BOX_MEM", "1024")),
                verbose=False, out=out, hostio=hostio)
            if rc not in (0, 1):
                problem = f"guest pytest exited with status {rc}"
        except (Exception, SystemExit) as e:  # the box could not be built or booted
            problem = f"the box did not run: {e}"
    by_id: dict[str, list[dict[str, Any]]] = {}
    report = hostio / "report.jsonl"
    if report.exists():
        for line in report.read_text().splitlines():
            rec = json.loads(line)
            by_id.setdefault(rec["nodeid"], []).append(rec)
    tail = "".join(console.read_text(errors="replace").splitlines(True)[-30:])
    stash[RESULTS] = {"by_id": by_id, "problem": problem, "console": str(console),
                      "tail": tail}
    return stash[RESULTS]


if not IN_GUEST:

    def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
        """The box's own slowest tests and modules (the host's --durations sees only the
        proxies): the suite has a 30-minute budget."""
        results = config.stash.get(RESULTS, None)
        if not results or not results["by_id"]:
            return
        per_test: dict[str, float] = {}
        for nodeid, recs in results["by_id"].items():
            per_test[nodeid] = sum(float(r.get("duration", 0.0)) for r in recs)
        per_module: dict[str, float] = {}
        for nodeid, secs in per_test.items():
            module = nodeid.split("::")[0]
            per_module[module] = per_module.get(module, 0.0) + secs
        tr = terminalreporter
        tr.write_sep("=", f"slowest in the box (all phases; {sum(per_test.values()):.0f} s "
                          f"in {len(per_test)} tests)")
        for module, secs in sorted(per_module.items(), key=lambda kv: -kv[1])[:15]:
            tr.write_line(f"{secs:8.1f}s  {module}")
        tr.write_line("")
        for nodeid, secs in sorted(per_test.items(), key=lambda kv: -kv[1])[:20]:
            tr.write_line(f"{secs:8.1f}s  {nodeid}")

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
        skip = os.environ.get("AGENT_SKIP_GUEST") == "1"
        for i, item in enumerate(items):
            if "/tests/guest/" not in str(item.path) or isinstance(item, GuestProxy):
                continue
            proxy = GuestProxy.from_parent(item.parent, name=item.name, nodeid=item.nodeid)
            proxy.add_marker(pytest.mark.guest)
            if skip:
                proxy.add_marker(pytest.mark.skip(reason="guest tier skipped (AGENT_SKIP_GUEST=1)"))
            elif os.geteuid() != 0:
                proxy.add_marker(pytest.mark.skip(reason="guest tier: building the box needs root"))
            items[i] = proxy
