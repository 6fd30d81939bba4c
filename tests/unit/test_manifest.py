from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.core.errors import ConfigError
from agent.core.grants import CAPABILITIES, PRIVILEGED_OPS, REFUSED_CAPABILITIES
from agent.core.manifest import (
    EgressRule,
    Manifest,
    ManifestError,
    load_manifest,
    manifest_from_dict,
    parse_manifest,
)

SERVICES = Path(__file__).resolve().parents[2] / "rootfs-overlay/etc/agent/services"

BASE: dict[str, Any] = {
    "name": "web",
    "service": {"command": "/bin/busybox", "args": ["httpd", "-f"], "env": {"A_1": "x"}},
    "image": {"root": "/usr/share/agent/images/demo"},
    "writable": [{"kind": "tmpfs", "path": "/tmp", "size": "4M"},
                 {"kind": "data", "path": "/var/lib/web", "size": "32M"}],
    "resources": {"cpu_min": "100m", "cpu_max": "0.5", "memory_min": "8M",
                  "memory_max": "32M", "pids_max": 32, "io_weight": 200, "priority": "high"},
    "network": {"vlan": 100, "peers": [{"cell": "db", "ports": [5432]}],
                "egress": ["10.0.0.0/8", "53/udp"]},
    "lifecycle": {"mode": "service", "restart": "always",
                  "backoff": {"initial": "500ms", "max": "30s"}},
    "privileges": {"capabilities": ["net_bind_service"], "ops": ["set_time"]},
}


def with_(path: str, value: Any) -> dict[str, Any]:
    """BASE with one key set (``...`` deletes it); path like ``writable.0.size``."""
    d = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = d
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is ...:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return d


def test_base_is_valid_and_decoded() -> None:
    m = manifest_from_dict(copy.deepcopy(BASE))
    assert m.name == "web"
    assert m.service.env == (("A_1", "x"),)
    assert m.resources.cpu_min == 100 and m.resources.cpu_max == 500
    assert m.resources.memory_max == 32 << 20 and m.resources.priority == 80
    assert m.tmpfs[0].size == 4 << 20 and m.tmpfs[0].exec is False
    assert m.data is not None and (m.data.source, m.data.size) == ("web", 32 << 20)
    assert m.network is not None and m.network.vlan == 100
    assert m.network.egress == (EgressRule("10.0.0.0/8"), EgressRule(None, 53, "udp"))
    assert m.lifecycle.backoff_initial_ms == 500 and m.lifecycle.backoff_max_ms == 30_000
    assert m.privileges.capabilities == ("CAP_NET_BIND_SERVICE",)


def test_defaults() -> None:
    m = parse_manifest('name = "a"\n[service]\ncommand = "/x"\n[image]\nroot = "/img"\n')
    assert m.network is None
    assert m.lifecycle.mode == "service" and m.lifecycle.restart == "on-failure"
    assert m.resources.memory_max == 64 << 20 and m.resources.pids_max == 64
    assert m.service.workdir == "/" and m.service.uid == 0
    one = parse_manifest('name = "a"\n[service]\ncommand = "/x"\n[image]\nroot = "/img"\n'
                         '[lifecycle]\nmode = "oneshot"\n')
    assert one.lifecycle.restart == "no"


# Every rule of the validator: (key to change, new value, exact error key, message fragment).
RULES: list[tuple[str, Any, str, str]] = [
    ("name", ..., "name", "required key is missing"),
    ("name", "Web", "name", "not a valid cell name"),
    ("name", "a" * 33, "name", "not a valid cell name"),
    ("name", "-web", "name", "not a valid cell name"),
    ("name", 5, "name", "expected string, got integer"),
    ("description", ["x"], "description", "expected string, got array"),
    ("colour", "red", "colour", "unknown key"),
    ("service", ..., "service", "required key is missing"),
    ("service", "x", "service", "expected table, got string"),
    ("service.command", ..., "service.command", "required key is missing"),
    ("service.command", "bin/sh", "service.command", "not an absolute path"),
    ("service.command", "/bin/../sh", "service.command", "not normalized"),
    ("service.command", "/bin//sh", "service.command", "not normalized"),
    ("service.command", "//bin/sh", "service.command", "not normalized"),
    ("service.command", "/bin/sh/", "service.command", "not normalized"),
    ("service.command", "/bin/\0sh", "service.command", "NUL"),
    ("service.command", "/" + "a" * 5000, "service.command", "longer than"),
    ("service.args", "httpd", "service.args", "expected array of strings, got string"),
    ("service.args", ["a", 1], "service.args[1]", "expected string, got integer"),
    ("service.args", ["x"] * 300, "service.args", "at most 256"),
    ("service.env", {"1A": "x"}, "service.env.1A", "invalid environment variable name"),
    ("service.env", {"A-B": "x"}, "service.env.A-B", "invalid environment variable name"),
    ("service.env", {"A": 1}, "service.env.A", "expected string, got integer"),
    ("service.env", ["A=1"], "service.env", "expected table, got array"),
    ("service.workdir", "www", "service.workdir", "not an absolute path"),
    ("service.uid", 70000, "service.uid", "out of range 0..65535"),
    ("service.gid", -1, "service.gid", "out of range"),
    ("service.user", "www", "service.user", "unknown key"),
    ("image", ..., "image", "required key is missing"),
    ("image.root", "/", "image.root", "host root cannot be an image"),
    ("image.root", "images/demo", "image.root", "not an absolute path"),
    ("image.rot", "/x", "image.rot", "unknown key; did you mean root?"),
    ("writable", {"kind": "tmpfs"}, "writable", "expected array of tables, got table"),
    ("writable", [{"kind": "tmpfs", "path": f"/t{i}", "size": "4K"} for i in range(17)],
     "writable", "at most 16"),
    ("writable.0", "tmp", "writable[0]", "expected table, got string"),
    ("writable.0.kind", "overlay", "writable[0].kind", "not one of: tmpfs, data"),
    ("writable.0.kind", ..., "writable[0].kind", "required key is missing"),
    ("writable.0.path", "/proc", "writable[0].path", "reserved"),
    ("writable.0.path", "/dev/shm", "writable[0].path", "reserved"),
    ("writable.0.path", "/", "writable[0].path", "reserved"),
    ("writable.0.path", "/var/lib/web", "writable[1].path", "already a writable area"),
    ("writable.0.size", ..., "writable[0].size", "required key is missing"),
    ("writable.0.size", "1K", "writable[0].size", "below one page"),
    ("writable.0.size", "4Q", "writable[0].size", "unknown suffix"),
    ("writable.0.size", "64M", "writable", "above resources.memory_max"),
    ("writable.0.exec", "yes", "writable[0].exec", "expected boolean, got string"),
    ("writable.0.source", "x", "writable[0].source", "unknown key"),
    ("writable.1.source", "../etc", "writable[1].source", "not a service name"),
    ("writable.1.source", "a/b", "writable[1].source", "not a service name"),
    ("writable.1.source", ".hidden", "writable[1].source", "not a service name"),
    ("writable.1.source", "Web", "writable[1].source", "not a service name"),
    ("writable.1.size", "1M", "writable[1].size", "below the smallest data dir (4M)"),
    ("writable.1.size", 4194303, "writable[1].size", "below the smallest data dir"),
    ("writable.1.size", "-1M", "writable[1].size", "negative"),
    ("writable.1.source", "db", "writable[1].size", "has its owner's size"),
    ("writable.0", {"kind": "data", "path": "/d", "source": "d"}, "writable[1].kind",
     "only one persistent data area"),
    ("resources", 1, "resources", "expected table, got integer"),
    ("resources.memroy_max", "1M", "resources.memroy_max", "did you mean memory_max?"),
    ("resources.cpu_max", "5m", "resources.cpu_max", "below the minimum of 10m"),
    ("resources.cpu_max", "2000", "resources.cpu_max", "above the limit"),
    ("resources.cpu_min", "1", "resources.cpu_min", "above cpu_max"),
    ("resources.cpu_min", "-1", "resources.cpu_min", "negative"),
    ("resources.memory_max", "512K", "resources.memory_max", "below the minimum of 1M"),
    ("resources.memory_max", "2T", "resources.memory_max", "above the limit"),
    ("resources.memory_min", "64M", "resources.memory_min", "above memory_max"),
    ("resources.pids_max", 0, "resources.pids_max", "out of range 1..65536"),
    ("resources.pids_max", "32", "resources.pids_max", "expected integer, got string"),
    ("resources.io_weight", 0, "resources.io_weight", "out of range 1..10000"),
    ("resources.io_weight", 10001, "resources.io_weight", "out of range 1..10000"),
    ("resources.priority", 100, "resources.priority", "not 0..99"),
    ("resources.priority", "urgent", "resources.priority", "not 0..99"),
    ("resources.priority", True, "resources.priority", "not 0..99"),
    ("network", [], "network", "expected table, got array"),
    ("network.vlan", 1, "network.vlan", "not a VLAN id 2..4094"),
    ("network.vlan", 4095, "network.vlan", "not a VLAN id 2..4094"),
    ("network.vlan", "100", "network.vlan", "not a VLAN id"),
    ("network.peers", {"cell": "db"}, "network.peers", "expected array of tables"),
    ("network.peers.0.cell", "DB!", "network.peers[0].cell", "not a valid cell name"),
    ("network.peers.0.cell", "web", "network.peers[0].cell", "its own peer"),
    ("network.peers.0.cell", ..., "network.peers[0].cell", "required key is missing"),
    ("network.peers.0.ports", [], "network.peers[0].ports", "empty"),
    ("network.peers.0.ports", [0], "network.peers[0].ports[0]", "not a port number"),
    ("network.peers.0.ports", [70000], "network.peers[0].ports[0]", "not a port number"),
    ("network.peers.0.ports", 80, "network.peers[0].ports", "expected array of integers"),
    ("network.peers.0.proto", "sctp", "network.peers[0].proto", "not one of: tcp, udp"),
    ("network.peers.0.port", 1, "network.peers[0].port", "did you mean ports?"),
    ("network.egress", "yes", "network.egress", "expected boolean or array of strings"),
    ("network.egress", [1], "network.egress[0]", "expected string, got integer"),
    ("network.egress", ["10.0.0.1/8"], "network.egress[0]", "not an egress rule"),
    ("network.egress", ["443/sctp"], "network.egress[0]", "not an egress rule"),
    ("network.egress", ["70000"], "network.egress[0]", "not an egress rule"),
    ("network.egress", ["10.0.0.0/8 443 53"], "network.egress[0]", "not an egress rule"),
    ("network.egress", [""], "network.egress[0]", "not an egress rule"),
    ("network.egress", ["53/udp"] * 65, "network.egress", "at most 64"),
    ("lifecycle.mode", "daemon", "lifecycle.mode", "not one of: oneshot, service"),
    ("lifecycle.restart", "sometimes", "lifecycle.restart", "not one of: no, on-failure"),
    ("lifecycle.mode", "oneshot", "lifecycle.restart", "oneshot cell cannot restart always"),
    ("lifecycle.backoff", "1s", "lifecycle.backoff", "expected table, got string"),
    ("lifecycle.backoff.initial", "5ms", "lifecycle.backoff.initial", "below the minimum"),
    ("lifecycle.backoff.initial", "1m", "lifecycle.backoff.initial", "above max 30s"),
    ("lifecycle.backoff.max", "1y", "lifecycle.backoff.max", "unknown suffix"),
    ("lifecycle.backoff.maximum", "1s", "lifecycle.backoff.maximum", "did you mean max?"),
    ("lifecycle.destroy_on_exit", 1, "lifecycle.destroy_on_exit", "expected boolean"),
    ("privileges.capabilities", ["CAP_SYS_ADMIN"], "privileges.capabilities[0]",
     "CAP_SYS_ADMIN is never granted"),
    ("privileges.capabilities", ["chown", "sys_module"], "privileges.capabilities[1]",
     "CAP_SYS_MODULE is never granted"),
    ("privileges.capabilities", ["CAP_FLY"], "privileges.capabilities[0]",
     "not a Linux capability"),
    ("privileges.capabilities", "CAP_CHOWN", "privileges.capabilities", "expected array"),
    ("privileges.ops", ["format_disk"], "privileges.ops[0]", "not a privileged operation"),
    ("privileges.caps", [], "privileges.caps", "unknown key"),
]


@pytest.mark.parametrize(("path", "value", "key", "fragment"), RULES,
                         ids=[f"{r[0]}={str(r[1])[:20]}" for r in RULES])
def test_rule(path: str, value: Any, key: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as ei:
        manifest_from_dict(with_(path, value), "svc.toml")
    e = ei.value
    assert isinstance(e, ConfigError)
    assert e.code == "E_MANIFEST"
    assert e.key == key, e.problems
    assert e.message.startswith(f"svc.toml: {key}: ")
    assert fragment in e.message


def test_all_problems_are_collected() -> None:
    d = with_("name", "BAD")
    d["resources"]["pids_max"] = 0
    d["network"]["vlan"] = 0
    with pytest.raises(ManifestError) as ei:
        manifest_from_dict(d, "f.toml")
    assert ei.value.keys == ("name", "resources.pids_max", "network.vlan")
    assert "(and 2 more problems)" in ei.value.message
    assert ei.value.problems[2].startswith("f.toml: network.vlan: ")


def test_refused_capability_has_hint() -> None:
    with pytest.raises(ManifestError) as ei:
        manifest_from_dict(with_("privileges.capabilities", ["CAP_SYS_BOOT"]))
    assert ei.value.hint is not None and "reboot" in ei.value.hint


def test_vocabularies() -> None:
    assert CAPABILITIES["CAP_CHOWN"] == 0 and CAPABILITIES["CAP_CHECKPOINT_RESTORE"] == 40
    assert len(CAPABILITIES) == 41
    assert set(REFUSED_CAPABILITIES) <= set(CAPABILITIES)
    assert {"set_time", "mount_usb", "reboot", "sysctl_net"} <= set(PRIVILEGED_OPS)


def test_toml_syntax_error() -> None:
    with pytest.raises(ManifestError) as ei:
        parse_manifest("name = \n", "x.toml")
    assert ei.value.code == "E_MANIFEST"
    assert ei.value.message.startswith("x.toml: TOML syntax:")


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as ei:
        load_manifest(str(tmp_path / "nope.toml"))
    assert "cannot read" in ei.value.message


# ---- round trip through to_dict() and TOML text


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"


def to_toml(d: dict[str, Any]) -> str:
    return "".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in d.items())


def _round_trip(m: Manifest) -> None:
    again = parse_manifest(to_toml(m.to_dict()))
    assert again == m
    assert again.to_dict() == m.to_dict()


@pytest.mark.parametrize("path", sorted(SERVICES.glob("*.toml")), ids=lambda p: p.name)
def test_example_manifests_load_and_round_trip(path: Path) -> None:
    m = load_manifest(str(path))
    assert m.source == str(path)
    assert m.name == path.stem
    assert m.image_root == "/usr/share/agent/images/demo"
    assert m.service.command == "/bin/busybox"
    _round_trip(m)


def test_example_set() -> None:
    ms = {p.stem: load_manifest(str(p)) for p in SERVICES.glob("*.toml")}
    assert ms["demo-echo"].lifecycle.mode == "oneshot"
    web = ms["demo-web"]
    assert web.network is not None and web.network.vlan == 100
    assert "8080" in web.service.args
    client = ms["demo-client"].network
    assert client is not None and client.peers[0].cell == "demo-web"
    assert client.peers[0].ports == (8080,)


@settings(max_examples=150)
@given(
    cpu_max=st.integers(10, 64_000), mem=st.integers(1 << 20, 1 << 34),
    pids=st.integers(1, 65536), vlan=st.one_of(st.just("auto"), st.integers(2, 4094)),
    egress=st.one_of(st.booleans(), st.lists(st.sampled_from(
        ["10.0.0.0/8", "53/udp", "443", "0.0.0.0/0 443/tcp", "::/0", "fd00::/8 80/tcp"]),
        max_size=4)),
    caps=st.lists(st.sampled_from(sorted(set(CAPABILITIES) - set(REFUSED_CAPABILITIES)))),
    ops=st.lists(st.sampled_from(sorted(PRIVILEGED_OPS))),
    args=st.lists(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126))),
)
def test_round_trip_generated(cpu_max: int, mem: int, pids: int, vlan: object, egress: object,
                              caps: list[str], ops: list[str], args: list[str]) -> None:
    d = copy.deepcopy(BASE)
    d["resources"] = {"cpu_max": f"{cpu_max}m", "memory_max": mem, "pids_max": pids}
    d["network"] = {"vlan": vlan, "egress": egress}
    d["privileges"] = {"capabilities": caps, "ops": ops}
    d["service"]["args"] = args
    d["writable"] = []
    _round_trip(manifest_from_dict(d))


# ---- arbitrary input never raises anything but ConfigError

KEYS = ["name", "service", "image", "writable", "resources", "network", "lifecycle",
        "privileges", "command", "root", "kind", "path", "size", "cpu_max", "memory_max",
        "vlan", "peers", "egress", "mode", "backoff", "capabilities", "ops", "env", "args",
        "ports", "cell", "source", "initial", "max", "priority", "x"]
scalars = st.one_of(st.integers(-(1 << 70), 1 << 70), st.text(max_size=12), st.booleans(),
                    st.floats(), st.sampled_from(["/bin/sh", "64M", "auto", "tmpfs", "1s"]))
toml_ish = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6),
                                            inner, max_size=5)),
    max_leaves=30,
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS), toml_ish, max_size=8))
def test_random_dicts_only_raise_config_error(d: dict[str, Any]) -> None:
    try:
        manifest_from_dict(d)
    except ConfigError as e:
        assert e.code == "E_MANIFEST"


@settings(max_examples=400)
@given(st.sampled_from([r[0] for r in RULES if r[1] is not ...]), toml_ish)
def test_mutated_base_only_raises_config_error(path: str, value: Any) -> None:
    try:
        d = with_(path, value)
    except (KeyError, IndexError, TypeError):
        return
    try:
        manifest_from_dict(d)
    except ManifestError as e:
        assert e.key and e.code == "E_MANIFEST"


def test_no_os_access_in_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object) -> None:
        raise AssertionError("decoding touched the filesystem")
    monkeypatch.setattr(os, "stat", boom)
    monkeypatch.setattr(os, "lstat", boom)
    manifest_from_dict(copy.deepcopy(BASE))
