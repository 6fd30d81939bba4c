from __future__ import annotations

import errno
import itertools
import os
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.errors import KernelError
from agent.kernel import journal as jmod
from agent.kernel.journal import (
    HEADER,
    MAGIC,
    Journal,
    JournalError,
    JournalFullError,
    Record,
    encode_record,
    read_journal,
    scan,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 0.5
        return self.now


class KV:
    """A toy owner: a dict of cells, journaled as set/del records."""

    def __init__(self) -> None:
        self.cells: dict[str, int] = {}

    def apply(self, rec: Record) -> None:
        if rec.t == "set":
            self.cells[rec.data["k"]] = rec.data["v"]
        elif rec.t == "del":
            self.cells.pop(rec.data["k"], None)

    def snapshot(self) -> list[tuple[str, Mapping[str, Any]]]:
        return [("set", {"k": k, "v": v}) for k, v in sorted(self.cells.items())]

    @classmethod
    def replayed(cls, records: Iterator[Record] | list[Record]) -> dict[str, int]:
        kv = cls()
        for r in records:
            kv.apply(r)
        return kv.cells


def write_n(path: Path, n: int) -> list[int]:
    """Append n records synced; return the offset where each record starts."""
    offsets = []
    with Journal(path, clock=FakeClock()) as j:
        for i in range(n):
            offsets.append(j.size)
            j.append("set", {"k": f"c{i}", "v": i, "blob": b"x" * (i % 7)}, sync=True)
    return offsets


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "j"
    clock = FakeClock()
    with Journal(path, clock=clock) as j:
        r1 = j.append("cell", {"name": "web", "vlan": 10, "tags": ["a", "b"]}, sync=True)
        r2 = j.append("alloc", {"ip": b"\x0a\x00\x00\x02"}, sync=False)
        assert r2.seq == r1.seq + 1
        # a buffered record is readable through replay (written, not synced)
        assert [r.t for r in j.replay()] == ["cell", "alloc"]
    got = read_journal(path)
    assert got.records == [r1, r2]
    assert got.records[0].data == {"name": "web", "vlan": 10, "tags": ["a", "b"]}
    assert got.records[0].ts == 1000.5
    assert got.torn_bytes == 0 and got.skipped == []
    # sequence numbers continue after reopening
    with Journal(path, clock=clock) as j:
        assert j.append("x", {}, sync=True).seq == r2.seq + 1


def test_frame_layout() -> None:
    frame = encode_record("t", 7, 1.5, {"a": 1})
    magic, version, length, crc = HEADER.unpack_from(frame)
    payload = frame[HEADER.size:]
    assert (magic, version, length) == (MAGIC, 1, len(payload))
    assert crc == zlib.crc32(payload)
    assert cbor2.loads(payload) == {"t": "t", "seq": 7, "ts": 1.5, "d": {"a": 1}}


def test_unencodable_and_oversized_records_are_refused(tmp_path: Path) -> None:
    with Journal(tmp_path / "j") as j:
        with pytest.raises(JournalError) as ei:
            j.append("bad", {"x": object()}, sync=True)
        assert ei.value.code == "E_JOURNAL"
        with pytest.raises(JournalError):
            j.append("big", {"x": b"\0" * (jmod.MAX_PAYLOAD + 1)}, sync=True)
        j.append("ok", {}, sync=True)
    assert [r.t for r in read_journal(tmp_path / "j").records] == ["ok"]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(min_value=1, max_value=6), data=st.data())
def test_torn_tail_at_every_offset(tmp_path_factory: pytest.TempPathFactory, n: int,
                                   data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("torn") / "j"
    offsets = write_n(path, n)
    full = path.read_bytes()
    last = offsets[-1]
    garbage = data.draw(st.sampled_from([b"", b"\xff" * 40, b"\0" * 40]))
    for cut in range(last, len(full)):
        path.write_bytes(full[:cut] + garbage)
        got = read_journal(path)
        assert len(got.records) == n - 1
        assert got.skipped == []
        assert got.end == last
        assert got.torn_bytes == cut - last + len(garbage)
        # opening for writing cuts the tail off; appends after it are readable
        with Journal(path) as j:
            assert j.stats.truncated_bytes == cut - last + len(garbage)
            j.append("after", {}, sync=True)
        again = read_journal(path)
        assert [r.t for r in again.records] == ["set"] * (n - 1) + ["after"]
        assert again.torn_bytes == 0 and again.skipped == []


@settings(max_examples=50, deadline=None)
@given(n=st.integers(min_value=3, max_value=8), data=st.data())
def test_bit_flip_in_the_middle_skips_exactly_one_record(
        tmp_path_factory: pytest.TempPathFactory, n: int, data: st.DataObject) -> None:
    path = tmp_path_factory.mktemp("flip") / "j"
    offsets = write_n(path, n)
    buf = bytearray(path.read_bytes())
    victim = data.draw(st.integers(min_value=0, max_value=n - 2))  # not the last record
    start, end = offsets[victim], offsets[victim + 1]
    pos = data.draw(st.integers(min_value=start, max_value=end - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    buf[pos] ^= 1 << bit
    got = scan(bytes(buf))
    assert [r.data["v"] for r in got.records] == [i for i in range(n) if i != victim]
    assert got.skipped == [(start, end - start)]
    assert got.torn_bytes == 0
    path.write_bytes(bytes(buf))
    with Journal(path) as j:  # reported, not raised, and not "repaired" away
        assert j.stats.skipped_bytes == end - start
        assert j.stats.truncated_bytes == 0
        j.append("set", {"k": "new", "v": 99}, sync=True)
    assert len(read_journal(path).records) == n


def test_random_garbage_never_crashes_replay() -> None:
    rng = __import__("random").Random(7)
    good = b"".join(encode_record("r", i, 0.0, {"i": i}) for i in range(20))
    for _ in range(300):
        buf = bytearray(good)
        for _ in range(rng.randint(1, 10)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        got = scan(bytes(buf))
        seen = [r.data["i"] for r in got.records]
        assert seen == sorted(set(seen))  # valid ones survive, in order, once
        assert set(seen) <= set(range(20))
        assert got.end + got.torn_bytes == len(buf)


def test_compaction_preserves_state_and_bounds_size(tmp_path: Path) -> None:
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, max_bytes=8192, snapshot=kv.snapshot, clock=FakeClock())
    biggest = 0
    seqs: list[int] = []
    for i in range(10_000):
        k = f"cell{i % 37}"
        t = "del" if i % 5 == 4 else "set"
        rec = j.append(t, {"k": k, "v": i}, sync=(i % 3 == 0))
        kv.apply(rec)
        seqs.append(rec.seq)
        biggest = max(biggest, j.size, path.stat().st_size)
    j.close()
    assert j.stats.compactions > 10
    # bounded: the limit plus at most one record over it
    assert biggest <= 8192 + len(encode_record("set", 10**9, 0.0, {"k": "cell36", "v": 10**4}))
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    records = list(read_journal(path).records)
    assert records[0].t == "snapshot"
    assert [r.seq for r in records] == sorted(r.seq for r in records)
    assert KV.replayed(records) == kv.cells
    assert not (tmp_path / "j.tmp").exists()


class Crash(BaseException):
    """Stands for the agent being killed at this point."""


def test_crash_before_rename_leaves_old_file_intact(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, max_bytes=4096, snapshot=kv.snapshot)
    i = 0
    while j.size + 64 <= 4096:  # fill up to just under the bound
        kv.apply(j.append("set", {"k": f"c{i % 5}", "v": i}, sync=True))
        i += 1
    before = path.read_bytes()

    def crash(src: Any, dst: Any) -> None:
        raise Crash
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(Crash):  # does not fit: compaction first, killed before its rename
        j.append("set", {"k": "late", "v": -1, "pad": "x" * 64}, sync=True)
    monkeypatch.undo()
    assert (tmp_path / "j.tmp").exists()  # the half-done snapshot
    assert path.read_bytes() == before
    j.abandon()
    j2 = Journal(path, max_bytes=4096, snapshot=kv.snapshot)
    assert not (tmp_path / "j.tmp").exists()
    assert KV.replayed(j2.replay()) == kv.cells
    j2.compact()
    assert KV.replayed(j2.replay()) == kv.cells
    assert path.stat().st_size < 4096
    j2.close()


def test_compaction_keeps_working_after_a_failed_snapshot_write(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, max_bytes=4096, snapshot=kv.snapshot)
    kv.apply(j.append("set", {"k": "a", "v": 1}, sync=True))
    real_replace = os.replace

    def enospc(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", enospc)
    with pytest.raises(JournalFullError) as ei:
        j.compact()
    assert ei.value.errno == 28 and "compact" in ei.value.message
    assert ei.value.code == "E_JOURNAL_FULL"
    monkeypatch.setattr(os, "replace", real_replace)
    assert not (tmp_path / "j.tmp").exists()
    kv.apply(j.append("set", {"k": "b", "v": 2}, sync=True))
    j.close()
    assert KV.replayed(read_journal(path).records) == {"a": 1, "b": 2}


def test_fsync_only_for_synced_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        calls.append(fd)
        real(fd)
    monkeypatch.setattr(os, "fdatasync", spy)
    j = Journal(tmp_path / "j", buffer_bytes=1 << 16)
    for i in range(100):
        j.append("sample", {"i": i}, sync=False)
    assert calls == [] and j.stats.write_calls == 0  # all still in the buffer
    for i in range(5):
        j.append("state", {"i": i}, sync=True)
    assert len(calls) == 5 == j.stats.fsyncs
    assert j.stats.write_calls == 5  # buffered records went out with the first sync
    assert j.stats.appends == 105 and j.stats.synced_appends == 5
    j.append("sample", {}, sync=False)
    j.close()  # flush on close syncs once more
    assert len(calls) == 6
    j.close()
    assert len(calls) == 6
    assert len(read_journal(tmp_path / "j").records) == 106
    assert j.stats.bytes_written == (tmp_path / "j").stat().st_size


def test_full_buffer_is_written_without_fsync(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j", buffer_bytes=256)
    for i in range(50):
        j.append("sample", {"i": i, "pad": "x" * 20}, sync=False)
    assert j.stats.write_calls > 0 and j.stats.fsyncs == 0
    written = j.stats.bytes_written
    j.abandon()  # kill -9: what was still buffered is lost, what was written is kept
    got = read_journal(tmp_path / "j")
    assert 0 < len(got.records) < 50
    assert got.end == written and got.torn_bytes == 0


def test_closed_journal_refuses_appends(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.close()
    assert j.closed
    with pytest.raises(JournalError):
        j.append("x", {}, sync=True)


def test_open_failure_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(KernelError) as ei:
        Journal(tmp_path / "missing-dir" / "j")
    assert "missing-dir" in ei.value.message


# -- refusals: the bound, a full file system, a failed fdatasync ---------------------------

def contiguous(records: list[Record]) -> bool:
    return all(b.seq == a.seq + 1 for a, b in itertools.pairwise(records))


def test_the_bound_is_hard_and_a_full_journal_refuses_cleanly(tmp_path: Path) -> None:
    """The live state grows past what compaction can shrink: the record is refused with
    E_JOURNAL_FULL, the file never passes max_bytes, every acknowledged record replays."""
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, max_bytes=4096, snapshot=kv.snapshot, clock=FakeClock())
    refused = None
    for i in range(1000):
        try:
            kv.apply(j.append("set", {"k": f"key-{i:04}", "v": i, "pad": "p" * 40},
                              sync=i % 2 == 0))
        except JournalFullError as exc:
            refused = exc
            break
        assert j.size <= 4096 and path.stat().st_size <= 4096
    assert refused is not None and refused.code == "E_JOURNAL_FULL" and refused.errno is None
    assert "journal_max" in (refused.hint or "") and "'set'" in refused.message
    assert j.stats.refused == 1 and j.stats.compactions >= 1
    seq = j.next_seq
    with pytest.raises(JournalFullError):  # still full: refused again, seq not used
        j.append("set", {"k": "another", "v": -1, "pad": "p" * 40}, sync=True)
    assert j.next_seq == seq
    # reads keep working, and hold exactly what was acknowledged
    assert KV.replayed(j.replay()) == kv.cells
    j.close()
    got = read_journal(path)
    assert KV.replayed(got.records) == kv.cells and contiguous(got.records)
    assert got.torn_bytes == 0 and got.skipped == [] and path.stat().st_size <= 4096


def test_check_room_keeps_the_other_half_for_existing_state(tmp_path: Path) -> None:
    """An owner that asks check_room before taking on new state is refused early, and can
    then always journal changes to the state it has (updates, deletes) within the bound."""
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, max_bytes=8192, snapshot=kv.snapshot, clock=FakeClock())

    def put_new(i: int) -> None:
        data = {"k": f"key-{i:04}", "v": i, "pad": "p" * 60}
        j.check_room(len(encode_record("set", j.next_seq, 0.0, data)), f"key {i}")
        kv.apply(j.append("set", data, sync=True))

    n = 0
    with pytest.raises(JournalFullError) as ei:
        for n in range(1000):  # n: the count admitted
            put_new(n)
    assert ei.value.code == "E_JOURNAL_FULL" and "no room for key" in ei.value.message
    assert j.live_bytes() <= 8192 // 2 < j.live_bytes() + 120
    admitted = len(kv.cells)
    assert 10 < admitted == n
    for step in range(2000):  # the admitted keys change and go, never refused
        k = sorted(kv.cells)[step % len(kv.cells)] if kv.cells else None
        if k is None:
            break
        if step % 50 == 49:
            kv.apply(j.append("del", {"k": k}, sync=True))
        else:
            kv.apply(j.append("set", {"k": k, "v": step, "pad": "q" * 60}, sync=step % 3 == 0))
        assert path.stat().st_size <= 8192
    assert j.stats.refused == 1
    j.close()
    assert KV.replayed(read_journal(path).records) == kv.cells


def _in_child(fn: Any) -> dict[str, Any]:
    """Run ``fn()`` in a forked child (it may change its rlimits); its JSON result."""
    import json
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(r)
        try:
            out = json.dumps(fn())
        except BaseException:
            out = json.dumps({"error": traceback.format_exc()})
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    res: dict[str, Any] = __import__("json").loads(b"".join(chunks))
    assert "error" not in res, res.get("error")
    return res


@pytest.mark.parametrize("limit", [1500, 2900, 5000])
def test_a_full_file_system_refuses_records_and_loses_none(tmp_path: Path, limit: int) -> None:
    """The kernel refuses to grow the file (RLIMIT_FSIZE: EFBIG, with a short write first,
    as a full disk gives ENOSPC): records are refused with E_JOURNAL_FULL, nothing
    half-written stays in the file, buffered records are kept, and once there is room
    again everything acknowledged is in the file, in order."""
    import resource
    import signal

    path = tmp_path / "j"

    def child() -> dict[str, Any]:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        kv = KV()
        j = Journal(path, max_bytes=1 << 20, snapshot=kv.snapshot, clock=FakeClock(),
                    buffer_bytes=256)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        refusals: list[tuple[str, int | None]] = []
        acked = 0
        for i in range(200):
            try:
                rec = j.append("set", {"k": f"c{i % 40}", "v": i, "pad": "z" * (i % 30)},
                               sync=i % 4 != 1)
            except JournalFullError as exc:
                refusals.append((exc.code, exc.errno))
                continue
            kv.apply(rec)
            acked += 1
        on_disk = read_journal(path)
        at_limit = {"size": path.stat().st_size, "torn": on_disk.torn_bytes,
                    "skipped": len(on_disk.skipped)}
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # room again
        kv.apply(j.append("set", {"k": "after", "v": 1}, sync=True))
        j.close()
        got = read_journal(path)
        return {"refusals": refusals, "acked": acked, "at_limit": at_limit,
                "rewrites": j.stats.rewrites, "same": KV.replayed(got.records) == kv.cells,
                "contiguous": contiguous(got.records), "torn": got.torn_bytes,
                "skipped": len(got.skipped)}

    res = _in_child(child)
    assert res["refusals"] and res["acked"] > 5
    assert {tuple(r) for r in res["refusals"]} == {("E_JOURNAL_FULL", errno.EFBIG)}
    assert res["at_limit"]["size"] <= limit
    assert res["at_limit"]["torn"] == 0 and res["at_limit"]["skipped"] == 0
    assert res["same"] and res["contiguous"] and res["torn"] == 0 and res["skipped"] == 0


def test_a_failed_fdatasync_is_not_acknowledged_and_the_file_is_rewritten(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j"
    kv = KV()
    j = Journal(path, snapshot=kv.snapshot, clock=FakeClock())
    kv.apply(j.append("set", {"k": "a", "v": 1}, sync=True))
    real = os.fdatasync

    def eio(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(os, "fdatasync", eio)
    with pytest.raises(KernelError) as ei:
        j.append("set", {"k": "b", "v": 2}, sync=True)
    assert ei.value.code == "E_KERNEL" and "fdatasync" in ei.value.message
    monkeypatch.setattr(os, "fdatasync", real)
    # the owner did not apply "b"; the next append first rewrites the file from its state
    kv.apply(j.append("set", {"k": "c", "v": 3}, sync=True))
    assert j.stats.rewrites == 1
    j.close()
    got = read_journal(path).records
    assert KV.replayed(got) == {"a": 1, "c": 3} == kv.cells
    assert [r.seq for r in got] == sorted({r.seq for r in got})


def test_replay_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads keep working while writes fail: buffered records are replayed from memory."""
    j = Journal(tmp_path / "j", buffer_bytes=1 << 16)
    j.append("set", {"k": "a", "v": 1}, sync=True)
    j.append("set", {"k": "b", "v": 2}, sync=False)

    def enospc(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "write", enospc)
    assert KV.replayed(j.replay()) == {"a": 1, "b": 2}
    with pytest.raises(JournalFullError) as ei:
        j.append("set", {"k": "c", "v": 3}, sync=True)
    assert ei.value.errno == errno.ENOSPC and "df " in (ei.value.hint or "")
    assert KV.replayed(j.replay()) == {"a": 1, "b": 2}  # "b" is still buffered, "c" is not
    monkeypatch.undo()
    j.close()
    assert KV.replayed(read_journal(tmp_path / "j").records) == {"a": 1, "b": 2}
