"""Fuzz the live agentd's control socket and print figures (issue 10): ``bench/run fuzz``
(boots the box and runs this inside) or, in the box, ``python3 -P
/mnt/src/bench/fuzz.py -n 100000``.  Prints figures, never pass/fail; the guest test
``tests/guest/test_control_fuzz.py`` runs a short form of :func:`run` and asserts on them.

What it does, against the socket ``--socket`` of the agentd whose pid is in ``--pidfile``:

* ``-n`` messages from :class:`ctlfuzz.Gen` (seeded, one generator per connection), over
  ``--connections`` connections at once; each message must get exactly one reply within
  ``--timeout`` seconds: a result, or an error whose code is ``E_...`` and is not
  ``E_INTERNAL``, with the id agentd can know (:func:`ctlfuzz.expected_id`).  A message
  that would destroy something (:func:`ctlfuzz.effect`: run a service, stop a cell,
  resize a cell other than the victim) is not sent; ``events.follow`` goes on a connection
  of its own, which is closed after its first reply (or 0.25 s without one);
* meanwhile ``--silent`` connections send requests with large replies and never read
  them, some half-closed; at the end a storm of ``--storm`` connections at once, each
  asking one ``ping``: every one is answered (``pong`` or ``E_BUSY``);
* agentd's RSS is read before, after every tenth of the messages and at the end: from
  the first tenth on (allocator and caches warm) it must stay flat.

Figures: messages/s, the families sent, the reply codes, latency (median, p99, max),
agentd's RSS before/after/peak, the storm's outcome, and every failure (the first 20
described).  With ``--victim`` it first starts a cell of its own (``fuzz-victim``) that
the fuzz may pin and unpin but that must still run, same pid, at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ctlfuzz import Gen, decode, effect, expected_id

from agent.cli.client import Client
from agent.core.errors import AgentError, ProtocolError
from agent.core.protocol import MAX_FRAME, Request, RequestError, decode_reply, encode_request

SOCKET = Path("/run/agent/agentd.sock")
PIDFILE = Path("/var/run/agentd.pid")
SERVICES = Path("/etc/agent/services")
INIT = Path("/etc/init.d/S50agentd")
_CODE = re.compile(r"E_[A-Z0-9_]+")


@dataclass
class Figures:
    messages: int = 0
    seconds: float = 0.0
    families: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    skipped_harmful: int = 0
    streams: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    peak_kib: int = 0
    storm: Counter[str] = field(default_factory=Counter)
    slowest: list[tuple[float, str, str]] = field(default_factory=list)
    # (sent, replied) monotonic seconds, family, what agentd makes of it: for stalls
    timeline: list[tuple[float, float, str, str]] = field(default_factory=list)
    probe: list[tuple[float, float]] = field(default_factory=list)  # (sent, ms): pings
    silent_at: float = 0.0  # when the silent connections sent their requests
    failures: int = 0
    failed: list[str] = field(default_factory=list)
    pid_before: int = 0
    pid_after: int = 0

    def fail(self, what: str) -> None:
        self.failures += 1
        if len(self.failed) < 20:
            self.failed.append(what)

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_ms) or [0.0]
        d = asdict(self)
        for bulky in ("latencies_ms", "timeline", "probe"):
            d.pop(bulky)
        probe = max((ms for _, ms in self.probe), default=0.0)
        d.update(rate=round(self.messages / max(self.seconds, 1e-9), 1),
                 latency_ms={"median": round(statistics.median(lat), 2),
                             "p99": round(lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0], 2),
                             "max": round(lat[-1], 2)},
                 probe_max_ms=round(probe, 1))
        return d

    def stalls(self, over_ms: float = 1000.0) -> list[str]:
        """Each ping of the probe slower than ``over_ms``, with the fuzz messages in flight
        then (the one that held the loop is among them, usually the first sent)."""
        out = []
        for sent, ms in sorted(self.probe, key=lambda p: -p[1])[:5]:
            if ms < over_ms:
                break
            end = sent + ms / 1000
            inflight = sorted(x for x in self.timeline if x[0] <= end and x[1] >= sent)
            before = sorted(x for x in self.timeline if sent - 2 <= x[1] < sent)[-6:]
            ago = sent - self.silent_at
            silent = (f" (the silent connections' requests were sent {ago:.1f} s before)"
                      if 0 <= ago < 60 else "")
            out.append(f"ping took {ms:.0f} ms{silent}; in flight: " + "; ".join(
                f"{fam} {what} ({(t1 - t0) * 1000:.0f} ms)" for t0, t1, fam, what in inflight[:8])
                + "; answered in the 2 s before: " + "; ".join(
                f"{fam} {what}" for _, _, fam, what in before))
        return out


def _connect(path: Path, timeout: float) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:  # a full listen backlog says EAGAIN at once: wait, as agentctl does
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.005)


def rss_kib(pid: int) -> tuple[int, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    f = dict(ln.split(":", 1) for ln in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(f["VmRSS"].split()[0]), int(f["VmHWM"].split()[0])


def _what(got: Request | RequestError) -> str:
    if isinstance(got, RequestError):
        return got.code
    return f"{got.op}({', '.join(f'{k}={str(v)[:24]!r}' for k, v in got.args.items())})"[:120]


def _check(fig: Figures, frame: bytes, got: Request | RequestError, data: bytes,
           fam: str) -> None:
    """One reply to one frame: its id, its shape, its code."""
    what = f"{fam} frame {frame[:48].hex()}{'...' if len(frame) > 48 else ''} ({len(frame)} B)"
    if not data:
        fig.fail(f"{what}: connection closed without a reply")
        return
    try:
        reply = decode_reply(data)
    except ProtocolError as exc:
        fig.fail(f"{what}: undecodable reply {data[:64]!r}: {exc.message}")
        return
    want = expected_id(got)
    if reply.id != want:
        fig.fail(f"{what}: reply id {reply.id}, expected {want}")
    if reply.more:
        fig.fail(f"{what}: a streamed reply")
    if reply.ok:
        fig.codes["ok"] += 1
        return
    assert reply.error is not None
    code = reply.error.code
    fig.codes[code] += 1
    if not _CODE.fullmatch(code) or not reply.error.message:
        fig.fail(f"{what}: malformed error {reply.error!r}")
    elif code == "E_INTERNAL":
        fig.fail(f"{what}: {code}: {reply.error.message[:300]}")


def _stream(path: Path, frame: bytes, fig: Figures, lock: threading.Lock, what: str) -> None:
    """events.follow on a connection of its own, closed after its first reply."""
    t0 = time.monotonic()
    with _connect(path, 0.25) as s:
        s.send(frame)
        try:
            data = s.recv(MAX_FRAME + 1)
        except TimeoutError:  # a follow that matches nothing yet: silence is right
            data = b""
    with lock:
        fig.streams += 1
        fig.timeline.append((t0, time.monotonic(), "stream", what))
        if data:
            try:
                reply = decode_reply(data)
                fig.codes["ok" if reply.ok else reply.error.code if reply.error else "?"] += 1
            except ProtocolError as exc:
                fig.fail(f"stream reply undecodable: {exc.message}")


def _worker(path: Path, gen: Gen, count: int, timeout: float, fig: Figures,
            lock: threading.Lock, protect: tuple[set[str], set[str], str | None]) -> None:
    try:
        _fuzz(path, gen, count, timeout, fig, lock, protect)
    except Exception as exc:  # the fuzzer's own failure must not pass for a quiet run
        with lock:
            fig.fail(f"fuzzer: {type(exc).__name__}: {exc}")


def _fuzz(path: Path, gen: Gen, count: int, timeout: float, fig: Figures,
          lock: threading.Lock, protect: tuple[set[str], set[str], str | None]) -> None:
    s = _connect(path, timeout)
    sent = 0
    while sent < count:
        fam, frame = gen.one()
        got = decode(frame)
        eff = effect(got, *protect)
        if eff == "harmful":
            with lock:
                fig.skipped_harmful += 1
            continue
        sent += 1
        with lock:
            fig.families[fam] += 1
            fig.messages += 1
        if eff == "stream":
            _stream(path, frame, fig, lock, _what(got))
            continue
        t0 = time.monotonic()
        try:
            s.send(frame)
            data = s.recv(MAX_FRAME + 1)
        except TimeoutError:
            with lock:
                fig.fail(f"{fam} frame {frame[:48].hex()} ({len(frame)} B): no reply "
                         f"within {timeout} s")
            s.close()
            s = _connect(path, timeout)
            continue
        except OSError as exc:
            with lock:
                fig.fail(f"{fam} frame ({len(frame)} B): connection lost: {exc}")
            s.close()
            s = _connect(path, timeout)
            continue
        t1 = time.monotonic()
        ms = (t1 - t0) * 1000
        with lock:
            fig.latencies_ms.append(ms)
            fig.timeline.append((t0, t1, fam, _what(got)))
            if len(fig.slowest) < 5 or ms > fig.slowest[-1][0]:
                fig.slowest = sorted([*fig.slowest, (round(ms, 1), fam, _what(got))],
                                     reverse=True)[:5]
            _check(fig, frame, got, data, fam)
    s.close()


def _probe(path: Path, fig: Figures, done: threading.Event, timeout: float) -> None:
    """A ping every 0.25 s on a connection of its own: how long the loop was held."""
    with _connect(path, timeout) as s:
        rid = 0
        while not done.wait(0.25):
            rid += 1
            t0 = time.monotonic()
            s.send(encode_request(rid, "ping"))
            try:
                s.recv(MAX_FRAME + 1)
            except TimeoutError:
                fig.fail(f"probe: no pong within {timeout} s")
                return
            fig.probe.append((t0, (time.monotonic() - t0) * 1000))


def _silent(path: Path, n: int, each: int) -> list[socket.socket]:
    """``n`` connections that ask for big replies and never read them; every third one
    half-closes its side, every fifth one closes at once."""
    held = []
    for i in range(n):
        s = _connect(path, 5.0)
        for j in range(each):
            with contextlib.suppress(OSError):
                s.send(encode_request(j + 1, "events", {"n": 1000}))
        if i % 5 == 4:
            s.close()
            continue
        if i % 3 == 2:
            s.shutdown(socket.SHUT_WR)
        held.append(s)
    return held


def _storm(path: Path, n: int, timeout: float, fig: Figures) -> None:
    """``n`` connections at once, one ping each: pong or E_BUSY, never silence."""
    conns: list[socket.socket] = []
    try:
        for _ in range(n):
            try:
                conns.append(_connect(path, timeout))
            except OSError as exc:
                fig.storm["connect failed"] += 1
                fig.fail(f"storm: connect failed: {exc}")
        for i, s in enumerate(conns):
            s.send(encode_request(i + 1, "ping"))
        for s in conns:
            try:
                reply = decode_reply(s.recv(MAX_FRAME + 1))
            except (OSError, ProtocolError) as exc:
                fig.storm["unanswered"] += 1
                fig.fail(f"storm: {type(exc).__name__}: {exc}")
                continue
            if reply.ok and reply.result == "pong":
                fig.storm["pong"] += 1
            elif reply.error is not None and reply.error.code == "E_BUSY":
                fig.storm["E_BUSY"] += 1
            else:
                fig.storm["other"] += 1
                fig.fail(f"storm: {reply!r}")
    finally:
        for s in conns:
            s.close()


def run(count: int, *, path: Path = SOCKET, pid: int, seed: int = 1, connections: int = 4,
        timeout: float = 30.0, silent: int = 6, storm: int = 100,
        cells: set[str] | None = None, services: set[str] | None = None,
        victim: str | None = None, progress: bool = False) -> Figures:
    """Send ``count`` fuzz messages to agentd ``pid`` on ``path``; its figures."""
    fig = Figures(pid_before=pid)
    lock = threading.Lock()
    protect = (cells or set(), services or set(), victim)
    names = [victim or "fuzz-victim", "no-such-cell", *sorted(cells or ())]
    fig.rss_kib.append(rss_kib(pid)[0])
    done = threading.Event()
    probe = threading.Thread(target=_probe, args=(path, fig, done, timeout))
    probe.start()
    fig.silent_at = time.monotonic()
    held = _silent(path, silent, 16)
    t0 = time.monotonic()
    per = [count // connections + (1 if i < count % connections else 0)
           for i in range(connections)]
    for tenth in range(10):
        threads = [threading.Thread(target=_worker, args=(
            path, Gen(seed * 1000 + 10 * i + tenth + 1, names),
            per[i] // 10 + (per[i] % 10 if tenth == 9 else 0), timeout, fig, lock, protect))
            for i in range(connections)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fig.rss_kib.append(rss_kib(pid)[0])
        if progress:
            print(f"  {tenth + 1}/10: {fig.messages} messages, {time.monotonic() - t0:.0f} s, "
                  f"agentd RSS {fig.rss_kib[-1] / 1024:.1f} MiB, failures {fig.failures}",
                  flush=True)
    fig.seconds = time.monotonic() - t0
    done.set()
    probe.join()
    _storm(path, storm, timeout, fig)
    for s in held:
        s.close()
    with _connect(path, timeout) as s:  # still there, same process
        s.send(encode_request(1, "status"))
        fig.pid_after = int(decode_reply(s.recv(MAX_FRAME + 1)).result["pid"])
    fig.rss_kib.append(rss_kib(pid)[0])
    fig.peak_kib = rss_kib(pid)[1]
    return fig


# ---------------------------------------------------------------------- the command

def _ctl(*args: str) -> Any:
    r = subprocess.run(["agentctl", "--json", *args], capture_output=True, text=True,
                       timeout=120)
    if r.returncode:
        raise SystemExit(f"agentctl {' '.join(args)}: {r.stderr.strip()}")
    return json.loads(r.stdout) if r.stdout.strip() else None


def _ensure_agentd() -> None:
    """Start agentd (idempotent) and wait until its cell manager is up."""
    subprocess.run([str(INIT), "start"], capture_output=True, timeout=120)
    deadline = time.monotonic() + 120
    while True:
        try:
            with Client(SOCKET) as c:
                if isinstance(c.call("status").get("budget"), dict):
                    return
        except AgentError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit("agentd does not answer, or has no cell manager")
        time.sleep(0.5)


def _cells(path: Path) -> set[str]:
    """The cells agentd has now (none when it runs without its cell manager)."""
    try:
        with Client(path) as c:
            return {str(r["name"]) for r in c.call("ps")}
    except AgentError as exc:
        if exc.code not in ("E_UNAVAILABLE", "E_UNKNOWN_OP"):
            raise
        return set()


def _start_victim(name: str) -> int:
    (SERVICES / f"{name}.toml").write_text(
        f'name = "{name}"\n[service]\ncommand = "/bin/busybox"\nargs = ["sleep", "1000000"]\n'
        '[image]\nroot = "/usr/share/agent/images/demo"\n'
        '[lifecycle]\nmode = "service"\nrestart = "no"\n')
    return int(_ctl("run", name)["pid"])


def print_figures(fig: Figures, seed: int, connections: int) -> None:
    d = fig.summary()
    mib = [round(k / 1024, 1) for k in fig.rss_kib]
    print(f"control fuzz: {fig.messages} messages in {fig.seconds:.1f} s ({d['rate']} msg/s), "
          f"{connections} connections, seed {seed}")
    print("families:  " + ", ".join(f"{k} {v}" for k, v in fig.families.most_common()))
    print("replies:   " + ", ".join(f"{k} {v}" for k, v in fig.codes.most_common()))
    print(f"not sent (would destroy): {fig.skipped_harmful}; events.follow streams: "
          f"{fig.streams}")
    lat = d["latency_ms"]
    print(f"latency:   median {lat['median']} ms, p99 {lat['p99']} ms, max {lat['max']} ms")
    for ms, fam, what in fig.slowest:
        print(f"  {ms} ms: {fam} {what}")
    print(f"loop held (a ping every 0.25 s on its own connection): at most {d['probe_max_ms']} ms")
    for line in fig.stalls():
        print(f"  {line}")
    print(f"agentd RSS: {mib[0]} MiB before, {mib[1]} MiB after the first tenth, {mib[-1]} MiB "
          f"at the end (each tenth: {' '.join(map(str, mib[1:-1]))}), peak "
          f"{fig.peak_kib / 1024:.1f} MiB")
    print("storm:     " + ", ".join(f"{k} {v}" for k, v in fig.storm.most_common()))
    print(f"agentd pid {fig.pid_before} before, {fig.pid_after} after")
    print(f"failures:  {fig.failures}")
    for f in fig.failed:
        print(f"  {f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=100_000, help="messages (default 100000)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--timeout", type=float, default=30.0, help="per reply, seconds")
    p.add_argument("--silent", type=int, default=6, help="connections that never read")
    p.add_argument("--storm", type=int, default=100, help="connections at once at the end")
    p.add_argument("--socket", type=Path, default=SOCKET)
    p.add_argument("--pidfile", type=Path, default=PIDFILE)
    p.add_argument("--victim", action="store_true", help="start fuzz-victim first")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    ns = p.parse_args(argv)
    if ns.socket == SOCKET and INIT.exists():  # the box: agentd as its init script runs it
        _ensure_agentd()
    pid = int(ns.pidfile.read_text().strip())
    victim = "fuzz-victim" if ns.victim else None
    vpid = _start_victim(victim) if victim else None
    try:
        cells = _cells(ns.socket)
        services = {f.stem for f in SERVICES.glob("*.toml")} if SERVICES.is_dir() else set()
        fig = run(ns.n, path=ns.socket, pid=pid, seed=ns.seed, connections=ns.connections,
                  timeout=ns.timeout, silent=ns.silent, storm=ns.storm, cells=cells,
                  services=services, victim=victim, progress=True)
        print_figures(fig, ns.seed, ns.connections)
        if victim:
            row = {r["name"]: r for r in _ctl("ps")}.get(victim, {})
            print(f"victim:    {victim} {row.get('state')}, pid {vpid} before, "
                  f"{row.get('pid')} after")
        if ns.json:
            ns.json.write_text(json.dumps(fig.summary(), indent=2) + "\n")
    finally:
        if victim:
            subprocess.run(["agentctl", "stop", victim], capture_output=True, timeout=120)
            (SERVICES / f"{victim}.toml").unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
