"""Who may do what: identities (from SO_PEERCRED) -> roles -> operations, services, ceilings.

Deny by default.  An identity that no ``[[identity]]`` entry matches has no rights at
all, root included: uid 0 is an administrator only because the policy file says so.
Entries are tried in file order and the first whose every given field (``uid``,
``gid``, ``user``) matches wins.  See ``docs/policy.md``.

:meth:`Policy.authorize` is pure; it returns a :class:`Decision` naming the rule that
allowed the request, or raises :class:`~agent.core.errors.RefusedError` with one of the codes
``E_POLICY_ROLE``, ``E_POLICY_OP``, ``E_POLICY_SERVICE``, ``E_POLICY_CEILING``,
``E_POLICY_PRIVILEGE``, ``E_POLICY_SHARE``, naming the identity, the rule and the numbers,
or ``E_POLICY_USERNS`` when agentd runs without user namespaces and the manifest asks for
what a cell may have only inside one (:func:`agent.core.grants.without_userns`).

A data dir belongs to one service (docs/data-dirs.md).  A manifest whose data ``source``
names another service is run only if a ``[[share]]`` entry lists it among that
service's ``readers``; it then mounts the data dir read-only.  Sharing is box-wide,
whatever the caller's role: a file one cell drops and another reads is what the
correlation engine watches for, so it must be explicit.
"""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.core import units
from agent.core.errors import RefusedError
from agent.core.grants import CAPABILITY_MODES, PRIVILEGED_OPS, without_userns
from agent.core.manifest import NAME_RE, Manifest
from agent.core.units import ConfigProblems, Problem, TableReader

__all__ = [
    "GLOBAL_OPS",
    "OPS",
    "Decision",
    "Identity",
    "Policy",
    "PolicyError",
    "Role",
    "Share",
    "load_policy",
    "parse_passwd",
    "parse_policy",
    "policy_from_dict",
]

# Control operations a role may be granted ("may"); "*" grants all of them.
OPS: dict[str, str] = {
    "run": "create a cell from a manifest and start it",
    "stop": "stop a cell's service (the cell may stay, per its lifecycle)",
    "destroy": "tear a cell down and release its resources",
    "resize": "change a running cell's resources within the role's ceilings",
    "ps": "list cells",
    "inspect": "show a cell's manifest, plan and state",
    "logs": "read a cell's output",
    "status": "show the agent's own state and budget",
    "events": "read or follow the event bus",
    "pin": "keep a cell from being reclaimed or resized down",
    "unpin": "undo pin",
    "reload": "re-read manifests and policy",
    "patterns": "install a signed pattern database",
    "respawn": "re-make the master from the installed image (an upgrade takes this path)",
}
# Operations that do not name a service: the service globs do not apply.
GLOBAL_OPS = frozenset({"ps", "status", "events", "reload", "patterns", "respawn"})
# Operations whose manifest is checked against the role's ceilings.
_SIZED_OPS = frozenset({"run", "resize"})


class PolicyError(ConfigProblems):
    """The policy file is invalid (code ``E_POLICY``)."""


@dataclass(frozen=True)
class Identity:
    index: int  # position in the file, for messages
    role: str
    uid: int | None = None
    gid: int | None = None
    user: str | None = None  # resolved to user_uid at load time
    user_uid: int | None = None

    def matches(self, uid: int, gid: int, groups: Sequence[int]) -> bool:
        if self.user is not None and (self.user_uid is None or self.user_uid != uid):
            return False
        if self.uid is not None and self.uid != uid:
            return False
        return self.gid is None or self.gid == gid or self.gid in groups

    def __str__(self) -> str:
        parts = [f"{k}={v}" for k, v in (("uid", self.uid), ("gid", self.gid),
                                         ("user", self.user)) if v is not None]
        return f"identity[{self.index}] {' '.join(parts)} -> role {self.role}"


@dataclass(frozen=True)
class Role:
    name: str
    services: tuple[str, ...] = ()  # fnmatch globs over cell names
    may: frozenset[str] = frozenset()
    privileged_ops: frozenset[str] = frozenset()
    cpu_max: int | None = None  # millicpu per cell; None: no ceiling
    memory_max: int | None = None  # bytes per cell
    pids_max: int | None = None  # per cell
    max_cells: int | None = None  # cells of this requester at once

    def covers(self, service: str) -> bool:
        return any(fnmatch.fnmatchcase(service, g) for g in self.services)


@dataclass(frozen=True)
class Share:
    """``[[share]]``: service ``data``'s data dir may be mounted read-only by ``readers``."""

    index: int  # position in the file, for messages
    data: str
    readers: tuple[str, ...]

    def __str__(self) -> str:
        return f"share[{self.index}] {self.data} -> {', '.join(self.readers)}"


@dataclass(frozen=True)
class Decision:
    """Why a request was allowed."""

    uid: int
    gid: int
    op: str
    service: str | None
    role: Role
    rule: str

    def may_see(self, service: str) -> bool:
        """Whether a listing (``ps``, ``events``) may show this cell to the requester."""
        return self.role.covers(service)


@dataclass(frozen=True)
class Policy:
    identities: tuple[Identity, ...] = ()
    roles: Mapping[str, Role] | None = None
    warnings: tuple[str, ...] = ()
    source: str = "<string>"
    shares: tuple[Share, ...] = ()

    def data_share(self, reader: str, data: str) -> Share | None:
        """The ``[[share]]`` entry that lets service ``reader`` mount ``data``'s data dir."""
        return next((s for s in self.shares if s.data == data and reader in s.readers), None)

    def check_data_source(self, m: Manifest) -> Share | None:
        """Refuse (``E_POLICY_SHARE``) a manifest that names another service's data dir
        without a share; the share that allows it (None: its own, or no data dir)."""
        if m.data is None or m.data.source == m.name:
            return None
        share = self.data_share(m.name, m.data.source)
        if share is None:
            raise RefusedError(
                "E_POLICY_SHARE", f"{m.name}: writable data source {m.data.source!r} is the "
                f"data dir of service {m.data.source}, and no [[share]] in {self.source} "
                f"lets {m.name} read it",
                f'leave source out (a service\'s own data dir), or add [[share]] data = '
                f'"{m.data.source}" readers = ["{m.name}"] to the policy (read-only)')
        return share

    def identify(self, uid: int, gid: int, groups: Sequence[int] = ()) -> Identity | None:
        return next((i for i in self.identities if i.matches(uid, gid, groups)), None)

    def authorize(self, peer_uid: int, peer_gid: int, op: str, service: str | None,
                  manifest: Manifest | None, current_cells: int,
                  *, peer_groups: Sequence[int] = (), userns: bool = True) -> Decision:
        """``userns``: agentd runs cells in user namespaces (``[userns] enabled``);
        without them a ``run`` is also checked against what a cell may have there."""
        who = f"uid {peer_uid} gid {peer_gid}"
        ident = self.identify(peer_uid, peer_gid, peer_groups)
        if ident is None or self.roles is None:
            raise RefusedError("E_POLICY_ROLE", f"{who}: no identity rule in {self.source} "
                               "matches; unknown identities have no rights",
                               "add an [[identity]] entry for this uid or gid")
        role = self.roles[ident.role]
        rule = str(ident)
        if op not in role.may:
            raise RefusedError("E_POLICY_OP", f"{who} ({rule}): role {role.name} may not "
                               f"'{op}'; it may: {', '.join(sorted(role.may)) or 'nothing'}")
        if op not in GLOBAL_OPS:
            if service is None:
                raise RefusedError("E_POLICY_SERVICE", f"{who}: '{op}' needs a service name")
            if not role.covers(service):
                raise RefusedError(
                    "E_POLICY_SERVICE", f"{who} ({rule}): service {service!r} does not match "
                    f"role {role.name} services {list(role.services)}")
        if op in _SIZED_OPS and manifest is not None:
            self._check_ceilings(who, rule, role, manifest)
        if op == "run" and manifest is not None:
            self.check_data_source(manifest)
        if op == "run" and manifest is not None and not userns:
            _check_without_userns(who, rule, manifest)
        if op == "run" and role.max_cells is not None and current_cells >= role.max_cells:
            raise RefusedError("E_POLICY_CEILING", f"{who} ({rule}): already runs "
                               f"{current_cells} cells, role {role.name} max_cells is "
                               f"{role.max_cells}", "destroy a cell first")
        return Decision(peer_uid, peer_gid, op, service, role, rule)

    @staticmethod
    def _check_ceilings(who: str, rule: str, role: Role, m: Manifest) -> None:
        r = m.resources
        fmt: dict[str, Callable[[int], str]] = {
            "cpu_max": units.format_cpu, "memory_max": units.format_size, "pids_max": str}
        for key, asked, limit in (("cpu_max", r.cpu_max, role.cpu_max),
                                  ("memory_max", r.memory_max, role.memory_max),
                                  ("pids_max", r.pids_max, role.pids_max)):
            if limit is not None and asked > limit:
                raise RefusedError(
                    "E_POLICY_CEILING", f"{who} ({rule}): {m.name}: resources.{key} "
                    f"{fmt[key](asked)} ({asked}) is above role {role.name} ceiling "
                    f"{fmt[key](limit)} ({limit})", f"lower resources.{key} in the manifest")
        extra = sorted(set(m.privileges.ops) - role.privileged_ops)
        if extra:
            raise RefusedError(
                "E_POLICY_PRIVILEGE", f"{who} ({rule}): {m.name}: privileged ops {extra} "
                f"are not granted to role {role.name}",
                f"role {role.name} may ask for: "
                f"{', '.join(sorted(role.privileged_ops)) or 'none'}")


def _check_without_userns(who: str, rule: str, m: Manifest) -> None:
    problems = without_userns(m.privileges.capabilities, m.service.uid, m.service.gid)
    if not problems:
        return
    hints = []
    if any(key.startswith("service.") for key, _ in problems):
        hints.append("give the service a non-zero uid and gid of its own (service.uid, "
                     "service.gid)")
    if any(key == "privileges.capabilities" for key, _ in problems):
        keep = sorted(c.removeprefix("CAP_").lower() for c, mode in CAPABILITY_MODES.items()
                      if mode.keep_without_userns)
        hints.append(f"without user namespaces a cell may keep only: {', '.join(keep)}")
    raise RefusedError(
        "E_POLICY_USERNS", f"{who} ({rule}): {m.name}: agentd runs cells without user "
        "namespaces ([userns] enabled = false), where the cell's ids and capabilities are "
        "the host's: " + "; ".join(f"{key}: {why}" for key, why in problems),
        "; ".join(hints) + " (docs/isolation.md)")


# --------------------------------------------------------------------------------------------
# Decoding


def parse_passwd(text: str) -> dict[str, int]:
    """User name -> uid from /etc/passwd text (malformed lines are skipped)."""
    users: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split(":")
        if len(f) >= 3 and f[0] and f[2].isdigit():
            users.setdefault(f[0], int(f[2]))
    return users


def _role(name: str, rd: TableReader) -> Role:
    services = rd.strings("services", ())
    for i, g in enumerate(services):
        if not g:
            rd.error(f"services[{i}]", "empty glob")
    may = set(rd.strings("may", ()))
    if "*" in may:
        may = set(OPS)
    for op in sorted(may - set(OPS)):
        rd.error("may", f"{op!r} is not an operation", "one of: * " + " ".join(OPS))
    privs = set(rd.strings("privileged_ops", ()))
    if "*" in privs:
        privs = set(PRIVILEGED_OPS)
    for op in sorted(privs - set(PRIVILEGED_OPS)):
        rd.error("privileged_ops", f"{op!r} is not a privileged operation",
                 "one of: * " + " ".join(PRIVILEGED_OPS))
    cpu = rd.unit("cpu_max", units.parse_cpu, None)
    mem = rd.unit("memory_max", units.parse_size, None)
    pids = rd.integer("pids_max", 1, 1 << 22, None)
    cells = rd.integer("max_cells", 0, 4096, None)
    rd.finish()
    return Role(name, services, frozenset(may & set(OPS)),
                frozenset(privs & set(PRIVILEGED_OPS)), cpu, mem, pids, cells)


def _shares(top: TableReader) -> tuple[Share, ...]:
    """``[[share]]``: ``data`` a service name, ``readers`` a non-empty list of service
    names (no globs: every reader of a data dir is named)."""
    out: list[Share] = []
    for i, rd in enumerate(top.tables("share", 1024)):
        data = rd.string("data")
        if isinstance(data, str) and not NAME_RE.match(data):
            rd.error("data", f"{data!r} is not a service name")
            data = None
        readers = rd.strings("readers")
        good: list[str] = []
        for j, r in enumerate(readers if isinstance(readers, tuple | list) else ()):
            if not NAME_RE.match(r):
                rd.error(f"readers[{j}]", f"{r!r} is not a service name",
                         "name each reader: globs are not allowed here")
            elif r == data:
                rd.error(f"readers[{j}]", f"{r!r} owns the data dir already")
            else:
                good.append(r)
        if isinstance(readers, tuple | list) and not readers:
            rd.error("readers", "empty: list the services that may read the data dir")
        rd.finish()
        if isinstance(data, str) and good and len(good) == len(readers):
            out.append(Share(i, data, tuple(dict.fromkeys(good))))
    return tuple(out)


def policy_from_dict(data: dict[str, Any], source: str = "<string>",
                     users: Mapping[str, int] | None = None) -> Policy:
    """Validate decoded policy TOML; ``users`` maps user names to uids (see parse_passwd)."""
    top = TableReader(data)
    roles: dict[str, Role] = {}
    rt = top.sub("role")
    if rt is not None:
        for name in rt.table:
            sub = rt.sub(name)
            if not NAME_RE.match(name):
                rt.error(name, "invalid role name", "lower-case letters, digits and -")
            elif sub is not None:
                roles[name] = _role(name, sub)
    idents: list[Identity] = []
    warnings: list[str] = []
    shares = _shares(top)
    for i, rd in enumerate(top.tables("identity", 1024)):
        uid = rd.integer("uid", 0, 0xFFFFFFFE, None)
        gid = rd.integer("gid", 0, 0xFFFFFFFE, None)
        user = rd.string("user", None)
        role = rd.string("role")
        if not {"uid", "gid", "user"} & set(rd.table):
            rd.error("uid", "an identity needs at least one of uid, gid, user")
        if isinstance(role, str) and role not in roles:
            rd.error("role", f"role {role!r} is not defined",
                     f"defined roles: {', '.join(roles) or 'none'}")
        user_uid = None
        if user is not None:
            user_uid = (users or {}).get(user)
            if user_uid is None:
                warnings.append(f"{source}: identity[{i}].user: no user {user!r}; "
                                "the entry matches nobody")
        rd.finish()
        if isinstance(role, str) and role in roles:
            idents.append(Identity(i, role, uid, gid, user, user_uid))
    top.finish()
    if top.problems:
        raise PolicyError("E_POLICY", source, top.problems)
    return Policy(tuple(idents), roles, tuple(warnings), source, shares)


def parse_policy(text: str, source: str = "<string>",
                 users: Mapping[str, int] | None = None) -> Policy:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise PolicyError("E_POLICY", source, [Problem("", f"TOML syntax: {e}")]) from None
    return policy_from_dict(data, source, users)


def load_policy(path: str, users: Mapping[str, int] | None = None) -> Policy:
    try:
        with open(path, "rb") as f:
            text = f.read(1 << 20).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError("E_POLICY", path, [Problem("", f"cannot read: {e}")]) from None
    return parse_policy(text, path, users)
