"""agent.kconfig: the .config parser, the feature table, the fragments."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import ConfigError
from agent.core.kconfig import (
    EXTRA_SYMBOLS,
    FEATURES,
    Status,
    config_status,
    feature,
    fragment_symbols,
    is_enabled,
    parse_config,
    parse_config_gz,
    render_fragment,
)

REPO = Path(__file__).resolve().parents[2]
FRAGMENTS = (
    REPO / "recipes/meta-agent/recipes-kernel/linux/linux-yocto/agent.cfg",
    REPO / "recipes/buildroot-external/board/agent/linux.fragment",
)

SAMPLE = """\
#
# Automatically generated file; DO NOT EDIT.
#
CONFIG_CC_VERSION_TEXT="gcc (Debian 12.2.0-14) 12.2.0"
CONFIG_NAMESPACES=y
CONFIG_NET_NS=m
# CONFIG_USER_NS is not set
CONFIG_NR_CPUS=8
CONFIG_CMDLINE="console=ttyS0 quote=\\"x\\""
garbage line
CONFIG_PSI=y
CONFIG_PSI=n
"""


def test_parse_values() -> None:
    cfg = parse_config(SAMPLE)
    assert cfg["NAMESPACES"] == "y"
    assert cfg["NET_NS"] == "m"
    assert cfg["USER_NS"] == "n"
    assert cfg["NR_CPUS"] == "8"
    assert cfg["CC_VERSION_TEXT"] == "gcc (Debian 12.2.0-14) 12.2.0"
    assert cfg["CMDLINE"] == 'console=ttyS0 quote="x"'
    assert cfg["PSI"] == "n"  # the last assignment wins
    assert is_enabled(cfg, "NET_NS") and is_enabled(cfg, "NAMESPACES")
    assert not is_enabled(cfg, "USER_NS") and not is_enabled(cfg, "ABSENT")


def test_parse_gz_matches_plain() -> None:
    assert parse_config_gz(gzip.compress(SAMPLE.encode())) == parse_config(SAMPLE)


def test_parse_gz_rejects_garbage() -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config_gz(b"\x1f\x8bnot really gzip")
    assert exc.value.code == "E_KCONFIG"


@given(st.dictionaries(st.from_regex(r"[A-Z][A-Z0-9_]{0,20}", fullmatch=True),
                       st.sampled_from(["y", "m", "n", "42", "0x10", "some text"])))
def test_parse_roundtrip(values: dict[str, str]) -> None:
    lines = []
    for sym, val in values.items():
        if val == "n":
            lines.append(f"# CONFIG_{sym} is not set")
        elif val in ("y", "m") or val.isdigit() or val.startswith("0x"):
            lines.append(f"CONFIG_{sym}={val}")
        else:
            lines.append(f'CONFIG_{sym}="{val}"')
    assert parse_config("\n".join(lines)) == values


def test_feature_table_is_consistent() -> None:
    names = [f.name for f in FEATURES]
    assert len(names) == len(set(names))
    for f in FEATURES:
        assert f.need, f.name
        assert f.consequence and f.why and f.title, f.name
    assert feature("psi").unset == ("PSI_DEFAULT_DISABLED",)
    with pytest.raises(KeyError):
        feature("nope")


def full_config() -> dict[str, str]:
    return {s: v for s, v in fragment_symbols().items()}


def test_fragment_config_has_everything() -> None:
    cfg = full_config()
    for f in FEATURES:
        assert config_status(cfg, f) == (Status.PRESENT, []), f.name


def test_missing_need_and_want_and_unset() -> None:
    cfg = full_config()
    cfg["CFS_BANDWIDTH"] = "n"
    cfg["PSI_DEFAULT_DISABLED"] = "y"
    del cfg["VETH"]
    cfg["NET_NS"] = "m"
    assert config_status(cfg, feature("cpu")) == (Status.DEGRADED, ["CONFIG_CFS_BANDWIDTH not set"])
    assert config_status(cfg, feature("psi")) == (
        Status.DEGRADED, ["CONFIG_PSI_DEFAULT_DISABLED=y should be unset"])
    assert config_status(cfg, feature("veth")) == (Status.MISSING, ["CONFIG_VETH not set"])
    assert config_status(cfg, feature("namespaces"))[0] is Status.PRESENT


def test_render_fragment_covers_table() -> None:
    text = render_fragment()
    parsed = parse_config(text)
    assert parsed == fragment_symbols()
    for f in FEATURES:
        for s in (*f.need, *f.want):
            assert parsed[s] == "y"
        for s in f.unset:
            assert parsed[s] == "n"
    for s in EXTRA_SYMBOLS:
        assert parsed[s] == "y"


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: p.name)
def test_checked_in_fragments_are_generated(path: Path) -> None:
    assert path.read_text() == render_fragment(), (
        f"{path} is stale: regenerate with "
        f"`python -m agent.core.kconfig > {path.relative_to(REPO)}`")


def test_fragments_agree() -> None:
    yocto, buildroot = (parse_config(p.read_text()) for p in FRAGMENTS)
    assert yocto == buildroot
