"""The host's tables changed by sections (agent.core.nftsections, FirewallSync): after
any sequence of cells coming and going, each table holds exactly what a whole rebuild
for the cells now would make; a cell's arrival costs the same whatever else runs; a
change the kernel refuses is made again whole."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from nfteval import FakeNft, Ruleset

from agent.core import firewall as fw
from agent.core import l2fw, nftsections
from agent.core.errors import AgentError
from agent.core.firewall import CellFw
from agent.core.manifest import EgressRule, Peer
from agent.kernel.nft import FirewallSync

NAMES = [f"c{i}" for i in range(6)]


@st.composite
def pools(draw: st.DrawFn) -> list[CellFw]:
    """Six cells with peers (some on each other) and egress rules; addresses fixed."""
    cells = []
    for i, name in enumerate(NAMES):
        vlan = draw(st.sampled_from([100, 101]))
        peers = draw(st.lists(st.builds(
            Peer, st.sampled_from([n for n in NAMES if n != name]),
            st.lists(st.sampled_from([80, 443, 53]), min_size=1, max_size=2,
                     unique=True).map(lambda p: tuple(sorted(p))),
            st.sampled_from(["tcp", "udp"])), max_size=2))
        egress = draw(st.lists(st.builds(
            EgressRule, st.sampled_from([None, "0.0.0.0/0", "8.8.8.8/32"]),
            st.sampled_from([None, 53]), st.sampled_from(["tcp", "udp", "any"])),
            max_size=2))
        cells.append(CellFw(name, vlan, f"10.77.{vlan - 100}.{i + 2}", tuple(peers),
                            draw(st.booleans()), tuple(egress)))
    return cells


def _sync(nft: FakeNft) -> FirewallSync:
    return FirewallSync(nft, "agbr0", lambda c: Path("/nonexistent") / c)  # type: ignore[arg-type]


def _whole(cells: list[CellFw]) -> tuple[object, object]:
    return (Ruleset(fw.host_ruleset(cells, "agbr0")).state(),
            Ruleset(l2fw.l2_ruleset(cells)).state())


def _held(nft: FakeNft) -> tuple[object, object]:
    return (nft.tables[(None, fw.HOST_TABLE)].state(),
            nft.tables[(None, l2fw.L2_TABLE)].state())


@settings(max_examples=150, deadline=None)
@given(pools(), st.lists(st.sets(st.integers(0, len(NAMES) - 1)), min_size=1, max_size=8))
def test_any_sequence_of_refreshes_holds_what_a_rebuild_makes(
        pool: list[CellFw], steps: list[set[int]]) -> None:
    nft = FakeNft()
    sync = _sync(nft)
    for step in steps:
        cells = [pool[i] for i in sorted(step)]
        assert sync.refresh(cells, []) == []
        if cells:
            assert _held(nft) == _whole(cells)
        else:  # no cell: no tables (both deleted)
            assert nft.applied[-2:] == [(None, "-agent_host"), (None, "-agent_l2")]
            assert nft.tables[(None, fw.HOST_TABLE)].state() == Ruleset().state()


def _plain(i: int) -> CellFw:
    return CellFw(f"bg{i}", 101, f"10.77.1.{i + 2}", egress_any=i % 2 == 0)


def test_a_cell_costs_the_same_with_none_or_forty_running() -> None:
    """The batch for a cell coming and going does not grow with the cells there are; the
    control: a whole rebuild does."""
    web = CellFw("web", 100, "10.77.0.2", (Peer("bg0", (80,), "tcp"),), False, ())
    sizes = []
    for n in (1, 40):
        bg = [_plain(i) for i in range(n)]
        nft = FakeNft()
        sync = _sync(nft)
        sync.refresh(bg, [])
        runs = nft.runs
        got: list[int] = []
        nft.apply = lambda batch, netns=None, _a=nft.apply, _g=got: (  # type: ignore[method-assign]
            _g.append(len(batch)), _a(batch, netns))[1]
        sync.refresh([*bg, web], [])
        sync.refresh(bg, [])
        assert nft.runs == runs + 2 and _held(nft) == _whole(bg)
        sizes.append((got, len(fw.host_ruleset(bg, "agbr0")) + len(l2fw.l2_ruleset(bg))))
    (small, whole1), (big, whole40) = sizes
    assert small == big and small[0] > 0  # the same commands, one cell's worth
    assert whole40 > 10 * whole1  # the control: a rebuild grows with the cells


def test_a_peer_arriving_changes_only_its_clients_section() -> None:
    client = CellFw("client", 100, "10.77.0.2", (Peer("web", (8080,), "tcp"),), False, ())
    other = CellFw("other", 100, "10.77.0.3", (), True, ())
    web = CellFw("web", 101, "10.77.1.2")
    old = fw.host_tables([client, other], "agbr0")
    new = fw.host_tables([client, other, web], "agbr0")
    batch = nftsections.change(old, new, fw.FAMILY, fw.HOST_TABLE)
    touched = {c for cmd in batch for c in ("client", "other", "web")
               if f"_{c}" in str(cmd) or f'"{c}' in str(cmd)}
    assert touched == {"client", "web"}  # "other" is left alone
    state = Ruleset(old.full())
    state.apply(batch)
    assert state.state() == Ruleset(new.full()).state()
    # nothing changed: nothing to send; no cells: the table goes; unknown: whole
    assert nftsections.change(new, fw.host_tables([client, other, web], "agbr0"),
                              fw.FAMILY, fw.HOST_TABLE) == []
    assert nftsections.change(new, None, fw.FAMILY, fw.HOST_TABLE) == \
        fw.delete_table(fw.HOST_TABLE)
    assert nftsections.change(None, None, fw.FAMILY, fw.HOST_TABLE) == []
    assert nftsections.change(nftsections.UNKNOWN, new, fw.FAMILY, fw.HOST_TABLE) == \
        new.full()


def test_a_table_changed_behind_the_agents_back_is_made_again_whole() -> None:
    nft = FakeNft()
    sync = _sync(nft)
    a, b = CellFw("a", 100, "10.77.0.2", egress_any=True), CellFw("b", 100, "10.77.0.3")
    assert sync.refresh([a], []) == []
    del nft.tables[(None, fw.HOST_TABLE)]  # someone ran `nft flush ruleset`
    refused = []

    def apply(batch: list[dict[str, object]], netns: Path | None = None) -> None:
        try:
            FakeNft.apply(nft, batch, netns)
        except AssertionError as exc:  # the model refuses what the kernel would
            refused.append(str(exc))
            raise AgentError("E_NFT", f"nft: {exc}") from None

    nft.apply = apply  # type: ignore[method-assign]
    assert sync.refresh([a, b], []) == []
    assert refused  # the change by sections was refused, then the whole table went in
    assert _held(nft) == _whole([a, b])


@settings(max_examples=150, deadline=None)
@given(pools(), st.sets(st.integers(0, len(NAMES) - 1), min_size=1))
def test_a_cell_table_needs_only_the_cells_related_to_it(pool: list[CellFw],
                                                         chosen: set[int]) -> None:
    """FirewallSync makes a cell's table from the cell and the cells it names or that
    name it: the same batch as from every cell (so a refresh need not look at all)."""
    cells = [pool[i] for i in sorted(chosen)]
    related = fw.related_cells(cells)
    for c in cells:
        assert fw.cell_ruleset(c, related.get(c.name, set())) == fw.cell_ruleset(c, cells)


def test_sections_are_made_again_only_for_cells_that_changed() -> None:
    """With a cache, a table for 40 cells plus one makes one section anew; the control:
    without it, every one."""
    bg = [_plain(i) for i in range(40)]
    cache: nftsections.SectionCache = {}
    first = fw.host_tables(bg, "agbr0", cache=cache)
    again = fw.host_tables([*bg, CellFw("new", 100, "10.77.0.2")], "agbr0", cache=cache)
    fresh = [n for n, s in again.sections.items() if s is not first.sections.get(n)]
    assert fresh == ["new"]
    assert len(cache) == 41  # no cell that is gone
    cold = fw.host_tables([*bg, CellFw("new", 100, "10.77.0.2")], "agbr0")
    assert [n for n, s in cold.sections.items() if s is first.sections.get(n)] == []
    assert again.full() == cold.full()
    fw.host_tables(bg[:3], "agbr0", cache=cache)
    assert len(cache) == 3
