"""The correlation service's files: pinned keys, bundle pairs, the drop and store dirs.

* Keys: ``<keys_dir>/*.pub``, each one ``ed25519-public HEX`` line (:func:`load_keys`).
* A *pair* is ``NAME.bundle`` and ``NAME.bundle.sig`` side by side (:func:`read_pair`).
  Files are opened ``O_NOFOLLOW`` and must be regular; at most a byte over the bundle
  limit is read, so an oversized file is refused without being read whole.
* The update (drop) directory is a spool: the service processes each complete pair
  once and removes it (:func:`consume`, only if the files are still the ones read);
  names starting with a dot, and anything but ``*.bundle``/``*.bundle.sig``, are left
  alone (an updater writes under such a name, then renames).
* The store (:class:`Store`) keeps what was loaded from the update directory, as
  ``v<VERSION>.bundle`` + ``.sig``: the current bundle and the one before it, so a
  restart loads them again in order and a rollback survives one.

Everything is written atomically: a temporary file, fsync, rename, fsync of the dir.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent.core.errors import KernelError
from agent.kernel.journal import fsync_dir
from agent.monitor.correlation import bundle as bnd

__all__ = ["Pair", "Store", "consume", "load_keys", "peek_version", "read_pair", "stems",
           "write_atomic"]

BUNDLE, SIG = ".bundle", ".bundle.sig"
_STEM = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_STORED = re.compile(r"v(\d{1,19})")
_SIG_READ = 4096  # a signature is 64 bytes; more is refused by the check, unread


@dataclass(frozen=True)
class Pair:
    stem: str
    data: bytes
    sig: bytes
    ids: tuple[tuple[int, int], tuple[int, int]]  # (dev, ino) of bundle and signature


def load_keys(keys_dir: Path) -> tuple[list[bytes], list[tuple[Path, bnd.BundleError]]]:
    """The pinned public keys, and the key files that are not one (with the error)."""
    keys: list[bytes] = []
    bad: list[tuple[Path, bnd.BundleError]] = []
    try:
        paths = sorted(p for p in keys_dir.iterdir() if p.name.endswith(".pub"))
    except FileNotFoundError:
        return keys, bad
    for p in paths:
        try:
            text = _read_regular(p, 64 << 10).decode("utf-8", "replace")
            key = bnd.parse_key(text, "public", str(p))
        except bnd.BundleError as exc:
            bad.append((p, exc))
            continue
        except OSError as exc:
            bad.append((p, bnd.BundleError("E_BUNDLE_KEY", f"{p}: {exc.strerror or exc}",
                                           "the key file must be a readable regular file")))
            continue
        if key not in keys:
            keys.append(key)
    return keys, bad


def _read_regular(path: Path, limit: int) -> bytes:
    """At most ``limit`` bytes of a regular file, not through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(0, "not a regular file")
        chunks = []
        left = limit
        while left > 0:
            b = os.read(fd, min(left, 1 << 20))
            if not b:
                break
            chunks.append(b)
            left -= len(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _ident(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def read_pair(directory: Path, stem: str) -> Pair | None:
    """The pair ``stem`` of ``directory`` if both halves are there (None: wait for the
    other half).  Raises OSError when a half cannot be read."""
    b, s = directory / (stem + BUNDLE), directory / (stem + SIG)
    ib, isig = _ident(b), _ident(s)
    if ib is None or isig is None:
        return None
    data = _read_regular(b, bnd.MAX_BUNDLE_BYTES + 1)
    sig = _read_regular(s, _SIG_READ)
    return Pair(stem, data, sig, (ib, isig))


def consume(directory: Path, pair: Pair) -> None:
    """Remove ``pair``'s files, each only if it is still the file that was read (an
    updater may have put a new one there since)."""
    for path, ident in zip((directory / (pair.stem + BUNDLE), directory / (pair.stem + SIG)),
                           pair.ids, strict=True):
        if _ident(path) == ident:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def stems(directory: Path) -> list[str]:
    """The names of the pairs (complete or not) in ``directory``."""
    out: set[str] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        stem = stem_of(name)
        if stem is not None:
            out.add(stem)
    return sorted(out)


def stem_of(name: str) -> str | None:
    """The pair a file name belongs to, or None when the service must ignore it."""
    for suffix in (SIG, BUNDLE):
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return stem if _STEM.fullmatch(stem) else None
    return None


def peek_version(data: bytes) -> int:
    """The version a bundle claims, unverified: only to order pairs (0 if unreadable)."""
    try:
        v = cbor2.loads(data).get("version")
    except Exception:  # cbor2 raises many kinds; the real check refuses it later
        return 0
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """``path`` holds ``data``, or what it held before: never a part (KernelError)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KernelError.from_oserror("write", str(path), exc,
                                       "is the state directory full or read-only?") from None


class Store:
    """Bundles loaded from the update directory (see the module doc)."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory

    def versions(self) -> list[int]:
        """Stored versions with both halves, lowest first."""
        out = []
        for stem in stems(self.dir):
            m = _STORED.fullmatch(stem)
            if m and (self.dir / (stem + BUNDLE)).exists() and (self.dir / (stem + SIG)).exists():
                out.append(int(m.group(1)))
        return sorted(out)

    def read(self, version: int) -> Pair | None:
        return read_pair(self.dir, f"v{version}")

    def put(self, version: int, data: bytes, sig: bytes) -> None:
        """Store a pair: the signature first, so a pair is complete only when whole."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.dir / f"v{version}{SIG}", sig)
        write_atomic(self.dir / f"v{version}{BUNDLE}", data)

    def remove(self, version: int) -> None:
        for suffix in (BUNDLE, SIG):  # the bundle first: a lone .sig is never loaded
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"v{version}{suffix}").unlink()

    def keep(self, versions: set[int]) -> list[int]:
        """Remove every stored pair (and stray half) but ``versions``; those removed."""
        gone = []
        for stem in stems(self.dir):
            m = _STORED.fullmatch(stem)
            if m is None or int(m.group(1)) not in versions:
                for suffix in (BUNDLE, SIG):
                    with contextlib.suppress(FileNotFoundError):
                        (self.dir / (stem + suffix)).unlink()
                if m is not None:
                    gone.append(int(m.group(1)))
        return gone

    def __iter__(self) -> Iterator[int]:
        return iter(self.versions())
