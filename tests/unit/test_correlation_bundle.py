"""Pattern bundles: signed, versioned, refused with a reason, swapped in whole.

Every refusal leaves the loaded library as it was: the same bundle, the same patterns
in the engine, the same partial matches.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.monitor.correlation import bundle as bnd
from agent.monitor.correlation.bundle import BundleError
from agent.monitor.correlation.engine import Engine
from agent.monitor.correlation.event import Record
from agent.monitor.correlation.language import parse
from agent.monitor.correlation.library import Library

REPO = Path(__file__).resolve().parents[2]
SECRET = bytes(range(32))
OTHER = bytes(range(1, 33))
PUB = bnd.public_key(SECRET)

TEXT = """
pattern drop
  within 1m
  step w: exec/file-written
  step x: exec/exec-denied same hash
end
pattern reach
  within 1m
  step s: net/scan
  step f: net/flow cell == s.cell
end
"""
CHANGED = TEXT.replace("step f: net/flow cell == s.cell", "step f: net/flow cell != s.cell")
ADDED = TEXT + "pattern many\n  step d: syscall/denied\n  count 3 within 1m\nend\n"


def signed(text: str = TEXT, version: int = 2, secret: bytes = SECRET, *,
           min_engine: int = 1) -> tuple[bytes, bytes]:
    data = bnd.stamp(bnd.encode(parse(text), version, min_engine),
                     bnd.key_id(bnd.public_key(secret)))
    return data, bnd.sign(data, secret)


def sign_raw(obj: Any) -> tuple[bytes, bytes]:
    data = cbor2.dumps(obj)
    return data, bnd.sign(data, SECRET)


def envelope(**change: Any) -> dict[str, Any]:
    env: dict[str, Any] = cbor2.loads(signed()[0])
    env.update(change)
    return env


def loaded() -> Library:
    """A library with version 2 loaded and a partial match of each pattern alive."""
    library = Library(Engine(), [bnd.public_key(OTHER), PUB])
    assert library.offer(*signed(version=2), origin="/etc/agent/patterns/default.bundle").ok
    library.engine.feed(Record(1, 0.0, 0.0, "a", "exec", "file-written", {"hash": "h"}))
    library.engine.feed(Record(2, 0.0, 0.0, "a", "net", "scan", {}))
    assert library.engine.live == 2
    return library


@pytest.fixture
def lib() -> Library:
    return loaded()


def state(library: Library) -> tuple[Any, ...]:
    return (library.current, library.previous, library.engine.patterns,
            [id(p) for pat in library.engine.patterns
             for p in library.engine.partials(pat.name)])


def test_a_good_bundle_round_trip(lib: Library) -> None:
    b = lib.current
    assert b is not None and b.version == 2 and b.signer == bnd.key_id(PUB)
    assert b.patterns == parse(TEXT) and b.names == ("drop", "reach")
    data, sig = signed()
    assert bnd.verify(data, sig, [PUB]) == b and len(sig) == 64
    assert b.digest == __import__("hashlib").sha256(data).hexdigest()


REFUSALS = [
    ("bad signature", lambda: (signed()[0], bytes(64)), "E_BUNDLE_SIGNATURE"),
    ("flipped signature bit", lambda: (signed()[0], bytes([signed()[1][0] ^ 1])
                                       + signed()[1][1:]), "E_BUNDLE_SIGNATURE"),
    ("short signature", lambda: (signed()[0], signed()[1][:63]), "E_BUNDLE_SIGNATURE"),
    ("no signature", lambda: (signed()[0], b""), "E_BUNDLE_SIGNATURE"),
    ("unpinned key", lambda: signed(secret=bytes(32)), "E_BUNDLE_SIGNATURE"),
    ("changed after signing", lambda: (signed()[0].replace(b"drop", b"dorp"), signed()[1]),
     "E_BUNDLE_SIGNATURE"),
    ("equal version", lambda: signed(version=2), "E_BUNDLE_VERSION"),
    ("older version", lambda: signed(version=1, text=ADDED), "E_BUNDLE_VERSION"),
    ("newer engine", lambda: signed(version=3, min_engine=2), "E_BUNDLE_ENGINE"),
    ("unstamped", lambda: (d := bnd.encode(parse(TEXT), 3), bnd.sign(d, SECRET)),
     "E_BUNDLE_SIGNER"),
    ("another signer named", lambda: (d := bnd.stamp(bnd.encode(parse(TEXT), 3),
                                                     bnd.key_id(bnd.public_key(OTHER))),
                                      bnd.sign(d, SECRET)), "E_BUNDLE_SIGNER"),
    ("format 2", lambda: sign_raw(envelope(format=2, version=3)), "E_BUNDLE_FORMAT"),
    ("not CBOR", lambda: (b := b"\xff\x00garbage", bnd.sign(b, SECRET)), "E_BUNDLE_DECODE"),
    ("trailing bytes", lambda: (d := signed(version=3)[0] + b"\x00", bnd.sign(d, SECRET)),
     "E_BUNDLE_DECODE"),
    ("a list", lambda: sign_raw([1, 2]), "E_BUNDLE_FIELD"),
    ("missing field", lambda: sign_raw({k: v for k, v in envelope(version=3).items()
                                        if k != "min_engine"}), "E_BUNDLE_FIELD"),
    ("extra field", lambda: sign_raw(envelope(version=3, extra=1)), "E_BUNDLE_FIELD"),
    ("version as text", lambda: sign_raw(envelope(version="3")), "E_BUNDLE_FIELD"),
    ("version 0", lambda: sign_raw(envelope(version=0)), "E_BUNDLE_FIELD"),
    ("no patterns", lambda: sign_raw(envelope(version=3, patterns=[])), "E_BUNDLE_FIELD"),
    ("a bad pattern", lambda: sign_raw(envelope(version=3, patterns=[{"name": "x"}])),
     "E_BUNDLE_PATTERN"),
    ("an invalid pattern", lambda: sign_raw(envelope(version=3, patterns=[
        {**parse(TEXT)[0].to_wire(), "severity": "loud"}])), "E_BUNDLE_PATTERN"),
    ("names repeated", lambda: sign_raw(envelope(version=3, patterns=[
        parse(TEXT)[0].to_wire()] * 2)), "E_BUNDLE_PATTERN"),
    ("too big", lambda: (b"\x00" * (bnd.MAX_BUNDLE_BYTES + 1), bytes(64)), "E_BUNDLE_SIZE"),
]


@pytest.mark.parametrize(("make", "code"), [(m, c) for _, m, c in REFUSALS],
                         ids=[r[0] for r in REFUSALS])
def test_refused_with_a_reason_and_nothing_changes(lib: Library, make: Any, code: str,
                                                   request: pytest.FixtureRequest) -> None:
    before = state(lib)
    out = lib.offer(*make(), origin="/data/agent/patterns/new.bundle")
    assert not out.ok and out.error is not None and out.error.code == code, out.error
    calm = {"equal version", "newer engine"}
    assert out.kind == "bundle-refused"
    assert out.severity == ("notice" if request.node.callspec.id in calm else "alert")
    assert out.attrs["reason"] == code and out.attrs["loaded"] == 2
    assert out.attrs["origin"] == "/data/agent/patterns/new.bundle" and out.attrs["message"]
    assert out.error.hint
    assert state(lib) == before


def test_swap_keeps_the_partials_of_unchanged_patterns(lib: Library) -> None:
    drop = [id(p) for p in lib.engine.partials("drop")]
    out = lib.offer(*signed(CHANGED + "pattern many\n  step d: a/b\nend\n", 3))
    assert out.ok and out.kind == "bundle-loaded" and out.severity == "notice"
    assert (out.attrs["kept"], out.attrs["changed"], out.attrs["added"],
            out.attrs["removed"], out.attrs["retired"]) == (["drop"], ["reach"], ["many"], [], 1)
    assert [id(p) for p in lib.engine.partials("drop")] == drop
    assert lib.engine.partials("reach") == []
    ms = lib.engine.feed(Record(3, 1.0, 1.0, "b", "exec", "exec-denied", {"hash": "h"}))
    assert [m.pattern for m in ms] == ["drop"]  # the partial begun under version 1
    assert lib.current is not None and lib.current.version == 3
    assert lib.previous is not None and lib.previous.version == 2


def test_rollback(lib: Library) -> None:
    assert lib.rollback().error is not None  # nothing before version 2
    lib.offer(*signed(ADDED, 5))
    drop = [id(p) for p in lib.engine.partials("drop")]
    out = lib.rollback()
    assert out.ok and out.attrs["version"] == 2 and out.attrs["removed"] == ["many"]
    assert out.attrs["kept"] == ["drop", "reach"] and out.attrs["origin"] == "rollback"
    assert [id(p) for p in lib.engine.partials("drop")] == drop
    assert lib.current is not None and lib.current.version == 2 and lib.previous is None
    again = lib.rollback()
    assert again.error is not None and again.error.code == "E_BUNDLE_ROLLBACK"
    assert lib.offer(*signed(ADDED, 5)).ok  # the rolled-back version may come again


def test_describe(lib: Library) -> None:
    d = lib.describe()
    assert (d["version"], d["signer"], d["previous"], d["partials"]) == (
        2, bnd.key_id(PUB), None, 2)
    assert d["keys"] == [bnd.key_id(bnd.public_key(OTHER)), bnd.key_id(PUB)]
    assert [p["name"] for p in d["patterns"]] == ["drop", "reach"]
    assert d["patterns"][0]["partials"] == 1 and d["patterns"][0]["steps"] == 2
    assert cbor2.loads(cbor2.dumps(d)) == d


def test_keys() -> None:
    text = bnd.key_text("secret", SECRET)
    assert bnd.parse_key(text, "secret") == SECRET
    assert bnd.parse_key(bnd.key_text("public", PUB)) == PUB
    assert bnd.key_id(PUB) in text and re.fullmatch(r"[0-9a-f]{16}", bnd.key_id(PUB))
    for bad in ("", "ed25519-public abc", text + text, "ed25519-public " + "0" * 64 + "\n"
                + "ed25519-public " + "1" * 64):
        with pytest.raises(BundleError) as exc:
            bnd.parse_key(bad, where="k.pub")
        assert exc.value.code == "E_BUNDLE_KEY" and "k.pub" in exc.value.message
    with pytest.raises(BundleError, match="found a secret key"):
        bnd.parse_key(text)


# -- random input -----------------------------------------------------------------------------

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300), st.binary(min_size=0, max_size=80), st.booleans())
def test_random_bytes_are_refused(data: bytes, sig: bytes, sign_it: bool) -> None:
    lib = loaded()
    before = state(lib)
    out = lib.offer(data, bnd.sign(data, SECRET) if sign_it else sig)
    assert out.error is not None and out.error.code.startswith("E_BUNDLE_")
    assert state(lib) == before


def _cbor() -> st.SearchStrategy[Any]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-3, 2**64), st.text(max_size=8),
                     st.binary(max_size=8), st.floats(allow_nan=True))
    return st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=4),
                                                  st.dictionaries(st.text(max_size=6), c,
                                                                  max_size=4)), max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(["format", "version", "min_engine", "signer",
                                        "patterns", "x"]), _cbor(), max_size=6))
def test_random_structures_signed_by_the_pinned_key_are_refused(obj: dict[str, Any]) -> None:
    lib = loaded()
    before = state(lib)
    out = lib.offer(*sign_raw(obj))
    assert out.error is not None and out.error.code.startswith("E_BUNDLE_")
    assert state(lib) == before


GOOD2 = signed(ADDED, 3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(GOOD2[0]) - 1), st.integers(0, len(GOOD2[0]) - 1),
       st.integers(1, 255), st.booleans())
def test_truncated_and_corrupted_bundles(cut: int, at: int, xor: int, resign: bool) -> None:
    """Cut short or with a byte changed: refused with the old signature; re-signed, each
    one is refused with a reason or is a sound bundle (a changed letter in a text)."""
    data = GOOD2[0]
    for bad in (data[:cut], data[:at] + bytes([data[at] ^ xor]) + data[at + 1:]):
        lib = loaded()
        before = state(lib)
        out = lib.offer(bad, bnd.sign(bad, SECRET) if resign else GOOD2[1])
        if out.ok:
            assert resign and out.bundle is not None and out.bundle.version > 2
            assert lib.current is out.bundle and lib.previous is before[0]
            continue
        assert out.error is not None and out.error.code.startswith("E_BUNDLE_")
        if not resign:
            assert out.error.code == "E_BUNDLE_SIGNATURE"
        assert state(lib) == before


# -- what the box ships -----------------------------------------------------------------------

OVERLAY = REPO / "rootfs-overlay"


def test_the_default_bundle_is_signed_and_current() -> None:
    pinned = [bnd.parse_key(p.read_text(), "public", str(p))
              for p in sorted((OVERLAY / "etc/agent/keys").glob("*.pub"))]
    assert pinned, "no public key pinned in rootfs-overlay/etc/agent/keys/"
    d = OVERLAY / "etc/agent/patterns"
    b = bnd.verify((d / "default.bundle").read_bytes(),
                   (d / "default.bundle.sig").read_bytes(), pinned)
    assert b.patterns == parse((d / "default.pat").read_text()), (
        "default.bundle is stale: rebuild and sign it (keys/README.md)")
    dev = bnd.parse_key((REPO / "keys/dev/patterns.key").read_text(), "secret")
    assert bnd.public_key(dev) in pinned


@pytest.mark.parametrize("tree", ["rootfs-overlay", "agent", "recipes", "qemu"])
def test_no_secret_key_ships(tree: str) -> None:
    for path in (REPO / tree).rglob("*"):
        if path.is_file() and path.stat().st_size < 1 << 20:
            # the marker may appear in code (.py, and its compiled .pyc), never in data
            assert b"ed25519-secret" not in path.read_bytes() or path.suffix in (".py", ".pyc"), \
                path
