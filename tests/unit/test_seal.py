"""agent.core.seal and agent.kernel.seal: the hash manifest of a tree, its text form, and
what differs when a tree is changed after its seal was made."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.seal import Entry, Seal, SealError
from agent.kernel.seal import seal_tree

_name = st.text("abcxyz019._-", min_size=1, max_size=8).filter(lambda s: s not in (".", ".."))


@given(st.lists(st.tuples(st.lists(_name, min_size=1, max_size=3), st.booleans(),
                          st.binary(max_size=64), st.integers(0, 0o7777)), max_size=20))
def test_text_round_trip(items: list[tuple[list[str], bool, bytes, int]]) -> None:
    entries = [Entry("/".join(p), "f", "ab" * 32, len(d), m) if f else
               Entry("/".join(p), "l", target="../x y/z") for p, f, d, m in items]
    seal = Seal.of(entries)
    assert Seal.parse(seal.text()) == seal


@pytest.mark.parametrize("text, where", [
    ("nope\n", ":1"), ("# agent-seal 1\nf\t0755\t1\tzz\tbin/x\n", ":2"),
    ("# agent-seal 1\nf\t0755\t1\t" + "a" * 64 + "\t../etc/passwd\n", ":2"),
    ("# agent-seal 1\nl\t\tbin/x\n", ":2"), ("# agent-seal 1\nq\tbin/x\n", ":2"),
])
def test_bad_seals_name_the_line(text: str, where: str) -> None:
    with pytest.raises(SealError) as info:
        Seal.parse(text, "img.seal")
    assert info.value.code == "E_SEAL" and f"img.seal{where}" in info.value.message


def test_a_tree_and_its_changes(tmp_path: Path) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/app").write_bytes(b"#!/bin/sh\necho hi\n")
    (tmp_path / "bin/app").chmod(0o755)
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib/a.so").write_bytes(b"\x7fELF" + b"\0" * 100)
    os.symlink("a.so", tmp_path / "lib/b.so")
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x").write_text("writable area")
    sealed = seal_tree(tmp_path, skip=("data",))
    assert sorted(sealed.entries) == ["bin/app", "lib/a.so", "lib/b.so"]
    assert sealed.compare(seal_tree(tmp_path, skip=("data",))) == []
    (tmp_path / "bin/app").write_bytes(b"#!/bin/sh\nrm -rf /\n")
    (tmp_path / "lib/a.so").chmod(0o777)
    (tmp_path / "bin/dropped").write_bytes(b"evil")
    os.unlink(tmp_path / "lib/b.so")
    got = {(m.path, m.reason) for m in sealed.compare(seal_tree(tmp_path, skip=("data",)))}
    assert got == {("bin/app", "changed"), ("lib/a.so", "mode"), ("bin/dropped", "unsealed"),
                   ("lib/b.so", "missing")}


def test_a_fifo_in_an_image_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(Exception, match="only files, links"):
        seal_tree(tmp_path)
