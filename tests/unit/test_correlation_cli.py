"""``agent-patterns``: keygen, check, build, sign, verify; one error line with a hint."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from agent.cli.patterns import main
from agent.monitor.correlation import bundle as bnd

REPO = Path(__file__).resolve().parents[2]
DEFAULT = REPO / "rootfs-overlay/etc/agent/patterns/default.pat"


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


def test_the_whole_flow(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key, pub = tmp_path / "k", tmp_path / "k.pub"
    bundle = tmp_path / "lib.bundle"
    rc, text = run("keygen", "-o", str(key))
    assert rc == 0 and bnd.key_id(bnd.parse_key(pub.read_text())) in text
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    rc, text = run("check", str(DEFAULT))
    assert rc == 0 and "shared-drop-exec" in text and text.startswith("11 patterns")
    assert all(len(line) <= 80 for line in text.splitlines())
    rc, text = run("build", str(DEFAULT), "-o", str(bundle), "--version", "7")
    assert rc == 0 and "version 7, 11 patterns" in text
    rc, _ = run("verify", str(bundle), "--pubkey", str(pub))
    assert rc == 1 and "error[E_IO]: read signature" in capsys.readouterr().err
    rc, text = run("sign", str(bundle), "--key", str(key))
    assert rc == 0 and Path(f"{bundle}.sig").stat().st_size == 64
    rc, text = run("verify", str(bundle), "--pubkey", str(pub))
    assert rc == 0 and "good signature" in text and "version 7" in text
    rc, text = run("verify", str(bundle), "--pubkey", str(pub), "--json")
    assert rc == 0 and '"version": 7' in text
    rc, _ = run("verify", str(bundle), "--pubkey", str(pub), "--after", "7")
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and err == ["agent-patterns: error[E_BUNDLE_VERSION]: version 7 is not "
                               "newer than the loaded 7",
                               "hint: build the library with a higher --version"]
    rc, _ = run("verify", str(bundle), "--pubkey", str(pub), "--engine", "0")
    assert rc == 1 and "E_BUNDLE_ENGINE" in capsys.readouterr().err


def test_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.pat"
    bad.write_text("pattern p\n  step a x/y\nend\n")
    assert run("build", str(bad), "-o", str(tmp_path / "b"), "--version", "1")[0] == 1
    err = capsys.readouterr().err
    assert err.startswith(f"agent-patterns: error[E_PATTERN_SYNTAX]: {bad}:2: ")
    assert "\nhint: " in err and "Traceback" not in err
    assert run("--debug", "check", str(bad))[0] == 1
    assert "Traceback" in capsys.readouterr().err
    key = tmp_path / "k"
    assert run("keygen", "-o", str(key))[0] == 0
    assert run("keygen", "-o", str(key))[0] == 1
    assert "error[E_EXISTS]" in capsys.readouterr().err
    assert run("sign", str(tmp_path / "none"), "--key", str(key))[0] == 1
    assert "error[E_IO]: read bundle" in capsys.readouterr().err
    assert run("verify", str(tmp_path / "none"), "--pubkey", str(key))[0] == 1
    assert "E_BUNDLE_KEY" in capsys.readouterr().err  # a secret key given as public
    assert run("build", "-o", "x")[0] == 2  # usage
    assert run()[0] == 2
