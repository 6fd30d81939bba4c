from __future__ import annotations

import ipaddress
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.config import AgentConfig, HostReserve, load_config, parse_config, parse_size
from agent.core.errors import ConfigError

OVERLAY = Path(__file__).resolve().parents[2] / "rootfs-overlay" / "etc" / "agent" / "agentd.toml"


def test_missing_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(tmp_path / "none.toml")
    assert cfg == AgentConfig()
    assert cfg.socket_path == Path("/run/agent/agentd.sock")
    assert cfg.host_reserve == HostReserve(0.25, 96 * 2**20, 256)
    assert (cfg.log_buffer_bytes, cfg.journal_max_bytes) == (65536, 2**20)
    assert cfg.pidfile == Path("/run/agent/agentd.pid")
    with pytest.raises(ConfigError):
        load_config(tmp_path / "none.toml", missing_ok=False)


def test_shipped_file_is_the_defaults_commented_or_not() -> None:
    text = OVERLAY.read_text()
    assert load_config(OVERLAY, missing_ok=False) == AgentConfig()
    uncommented = re.sub(r"(?m)^#(\w+ = )", r"\1", text)
    assert uncommented != text
    assert parse_config(tomllib.loads(uncommented)) == AgentConfig()


def test_full_file(tmp_path: Path) -> None:
    p = tmp_path / "agentd.toml"
    p.write_text("""
socket_path = "/tmp/a.sock"
log_level = "DEBUG"
[network]
bridge = "br-cells"
address_pool = "192.168.0.0/20"
vlan_min = 10
vlan_max = 20
[userns]
enabled = false
uid_base = 200000
uid_size = 1000
[host_reserve]
cpu = 1
memory = "1G"
pids = 10
[logs]
cell_buffer = 4096
journal_max = "2MiB"
[limits]
output_rate = "64K"
trap_rate = 50
""")
    cfg = load_config(p)
    assert cfg.socket_path == Path("/tmp/a.sock") and cfg.log_level == "debug"
    assert cfg.bridge == "br-cells" and cfg.address_pool == ipaddress.IPv4Network("192.168.0.0/20")
    assert (cfg.vlan_min, cfg.vlan_max, cfg.userns, cfg.uid_base, cfg.uid_size) == \
        (10, 20, False, 200000, 1000)
    assert cfg.host_reserve == HostReserve(1.0, 2**30, 10)
    assert (cfg.log_buffer_bytes, cfg.journal_max_bytes) == (4096, 2 * 2**20)
    assert cfg.state_dir == Path("/var/lib/agent")  # untouched default
    assert cfg.subnet_count == 16
    assert str(cfg.subnet_for_vlan(10)) == "192.168.0.0/24"
    assert str(cfg.subnet_for_vlan(12)) == "192.168.2.0/24"
    assert str(cfg.gateway_for_vlan(12)) == "192.168.2.1"
    with pytest.raises(ConfigError):
        cfg.subnet_for_vlan(21)
    assert cfg.uid_range(2) == (202000, 1000)
    assert (cfg.output_rate, cfg.output_burst, cfg.trap_rate, cfg.trap_burst) == \
        (64 << 10, 1 << 20, 50, 50)


@pytest.mark.parametrize(("data", "names", "hint"), [
    ({"sockett_path": "/x"}, "sockett_path", "socket_path"),
    ({"brige": "x"}, "brige", "[network]"),
    ({"network": {"vlan": 5}}, "network.vlan", None),
    ({"nework": {}}, "nework", "network"),
    ({"network": "x"}, "network", "[network]"),
    ({"network": {"vlan_min": "100"}}, "network.vlan_min", "vlan_min = 2"),
    ({"network": {"vlan_min": True}}, "network.vlan_min", None),
    ({"network": {"vlan_max": 5000}}, "network.vlan_max", None),
    ({"network": {"vlan_min": 300, "vlan_max": 200}}, "network.vlan_min", "swap"),
    ({"network": {"address_pool": "10.0.0.0/25"}}, "network.address_pool", None),
    ({"network": {"address_pool": "10.0.0.1/16"}}, "network.address_pool", None),
    ({"network": {"address_pool": "fd00::/64"}}, "network.address_pool", None),
    ({"network": {"bridge": "a-name-that-is-too-long"}}, "network.bridge", None),
    ({"userns": {"enabled": "yes"}}, "userns.enabled", "true"),
    ({"userns": {"uid_base": 2**32 - 10}}, "userns.uid_base", None),
    ({"host_reserve": {"memory": "lots"}}, "host_reserve.memory", "96M"),
    ({"host_reserve": {"memory": -1}}, "host_reserve.memory", None),
    ({"host_reserve": {"cpu": "1"}}, "host_reserve.cpu", None),
    ({"logs": {"journal_max": 1.5}}, "logs.journal_max", None),
    ({"state_dir": "relative/dir"}, "state_dir", None),
    ({"log_level": "loud"}, "log_level", None),
    ({"limits": {"trap_rate": 0}}, "limits.trap_rate", None),
    ({"limits": {"trap_rate": "fast"}}, "limits.trap_rate", None),
    ({"limits": {"output_rate": 10}}, "limits.output_rate", "256K"),
    ({"limits": {"output_burst": "4K"}}, "limits.output_burst", "1M"),
    ({"limits": {"traps_rate": 5}}, "limits.traps_rate", "trap_rate"),
])
def test_errors_name_the_key(data: dict[str, Any], names: str, hint: str | None) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(data, "test.toml")
    err = info.value
    assert err.code == "E_CONFIG" and f"`{names}`" in err.message and err.hint
    if hint is not None:
        assert hint in err.hint


def test_bad_toml(tmp_path: Path) -> None:
    p = tmp_path / "agentd.toml"
    p.write_text("socket_path = \n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    assert str(p) in info.value.message


@pytest.mark.parametrize(("text", "value"), [
    ("0", 0), ("96M", 96 << 20), ("64K", 65536), ("64k", 65536), ("1G", 1 << 30),
    ("2T", 2 << 40), ("10MiB", 10 << 20), ("10MB", 10 << 20), (" 5 ", 5), ("7B", 7),
])
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "M", "1.5M", "-1K", "10X", "1 0K", "0x10"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text, "logs.cell_buffer")


@given(st.integers(0, 2**40), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_property(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}") == n * {"": 1, "K": 1024, "M": 2**20, "G": 2**30}[unit]


def test_responses_and_correlation_tables(tmp_path: Path) -> None:
    from agent.core.responses import Response

    cfg = parse_config({"responses": {"net/scan": "isolate",
                                      "correlation/escapes-across-cells": "record"},
                        "correlation": {"queue": 512}})
    assert cfg.responses.decide("web", "net", "scan") is Response.ISOLATE
    assert cfg.responses.override("correlation", "escapes-across-cells") is Response.RECORD
    assert cfg.correlation == {"queue": 512}
    assert cfg.to_wire()["responses"]["net/scan"] == "isolate"
    with pytest.raises(ConfigError) as info:
        parse_config({"responses": {"net/scan": "nuke"}})
    assert "[responses]" in info.value.message and "nuke" in info.value.message
    with pytest.raises(ConfigError) as info:
        parse_config({"correlation": 3})
    assert "correlation" in info.value.message and info.value.hint
