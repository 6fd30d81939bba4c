"""Data dir sizes and the admission that keeps the journal's room (agent.core.datavol)."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import datavol
from agent.core.config import AgentConfig, parse_config
from agent.core.datavol import ImageUse, StateUsage
from agent.core.errors import ConfigError, NotFoundError, RefusedError
from agent.core.manifest import DataDir, Manifest, manifest_from_dict

MiB = 1 << 20
CFG = AgentConfig()


def m(name: str, size: int | None = None, source: str | None = None) -> Manifest:
    base = manifest_from_dict({"name": name, "service": {"command": "/bin/app"},
                               "image": {"root": "/img"}})
    return replace(base, data=DataDir("/data", source or name, size))


def test_sizes_default_and_ceiling() -> None:
    assert datavol.data_size(m("a"), CFG) == 16 * MiB
    assert datavol.data_size(m("a", 64 * MiB), CFG) == 64 * MiB
    assert datavol.data_size(m("a", source="b"), CFG) is None  # a reader holds no size
    plain = manifest_from_dict({"name": "p", "service": {"command": "/x"},
                                "image": {"root": "/img"}})
    assert datavol.data_size(plain, CFG) is None
    with pytest.raises(RefusedError) as ei:
        datavol.data_size(m("a", 300 * MiB), CFG)
    assert ei.value.code == "E_DATA_SIZE" and "300M" in ei.value.message


def test_admit_counts_what_each_image_may_still_grow_by() -> None:
    usage = StateUsage(100 * MiB, {"old": ImageUse(32 * MiB, 30 * MiB)})
    # old may grow by 2, the new one by 60: 62 of 100-16
    assert datavol.admit("new", 60 * MiB, usage, {}, 16 * MiB) == 22 * MiB
    with pytest.raises(RefusedError) as ei:
        datavol.admit("new", 83 * MiB, usage, {}, 16 * MiB)
    e = ei.value
    assert e.code == "E_DATA_SPACE"
    assert "need 85.0 MiB more, 84.0 MiB is free above the journal's reserve" in e.message
    assert e.hint is not None and "retired service" in e.hint


def test_cells_admitted_before_their_image_exists_count() -> None:
    usage = StateUsage(100 * MiB)
    datavol.admit("a", 40 * MiB, usage, {}, 16 * MiB)
    with pytest.raises(RefusedError):  # a's image is not there yet, its size still counts
        datavol.admit("b", 50 * MiB, usage, {"a": 40 * MiB}, 16 * MiB)


def test_an_image_is_never_counted_smaller_than_it_is() -> None:
    usage = StateUsage(100 * MiB, {"a": ImageUse(80 * MiB, 1 * MiB)})
    with pytest.raises(RefusedError):  # asks 8M, but the image is 80M: it stays 80M
        datavol.admit("a", 8 * MiB, usage, {}, 32 * MiB)
    assert datavol.admit("a", 8 * MiB, usage, {}, 16 * MiB) == 5 * MiB


def test_admit_manifest_refuses_a_missing_shared_dir_and_counts_the_others() -> None:
    usage = StateUsage(100 * MiB, {"owner": ImageUse(16 * MiB, 1 * MiB)})
    datavol.admit_manifest(m("reader", source="owner"), CFG, usage, {})
    with pytest.raises(NotFoundError) as ei:
        datavol.admit_manifest(m("reader", source="nobody"), CFG, usage, {})
    assert ei.value.code == "E_DATA_SOURCE" and ei.value.hint == "run nobody once first"
    others = {"x": m("x", 40 * MiB), "reader": m("reader", source="owner")}
    with pytest.raises(RefusedError, match="would fill"):
        datavol.admit_manifest(m("new", 40 * MiB), CFG, usage, others)
    datavol.admit_manifest(m("new", 20 * MiB), CFG, usage, others)


@settings(max_examples=300, deadline=None)
@given(avail=st.integers(0, 1 << 30), reserve=st.integers(0, 64 * MiB),
       images=st.dictionaries(st.sampled_from("abcdef"),
                              st.tuples(st.integers(4, 256), st.integers(0, 256)),
                              max_size=6),
       asks=st.lists(st.tuples(st.sampled_from("abcdefgh"), st.integers(4, 256)),
                     max_size=8))
def test_what_is_admitted_always_fits_beside_the_reserve(
        avail: int, reserve: int, images: dict[str, tuple[int, int]],
        asks: list[tuple[str, int]]) -> None:
    usage = StateUsage(avail, {n: ImageUse(s * MiB, min(a, s) * MiB)
                               for n, (s, a) in images.items()})
    held: dict[str, int] = {}
    for name, size in asks:
        try:
            datavol.admit(name, size * MiB, usage, held, reserve)
        except RefusedError:
            continue
        held[name] = max(held.get(name, 0), size * MiB)
        # every image filled up, plus every admitted cell's: still within avail - reserve
        full = {n: u.size for n, u in usage.images.items()}
        for n, s in held.items():
            full[n] = max(full.get(n, 0), s)
        growth = sum(full[n] - (usage.images[n].allocated if n in usage.images else 0)
                     for n in full)
        assert growth <= avail - reserve


def test_config_data_section() -> None:
    cfg = parse_config({"data": {"default_size": "8M", "max_size": "1G",
                                 "state_reserve": "4M"}, "logs": {"journal_max": "2M"}})
    assert (cfg.data_default_size, cfg.data_max_size, cfg.data_state_reserve) == (
        8 * MiB, 1 << 30, 4 * MiB)
    assert cfg.to_wire()["data"] == {"default_size": 8 * MiB, "max_size": 1 << 30,
                                     "state_reserve": 4 * MiB}
    assert parse_config({"userns": {"slots": 16}}).uid_slots == 16


@pytest.mark.parametrize(("data", "fragment"), [
    ({"data": {"default_size": "1M"}}, "below the smallest data dir"),
    ({"data": {"default_size": "64M", "max_size": "32M"}}, "above `data.max_size`"),
    ({"data": {"state_reserve": "1M"}}, "twice `logs.journal_max`"),
    ({"data": {"reserve": "1M"}}, "did you mean `state_reserve`"),
    ({"userns": {"slots": 0}}, "between 1 and"),
    ({"userns": {"uid_base": 100000, "uid_size": 65536, "slots": 70000}}, "overflow 32 bits"),
])
def test_config_data_errors(data: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data)
    assert fragment in str(ei.value)
