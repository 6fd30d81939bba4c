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
import shutil
import subprocess
import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    "pty": "terminal", "tty": "terminal", "unicodedata": "unicodedata",
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
# The programs agent/kernel runs (found by `shutil.which("NAME"`): required ones with
# their package in Yocto (meta-networking) and their Buildroot symbol (the Buildroot test
# reads this table), optional ones with what the agent does without them.
TOOLS = {"nft": ("nftables", "BR2_PACKAGE_NFTABLES")}
OPTIONAL_TOOLS = {"nsenter": "nft runs in a cell's netns through setns(2) instead"}


def kernel_tools() -> set[str]:
    """The programs the kernel adapters look up on PATH to run them."""
    found: set[str] = set()
    for path in (REPO / "agent/kernel").rglob("*.py"):
        found.update(re.findall(r'shutil\.which\(\s*"([\w.-]+)"', path.read_text()))
    return found


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
    # meta-python: python3-pyroute2, python3-cbor2; meta-networking: nftables
    assert set(_variable(text, "LAYERDEPENDS_agent-layer").split()) == {
        "core", "openembedded-layer", "meta-python", "networking-layer"}
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


def test_tools_are_known() -> None:
    tools = kernel_tools()
    assert "nft" in tools  # the scan works
    unknown = tools - set(TOOLS) - set(OPTIONAL_TOOLS)
    assert not unknown, (
        f"agent/kernel runs {sorted(unknown)}: add each to TOOLS (with its Yocto package, "
        f"also in RDEPENDS of {RECIPE.name}, and its Buildroot symbol, selected in "
        "package/agent/Config.in) or to OPTIONAL_TOOLS (with what happens without it)")


def test_rdepends_are_exactly_the_imports_and_tools() -> None:
    needed = {"python3-core"} | {pkg for pkg, _ in TOOLS.values()}
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
        f"neither imported nor run: {sorted(rdepends - needed)}")


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


# ------------------------------------------- BitBake's parse, with the QA rules of insane.bbclass
#
# A real `bitbake -p` needs openembedded-core, which no package registry ships.  So the
# layer is parsed here by BitBake's own parser and datastore (the `bb` package of the
# bitbake-setup wheel: the same override, append and :remove semantics), over a stub
# configuration that keeps oe-core's OVERRIDES line (meta/conf/bitbake.conf) and the
# package variables it sets, and the parse-time rules of oe-core that broke real builds
# are applied to the result, each test named after its rule:
#
# * pn-overrides (insane.bbclass): a recipe's PN must not be in OVERRIDES;
# * pkgvarcheck (insane.bbclass): RDEPENDS, FILES, ... must not be set without a package
#   suffix (with PN in OVERRIDES, RDEPENDS:${PN} becomes RDEPENDS);
# * autorev-at-parse (base.bbclass): a git SRC_URI's revision is computed while parsing
#   (fetcher_hashes_dummyfunc[vardepvalue] = "${@bb.fetch.get_hashvalue(d)}", for the
#   task signatures); with AUTOREV that runs `git ls-remote`, so a layer whose default
#   needs a reachable repository fails the whole parse, every image with it.
#
# The layer is parsed as a BSP holds it: copied into a layers/ folder of its own, away
# from this repository.

OE_CONF = """\
# The parts of openembedded-core's meta/conf/bitbake.conf the rules read.
TARGET_OS = "linux"
TRANSLATED_TARGET_ARCH = "aarch64"
MACHINE = "qemuarm64"
DISTRO = "nodistro"
MACHINEOVERRIDES ?= "${MACHINE}"
DISTROOVERRIDES ?= "${@d.getVar('DISTRO') or ''}"
CLASSOVERRIDE ?= "class-target"
LIBCOVERRIDE = ":libc-glibc"
OVERRIDES = "${TARGET_OS}:${TRANSLATED_TARGET_ARCH}:pn-${PN}:layer-${FILE_LAYERNAME}:\
${MACHINEOVERRIDES}:${DISTROOVERRIDES}:${CLASSOVERRIDE}${LIBCOVERRIDE}:forcevariable"
PN = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[0] or 'defaultpkgname'}"
PV = "${@bb.parse.vars_from_file(d.getVar('FILE', False),d)[1] or '1.0'}"
BP = "${PN}-${PV}"
PACKAGES = "${PN}-src ${PN}-dbg ${PN}-staticdev ${PN}-dev ${PN}-doc ${PN}-locale ${PN}"
FILES:${PN} = "${bindir}/* ${sbindir}/* ${sysconfdir} ${libdir}/*${SOLIBS}"
FILES:${PN}-dev = "${includedir}"
RDEPENDS:${PN}-dev = "${PN} (= ${EXTENDPKGV})"
FILESEXTRAPATHS ?= "__default:"
# from meta/classes-global/base.bbclass
THISDIR = "${@os.path.dirname(d.getVar('FILE'))}"
SRCREV ??= "INVALID"
AUTOREV = "${@bb.fetch2.get_autorev(d)}"
BB_SRCREV_POLICY = "clear"
DL_DIR = "${TOPDIR}/downloads"
include conf/local.conf
"""
# A kernel recipe for the layer's linux-yocto_%.bbappend to apply to.
LINUX_YOCTO = 'SRC_URI = "git://git.yoctoproject.org/linux-yocto.git;branch=v6.6/standard/base"\n'
CLASSES = ("base", "python_setuptools_build_meta", "update-rc.d", "systemd", "pypi",
           "setuptools3", "native", "nativesdk")
# Checked by pkgvarcheck (oe-core insane.bbclass, scarthgap and wrynose alike).
PKGVARCHECK = ("RDEPENDS", "RRECOMMENDS", "RSUGGESTS", "RCONFLICTS", "RPROVIDES", "RREPLACES",
               "FILES", "pkg_preinst", "pkg_postinst", "pkg_prerm", "pkg_postrm", "ALLOW_EMPTY")
DOCS = (REPO / "docs/firmware.md", LAYER / "README.md",
        LAYER / "recipes-kernel/linux/linux-yocto_%.bbappend")


def _bb() -> Any:
    """BitBake's library.  bb.siggen imports bitbake's hash-equivalence client (hashserv),
    which the wheel leaves out and a parse never calls: a stand-in module is enough."""
    try:
        import bb
    except ImportError:
        pytest.fail("BitBake's library is not installed: it is in the test extra "
                    "(pip install bitbake-setup)")
    for name in ("hashserv", "hashserv.client"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["hashserv"].client = sys.modules["hashserv.client"]  # type: ignore[attr-defined]
    import bb.cookerdata
    import bb.data
    import bb.fetch2
    import bb.parse
    return bb


def documented_opt_in() -> str:
    """The kernel opt-in line, as docs/firmware.md, the layer's README and the bbappend
    tell users to write it (they must agree)."""
    found = {p.name: re.findall(r'(DISTROOVERRIDES \.= "[^"]*")', p.read_text())
             for p in DOCS}
    lines = {line for v in found.values() for line in v}
    assert all(found.values()) and len(lines) == 1, f"the documented opt-in differs: {found}"
    return lines.pop()


class Parsed:
    """The layer's recipes parsed by BitBake, the layer copied to ``root``/layers/."""

    def __init__(self, root: Path, local_conf: str) -> None:
        bb = _bb()
        self.bb = bb
        self.layer = root / "layers/meta-agent"
        shutil.copytree(LAYER, self.layer)
        oe = root / "layers/oe-stub"
        (oe / "conf").mkdir(parents=True)
        (oe / "classes").mkdir()
        (oe / "recipes-kernel/linux").mkdir(parents=True)
        (oe / "conf/bitbake.conf").write_text(OE_CONF)
        for c in CLASSES:
            (oe / f"classes/{c}.bbclass").write_text("")
        (oe / "recipes-kernel/linux/linux-yocto_6.6.bb").write_text(LINUX_YOCTO)
        (root / "build/conf").mkdir(parents=True)
        (root / "build/conf/local.conf").write_text(local_conf + "\n")
        self.oe = oe
        d = bb.data.init()
        d.setVar("BBPATH", f"{root / 'build'}:{oe}:{self.layer}")
        d.setVar("TOPDIR", str(root / "build"))
        d = bb.parse.handle(str(oe / "conf/bitbake.conf"), d, include=False)
        bb.parse.init_parser(d)
        d.setVar("__bbclasstype", "recipe")
        self.base = d

    def recipe(self, bbfile: Path, appends: Sequence[Path] = ()) -> Any:
        d = self.base.createCopy()
        d.setVar("FILE_LAYERNAME", "agent-layer")
        if appends:
            d.setVar("__BBAPPEND", " ".join(map(str, appends)))
        return self.bb.parse.handle(str(bbfile), d)[""]

    def agent(self) -> Any:
        return self.recipe(self.layer / RECIPE.relative_to(LAYER))

    def all(self) -> dict[str, Any]:
        """Every recipe of the layer, and linux-yocto with the layer's bbappend."""
        out = {}
        for bbfile in sorted(self.layer.rglob("*.bb")):
            d = self.recipe(bbfile)
            out[d.getVar("PN")] = d
        kernel = self.recipe(self.oe / "recipes-kernel/linux/linux-yocto_6.6.bb",
                             sorted(self.layer.rglob("linux-yocto_%.bbappend")))
        out[kernel.getVar("PN")] = kernel
        return out


OPT_INS = {"no opt-in": "", "kernel opt-in": "documented"}


def _local_conf(which: str) -> str:
    return documented_opt_in() if which == "documented" else which


@pytest.mark.parametrize("conf", OPT_INS.values(), ids=OPT_INS.keys())
def test_qa_pn_overrides(tmp_path: Path, conf: str) -> None:
    for pn, d in Parsed(tmp_path, _local_conf(conf)).all().items():
        overrides = d.getVar("OVERRIDES").split(":")
        assert pn not in overrides, (
            f'[pn-overrides] {d.getVar("FILE")}: has PN of "{pn}" which is in OVERRIDES '
            f"({':'.join(overrides)}): rename the override")


@pytest.mark.parametrize("conf", OPT_INS.values(), ids=OPT_INS.keys())
def test_qa_pkgvarcheck(tmp_path: Path, conf: str) -> None:
    for d in Parsed(tmp_path, _local_conf(conf)).all().values():
        bad = [v for v in PKGVARCHECK if d.getVar(v, False)]
        assert not bad, (f"[pkgvarcheck] {d.getVar('FILE')}: {bad} set as not being package "
                         "specific (is the recipe's PN in OVERRIDES?)")


def test_qa_rules_fire_on_an_override_named_after_the_recipe(tmp_path: Path) -> None:
    """The two rules above, shown to catch the opt-in the layer documented before."""
    d = Parsed(tmp_path, 'DISTROOVERRIDES .= ":agent"').agent()
    assert "agent" in d.getVar("OVERRIDES").split(":")
    assert "python3-pyroute2" in d.getVar("RDEPENDS", False)


def test_kernel_opt_in_adds_the_fragment(tmp_path: Path) -> None:
    kernel = {c: Parsed(tmp_path / c.replace(" ", "-"), _local_conf(v)).all()["linux-yocto"]
              for c, v in OPT_INS.items()}
    assert kernel["no opt-in"].getVar("SRC_URI").split() == LINUX_YOCTO.split('"')[1].split()
    assert "file://agent.cfg" in kernel["kernel opt-in"].getVar("SRC_URI").split()
    paths = kernel["kernel opt-in"].getVar("FILESEXTRAPATHS").split(":")
    assert (Path(paths[0]) / "agent.cfg").is_file(), paths


def test_autorev_at_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What base.bbclass does while parsing a git recipe, on the layer copied out of the
    repository: the revision comes from the recipe, no git command runs."""
    parsed = Parsed(tmp_path, "")
    bb = parsed.bb
    ran: list[str] = []

    def no_command(cmd: str, *args: Any, **kwargs: Any) -> str:
        ran.append(str(cmd))
        raise bb.fetch2.FetchError(f"ran at parse time: {cmd}")

    monkeypatch.setattr(bb.fetch2, "runfetchcmd", no_command)
    monkeypatch.setattr(bb.fetch2.git, "runfetchcmd", no_command)
    d = parsed.agent()
    d.setVar("BB_CACHEDIR", str(tmp_path / "cache"))
    bb.fetch2.fetcher_init(d)
    d.setVarFlag("fetcher_hashes_dummyfunc", "vardepvalue", "${@bb.fetch.get_hashvalue(d)}")
    try:
        rev = d.getVarFlag("fetcher_hashes_dummyfunc", "vardepvalue")
    except bb.data_smart.ExpansionError as exc:
        pytest.fail(f"[autorev-at-parse] the parse of {RECIPE.name} runs a command: {exc}")
    assert not ran
    assert rev == pinned_srcrev(), rev


def pinned_srcrev() -> str:
    m = re.search(r'^SRCREV = "([0-9a-f]{40})"$', RECIPE.read_text(), re.M)
    assert m, f"{RECIPE.name}: SRCREV must pin a 40-digit commit (SRCREV = \"<sha1>\")"
    return m.group(1)


def test_pinned_revision_is_a_commit_of_this_repository() -> None:
    rev = pinned_srcrev()
    git = ["git", "-C", str(REPO)]
    r = subprocess.run([*git, "cat-file", "-t", rev], capture_output=True, text=True)
    assert r.stdout.strip() == "commit", f"{rev} is not a commit of {REPO}: {r.stderr}"
    r = subprocess.run([*git, "merge-base", "--is-ancestor", rev, "HEAD"])
    assert r.returncode == 0, f"{rev} is not in the history of HEAD"


def test_no_inline_lint_suppressions() -> None:
    """A `# nooelint` in the layer hid oelint.vars.autorev; suppressions belong in SUPPRESS
    above, with their reason."""
    hits = [f"{p.relative_to(REPO)}:{i}" for p in _recipes()
            for i, line in enumerate(p.read_text().splitlines(), 1) if "nooelint" in line]
    assert not hits, hits


# ----------------------------------------------- docs/firmware.md: from a clean BSP checkout


def clean_bsp_blocks(build: str) -> list[list[str]]:
    """The code blocks (indented lines) of docs/firmware.md's "From a clean BSP checkout"
    subsection for ``build`` ("Yocto", "Buildroot")."""
    text = (REPO / "docs/firmware.md").read_text()
    assert "\n## From a clean BSP checkout\n" in text, "docs/firmware.md lost its section"
    section = text.split("\n## From a clean BSP checkout\n", 1)[1].split("\n## ", 1)[0]
    assert f"\n### {build}" in section, f"no {build} subsection"
    sub = section.split(f"\n### {build}", 1)[1].split("\n### ", 1)[0]
    blocks: list[list[str]] = []
    prev = False
    for line in sub.splitlines():
        code = line.startswith("    ")
        if code and not prev:
            blocks.append([])
        if code:
            blocks[-1].append(line[4:])
        prev = code or (prev and line.strip() == "")
    return blocks


# LAYERDEPENDS collection -> its folder in meta-openembedded ("core" comes with the BSP)
COLLECTION_DIRS = {"openembedded-layer": "meta-oe", "meta-python": "meta-python",
                   "networking-layer": "meta-networking"}


def test_clean_bsp_yocto(tmp_path: Path) -> None:
    blocks = clean_bsp_blocks("Yocto")
    adds = [b.split()[-1] for block in blocks for b in block
            if b.startswith("bitbake-layers add-layer ")]
    deps = set(_variable((LAYER / "conf/layer.conf").read_text(),
                         "LAYERDEPENDS_agent-layer").split()) - {"core"}
    assert set(COLLECTION_DIRS) == deps, "a new LAYERDEPENDS needs its folder here"
    for collection in deps:
        assert any(a.endswith("/" + COLLECTION_DIRS[collection]) for a in adds), (
            f"docs/firmware.md adds no layer for {collection}: {adds}")
    assert adds[-1].endswith("/recipes/meta-agent") and (REPO / "recipes/meta-agent").is_dir()
    assignment = re.compile(r'^[A-Z_][\w:${}.-]*\s*(\.=|\+=|\?=|=)\s*"')
    conf = next(b for b in blocks if all(assignment.match(x) for x in b))
    parsed = Parsed(tmp_path, "\n".join(conf))
    recipes = parsed.all()
    agent, kernel = recipes["agent"], recipes["linux-yocto"]
    assert "agent" in (agent.getVar("IMAGE_INSTALL") or "").split()
    assert "nftables" in agent.getVar("RDEPENDS:agent").split()
    assert "file://agent.cfg" in kernel.getVar("SRC_URI").split()
    for pn, d in recipes.items():
        assert pn not in d.getVar("OVERRIDES").split(":"), f"[pn-overrides] {pn}"
        assert not [v for v in PKGVARCHECK if d.getVar(v, False)], f"[pkgvarcheck] {pn}"
