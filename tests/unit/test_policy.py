from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from agent.core.errors import RefusedError
from agent.core.manifest import manifest_from_dict
from agent.core.policy import (
    OPS,
    Policy,
    PolicyError,
    load_policy,
    parse_passwd,
    parse_policy,
    policy_from_dict,
)

POLICY_FILE = Path(__file__).resolve().parents[2] / "rootfs-overlay/etc/agent/policy.toml"


def manifest(name: str = "vendor-app", cpu: str = "1", mem: str = "128M", pids: int = 128,
             ops: list[str] | None = None) -> Any:
    return manifest_from_dict({
        "name": name, "service": {"command": "/bin/app"}, "image": {"root": "/img"},
        "resources": {"cpu_max": cpu, "memory_max": mem, "pids_max": pids},
        "privileges": {"ops": ops or []},
    })


@pytest.fixture
def shipped() -> Policy:
    return load_policy(str(POLICY_FILE))


def test_root_is_admin_in_shipped_policy(shipped: Policy) -> None:
    for op in OPS:
        d = shipped.authorize(0, 0, op, "anything", manifest("anything", cpu="64"), 100)
        assert d.role.name == "admin"
        assert d.rule == "identity[0] uid=0 -> role admin"


def test_vendor_may_run_own_services_within_ceilings(shipped: Policy) -> None:
    d = shipped.authorize(1000, 1000, "run", "vendor-app", manifest(), 3)
    assert d.role.name == "vendor" and d.op == "run"
    assert d.may_see("vendor-x") and not d.may_see("demo-web")


def test_vendor_matched_by_supplementary_group(shipped: Policy) -> None:
    d = shipped.authorize(1234, 50, "ps", None, None, 0, peer_groups=[7, 1000])
    assert d.role.name == "vendor"


@pytest.mark.parametrize(("uid", "gid", "op", "service", "kwargs", "cells", "code", "fragments"), [
    (1001, 1001, "ps", None, {}, 0, "E_POLICY_ROLE", ["uid 1001 gid 1001", "no identity rule"]),
    (1000, 1000, "pin", "vendor-app", {}, 0, "E_POLICY_OP", ["identity[1] gid=1000",
                                                           "may not 'pin'"]),
    (1000, 1000, "reload", None, {}, 0, "E_POLICY_OP", ["may not 'reload'"]),
    (1000, 1000, "run", "demo-web", {}, 0, "E_POLICY_SERVICE", ["'demo-web'", "vendor-*"]),
    (1000, 1000, "stop", None, {}, 0, "E_POLICY_SERVICE", ["needs a service name"]),
    (1000, 1000, "run", "vendor-app", {"cpu": "1500m"}, 0, "E_POLICY_CEILING",
     ["resources.cpu_max 1500m (1500)", "ceiling 1 (1000)"]),
    (1000, 1000, "run", "vendor-app", {"mem": "256M"}, 0, "E_POLICY_CEILING",
     ["resources.memory_max 256M (268435456)", "ceiling 128M (134217728)"]),
    (1000, 1000, "resize", "vendor-app", {"pids": 129}, 0, "E_POLICY_CEILING",
     ["resources.pids_max 129", "ceiling 128"]),
    (1000, 1000, "run", "vendor-app", {}, 4, "E_POLICY_CEILING",
     ["already runs 4 cells", "max_cells is 4"]),
    (1000, 1000, "run", "vendor-app", {"ops": ["reboot"]}, 0, "E_POLICY_PRIVILEGE",
     ["['reboot']", "role vendor"]),
])
def test_refusals(shipped: Policy, uid: int, gid: int, op: str, service: str | None,
                  kwargs: dict[str, Any], cells: int, code: str, fragments: list[str]) -> None:
    m = manifest(**kwargs) if kwargs or op in ("run", "resize") else None
    with pytest.raises(RefusedError) as ei:
        shipped.authorize(uid, gid, op, service, m, cells)
    assert ei.value.code == code
    for f in fragments:
        assert f in ei.value.message


def _svc(uid: int = 0, gid: int = 0, caps: list[str] | None = None) -> Any:
    return manifest_from_dict({
        "name": "vendor-app", "service": {"command": "/bin/app", "uid": uid, "gid": gid},
        "image": {"root": "/img"}, "privileges": {"capabilities": caps or []}})


@pytest.mark.parametrize(("m", "fragments", "hint"), [
    (_svc(), ["service.uid: uid 0", "service.gid: gid 0", "host root"], "service.uid"),
    (_svc(1000, 0), ["service.gid: gid 0"], "non-zero uid and gid"),
    (_svc(1000, 1000, ["net_raw", "kill", "sys_nice"]),
     ["CAP_NET_RAW: raw and packet", "CAP_SYS_NICE: real-time"], "may keep only: audit_write"),
    (_svc(1000, 1000, ["chown", "setuid"]), ["CAP_CHOWN: chown of any inode",
                                             "CAP_SETUID: setuid(0)"], "net_bind_service"),
])
def test_without_userns_host_root_and_host_caps_are_refused(shipped: Policy, m: Any,
                                                            fragments: list[str],
                                                            hint: str) -> None:
    with pytest.raises(RefusedError) as ei:
        shipped.authorize(1000, 1000, "run", "vendor-app", m, 0, userns=False)
    assert ei.value.code == "E_POLICY_USERNS"
    assert "[userns] enabled = false" in ei.value.message
    for f in fragments:
        assert f in ei.value.message
    assert hint in (ei.value.hint or "") and "docs/isolation.md" in (ei.value.hint or "")
    # the control: with user namespaces the same manifest is the cell's own business
    assert shipped.authorize(1000, 1000, "run", "vendor-app", m, 0).op == "run"


def test_without_userns_a_non_root_service_with_kept_caps_runs(shipped: Policy) -> None:
    m = _svc(1000, 1000, ["net_bind_service", "kill", "sys_chroot", "audit_write"])
    assert shipped.authorize(1000, 1000, "run", "vendor-app", m, 0, userns=False).op == "run"
    # only run creates a cell: the other operations are not checked against the mode
    assert shipped.authorize(1000, 1000, "stop", "vendor-app", _svc(), 0, userns=False)


def test_ceilings_only_for_sized_ops(shipped: Policy) -> None:
    big = manifest(mem="1G")
    assert shipped.authorize(1000, 1000, "inspect", "vendor-app", big, 99).op == "inspect"


def test_empty_policy_denies_everyone_including_root() -> None:
    for p in (Policy(), parse_policy("")):
        with pytest.raises(RefusedError) as ei:
            p.authorize(0, 0, "status", None, None, 0)
        assert ei.value.code == "E_POLICY_ROLE"


def test_first_matching_identity_wins() -> None:
    p = parse_policy("""
[[identity]]
uid = 1000
gid = 1000
role = "ops"
[[identity]]
gid = 1000
role = "viewer"
[role.ops]
services = ["*"]
may = ["stop"]
[role.viewer]
may = ["ps"]
""")
    assert p.authorize(1000, 1000, "stop", "x", None, 0).role.name == "ops"
    with pytest.raises(RefusedError):
        p.authorize(1001, 1000, "stop", "x", None, 0)
    assert p.authorize(1001, 1000, "ps", None, None, 0).role.name == "viewer"


def test_user_names_resolve_through_passwd() -> None:
    users = parse_passwd("root:x:0:0::/root:/bin/sh\nbroken\nvendor:x:1500:1500::/:/bin/false\n")
    assert users == {"root": 0, "vendor": 1500}
    text = '[[identity]]\nuser = "vendor"\nrole = "r"\n[[identity]]\nuser = "ghost"\nrole = "r"\n' \
           '[role.r]\nmay = ["status"]\n'
    p = parse_policy(text, "p.toml", users)
    assert p.authorize(1500, 9, "status", None, None, 0).role.name == "r"
    assert p.warnings == ("p.toml: identity[1].user: no user 'ghost'; the entry matches nobody",)
    with pytest.raises(RefusedError):
        p.authorize(1501, 9, "status", None, None, 0)


BASE: dict[str, Any] = {
    "identity": [{"uid": 0, "role": "admin"}],
    "role": {"admin": {"services": ["*"], "may": ["*"], "cpu_max": "2", "memory_max": "1G",
                       "pids_max": 100, "max_cells": 3, "privileged_ops": ["reboot"]}},
}


@pytest.mark.parametrize(("mutate", "key", "fragment"), [
    (lambda d: d["identity"][0].update(role="root"), "identity[0].role", "not defined"),
    (lambda d: d["identity"][0].pop("role"), "identity[0].role", "required key is missing"),
    (lambda d: d["identity"][0].pop("uid"), "identity[0].uid", "at least one of uid"),
    (lambda d: d["identity"][0].update(uid=-1), "identity[0].uid", "out of range"),
    (lambda d: d["identity"][0].update(gid="wheel"), "identity[0].gid", "expected integer"),
    (lambda d: d["identity"][0].update(usr="x"), "identity[0].usr", "did you mean user?"),
    (lambda d: d.update(identity={"uid": 0}), "identity", "expected array of tables"),
    (lambda d: d["role"].update(Admin={}), "role.Admin", "invalid role name"),
    (lambda d: d["role"]["admin"].update(may=["fly"]), "role.admin.may", "not an operation"),
    (lambda d: d["role"]["admin"].update(services="*"), "role.admin.services",
     "expected array of strings"),
    (lambda d: d["role"]["admin"].update(services=[""]), "role.admin.services[0]", "empty"),
    (lambda d: d["role"]["admin"].update(cpu_max="lots"), "role.admin.cpu_max", "invalid"),
    (lambda d: d["role"]["admin"].update(memory_max="2T"), "role.admin.memory_max",
     "above the limit"),
    (lambda d: d["role"]["admin"].update(max_cells=-1), "role.admin.max_cells", "out of range"),
    (lambda d: d["role"]["admin"].update(pids_max=0), "role.admin.pids_max", "out of range"),
    (lambda d: d["role"]["admin"].update(privileged_ops=["fly"]), "role.admin.privileged_ops",
     "not a privileged operation"),
    (lambda d: d["role"]["admin"].update(memory_maximum=1), "role.admin.memory_maximum",
     "did you mean memory_max?"),
    (lambda d: d["role"].update(x=1), "role.x", "expected table"),
    (lambda d: d.update(roles={}), "roles", "did you mean role?"),
])
def test_policy_rules(mutate: Any, key: str, fragment: str) -> None:
    d = copy.deepcopy(BASE)
    mutate(d)
    with pytest.raises(PolicyError) as ei:
        policy_from_dict(d, "policy.toml")
    assert ei.value.code == "E_POLICY"
    assert ei.value.key == key, ei.value.problems
    assert ei.value.message.startswith(f"policy.toml: {key}: ")
    assert fragment in ei.value.message


def test_base_policy_ceilings_decoded() -> None:
    p = policy_from_dict(copy.deepcopy(BASE))
    assert p.roles is not None
    r = p.roles["admin"]
    assert (r.cpu_max, r.memory_max, r.pids_max, r.max_cells) == (2000, 1 << 30, 100, 3)
    assert r.may == frozenset(OPS) and r.privileged_ops == frozenset({"reboot"})
    assert p.authorize(0, 0, "run", "a", manifest("a", cpu="2", mem="1G", pids=100,
                                                  ops=["reboot"]), 2).role is r
    with pytest.raises(RefusedError) as ei:
        p.authorize(0, 0, "run", "a", manifest("a", pids=100, ops=["set_time"]), 0)
    assert ei.value.code == "E_POLICY_PRIVILEGE"


def test_policy_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as ei:
        parse_policy("[[identity]\n", "p.toml")
    assert ei.value.message.startswith("p.toml: TOML syntax")
    with pytest.raises(PolicyError):
        load_policy(str(tmp_path / "none.toml"))


# -- data dirs: a source naming another service's data dir must be shared ------------------

SHARING = """
[[identity]]
uid = 0
role = "admin"

[role.admin]
services = ["*"]
may = ["*"]

[[share]]
data = "media-store"
readers = ["media-player", "media-index"]
"""


def data_manifest(name: str, source: str | None) -> Any:
    d: dict[str, Any] = {"kind": "data", "path": "/data"}
    if source is not None:
        d["source"] = source
    return manifest_from_dict({"name": name, "service": {"command": "/bin/app"},
                               "image": {"root": "/img"}, "writable": [d]})


def test_own_data_dir_needs_no_share_and_a_foreign_one_is_refused(shipped: Policy) -> None:
    for own in (data_manifest("demo-web", None), data_manifest("demo-web", "demo-web")):
        assert shipped.authorize(0, 0, "run", "demo-web", own, 0).role.name == "admin"
    thief = data_manifest("demo-client", "demo-web")
    with pytest.raises(RefusedError) as ei:  # the administrator too: sharing is box-wide
        shipped.authorize(0, 0, "run", "demo-client", thief, 0)
    e = ei.value
    assert e.code == "E_POLICY_SHARE"
    assert "data dir of service demo-web" in e.message and "demo-client" in e.message
    assert e.hint is not None and 'readers = ["demo-client"]' in e.hint
    # other ops than run do not mount anything
    assert shipped.authorize(0, 0, "inspect", "demo-client", thief, 0).op == "inspect"


def test_a_share_lets_only_its_named_readers_mount_the_data_dir() -> None:
    p = parse_policy(SHARING, "policy.toml")
    (share,) = p.shares
    assert str(share) == "share[0] media-store -> media-player, media-index"
    for reader in ("media-player", "media-index"):
        m = data_manifest(reader, "media-store")
        p.authorize(0, 0, "run", reader, m, 0)
        assert p.check_data_source(m) == share
    with pytest.raises(RefusedError, match=r"no \[\[share\]\]"):
        p.authorize(0, 0, "run", "media-evil", data_manifest("media-evil", "media-store"), 0)
    with pytest.raises(RefusedError):  # shares do not chain or reverse
        p.authorize(0, 0, "run", "media-store",
                    data_manifest("media-store", "media-player"), 0)
    assert p.data_share("media-player", "media-store") is share
    assert p.data_share("media-store", "media-player") is None


@pytest.mark.parametrize(("share", "key", "fragment"), [
    ({"data": "a", "readers": []}, "share[0].readers", "empty"),
    ({"data": "a", "readers": ["b*"]}, "share[0].readers[0]", "not a service name"),
    ({"data": "a", "readers": ["a"]}, "share[0].readers[0]", "owns the data dir"),
    ({"data": "../a", "readers": ["b"]}, "share[0].data", "not a service name"),
    ({"readers": ["b"]}, "share[0].data", "missing"),
    ({"data": "a", "readers": ["b"], "mode": "rw"}, "share[0].mode", "unknown key"),
])
def test_bad_shares_are_refused_with_the_key(share: dict[str, Any], key: str,
                                             fragment: str) -> None:
    with pytest.raises(PolicyError) as ei:
        policy_from_dict({"share": [share]}, "policy.toml")
    assert ei.value.key == key, ei.value.problems
    assert fragment in ei.value.message
