"""Service manifests: TOML text -> frozen, validated :class:`Manifest` (design step C input).

Every key, type, default and bound is documented in ``docs/manifest.md``.  Decoding
collects every problem it finds and raises one :class:`ManifestError` (code
``E_MANIFEST``) whose message is ``<file>: <key>: <problem>`` for the first problem;
``problems`` lists them all.  The records themselves are in
:mod:`agent.core.manifestmodel`, re-exported here.  Whether the image on disk holds what
a manifest names is checked by :func:`agent.kernel.image.check_image`.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
import tomllib
from typing import Any, Literal

from agent.core import units
from agent.core.config import DATA_MIN_SIZE
from agent.core.grants import CAPABILITIES, PRIVILEGED_OPS, REFUSED_CAPABILITIES
from agent.core.manifestmodel import (
    MAX_ID,
    MAX_STRING,
    MAX_WRITABLE,
    MIN_CPU_MAX,
    MIN_MEMORY_MAX,
    NAME_RE,
    PRIORITY_NAMES,
    DataDir,
    EgressRule,
    Lifecycle,
    Manifest,
    ManifestError,
    Network,
    Peer,
    Privileges,
    Resources,
    Service,
    Tmpfs,
)
from agent.core.units import Problem, TableReader

__all__ = [
    "MIN_CPU_MAX",
    "NAME_RE",
    "PRIORITY_NAMES",
    "DataDir",
    "EgressRule",
    "Lifecycle",
    "Manifest",
    "ManifestError",
    "Network",
    "Peer",
    "Privileges",
    "Resources",
    "Service",
    "Tmpfs",
    "load_manifest",
    "manifest_from_dict",
    "parse_manifest",
]
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_PORT_RE = re.compile(r"^([0-9]{1,5})(?:/(tcp|udp))?$")
# Mounted by the planner in every cell; a writable area there would hide them.
_RESERVED_MOUNTS = ("/proc", "/sys", "/dev")


# --------------------------------------------------------------------------------------------
# Decoding


def _image_path(rd: TableReader, name: str, default: Any = None, required: bool = True) -> Any:
    """An absolute, normalized path: no `..`, `.`, `//`, trailing `/` or NUL."""
    p = rd.string(name) if required else rd.string(name, default)
    if not isinstance(p, str) or p is default:
        return p
    if not p.startswith("/"):
        rd.error(name, f"{p!r} is not an absolute path", "paths start with /")
    elif posixpath.normpath(p) != p or p.startswith("//"):
        rd.error(name, f"{p!r} is not normalized (no .., ., // or trailing /)",
                 f"write {posixpath.normpath('/' + p.lstrip('/'))!r}")
    elif len(p) > MAX_STRING:
        rd.error(name, f"path longer than {MAX_STRING} characters")
    else:
        return p
    return default


def _service(rd: TableReader) -> Service | None:
    command = _image_path(rd, "command")
    args = rd.strings("args", ())
    envt = rd.sub("env")
    env: list[tuple[str, str]] = []
    if envt is not None:
        for k in sorted(envt.table):
            if not _ENV_RE.match(k):
                envt.error(k, "invalid environment variable name",
                           "names are letters, digits and _, not starting with a digit")
                envt.raw(k)
                continue
            v = envt.string(k)
            if isinstance(v, str):
                env.append((k, v))
        if len(env) > 128:
            rd.error("env", f"{len(env)} variables, at most 128 allowed")
        envt.finish()
    workdir = _image_path(rd, "workdir", "/", required=False)
    uid = rd.integer("uid", 0, MAX_ID, 0)
    gid = rd.integer("gid", 0, MAX_ID, 0)
    rd.finish()
    if command is None:
        return None
    return Service(command, args, tuple(env), workdir, uid, gid)


def _writable(top: TableReader, name: str | None
              ) -> tuple[tuple[Tmpfs, ...], DataDir | None]:
    tmpfs: list[Tmpfs] = []
    data: list[DataDir] = []
    seen: set[str] = set()
    for rd in top.tables("writable", MAX_WRITABLE):
        kind = rd.string("kind")
        path = _image_path(rd, "path")
        if isinstance(path, str):
            if path == "/" or any(path == m or path.startswith(m + "/") for m in _RESERVED_MOUNTS):
                rd.error("path", f"{path!r} is reserved", "/, /proc, /sys and /dev are "
                         "set up by the agent; choose a directory such as /tmp or /var")
                path = None
            elif path in seen:
                rd.error("path", f"{path!r} is already a writable area")
                path = None
            else:
                seen.add(path)
        if kind == "tmpfs":
            size = rd.unit("size", units.parse_size)
            if isinstance(size, int) and size < 4096:
                rd.error("size", f"{size} bytes is below one page (4096)")
                size = None
            exe = rd.boolean("exec", False)
            if isinstance(path, str) and isinstance(size, int):
                tmpfs.append(Tmpfs(path, size, exe))
        elif kind == "data":
            source = rd.string("source", name)
            if isinstance(source, str) and not NAME_RE.match(source):
                rd.error("source", f"{source!r} is not a service name",
                         "a data dir belongs to a service: leave source out for the "
                         "service's own, or name the service whose data dir the policy "
                         "shares with this one (docs/data-dirs.md)")
                source = None
            dsize = rd.unit("size", units.parse_size, None)
            if isinstance(dsize, int) and dsize < DATA_MIN_SIZE:
                rd.error("size", f"{units.format_size(dsize)} is below the smallest data dir "
                         f"({units.format_size(DATA_MIN_SIZE)})",
                         "an ext4 image smaller than that is mostly its own metadata")
                dsize = None
            elif isinstance(dsize, int) and isinstance(source, str) and source != name:
                rd.error("size", f"a data dir read from service {source} has its owner's "
                         "size", "leave size out, or set it in the manifest of " + source)
                dsize = None
            if data:
                rd.error("kind", "only one persistent data area is allowed per cell")
            elif isinstance(path, str) and isinstance(source, str):
                data.append(DataDir(path, source, dsize))
        elif kind is not None:
            rd.error("kind", f"{kind!r} is not one of: tmpfs, data")
        rd.finish()
    return tuple(tmpfs), (data[0] if data else None)


def _resources(rd: TableReader | None) -> Resources | None:
    if rd is None:
        return Resources()
    dflt = Resources()
    cpu_min = rd.unit("cpu_min", units.parse_cpu, dflt.cpu_min)
    cpu_max = rd.unit("cpu_max", units.parse_cpu, dflt.cpu_max)
    mem_min = rd.unit("memory_min", units.parse_size, dflt.memory_min)
    mem_max = rd.unit("memory_max", units.parse_size, dflt.memory_max)
    pids = rd.integer("pids_max", 1, 65536, dflt.pids_max)
    io = rd.integer("io_weight", 1, 10000, dflt.io_weight)
    prio = rd.raw("priority", "normal")
    n = len(rd.problems)
    if cpu_max < MIN_CPU_MAX:
        rd.error("cpu_max", f"{cpu_max}m is below the minimum of {MIN_CPU_MAX}m")
    elif cpu_min > cpu_max:
        rd.error("cpu_min", f"{units.format_cpu(cpu_min)} is above cpu_max "
                 f"{units.format_cpu(cpu_max)}", "cpu_min must be <= cpu_max")
    if mem_max < MIN_MEMORY_MAX:
        rd.error("memory_max", f"{mem_max} bytes is below the minimum of 1M")
    elif mem_min > mem_max:
        rd.error("memory_min", f"{units.format_size(mem_min)} is above memory_max "
                 f"{units.format_size(mem_max)}", "memory_min must be <= memory_max")
    if isinstance(prio, str) and prio in PRIORITY_NAMES:
        prio = PRIORITY_NAMES[prio]
    elif isinstance(prio, bool) or not isinstance(prio, int) or not 0 <= prio <= 99:
        rd.error("priority", f"{prio!r} is not 0..99 or one of: low, normal, high")
    rd.finish()
    if len(rd.problems) > n:
        return None
    return Resources(cpu_min, cpu_max, mem_min, mem_max, pids, io, prio)


def _egress_rule(rd: TableReader, key: str, text: str) -> EgressRule | None:
    cidr: str | None = None
    port: int | None = None
    proto: Literal["tcp", "udp", "any"] = "any"
    for tok in text.split():
        m = _PORT_RE.match(tok)
        if m and port is None:
            port = int(m.group(1))
            proto = "tcp" if m.group(2) == "tcp" else "udp" if m.group(2) == "udp" else "any"
            if not 1 <= port <= 65535:
                break
            continue
        if cidr is None and not m:
            try:
                cidr = str(ipaddress.ip_network(tok, strict=True))
                continue
            except ValueError:
                pass
        break
    else:
        if cidr is not None or port is not None:
            return EgressRule(cidr, port, proto)
    rd.error(key, f"{text!r} is not an egress rule",
             'write "CIDR", "PORT[/tcp|/udp]" or both: "10.0.0.0/8", "53/udp", "0.0.0.0/0 443/tcp"')
    return None


def _network(rd: TableReader | None, name: str | None) -> Network | None:
    if rd is None:
        return None
    vlan = rd.raw("vlan", "auto")
    if vlan != "auto" and (isinstance(vlan, bool) or not isinstance(vlan, int)
                           or not 2 <= vlan <= 4094):
        rd.error("vlan", f"{vlan!r} is not a VLAN id 2..4094 or \"auto\"",
                 "VLAN 1 is the bridge's default PVID; 0 and 4095 are reserved")
        vlan = "auto"
    peers: list[Peer] = []
    for p in rd.tables("peers"):
        cell = p.string("cell")
        if isinstance(cell, str) and not NAME_RE.match(cell):
            p.error("cell", f"{cell!r} is not a valid cell name")
        elif cell == name:
            p.error("cell", "a cell cannot be its own peer")
        ports = p.typed("ports", list, "array of integers", None)
        good: list[int] = []
        for i, port in enumerate(ports or ()):
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                p.error(f"ports[{i}]", f"{port!r} is not a port number 1..65535")
            else:
                good.append(port)
        if ports is not None and not ports:
            p.error("ports", "empty: list the ports the peer may reach")
        proto = p.string("proto", "tcp")
        if proto not in ("tcp", "udp"):
            p.error("proto", f"{proto!r} is not one of: tcp, udp")
        ok = isinstance(ports, list) and len(good) == len(ports) > 0
        if isinstance(cell, str) and ok and proto in ("tcp", "udp"):
            peers.append(Peer(cell, tuple(sorted(set(good))), proto))
        p.finish()
    egress = rd.raw("egress", False)
    any_ = egress is True
    rules: list[EgressRule] = []
    if isinstance(egress, list):
        for i, item in enumerate(egress[:64]):
            if not isinstance(item, str):
                rd.error(f"egress[{i}]", f"expected string, got {units.type_name(item)}")
            elif (rule := _egress_rule(rd, f"egress[{i}]", item)) is not None:
                rules.append(rule)
        if len(egress) > 64:
            rd.error("egress", f"{len(egress)} rules, at most 64 allowed")
    elif not isinstance(egress, bool):
        rd.error("egress", f"expected boolean or array of strings, got {units.type_name(egress)}")
    rd.finish()
    return Network(vlan, tuple(peers), any_, tuple(rules))


def _lifecycle(rd: TableReader | None) -> Lifecycle:
    if rd is None:
        return Lifecycle()
    mode = rd.string("mode", "service")
    if mode not in ("oneshot", "service"):
        rd.error("mode", f"{mode!r} is not one of: oneshot, service")
        mode = "service"
    restart = rd.string("restart", "no" if mode == "oneshot" else "on-failure")
    if restart not in ("no", "on-failure", "always"):
        rd.error("restart", f"{restart!r} is not one of: no, on-failure, always")
        restart = "no"
    elif mode == "oneshot" and restart == "always":
        rd.error("restart", "a oneshot cell cannot restart always",
                 'use mode = "service" or restart = "on-failure"')
    initial, mx = 1000, 60_000
    b = rd.sub("backoff")
    if b is not None:
        initial = b.unit("initial", units.parse_duration, initial)
        mx = b.unit("max", units.parse_duration, mx)
        if initial < 10:
            b.error("initial", f"{initial}ms is below the minimum of 10ms")
        elif initial > mx:
            b.error("initial", f"{units.format_duration(initial)} is above max "
                    f"{units.format_duration(mx)}")
        b.finish()
    destroy = rd.boolean("destroy_on_exit", True)
    rd.finish()
    return Lifecycle(mode, restart, initial, mx, destroy)


def _privileges(rd: TableReader | None) -> Privileges:
    if rd is None:
        return Privileges()
    caps: set[str] = set()
    for i, c in enumerate(rd.strings("capabilities", ())):
        cap = c.upper() if c.upper().startswith("CAP_") else "CAP_" + c.upper()
        if cap in REFUSED_CAPABILITIES:
            rd.error(f"capabilities[{i}]", f"{cap} is never granted to a cell",
                     REFUSED_CAPABILITIES[cap])
        elif cap not in CAPABILITIES:
            rd.error(f"capabilities[{i}]", f"{c!r} is not a Linux capability")
        else:
            caps.add(cap)
    ops: set[str] = set()
    for i, op in enumerate(rd.strings("ops", ())):
        if op not in PRIVILEGED_OPS:
            rd.error(f"ops[{i}]", f"{op!r} is not a privileged operation",
                     "one of: " + ", ".join(sorted(PRIVILEGED_OPS)))
        else:
            ops.add(op)
    rd.finish()
    return Privileges(tuple(sorted(caps)), tuple(sorted(ops)))


def manifest_from_dict(data: dict[str, Any], source: str = "<string>") -> Manifest:
    """Validate decoded TOML; raise :class:`ManifestError` listing every problem."""
    top = TableReader(data)
    name = top.string("name")
    if isinstance(name, str) and not NAME_RE.match(name):
        top.error("name", f"{name!r} is not a valid cell name",
                  "1-32 lower-case letters, digits and -, not starting or ending with -")
        name = None
    desc = top.string("description", "")
    svc_rd = top.sub("service", required=True)
    service = _service(svc_rd) if svc_rd else None
    img = top.sub("image", required=True)
    root = seal = None
    if img is not None:
        root = _image_path(img, "root")
        if root == "/":
            img.error("root", "the host root cannot be an image", "point at an image directory")
            root = None
        seal = _image_path(img, "seal", None, required=False)
        img.finish()
    tmpfs, data_dir = _writable(top, name)
    res = _resources(top.sub("resources"))
    net = _network(top.sub("network"), name)
    life = _lifecycle(top.sub("lifecycle"))
    priv = _privileges(top.sub("privileges"))
    if res is not None and sum(t.size for t in tmpfs) > res.memory_max:
        top.error("writable", f"tmpfs areas total {units.format_size(sum(t.size for t in tmpfs))}"
                  f", above resources.memory_max {units.format_size(res.memory_max)}",
                  "tmpfs pages are charged to the cell's memory; raise memory_max or shrink")
    top.finish()
    if top.problems:
        raise ManifestError("E_MANIFEST", source, top.problems)
    assert name is not None and service is not None and root is not None and res is not None
    return Manifest(name, service, root, desc, tmpfs, data_dir, res, net, life, priv, source,
                    seal)


def parse_manifest(text: str, source: str = "<string>") -> Manifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ManifestError("E_MANIFEST", source, [Problem("", f"TOML syntax: {e}",
                                                           "see docs/manifest.md")]) from None
    return manifest_from_dict(data, source)


def load_manifest(path: str) -> Manifest:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ManifestError("E_MANIFEST", path, [Problem("", f"cannot read: {e}")]) from None
    return parse_manifest(text, path)

