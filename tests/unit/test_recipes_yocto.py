"""The Yocto layer in recipes/meta-agent: oelint-adv clean, RDEPENDS exact.

oelint-adv runs on every .bb/.bbappend for each LTS release the layer
claims.  Two rules are suppressed, for stated reasons:

* oelint.vars.homepageping fetches HOMEPAGE over the network; the test
  machines have none, so its verdict would depend on the machine;
* oelint.var.bbclassextend (severity info) suggests native/nativesdk
  variants; the agent recipe installs a daemon's init script and unit and
  has no meaningful native build.  python3-cgroupspy does set it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYER = REPO / "recipes/meta-agent"
RECIPE = LAYER / "recipes-agent/agent/agent_git.bb"
RELEASES = ("scarthgap", "wrynose")
SUPPRESS = ("oelint.vars.homepageping", "oelint.var.bbclassextend")

# Standard-library modules -> package of oe-core's python3-manifest.json
# (modules not listed here and present in python3-core map to core).
MANIFEST = {
    "asyncio": "asyncio", "concurrent": "asyncio",
    "ctypes": "ctypes",
    "datetime": "datetime", "calendar": "datetime", "_strptime": "datetime",
    "decimal": "numbers", "fractions": "numbers", "numbers": "numbers",
    "contextvars": "numbers",
    "difflib": "difflib",
    "fcntl": "fcntl",
    "gzip": "compression", "tarfile": "compression", "zipfile": "compression",
    "hashlib": "crypt",
    "json": "json",
    "logging": "logging",
    "socket": "io", "ssl": "io", "tempfile": "io", "termios": "io", "_pyio": "io",
    "base64": "netclient", "hmac": "netclient", "secrets": "netclient",
    "uuid": "netclient", "mimetypes": "netclient", "http": "netclient",
    "mmap": "mmap", "resource": "resource", "syslog": "syslog",
    "queue": "threading", "_threading_local": "threading",
    "random": "math", "cmath": "math",
    "pickle": "pickle", "shelve": "pickle",
    "pprint": "pprint", "shlex": "shell", "cmd": "shell",
    "string": "stringold", "statistics": "statistics",
    "multiprocessing": "multiprocessing", "socketserver": "netserver",
    "tomllib": "tomllib", "zoneinfo": "zoneinfo", "sqlite3": "sqlite3",
    "email": "email", "xml": "xml", "unittest": "unittest", "getpass": "unixadmin",
    "pty": "terminal", "tty": "terminal",
}
CORE = {
    "__future__", "abc", "argparse", "array", "ast", "binascii", "bisect", "bz2",
    "codecs", "collections", "contextlib", "copy", "copyreg", "csv", "dataclasses", "dis",
    "enum", "errno", "fnmatch", "functools", "gc", "genericpath", "getopt", "gettext",
    "glob", "grp", "heapq", "importlib", "inspect", "io", "ipaddress", "itertools",
    "keyword", "linecache", "locale", "lzma", "marshal", "math", "operator", "optparse",
    "os", "pathlib", "platform", "posix", "posixpath", "pwd", "re", "reprlib", "select",
    "selectors", "shutil", "signal", "site", "stat", "struct", "subprocess", "sys",
    "sysconfig", "textwrap", "threading", "time", "token", "tokenize", "traceback",
    "types", "typing", "warnings", "weakref", "zlib",
}
THIRD_PARTY = {"cbor2": "python3-cbor2", "pyroute2": "python3-pyroute2",
               "nacl": "python3-pynacl"}
OPTIONAL = {"cgroupspy"}  # PACKAGECONFIG[cgroupv1]


def _oelint() -> list[str] | None:
    script = Path(sys.executable).parent / "oelint-adv"
    if script.exists():
        return [str(script)]
    if importlib.util.find_spec("oelint_adv") is not None:
        return [sys.executable, "-m", "oelint_adv"]
    return None


def _recipes() -> list[Path]:
    return sorted(p for p in LAYER.rglob("*") if p.suffix in (".bb", ".bbappend"))


def _variable(text: str, name: str) -> str:
    """The value of ``name = "..."`` / ``+=`` (continuation lines joined)."""
    joined = text.replace("\\\n", " ")
    values = re.findall(rf'^{re.escape(name)}\s*\+?\??=\s*"([^"]*)"', joined, re.M)
    assert values, f"{name} not set"
    return " ".join(values)


@pytest.mark.parametrize("release", RELEASES)
def test_oelint_clean(release: str) -> None:
    cmd = _oelint()
    if cmd is None:
        pytest.fail("oelint-adv is not installed: it is in the test extra (pip install oelint-adv)")
    helptext = subprocess.run([*cmd, "--help"], capture_output=True, text=True).stdout
    if release not in helptext:
        pytest.skip(f"this oelint-adv does not know release {release}")
    args = [*cmd, "--quiet", "--mode", "all", "--release", release]
    for rule in SUPPRESS:
        args += ["--suppress", rule]
    proc = subprocess.run([*args, *map(str, _recipes())], capture_output=True, text=True,
                          timeout=300)
    findings = (proc.stdout + proc.stderr).strip()
    assert findings == "" and proc.returncode == 0, findings


def test_layer_conf() -> None:
    text = (LAYER / "conf/layer.conf").read_text()
    assert set(_variable(text, "LAYERSERIES_COMPAT_agent-layer").split()) >= {"scarthgap"}
    assert set(_variable(text, "LAYERDEPENDS_agent-layer").split()) == {
        "core", "openembedded-layer", "meta-python"}
    assert "agent-layer" in _variable(text, "BBFILE_COLLECTIONS")


def _agent_imports() -> set[str]:
    mods: set[str] = set()
    for path in (REPO / "agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods.add(node.module.split(".")[0])
    return mods


def test_rdepends_are_exactly_the_imports() -> None:
    needed = {"python3-core"}
    unknown = []
    for mod in _agent_imports():
        if mod == "agent" or mod in OPTIONAL:
            continue
        if mod in THIRD_PARTY:
            needed.add(THIRD_PARTY[mod])
        elif mod in MANIFEST:
            needed.add("python3-" + MANIFEST[mod])
        elif mod in CORE:
            pass
        elif mod in sys.stdlib_module_names:
            unknown.append(mod)
        else:
            unknown.append(mod)
    assert not unknown, (
        f"agent/ imports {sorted(unknown)}: add each to MANIFEST/CORE/THIRD_PARTY here "
        "(see python3-manifest.json in openembedded-core) and to RDEPENDS in " + str(RECIPE))
    rdepends = set(_variable(RECIPE.read_text(), "RDEPENDS:${PN}").split())
    assert rdepends == needed, (
        f"missing from RDEPENDS: {sorted(needed - rdepends)}; "
        f"not imported: {sorted(rdepends - needed)}")


def test_cgroupspy_only_for_v1_backend() -> None:
    text = RECIPE.read_text()
    assert 'PACKAGECONFIG[cgroupv1] = ",,,python3-cgroupspy"' in text
    assert "cgroupspy" not in _variable(text, "RDEPENDS:${PN}")
    assert (LAYER / "recipes-devtools/python/python3-cgroupspy_0.2.3.bb").exists()


def test_src_uri_files_exist_and_init_scripts_agree() -> None:
    files = LAYER / "recipes-agent/agent/files"
    for name in re.findall(r"file://([\w.\-]+)", _variable(RECIPE.read_text(), "SRC_URI")):
        assert (files / name).is_file(), name
    init = (files / "agentd.init").read_text()
    assert init == (REPO / "rootfs-overlay/etc/init.d/S50agentd").read_text()
    assert init == (REPO / "recipes/buildroot-external/package/agent/S50agentd").read_text()
    unit = (files / "agentd.service").read_text()
    assert unit == (REPO / "recipes/buildroot-external/package/agent/agentd.service").read_text()
    assert "ExecStart=/usr/bin/agentd" in unit


def test_license_checksum() -> None:
    lic = REPO / "LICENSE"
    if not lic.exists():
        pytest.fail("no LICENSE at the repository root")
    md5 = re.search(r"file://LICENSE;md5=([0-9a-f]{32})", RECIPE.read_text())
    assert md5 is not None
    assert hashlib.md5(lic.read_bytes()).hexdigest() == md5.group(1)
