"""nftables adapter: apply agent.core.firewall's batches with ``nft -j -f -``, in a netns or not.

Every batch is one ``nft`` invocation and so one kernel transaction: a table is replaced
whole or not at all.  Inside a cell's netns ``nft`` runs under ``nsenter --net=PATH``
(util-linux or busybox); without nsenter the child enters the netns itself with setns(2)
between fork and exec.  The netns belongs to the host's user namespace, so only the
agent (CAP_NET_ADMIN there) can change the cell's table: root in the cell cannot.

:class:`FirewallSync` keeps the host's tables (the forwarding policy ``inet agent_host``
and the cell ports' layer-2 rules ``bridge agent_l2``) and the cells' tables in step
with the set of cells (the master calls :meth:`FirewallSync.refresh` whenever cells come
and go) and is the ``firewall`` of the executor's context
(agent.core.cellops.ApplyCellFirewall).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from agent.core import firewall, l2fw, nftjson, nftsections
from agent.core import syscalls as abi
from agent.core.errors import AgentError, KernelError
from agent.core.firewall import CellFw
from agent.core.nftsections import Sectioned
from agent.kernel import libc as ksys
from agent.kernel import libnft
from agent.kernel.netns import in_netns

__all__ = ["FirewallSync", "Nft", "NftError"]

log = logging.getLogger(__name__)

_TIMEOUT = 30.0


class NftError(AgentError):
    """``nft`` refused a batch (``E_NFT``); the message carries nft's own words."""


def _refused(what: str, netns: Path | None, stderr: str) -> NftError:
    where = f" in {netns}" if netns is not None else ""
    msg = " ".join(stderr.split())[:400]
    return NftError("E_NFT", f"nft {what}{where}: {msg}",
                    "is the kernel built with nf_tables/conntrack (agentd --check)?")


class Nft:
    """Runs ``nft``; ``netns`` arguments are paths such as ``/run/netns/cell-web``."""

    def __init__(self, nft: str | None = None, nsenter: str | None = None,
                 library: bool | None = None) -> None:
        """``library``: through libnftables in this process (agent.kernel.libnft) when it
        can be loaded; the default when no ``nft`` path is given."""
        self.nft = nft or shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin") or "nft"
        self.nsenter = nsenter if nsenter is not None else shutil.which(
            "nsenter", path="/usr/bin:/bin:/usr/sbin:/sbin")
        self.lib = libnft.load() if (nft is None if library is None else library) else None

    def _run(self, args: Sequence[str], stdin: str | None, netns: Path | None,
             what: str) -> str:
        """``nft ARGS`` (``-j -f -`` with a batch on ``stdin``, or ``-j`` and a command)."""
        if netns is not None and not netns.exists():
            raise KernelError("open", str(netns), errno.ENOENT,
                              "the cell's netns is gone (was the cell destroyed?)")
        if self.lib is not None:
            return self._run_lib(args, stdin, netns, what)
        argv = [self.nft, *args]
        preexec: Callable[[], None] | None = None
        if netns is not None:
            if self.nsenter:
                argv = [self.nsenter, f"--net={netns}", "--", *argv]
            else:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)

                def preexec() -> None:  # only async-signal-safe work: one syscall
                    ksys.setns(fd, abi.CLONE_NEWNET, str(netns))
        try:
            r = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                               timeout=_TIMEOUT, preexec_fn=preexec, check=False)
        except FileNotFoundError as exc:
            raise KernelError.from_oserror("exec", argv[0], exc,
                                           "install nftables (the nft tool)") from exc
        except subprocess.TimeoutExpired as exc:
            raise KernelError("nft", what, errno.ETIMEDOUT) from exc
        finally:
            if preexec is not None:
                os.close(fd)
        if r.returncode != 0:
            raise _refused(what, netns, r.stderr or f"exit status {r.returncode}")
        return r.stdout

    def _run_lib(self, args: Sequence[str], stdin: str | None, netns: Path | None,
                 what: str) -> str:
        assert self.lib is not None and args[0] == "-j"
        lib = self.lib
        text = stdin if list(args) == ["-j", "-f", "-"] else " ".join(args[1:])
        assert text is not None

        def run() -> str:
            try:
                return lib.run(text)
            except libnft.LibNftError as exc:
                raise _refused(what, netns, str(exc)) from None

        return run() if netns is None else in_netns(netns, run)

    def apply(self, batch: Sequence[dict[str, Any]], netns: Path | None = None) -> None:
        """Apply an agent.core.firewall batch atomically."""
        self._run(["-j", "-f", "-"], firewall.batch_json(batch), netns, "apply batch")

    def delete_table(self, table: str, netns: Path | None = None,
                     family: str = firewall.FAMILY) -> None:
        """Remove ``<family> <table>``; absent is success."""
        self._run(["-j", "-f", "-"], nftjson.batch_json(nftjson.delete_table(table, family)),
                  netns, f"delete table {family} {table}")

    def list_table(self, table: str, netns: Path | None = None,
                   family: str = firewall.FAMILY) -> dict[str, Any] | None:
        """``nft -j list table <family> <table>`` parsed, or ``None`` when there is none."""
        try:
            out = self._run(["-j", "list", "table", family, table], None, netns,
                            f"list table {family} {table}")
        except NftError as exc:
            if "No such file" in exc.message:
                return None
            raise
        data: dict[str, Any] = json.loads(out)
        return data


class FirewallSync:
    """The agent's tables, kept in step with the cells.  Thread-safe (plans run in threads).

    * :meth:`apply_cell` makes a new cell's table (the create plan's step);
    * :meth:`refresh` rewrites the host's tables (removes them when there is no cell)
      and re-applies the tables of the given cells whose rules changed (a peer came or
      went); cells not given are forgotten.  What was applied is remembered as text, so
      a refresh that changes nothing runs no ``nft`` at all.

    ``l2=False`` leaves the bridge's layer-2 table out (benchmarks compare with and
    without it); it is a separate batch, so a kernel without the nftables bridge family
    loses only it (an error in :meth:`refresh`'s list), not the forwarding policy.
    """

    def __init__(self, nft: Nft, bridge: str, netns_path: Callable[[str], Path],
                 host_netns: Path | None = None, l2: bool = True) -> None:
        self.nft = nft
        self.bridge = bridge
        self.netns_path = netns_path
        self.host_netns = host_netns  # None: agentd's own netns (tests pass one of theirs)
        self.l2 = l2
        self._lock = threading.Lock()
        self._applied: dict[str, str] = {}  # cell -> batch text its netns holds
        self._inputs: dict[str, Any] = {}  # cell -> what that text was made of
        self._host_cache: nftsections.SectionCache = {}  # the sections last made
        self._l2_cache: nftsections.SectionCache = {}
        # the host's tables as last applied (agent.core.nftsections; UNKNOWN at start)
        self._host: nftsections.Applied = nftsections.UNKNOWN
        self._l2: nftsections.Applied = nftsections.UNKNOWN
        # the host tables' nft runs, the commands they carried, and the tables made whole
        # or removed (agentctl status `firewall`: a start's commands do not grow with the
        # cells running, tests/guest/test_firewall_flat.py)
        self.host_runs = self.host_commands = self.host_whole = 0
        # called (cell, netns) in the plan's thread once a new cell's table is in, before
        # its service starts: channel 3 opens the cell's log socket there
        self.on_cell_table: list[Callable[[str, Path], None]] = []

    def apply_cell(self, cell: str, batch: Sequence[dict[str, Any]]) -> None:
        text = firewall.batch_json(batch)
        path = self.netns_path(cell)
        with self._lock:
            self.nft.apply(batch, path)
            self._applied[cell] = text
            self._inputs.pop(cell, None)  # made by the plan: the next refresh compares
        for fn in list(self.on_cell_table):
            try:
                fn(cell, path)
            except Exception:  # a listener's failure is its own business
                log.exception("firewall: cell table listener failed for %s", cell)

    def remove_cell(self, cell: str) -> None:
        """Delete the cell's table if its netns is still there (undo of apply_cell)."""
        with self._lock:
            self._applied.pop(cell, None)
            self._inputs.pop(cell, None)
            path = self.netns_path(cell)
            if path.exists():
                self.nft.delete_table(firewall.CELL_TABLE, path)

    def refresh(self, cells: Iterable[CellFw], tables_of: Iterable[str] = ()) -> list[str]:
        """Rewrite the host table for ``cells``; re-apply the cell tables of the cells in
        ``tables_of`` (cells whose netns holds a table: running ones) when they changed.

        A failing cell table is reported in the returned list, not raised: one cell's
        netns going away must not stop the others.  A failing host table raises."""
        cells = list(cells)
        want = set(tables_of)
        errors: list[str] = []
        with self._lock:
            errors += self._refresh_host(cells)
            for cell in list(self._applied):
                if cell not in want:
                    del self._applied[cell]
                    self._inputs.pop(cell, None)
            related = firewall.related_cells(cells)
            for c in cells:
                if c.name not in want:
                    continue
                # what the cell's table is made of: itself and the cells it names or
                # that name it (not every cell: a refresh stays flat in their number)
                inputs = (c, frozenset(related.get(c.name, ())))
                if self._inputs.get(c.name) == inputs and c.name in self._applied:
                    continue
                batch = firewall.cell_ruleset(c, inputs[1])
                ctext = firewall.batch_json(batch)
                if self._applied.get(c.name) != ctext:
                    try:
                        self.nft.apply(batch, self.netns_path(c.name))
                    except AgentError as exc:
                        self._applied.pop(c.name, None)
                        self._inputs.pop(c.name, None)
                        errors.append(f"cell {c.name}: {exc.message}")
                        continue
                    self._applied[c.name] = ctext
                self._inputs[c.name] = inputs
        return errors

    def _refresh_host(self, cells: list[CellFw]) -> list[str]:
        """The host's two tables, by their changed sections (agent.core.nftsections; the
        whole tables at the first refresh).  Both changed (a cell came or went): one
        batch, one ``nft`` run, one transaction.  If that fails the forwarding table goes
        in alone (raising if it cannot) and the layer-2 table's failure is returned."""
        # no cell, no tables: the host's ruleset is then exactly as without the agent
        host = firewall.host_tables(cells, self.bridge, cache=self._host_cache) \
            if cells else None
        l2 = l2fw.l2_tables(cells, cache=self._l2_cache) if cells and self.l2 else None
        host_cmds = nftsections.change(self._host, host, firewall.FAMILY, firewall.HOST_TABLE)
        l2_cmds = (nftsections.change(self._l2, l2, l2fw.FAMILY, l2fw.L2_TABLE)
                   if self.l2 else [])
        if host_cmds and l2_cmds:
            try:
                self._host_apply([*host_cmds, *l2_cmds])
                self._host, self._l2 = host, l2
                return []
            except AgentError:
                pass  # find out which: the forwarding table alone first
        if host_cmds:
            self._apply_table("_host", host, firewall.FAMILY, firewall.HOST_TABLE)
        if not l2_cmds:
            return []
        try:
            self._apply_table("_l2", l2, l2fw.FAMILY, l2fw.L2_TABLE)
        except AgentError as exc:
            self._l2 = nftsections.UNKNOWN
            return [f"layer-2 rules (bridge {l2fw.L2_TABLE}): {exc.message}"]
        return []

    def _apply_table(self, attr: str, new: Sectioned | None, family: str, table: str) -> None:
        """Take one table to ``new``; a change by sections that the kernel refuses (the
        table is not what was applied: changed by hand?) is retried as the whole table."""
        old = getattr(self, attr)
        try:
            self._host_apply(nftsections.change(old, new, family, table))
        except AgentError:
            if not isinstance(old, Sectioned):
                setattr(self, attr, nftsections.UNKNOWN)
                raise
            log.warning("firewall: %s %s was not as last applied: made again whole",
                        family, table)
            setattr(self, attr, nftsections.UNKNOWN)
            self._host_apply(nftsections.change(nftsections.UNKNOWN, new, family, table))
        setattr(self, attr, new)

    def _host_apply(self, cmds: list[dict[str, Any]]) -> None:
        self.host_runs += 1
        self.host_commands += len(cmds)
        self.host_whole += sum("table" in c.get("delete", {}) for c in cmds)
        self.nft.apply(cmds, self.host_netns)

    def status(self) -> dict[str, int]:
        return {"host_runs": self.host_runs, "host_commands": self.host_commands,
                "host_whole": self.host_whole, "cell_tables": len(self._applied)}
