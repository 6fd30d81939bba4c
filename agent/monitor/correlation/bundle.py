"""The pattern bundle: compiled patterns in CBOR, with a detached Ed25519 signature.

A bundle is one canonical CBOR map (docs/patterns.md, "Bundles")::

    {"format": 1,            # this layout; an agent refuses formats it does not know
     "version": N,           # the library's version: an agent takes only newer ones
     "min_engine": V,        # the oldest engine that can run it (model.ENGINE_VERSION)
     "signer": "3f1c...",    # the id of the key that signed it (sha256 of it, 16 hex)
     "patterns": [...]}      # model.Pattern.to_wire() of each, names unique

and its signature is a separate file of the 64 bytes of an Ed25519 signature over the
exact bytes of the bundle (PyNaCl, i.e. libsodium; nothing here is hand-written
cryptography).  :func:`verify` checks, in this order, and refuses with a
:class:`BundleError` whose code names the reason: sizes, the signature against the
pinned public keys (before a byte of the bundle is decoded), the CBOR, the format, the
engine version, the signer, the version against the one loaded, and the patterns.

Key files are text: ``ed25519-public HEX`` or ``ed25519-secret HEX`` (the 32-byte seed)
on a line, ``#`` comments around it.  Pure: callers read and write files; key
generation takes its random seed from the caller.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import nacl.exceptions
import nacl.signing

from agent.core.errors import RefusedError
from agent.monitor.correlation.model import ENGINE_VERSION, Pattern, PatternError
from agent.monitor.correlation.wire import pattern_from_wire

__all__ = [
    "FORMAT",
    "MAX_BUNDLE_BYTES",
    "MAX_PATTERNS",
    "SIGNATURE_BYTES",
    "Bundle",
    "BundleError",
    "decode",
    "encode",
    "key_id",
    "key_text",
    "parse_key",
    "public_key",
    "sign",
    "stamp",
    "verify",
]

FORMAT = 1
MAX_BUNDLE_BYTES = 2 << 20
MAX_PATTERNS = 4096
SIGNATURE_BYTES = 64
_KEY_BYTES = 32
_FIELDS = ("format", "version", "min_engine", "signer", "patterns")
_MAX_VERSION = (1 << 63) - 1
_KEY_LINE = re.compile(r"ed25519-(public|secret)\s+([0-9a-fA-F]{64})")
_SIGNER = re.compile(r"[0-9a-f]{16}")


class BundleError(RefusedError):
    """A bundle, signature or key is refused; ``code`` is the reason (E_BUNDLE_*);
    ``version`` the bundle's version when it was read before the refusal."""

    version: int | None = None


@dataclass(frozen=True)
class Bundle:
    version: int
    min_engine: int
    signer: str
    patterns: tuple[Pattern, ...]
    digest: str  # sha256 of the bundle's bytes
    format: int = FORMAT

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.patterns)


def key_id(public: bytes) -> str:
    """A public key's id: the first 8 bytes of its sha256, in hex."""
    return hashlib.sha256(public).hexdigest()[:16]


def parse_key(text: str, kind: str = "public", where: str = "key") -> bytes:
    """The 32 bytes of a ``kind`` (public or secret) key file's text."""
    found = [m for line in text.splitlines()
             if (m := _KEY_LINE.fullmatch(line.strip()))]
    if len(found) != 1 or found[0].group(1) != kind:
        got = f"a {found[0].group(1)} key" if len(found) == 1 else \
            f"{len(found)} key lines" if found else "no key line"
        raise BundleError("E_BUNDLE_KEY", f"{where}: expected an ed25519 {kind} key, found "
                          f"{got}", f"the file holds one line 'ed25519-{kind} <64 hex>' "
                          "(agent-patterns keygen writes both files)")
    return bytes.fromhex(found[0].group(2))


def key_text(kind: str, key: bytes) -> str:
    """A key file (``kind`` public or secret) for ``key``."""
    public = key if kind == "public" else public_key(key)
    note = ("the public key to pin in the firmware (/etc/agent/keys/)" if kind == "public"
            else "SECRET: signs pattern bundles; keep it off every image and repository")
    return (f"# agent pattern-signing key {key_id(public)}: {note}\n"
            f"ed25519-{kind} {key.hex()}\n")


def public_key(secret: bytes) -> bytes:
    """The public key of a secret key (its 32-byte seed)."""
    return bytes(nacl.signing.SigningKey(secret).verify_key)


def encode(patterns: Sequence[Pattern], version: int, min_engine: int = ENGINE_VERSION,
           signer: str = "") -> bytes:
    """A bundle of ``patterns`` (not yet signed: ``signer`` empty until :func:`stamp`)."""
    names = [p.name for p in patterns]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise BundleError("E_BUNDLE_PATTERN", f"pattern names repeated: {', '.join(dup)}",
                          "rename one of each")
    if not 0 < len(patterns) <= MAX_PATTERNS:
        raise BundleError("E_BUNDLE_PATTERN", f"a bundle holds 1 to {MAX_PATTERNS} patterns",
                          "split the library, or write a pattern")
    _check_int("version", version, 1, _MAX_VERSION, "give --version N, above the last one")
    _check_int("min_engine", min_engine, 1, _MAX_VERSION, "the default is this engine's")
    data = cbor2.dumps({"format": FORMAT, "version": version, "min_engine": min_engine,
                        "signer": signer, "patterns": [p.to_wire() for p in patterns]},
                       canonical=True)
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError("E_BUNDLE_SIZE", f"the bundle would take {len(data)} bytes, more "
                          f"than {MAX_BUNDLE_BYTES}", "split the library")
    return data


def stamp(data: bytes, signer: str) -> bytes:
    """``data`` with ``signer`` as its signer (the bundle otherwise unchanged)."""
    env = _envelope(data)
    env["signer"] = signer
    return cbor2.dumps(env, canonical=True)


def sign(data: bytes, secret: bytes) -> bytes:
    """The detached signature of ``data`` with the secret key (its 32-byte seed)."""
    return bytes(nacl.signing.SigningKey(secret).sign(data).signature)


def verify(data: bytes, signature: bytes, keys: Iterable[bytes], *,
           engine_version: int = ENGINE_VERSION, after: int | None = None) -> Bundle:
    """The bundle of ``data`` if ``signature`` is a pinned key's over it, and it is sound,
    runs on ``engine_version`` and is newer than version ``after``; else BundleError."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise BundleError("E_BUNDLE_SIZE", f"the bundle has {len(data)} bytes, more than "
                          f"{MAX_BUNDLE_BYTES}", "a bundle is at most 2 MiB")
    if len(signature) != SIGNATURE_BYTES:
        raise BundleError("E_BUNDLE_SIGNATURE", f"the signature has {len(signature)} bytes, "
                          f"not {SIGNATURE_BYTES}", "the .sig file is the 64 bytes that "
                          "agent-patterns sign wrote")
    signer = None
    pinned = list(keys)
    for key in pinned:
        try:
            nacl.signing.VerifyKey(key).verify(data, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
                nacl.exceptions.TypeError):
            continue
        signer = key_id(key)
        break
    if signer is None:
        ids = ", ".join(key_id(k) for k in pinned) or "none"
        raise BundleError("E_BUNDLE_SIGNATURE", "the signature does not verify with any "
                          f"pinned key (pinned: {ids})", "sign the bundle with the key whose "
                          "public half is in the firmware; a changed bundle needs a new "
                          "signature")
    return decode(data, engine_version=engine_version, signer=signer, after=after)


def decode(data: bytes, *, engine_version: int = ENGINE_VERSION, signer: str | None = None,
           after: int | None = None) -> Bundle:
    """The bundle of ``data`` (its signature already checked, or not needed: tools)."""
    env = _envelope(data)
    if env["min_engine"] > engine_version:
        raise BundleError("E_BUNDLE_ENGINE", f"the bundle needs engine {env['min_engine']}, "
                          f"this agent has {engine_version}",
                          "update the agent first, or build the bundle for this engine")
    if signer is not None and env["signer"] != signer:
        raise BundleError("E_BUNDLE_SIGNER", f"the bundle names signer {env['signer']!r} but "
                          f"key {signer} signed it", "sign it with agent-patterns sign, "
                          "which names the signing key")
    if after is not None and env["version"] <= after:
        err = BundleError("E_BUNDLE_VERSION", f"version {env['version']} is not newer than "
                          f"the loaded {after}", "build the library with a higher --version")
        err.version = env["version"]
        raise err
    pats = env["patterns"]
    if not isinstance(pats, list) or not 0 < len(pats) <= MAX_PATTERNS:
        raise BundleError("E_BUNDLE_FIELD", f"patterns: a list of 1 to {MAX_PATTERNS}",
                          "rebuild the bundle with agent-patterns build")
    out: list[Pattern] = []
    for i, obj in enumerate(pats):
        try:
            out.append(pattern_from_wire(obj))
        except PatternError as exc:
            name = obj.get("name") if isinstance(obj, dict) else None
            raise BundleError("E_BUNDLE_PATTERN", f"pattern {i} ({name!r}): {exc.message}",
                              exc.hint) from None
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise BundleError("E_BUNDLE_PATTERN", "pattern names repeated",
                          "rebuild the bundle with agent-patterns build")
    return Bundle(env["version"], env["min_engine"], env["signer"], tuple(out),
                  hashlib.sha256(data).hexdigest(), env["format"])


def _envelope(data: bytes) -> dict[str, Any]:
    """The bundle's top map, its fields checked (the patterns left as they are)."""
    fp = io.BytesIO(data)
    try:
        obj = cbor2.CBORDecoder(fp).decode()
    except Exception as exc:  # cbor2 raises many kinds of errors on bad input
        raise BundleError("E_BUNDLE_DECODE", f"not a CBOR bundle: {type(exc).__name__}: "
                          f"{exc}"[:200], "rebuild it with agent-patterns build") from None
    if fp.tell() != len(data):
        raise BundleError("E_BUNDLE_DECODE", f"{len(data) - fp.tell()} bytes after the bundle",
                          "rebuild it with agent-patterns build")
    if not isinstance(obj, dict) or set(obj) != set(_FIELDS):
        keys = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise BundleError("E_BUNDLE_FIELD", f"a bundle is a map of {', '.join(_FIELDS)}; "
                          f"found {keys}", "rebuild it with agent-patterns build")
    if obj["format"] != FORMAT or isinstance(obj["format"], bool):
        raise BundleError("E_BUNDLE_FORMAT", f"bundle format {obj['format']!r} is not "
                          f"known (this agent reads {FORMAT})",
                          "update the agent, or build the bundle for this agent")
    _check_int("version", obj["version"], 1, _MAX_VERSION, "rebuild with --version N")
    _check_int("min_engine", obj["min_engine"], 1, _MAX_VERSION, "rebuild the bundle")
    if not isinstance(obj["signer"], str) or not (obj["signer"] == "" or
                                                  _SIGNER.fullmatch(obj["signer"])):
        raise BundleError("E_BUNDLE_FIELD", "signer: a key id (16 hex digits)",
                          "sign it with agent-patterns sign")
    return obj


def _check_int(name: str, v: object, lo: int, hi: int, hint: str) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BundleError("E_BUNDLE_FIELD", f"{name} {v!r}: an integer from {lo}", hint)
