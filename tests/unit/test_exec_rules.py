"""Channel 1's pure parts: the verdict (every combination of its inputs), the signature
file, exec.toml, the mountinfo reader and the fanotify event decoder."""

from __future__ import annotations

import itertools
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.errors import ConfigError
from agent.core.manifest import parse_manifest
from agent.core.seal import Entry, Seal
from agent.kernel.fanotify import FAN_OPEN_EXEC_PERM, FAN_Q_OVERFLOW, parse_events
from agent.monitor.exec.adapter import mount_points
from agent.monitor.exec.rules import ALLOW, Observed, Verdict, decide, seal_path_of, seal_relpath
from agent.monitor.exec.settings import ExecSettings, settings_from_text
from agent.monitor.exec.signatures import HEADER, MAX_BYTES, SignatureFileError, parse

H1, H2, H3 = "a" * 64, "b" * 64, "c" * 64
SEAL = Seal.of([Entry("bin/sh", "f", H1, 100, 0o755), Entry("bin/tool", "f", H2, 200, 0o750),
                Entry("bin/link", "l", target="sh")])


def obs(path: str = "/bin/sh", digest: str = H1, size: int = 100, mode: int = 0o755,
        on_image: bool = True) -> Observed:
    return Observed(path, digest, size, mode, on_image)


# -- the verdict ----------------------------------------------------------------------

PATHS = ["/bin/sh", "/bin/tool", "/bin/link", "/tmp/x", "bin/sh", "/bin/sh (deleted)",
         "/memfd:x (deleted)", "/bin/../bin/sh"]
DIGESTS = [H1, H2, H3]
SIZES = [100, 200, 1]
MODES = [0o755, 0o750, 0o4755]


@pytest.mark.parametrize("seal", [SEAL, None], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("sigs", [{}, {H3: "bad"}, {H1: "sh-listed"}], ids=["nosig", "h3", "h1"])
def test_every_combination_has_the_verdict_the_order_of_checks_gives(
        seal: Seal | None, sigs: dict[str, str]) -> None:
    """Spelled out independently of rules.decide: signature first, then memfd, then an
    unsealed image runs, then the seal's entry by path (only for a file on the image)."""
    for path, digest, size, mode, on_image in itertools.product(
            PATHS, DIGESTS, SIZES, MODES, [True, False]):
        o = obs(path, digest, size, mode, on_image)
        v = decide(o, seal, sigs)
        if digest in sigs:
            want = Verdict(False, "signature", sigs[digest])
        elif path.startswith("/memfd:"):
            want = Verdict(False, "memfd")
        elif seal is None:
            want = ALLOW
        else:
            rel = {"/bin/sh": "bin/sh", "/bin/tool": "bin/tool", "/bin/link": "bin/link"}
            entry = seal.get(rel[path]) if path in rel and on_image else None
            if entry is None:
                want = Verdict(False, "unsealed")
            elif entry.kind != "f" or (entry.digest, entry.size, entry.mode) != (
                    digest, size, mode):
                want = Verdict(False, "changed")
            else:
                want = ALLOW
        assert v == want, (o, seal is not None, sigs)


def test_the_controls_run() -> None:
    assert decide(obs(), SEAL, {}) == ALLOW
    assert decide(obs("/bin/tool", H2, 200, 0o750), SEAL, {H3: "x"}) == ALLOW
    assert decide(obs("/tmp/dropped", H3, on_image=False), None, {}) == ALLOW  # unsealed dev


def test_the_attacks_are_refused_with_their_reason() -> None:
    assert decide(obs("/tmp/x", on_image=False), SEAL, {}).reason == "unsealed"
    # the same content as a sealed file, copied to a writable area: still unsealed
    assert decide(obs("/tmp/sh", on_image=False), SEAL, {}).reason == "unsealed"
    # a sealed path seen on another file system (a mount over /bin): unsealed
    assert decide(obs("/bin/sh", on_image=False), SEAL, {}).reason == "unsealed"
    assert decide(obs(digest=H2), SEAL, {}).reason == "changed"
    assert decide(obs(size=101), SEAL, {}).reason == "changed"
    assert decide(obs(mode=0o4755), SEAL, {}).reason == "changed"  # setuid added
    assert decide(obs("/bin/link"), SEAL, {}).reason == "changed"  # a link became a file
    assert decide(obs(), SEAL, {H1: "x"}) == Verdict(False, "signature", "x")
    assert decide(obs("/memfd:a (deleted)"), None, {}).reason == "memfd"


@given(st.text(min_size=0, max_size=40))
def test_seal_relpath_never_escapes(path: str) -> None:
    rel = seal_relpath(path)
    if rel is not None:
        assert path == "/" + rel and not rel.startswith("/")
        assert ".." not in rel.split("/") and "" not in rel.split("/")


def test_seal_relpath_cases() -> None:
    assert seal_relpath("/bin/sh") == "bin/sh"
    for bad in ("bin/sh", "/bin/sh (deleted)", "/a/../b", "/a//b", "/", "/a\nb"):
        assert seal_relpath(bad) is None, bad


def test_the_seal_is_beside_the_image_unless_the_manifest_names_it() -> None:
    text = 'name = "c"\n[service]\ncommand = "/bin/sh"\n[image]\nroot = "/img/demo"\n'
    assert seal_path_of(parse_manifest(text)) == "/img/demo.seal"
    m = parse_manifest(text + 'seal = "/etc/s.seal"\n')
    assert seal_path_of(m) == "/etc/s.seal"
    assert m.to_dict()["image"] == {"root": "/img/demo", "seal": "/etc/s.seal"}
    with pytest.raises(ConfigError) as exc:
        parse_manifest(text + 'seal = "relative.seal"\n')
    assert "seal" in str(exc.value)


# -- the signature file ---------------------------------------------------------------

def test_signatures_parse_with_bad_lines_reported_by_number() -> None:
    data = (f"{HEADER}\n# comment\n\n{H1}  mirai arm7\n{H2.upper()}\nnothex\n{H1} again\n"
            f"{'d' * 63}\n{H3}\tname\x01x\n").encode()
    db, bad = parse(data)
    assert dict(db.digests) == {H1: "mirai arm7", H2: ""}
    assert [b.line for b in bad] == [6, 7, 8, 9]
    assert "listed twice" in str(bad[1]) and str(bad[0]).startswith("line 6:")


@pytest.mark.parametrize("data", [b"", b"\n", H1.encode(), b"# other 1\n", b"\xff\xfe",
                                  HEADER.encode()[:-1]])
def test_a_file_without_its_header_is_refused_as_a_whole(data: bytes) -> None:
    with pytest.raises(SignatureFileError) as exc:
        parse(data)
    assert exc.value.code == "E_SIGNATURES" and exc.value.hint


def test_the_header_alone_empties_it_on_purpose_and_size_is_bounded() -> None:
    assert len(parse(HEADER.encode())[0]) == 0
    assert len(parse(f"{HEADER}\r\n{H1}\r\n".encode())[0]) == 1
    with pytest.raises(SignatureFileError):
        parse(HEADER.encode() + b"\n" + b"#" * MAX_BYTES)


@given(st.binary(max_size=300))
def test_any_bytes_give_a_database_or_a_clear_refusal(tail: bytes) -> None:
    try:
        db, bad = parse(HEADER.encode() + b"\n" + tail)
    except SignatureFileError:
        return
    assert all(len(d) == 64 for d in db.digests)
    assert all(b.line >= 2 for b in bad)


def test_diff_counts_added_and_removed() -> None:
    old = parse(f"{HEADER}\n{H1}\n{H2}\n".encode())[0]
    new = parse(f"{HEADER}\n{H2}\n{H3}\n".encode())[0]
    assert new.diff(old) == (1, 1)


# -- exec.toml ------------------------------------------------------------------------

def test_settings_defaults_and_values(tmp_path: Path) -> None:
    d = settings_from_text("", tmp_path)
    assert d == ExecSettings(signatures=tmp_path / "exec/signatures.txt")
    assert d.enforce and not d.allow_unsealed
    s = settings_from_text('mode = "report"\nallow_unsealed = true\nrate = 5\n'
                           'signatures = "/etc/agent/sig.txt"\ncache = 16\n', tmp_path)
    assert (s.mode, s.allow_unsealed, s.rate, str(s.signatures), s.cache) == (
        "report", True, 5.0, "/etc/agent/sig.txt", 16)
    assert not s.enforce


@pytest.mark.parametrize("text", ['mode = "deny"', "allow_unsealed = 1", 'signatures = "x"',
                                  "rate = 0", "burst = true", "cache = 1", "cache = 1.5",
                                  "colour = 1", "mode ="])
def test_bad_settings_name_the_key(text: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        settings_from_text(text, tmp_path)
    assert exc.value.code == "E_CONFIG" and exc.value.hint
    key = text.split(" ")[0]
    assert key in exc.value.message or "TOML" in exc.value.message


# -- mountinfo and fanotify records ---------------------------------------------------

MOUNTINFO = """\
73 48 254:0 /img / ro,nosuid,nodev,relatime - ext4 /dev/vda rw
74 73 0:41 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw
80 73 0:6 / /dev rw,nosuid,noexec - tmpfs tmpfs rw
81 73 0:50 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
82 73 0:51 / /data\\040dir rw,nosuid,nodev - ext4 /dev/loop0 rw
83 73 0:52 / /tmp rw,nosuid,nodev - tmpfs tmpfs rw
"""


def test_mount_points_keep_exec_mounts_once_with_escapes_undone() -> None:
    assert mount_points(MOUNTINFO) == ["/", "/tmp", "/data dir"]
    with pytest.raises(ValueError):
        mount_points("1 2 3\n")


def test_a_mount_made_noexec_over_an_exec_one_is_left_out() -> None:
    text = MOUNTINFO + "84 73 0:53 / /tmp rw,noexec - tmpfs tmpfs rw\n"
    assert mount_points(text) == ["/", "/data dir"]


META = struct.Struct("=IBBHQii")


def test_fanotify_events_decode_and_a_torn_buffer_is_refused() -> None:
    buf = META.pack(24, 3, 0, 24, FAN_OPEN_EXEC_PERM, 7, 100) + META.pack(
        24, 3, 0, 24, FAN_Q_OVERFLOW, -1, 0)
    evs = parse_events(buf)
    assert [(e.permission, e.overflow, e.fd, e.pid) for e in evs] == [
        (True, False, 7, 100), (False, True, -1, 0)]
    assert parse_events(b"") == []
    for bad in (buf[:30], META.pack(24, 2, 0, 24, 0, 1, 1), META.pack(100, 3, 0, 24, 0, 1, 1)):
        with pytest.raises(ValueError):
            parse_events(bad)
