"""Build the emulated ARM set-top box from Debian arm64 packages.

Layers, each cached under ``$AGENT_BOX_CACHE`` (default ``~/.cache/agent-box``)
and keyed by a hash of its inputs, so that a rebuild with nothing changed
takes seconds:

``debs/``           downloaded ``.deb`` files (name_version_arch.deb)
``base-KEY/``       the packages unpacked with ``dpkg-deb -x``, pruned, kernel
                    modules selected and depmod'ed, bytecode compiled
``py-KEY/``         aarch64 Python dependencies (pip --target), compiled
``initrd-KEY.gz``   a tiny initramfs: busybox + the modules needed to mount
                    the root disk, then ``switch_root``
``root-KEY.ext4``   the root disk: base + Python layer + the agent's wheel +
                    ``rootfs-overlay/`` + the box's own init files

Only the host's Python standard library is used here.  Run as root (files in
the image must be owned by root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("AGENT_BOX_CACHE", Path.home() / ".cache" / "agent-box"))
# Bump when the way a layer is made changes, so old caches are not reused.
RECIPE_VERSION = "6"

EXCLUDE = {
    # Packaging machinery, init systems and tools busybox replaces: never run in the box.
    "debconf",
    "cdebconf",
    "dpkg",
    "perl",
    "perl-base",
    "perl-modules-5.36",
    "libperl5.36",
    "initramfs-tools",
    "initramfs-tools-core",
    "dracut",
    "dracut-core",
    "udev",
    "libudev1",
    "linux-base",
    "adduser",
    "passwd",
    "install-info",
    "coreutils",
    "tar",
    "cpio",
    "logsave",
    "dmsetup",
    "kpartx",
    "klibc-utils",
    "libklibc",
    "kmod",
    "libpam-modules",
    "libpam0g",
    "libpam-modules-bin",
    "libsemanage2",
    "libsemanage-common",
    "libdevmapper1.02.1",
    "libdebian-installer4",
    "libnewt0.52",
    "libslang2",
    "libtextwrap1",
    "readline-common",
    "mime-support",
    "mailcap",
    "libdb5.3",
    "libelogind0",
    "libgdbm-compat4",
}

# Kernel modules (and everything they depend on) kept in the image.
MODULE_DIRS = (
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
    "kernel/net/bridge",
    "kernel/net/8021q",
    "kernel/net/802",
    "kernel/net/llc",
    "kernel/net/9p",
    "kernel/fs/9p",
    "kernel/fs/netfs",
    "kernel/fs/fscache",
)
MODULES = (
    "virtio_pci",
    "virtio_blk",
    "virtio_rng",
    "ext4",
    "loop",  # data images (docs/data-dirs.md)
    "crc32c_generic",
    "libcrc32c",
    "veth",
    "bridge",
    "8021q",
    "nf_tables",
    # channel 3 (agent/monitor/net): conntrack events, NFLOG, the rate-limited log
    # rules; the kernel loads them on first use (nft, nfnetlink requests)
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nfnetlink_log",
    "nft_ct",
    "nft_log",
    "nft_limit",
    "inet_diag",  # the cells' TCP listeners (sock_diag)
    "tcp_diag",
    "9p",
    "9pnet_virtio",
    "overlay",
    "snd",  # only for /proc/asound: a directory the cells' /proc masks (tests/guest)
)
# Modules the initramfs needs to mount the root disk, in load order.
INITRD_MODULES = (
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "crc32c_generic",
    "libcrc32c",
    "jbd2",
    "ext4",
)
PIP_PLATFORM = (
    "--platform",
    "manylinux_2_36_aarch64",
    "--platform",
    "manylinux_2_28_aarch64",
    "--platform",
    "manylinux2014_aarch64",
    "--python-version",
    "3.11",
    "--only-binary=:all:",
)
PRUNE = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/lintian",
    "usr/share/bug",
    "usr/share/zsh",
    "usr/share/bash-completion",
)


def log(msg: str) -> None:
    print(f"[box] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def sha(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


def tree_hash(root: Path, exclude: tuple[str, ...] = ("__pycache__",)) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if any(part in exclude for part in p.parts):
            continue
        rel = p.relative_to(root).as_posix()
        if p.is_symlink():
            h.update(f"L{rel}->{os.readlink(p)}\0".encode())
        elif p.is_file():
            h.update(f"F{rel}:{p.stat().st_mode & 0o7777:o}\0".encode())
            h.update(p.read_bytes())
        elif p.is_dir():
            h.update(f"D{rel}\0".encode())
    return h.hexdigest()[:16]


def wanted_packages() -> list[str]:
    lines = (HERE / "packages.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


# --- packages ---------------------------------------------------------------------------


def resolve() -> list[tuple[str, str]]:
    """The closure of packages.txt for arm64, as (name, candidate version).

    Cached by the package list and the state of apt's lists (apt-get update
    changes them), since apt-cache takes seconds.
    """
    lists = sorted(Path("/var/lib/apt/lists").glob("*_Packages*"))
    key = sha(
        RECIPE_VERSION,
        json.dumps(wanted_packages()),
        json.dumps(sorted(EXCLUDE)),
        *[f"{p.name}:{p.stat().st_mtime_ns}" for p in lists],
    )
    cached = CACHE / f"resolve-{key}.json"
    if cached.exists():
        return [(n, v) for n, v in json.loads(cached.read_text())]
    for old in CACHE.glob("resolve-*.json"):
        old.unlink()
    result = _resolve()
    if not any(n.startswith("linux-image-") for n, _ in result):
        raise SystemExit(
            "box: no arm64 kernel in the closure: run "
            "'dpkg --add-architecture arm64 && apt-get update'"
        )
    cached.write_text(json.dumps(result))
    return result


def _resolve() -> list[tuple[str, str]]:
    indep_top = _candidates(wanted_packages(), arch_all_only=True)
    top = [p if p in indep_top else f"{p}:arm64" for p in wanted_packages()]
    out = run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *top,
        ],
        capture_output=True,
    ).stdout
    arm: set[str] = set()
    plain: set[str] = set()
    for line in out.splitlines():
        if line.startswith((" ", "<")):
            continue
        name = line.strip()
        base = name.split(":")[0]
        if base in EXCLUDE:
            continue
        if name.endswith(":arm64"):
            arm.add(base)
        elif ":" not in name:
            # Either an Architecture: all package or a native (amd64) one pulled in
            # through an arch:all dependency; only the former belongs in the box.
            plain.add(base)
    versions = _candidates([f"{n}:arm64" for n in sorted(arm)])
    indep = _candidates(sorted(plain - arm), arch_all_only=True)
    return sorted({**versions, **indep}.items())


def _candidates(names: list[str], arch_all_only: bool = False) -> dict[str, str]:
    if not names:
        return {}
    out = run(["apt-cache", "show", "--no-all-versions", *names], capture_output=True).stdout
    found: dict[str, str] = {}
    for para in out.split("\n\n"):
        fields = dict(
            ln.split(": ", 1) for ln in para.splitlines() if ": " in ln and not ln[0].isspace()
        )
        if "Package" not in fields or "Version" not in fields:
            continue
        if arch_all_only and fields.get("Architecture") != "all":
            continue
        found[fields["Package"]] = fields["Version"]
    return found


def deb_path(name: str, version: str) -> Path:
    v = version.replace(":", "%3a")
    d = CACHE / "debs"
    for arch in ("arm64", "all"):
        p = d / f"{name}_{v}_{arch}.deb"
        if p.exists():
            return p
    return d / f"{name}_{v}_arm64.deb"


def download(pkgs: list[tuple[str, str]]) -> list[Path]:
    d = CACHE / "debs"
    d.mkdir(parents=True, exist_ok=True)
    missing = [(n, v) for n, v in pkgs if not deb_path(n, v).exists()]
    if missing:
        log(f"downloading {len(missing)} arm64 packages into {d}")
    for n, v in missing:
        # _apt cannot write into root's home: download as root.  arm64 first, then
        # Architecture: all (which has no :arm64 form).
        for spec in (f"{n}:arm64={v}", f"{n}={v}"):
            r = subprocess.run(
                ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", spec],
                cwd=d, capture_output=True, text=True,
            )
            if r.returncode == 0 and deb_path(n, v).exists():
                break
    paths = [deb_path(n, v) for n, v in pkgs]
    lost = [p.name for p in paths if not p.exists()]
    if lost:
        raise SystemExit(f"box: download failed for {lost}")
    return paths


# --- base layer ---------------------------------------------------------------------------


def kernel_release(root: Path) -> str:
    rels = sorted(p.name for p in (root / "lib/modules").iterdir())
    if len(rels) != 1:
        raise SystemExit(f"box: expected one kernel in the image, found {rels}")
    return rels[0]


def select_modules(root: Path, kver: str) -> None:
    mdir = root / "lib/modules" / kver
    run(["depmod", "-b", str(root), kver])
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        by_name[Path(mod).name.removesuffix(".ko").replace("-", "_")] = mod
    keep: set[str] = set()
    todo = [m for m in deps if m.startswith(MODULE_DIRS)]
    todo += [by_name[n] for n in MODULES + INITRD_MODULES if n in by_name]
    while todo:
        m = todo.pop()
        if m not in keep:
            keep.add(m)
            todo.extend(deps.get(m, []))
    for ko in (mdir / "kernel").rglob("*.ko"):
        if ko.relative_to(mdir).as_posix() not in keep:
            ko.unlink()
    run(["depmod", "-b", str(root), kver])
    log(f"kept {len(keep)} kernel modules")


def compile_bytecode(root: Path, dirs: list[str]) -> None:
    # Same minor version as the box (3.11): Debian ships no .pyc, and the first imports
    # under emulation would take seconds without them.
    py = shutil.which("python3.11") or "/usr/bin/python3.11"
    targets = [str(root / d) for d in dirs if (root / d).exists()]
    run(
        [
            py,
            "-m",
            "compileall",
            "-q",
            "-j",
            "0",
            "--invalidation-mode",
            "unchecked-hash",
            "-s",
            str(root),
            "-p",
            "/",
            *targets,
        ],
        capture_output=True,
    )


def build_base(pkgs: list[tuple[str, str]], debs: list[Path]) -> Path:
    key = sha(
        RECIPE_VERSION, json.dumps(pkgs), json.dumps(sorted(MODULES)), json.dumps(MODULE_DIRS)
    )
    out = CACHE / f"base-{key}"
    if (out / ".done").exists():
        return out
    log(f"unpacking {len(debs)} packages into {out.name}")
    tmp = Path(tempfile.mkdtemp(prefix="base-", dir=CACHE))
    for deb in debs:
        run(["dpkg-deb", "-x", str(deb), str(tmp)])
    for p in PRUNE:
        shutil.rmtree(tmp / p, ignore_errors=True)
    kver = kernel_release(tmp)
    select_modules(tmp, kver)
    compile_bytecode(tmp, ["usr/lib/python3.11", "usr/lib/python3/dist-packages"])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".done").write_text(kver)
    return out


# --- python layer ------------------------------------------------------------------------


def build_pylayer() -> Path:
    req = (HERE / "requirements-guest.txt").read_text()
    key = sha(RECIPE_VERSION, req)
    out = CACHE / f"py-{key}"
    if (out / ".done").exists():
        return out
    log("installing aarch64 Python dependencies")
    tmp = Path(tempfile.mkdtemp(prefix="py-", dir=CACHE))
    target = tmp / "usr/lib/python3/dist-packages"
    wheels = tmp / "wheels"
    # Binary wheels for the box's platform where they exist (cbor2's C extension),
    # pure-Python ones otherwise; dependencies are listed explicitly, so --no-deps.
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "-q",
            "--no-deps",
            "-d",
            str(wheels),
            *PIP_PLATFORM,
            "-r",
            str(HERE / "requirements-guest.txt"),
        ]
    )
    pip_install(target, *PIP_PLATFORM, *map(str, sorted(wheels.glob("*.whl"))))
    shutil.rmtree(wheels)
    shutil.rmtree(target / "bin", ignore_errors=True)
    compile_bytecode(tmp, ["usr/lib/python3/dist-packages"])
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    (out / ".done").write_text("ok")
    return out


WHEEL_INPUTS = ("pyproject.toml", "README.md", "agent")


def build_wheel() -> Path:
    """The agent as a firmware build would install it: a wheel built with PEP 517."""
    key = sha(
        RECIPE_VERSION,
        *[
            tree_hash(REPO / n)
            if (REPO / n).is_dir()
            else (REPO / n).read_bytes()
            if (REPO / n).exists()
            else ""
            for n in WHEEL_INPUTS
        ],
    )
    d = CACHE / f"wheel-{key}"
    found = list(d.glob("agent-*.whl")) if d.exists() else []
    if found:
        return found[0]
    # Several work trees may build at once (one cache): keep the newest few wheels, and
    # build into a private directory renamed into place, never into a shared one.
    olds = sorted(CACHE.glob("wheel-*"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[6:]:
        shutil.rmtree(old, ignore_errors=True)
    out = Path(tempfile.mkdtemp(prefix=f"part-wheel-{key}-", dir=CACHE))
    src = Path(tempfile.mkdtemp(prefix="src-", dir=CACHE))
    try:
        # Build from a clean copy: no stale build/ or egg-info from the work tree.
        for name in WHEEL_INPUTS:
            s = REPO / name
            if s.is_dir():
                shutil.copytree(s, src / name, ignore=shutil.ignore_patterns("__pycache__"))
            elif s.exists():
                shutil.copy2(s, src / name)
        run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
            capture_output=True,
        )
        try:
            out.rename(d)
        except OSError:  # another build of the same inputs won: use its wheel
            shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)
    (whl,) = d.glob("agent-*.whl")
    return whl


# --- initramfs and root disk --------------------------------------------------------------

INITRD_INIT = """#!/bin/busybox sh
# Stage 1: load the modules for the virtio disk, mount it, switch_root into it.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in {modules}; do /bin/busybox insmod /lib/modules/$m.ko 2>/dev/null; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do /bin/busybox usleep 20000; i=$((i+1)); done
/bin/busybox mount -t ext4 -o rw /dev/vda /newroot || {{
    echo "box: cannot mount the root disk"; exec /bin/busybox sh; }}
/bin/busybox umount /proc
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
"""


def build_initrd(base: Path) -> Path:
    kver = (base / ".done").read_text()
    mdir = base / "lib/modules" / kver
    by_name = {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in mdir.rglob("*.ko")}
    missing = [m for m in INITRD_MODULES if m not in by_name]
    if missing:
        raise SystemExit(f"box: initramfs modules not found: {missing}")
    key = sha(
        RECIPE_VERSION, INITRD_INIT, kver, *INITRD_MODULES, (base / "bin/busybox").read_bytes()
    )
    out = CACHE / f"initrd-{key}.gz"
    if out.exists():
        return out
    log("building the initramfs")
    tmp = Path(tempfile.mkdtemp(prefix="initrd-", dir=CACHE))
    try:
        for d in ("bin", "proc", "dev", "newroot", "lib/modules"):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(base / "bin/busybox", tmp / "bin/busybox")
        for m in INITRD_MODULES:
            shutil.copy2(by_name[m], tmp / "lib/modules" / f"{m}.ko")
        init = tmp / "init"
        init.write_text(INITRD_INIT.format(modules=" ".join(INITRD_MODULES)))
        init.chmod(0o755)
        files = subprocess.run(["find", "."], cwd=tmp, check=True, capture_output=True).stdout
        cpio = subprocess.run(
            ["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"],
            cwd=tmp,
            input=files,
            check=True,
            capture_output=True,
        ).stdout
        part = out.with_suffix(".part")
        subprocess.run(["gzip", "-9"], input=cpio, stdout=part.open("wb"), check=True)
        part.rename(out)
    finally:
        shutil.rmtree(tmp)
    return out


def pip_install(target: Path, *args: str) -> None:
    """Install wheels into ``target`` as a firmware build does: no deps, no bytecode
    (compiled later for the box's Python), no scripts (ours are written by hand)."""
    run([sys.executable, "-m", "pip", "install", "-q", "--root-user-action=ignore",
         "--no-deps", "--no-compile", "--target", str(target), *args])


def install_wheel(whl: Path, root: Path) -> None:
    target = root / "usr/lib/python3/dist-packages"
    pip_install(target, str(whl))
    shutil.rmtree(target / "bin", ignore_errors=True)
    for script, func in (("agentd", "agent.daemon.main"), ("agentctl", "agent.cli.main")):
        p = root / "usr/bin" / script
        p.write_text(f"#!/usr/bin/python3\nimport sys\nfrom {func} import main\nsys.exit(main())\n")
        p.chmod(0o755)
    compile_bytecode(root, ["usr/lib/python3/dist-packages/agent"])
    # The installed agent's seal, bytecode included (what runs): the master checks its
    # files against it before it re-executes itself (docs/master.md, respawn).
    seal = root / "usr/share/agent/agent.seal"
    seal.parent.mkdir(parents=True, exist_ok=True)
    run([sys.executable, "-m", "agent.cli.seal", "build",
         str(root / "usr/lib/python3/dist-packages/agent"), "-o", str(seal)],
        cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def copy_tree(src: Path, dst: Path) -> None:
    """Copy src over dst, replacing files (never writing through hard links)."""
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        t = dst / rel
        if p.is_dir() and not p.is_symlink():
            t.mkdir(parents=True, exist_ok=True)
            continue
        if t.exists() or t.is_symlink():
            t.unlink()
        t.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            t.symlink_to(os.readlink(p))
        else:
            shutil.copy2(p, t)
            os.chown(t, 0, 0)


# The demo services' image (rootfs-overlay/etc/agent/services/demo-*.toml): a read-only
# root with a static busybox.  busybox cannot run on the build host to list its applets,
# so the links are made for this list, which covers the demo services and the tests.
DEMO_APPLETS = (
    "sh ash echo cat ls ps sleep true false id hostname mount umount mkdir rmdir touch rm "
    "cp mv ln dd head tail wc grep sed awk env printf kill httpd wget nc uname date "
    "stat chmod chown df du free top yes seq sort uniq tr cut readlink realpath ip ping "
    "test [ [[ find xargs which whoami sync usleep nproc"
).split()


def build_demo_image(base: Path, stage: Path) -> None:
    root = stage / "usr/share/agent/images/demo"
    for d in ("bin", "dev", "proc", "sys", "tmp", "run", "data", "etc", "www", "root"):
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(base / "bin/busybox", root / "bin/busybox")
    for a in DEMO_APPLETS:
        (root / "bin" / a).symlink_to("busybox")
    (root / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nservice:x:1000:1000:service:/www:/bin/sh\n"
    )
    (root / "etc/group").write_text("root:x:0:\nservice:x:1000:\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n")
    (root / "www/index.html").write_text("<h1>hello from demo-web, a cell</h1>\n")
    (root / "tmp").chmod(0o1777)
    # Its seal, beside it (<image>.seal, docs/exec.md): channel 1 lets its cells execute
    # only what it lists; the writable areas are left out.
    run([sys.executable, "-m", "agent.cli.seal", "build", str(root), "-o",
         f"{root}.seal", "--skip", "tmp", "--skip", "data", "--skip", "run"],
        cwd=REPO, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


@dataclass
class Image:
    kernel: Path
    initrd: Path
    rootdisk: Path
    kver: str
    build_seconds: float


def build(verbose: bool = True) -> Image:
    t0 = time.monotonic()
    if os.geteuid() != 0:
        raise SystemExit("box: building the image needs root (files in it are owned by root)")
    CACHE.mkdir(parents=True, exist_ok=True)
    pkgs = resolve()
    debs = download(pkgs)
    base = build_base(pkgs, debs)
    kver = (base / ".done").read_text()
    py = build_pylayer()
    initrd = build_initrd(base)
    whl = build_wheel()
    overlay = REPO / "rootfs-overlay"
    guest = HERE / "guest"
    key = sha(
        RECIPE_VERSION,
        base.name,
        py.name,
        whl.read_bytes(),
        tree_hash(overlay) if overlay.exists() else "",
        tree_hash(guest),
        Path(__file__).read_bytes(),
    )
    disk = CACHE / f"root-{key}.ext4"
    if not disk.exists():
        log(f"assembling the root disk {disk.name}")
        stage = Path(tempfile.mkdtemp(prefix="stage-", dir=CACHE))
        try:
            # Hard links: no data copied from the cached layers; later layers replace
            # files by unlinking first (copy_tree), so the cache is never written through.
            run(["cp", "-al", f"{base}/.", str(stage)])
            (stage / ".done").unlink()
            run(["cp", "-al", f"{py}/usr/.", str(stage / "usr")])
            install_wheel(whl, stage)
            if overlay.exists():
                copy_tree(overlay, stage)
            copy_tree(guest / "rootfs", stage)
            build_demo_image(base, stage)
            for d in (
                "proc",
                "sys",
                "dev",
                "run",
                "tmp",
                "mnt/host",
                "mnt/src",
                "root",
                "var/lib/agent",
                "var/log",
                "sys/fs/cgroup",
            ):
                (stage / d).mkdir(parents=True, exist_ok=True)
            (stage / "tmp").chmod(0o1777)
            # /var/run is /run, as in Buildroot's skeleton and Yocto's base-files (the
            # init scripts keep their pid files there).
            if not (stage / "var/run").exists() and not (stage / "var/run").is_symlink():
                (stage / "var/run").symlink_to("../run")
            # The kernel is passed to QEMU directly; keep only its config, which
            # `agentctl checkconfig` reads as /boot/config-<release> (like lxc-checkconfig).
            for f in (stage / "boot").iterdir():
                if not f.name.startswith("config-"):
                    f.unlink()
            part = disk.with_suffix(f".part-{os.getpid()}")
            used = int(run(["du", "-sm", str(stage)], capture_output=True).stdout.split()[0])
            size_mb = used + 160  # room for the agent's state, logs and test files
            run(
                [
                    "mke2fs",
                    "-q",
                    "-F",
                    "-t",
                    "ext4",
                    "-O",
                    "^has_journal",
                    "-L",
                    "agentbox",
                    "-d",
                    str(stage),
                    str(part),
                    f"{size_mb}M",
                ],
                capture_output=True,
            )
            part.rename(disk)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        prune_old(disk)
    kernel = base / "boot" / f"vmlinuz-{kver}"
    return Image(kernel, initrd, disk, kver, time.monotonic() - t0)


def make_state_disk(path: Path, size_mb: int = 32) -> Path:
    """A persistent state disk for the box (``qemu/box --state-disk``): an empty ext4
    *with* its journal (unlike the root disk), so that a power cut leaves a file system
    the next mount repairs, as on a box's flash partition."""
    part = path.with_name(path.name + ".part")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "agent-state", str(part), f"{size_mb}M"],
        capture_output=True)
    part.rename(path)
    return path


def read_from_disk(disk: Path, inner: str) -> bytes | None:
    """The file ``inner`` of an ext4 image as the next mount would see it: a copy of the
    image has its ext4 journal replayed (``e2fsck -fy``), then ``debugfs`` dumps the file.
    The image itself is not touched.  None if the file does not exist."""
    with tempfile.TemporaryDirectory(prefix="state-disk-") as tmp:
        copy = Path(tmp) / "disk"
        shutil.copyfile(disk, copy)
        fsck = subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, text=True)
        if fsck.returncode not in (0, 1):  # 1: errors corrected (a replayed journal, orphans)
            raise RuntimeError(f"e2fsck {disk} exited {fsck.returncode}: {fsck.stdout[-2000:]}")
        out = Path(tmp) / "file"
        run(["debugfs", "-R", f"dump -p {inner} {out}", str(copy)], capture_output=True)
        return out.read_bytes() if out.exists() else None


def prune_old(keep: Path) -> None:
    """Keep the newest few root disks only; they are 300+ MB each (a few: several work
    trees may be booting boxes from their own disks at once)."""
    disks = sorted(CACHE.glob("root-*.ext4"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in disks[8:]:
        if old != keep:
            old.unlink()


def main() -> int:
    img = build()
    print(
        json.dumps(
            {
                "kernel": str(img.kernel),
                "initrd": str(img.initrd),
                "rootdisk": str(img.rootdisk),
                "kver": img.kver,
                "build_seconds": round(img.build_seconds, 1),
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
