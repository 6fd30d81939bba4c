"""Data dirs in the box (issue 10, docs/data-dirs.md): keyed by the service's name, bounded
by their own ext4 image, shared only when the policy says so.

Each cell is a python probe (cellkit) with ``[[writable]] kind = "data"`` at ``/data``;
what it saw comes back as ``RESULT {json}``.  The images a test makes are removed after
it (operators remove a retired service's image the same way), so admission in later
tests of the same boot sees the state file system as before.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cellkit import (
    RUN_CELLS,
    SERVICES,
    clean,
    ctl,
    journal_live,
    kill9_and_restart,
    probe,
    ps,
    py_image,
    refused,
    restart_agentd,
    start,
    start_probe,
    stop_all,
    timed_status,
    write_manifest,
)

__all__ = ["clean"]

IMAGES = Path("/var/lib/agent/data")
POLICY = Path("/etc/agent/policy.toml")
MiB = 1 << 20
RESERVE = 16 * MiB  # agentd.toml's data.state_reserve (the shipped default)


def data(size: str | None = "4M", source: str | None = None) -> str:
    lines = ["[[writable]]", 'kind = "data"', 'path = "/data"']
    if size is not None:
        lines.append(f'size = "{size}"')
    if source is not None:
        lines.append(f'source = "{source}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def images() -> Iterator[list[str]]:
    """Names whose images are removed after the test (list it before ``clean``: it is
    torn down after the cells are stopped)."""
    names: list[str] = []
    yield names
    stop_all()
    for n in names:
        (IMAGES / f"{n}.img").unlink(missing_ok=True)


OWNER = r'''
import socket, time
me = socket.gethostname()
first = not os.path.exists("/data/who")
if first:
    with open("/data/who", "w") as f:
        f.write(me)
def again():
    with open("/data/again", "w") as f:
        f.write(me)
st = os.stat("/data")
result({"who": open("/data/who").read(), "first": first, "root": [st.st_uid, st.st_gid],
        "write": oserr(again), "map": open("/proc/self/uid_map").read().split()})
while True:
    time.sleep(3600)
'''


def round_of(names: list[str]) -> dict[str, dict[str, Any]]:
    """Start ``names`` in this order (all alive at once); what each saw; stop them."""
    seen = {}
    for n in names:
        _, seen[n] = start_probe(n, OWNER, extra=data())
        host = os.stat(RUN_CELLS / n / "data")  # the image's root on the host
        seen[n]["host_root"] = [host.st_uid, host.st_gid]
    stop_all()
    return seen


@pytest.mark.usefixtures("images", clean.__name__)
def test_each_cell_keeps_its_data_across_restarts_in_any_order(images: list[str]) -> None:
    names = ["dd-own-a", "dd-own-b", "dd-own-c"]
    images += names
    first = round_of(names)
    for n, r in first.items():
        assert r["first"] and r["who"] == n and r["write"] == "ok", r
        assert r["root"] == [0, 0], r  # the service's own root inside the cell
        base = int(r["map"][1])
        assert r["host_root"] == [base, base] and base >= 100_000, r
    bases = {n: r["map"][1] for n, r in first.items()}
    assert len(set(bases.values())) == 3, bases  # three services, three uid ranges
    for restart, order in ((restart_agentd, [names[2], names[1], names[0]]),
                           (kill9_and_restart, [names[1], names[2], names[0]])):
        restart()
        seen = round_of(order)
        for n, r in seen.items():
            # created in another order, after another agentd: the same range, its own data
            assert not r["first"] and r["who"] == n and r["write"] == "ok", (n, r)
            assert r["root"] == [0, 0] and r["map"][1] == bases[n], (n, r, bases)


FILL = r'''
import errno, time
n, err = 0, None
try:
    with open("/data/fill", "wb") as f:
        while True:
            f.write(b"\xa5" * 65536)
            n += 1
            if n % 16 == 0:
                f.flush()
                os.fsync(f.fileno())
except OSError as e:
    err = errno.errorcode.get(e.errno, str(e.errno))
def small():
    with open("/data/small", "w") as f:
        f.write("x" * 4096)
result({"err": err, "written": n * 65536, "after": oserr(small)})
while True:
    time.sleep(3600)
'''

NEIGHBOUR = r'''
def write():
    with open("/data/n", "wb") as f:
        f.write(b"n" * (1 << 20))
        f.flush()
        os.fsync(f.fileno())
result({"write": oserr(write)})
'''


@pytest.mark.usefixtures("images", clean.__name__)
def test_a_full_data_dir_is_enospc_and_nothing_else_fills(images: list[str]) -> None:
    images += ["dd-fill", "dd-neighbour"]
    free_before = shutil.disk_usage(IMAGES.parent).free
    _, r = start_probe("dd-fill", FILL, extra=data("8M"))
    assert r["err"] == "ENOSPC" and r["after"] == "ENOSPC", r
    assert 4 * MiB < r["written"] <= 8 * MiB, r
    img = IMAGES / "dd-fill.img"
    assert img.stat().st_size == 8 * MiB  # the image cannot grow past its size
    assert free_before - shutil.disk_usage(IMAGES.parent).free < 10 * MiB
    # with the cell's data dir full: agentd answers, journals, runs other cells.  (The
    # bound is functional: agentctl alone takes 1.6-5.4 s in a box on a loaded host.)
    timed_status(30)
    assert start("dd-other", ["sleep", "3600"])["state"] == "running"
    assert "dd-other" in journal_live()["cells"]  # journaled (fsynced) beside the full image
    n = probe("dd-neighbour", NEIGHBOUR, extra=data("8M"))
    assert n["write"] == "ok", n  # another cell's data dir has its own room
    assert ps()["dd-fill"]["state"] == "running"
    timed_status(30)


def _room() -> int:
    """What admission leaves for new images: free bytes minus the journal's reserve and
    what the images there may still grow by (docs/data-dirs.md)."""
    st = os.statvfs(IMAGES.parent)
    growth = 0
    if IMAGES.is_dir():
        for p in IMAGES.glob("*.img"):
            s = p.stat()
            growth += max(0, s.st_size - s.st_blocks * 512)
    return st.f_bavail * st.f_frsize - RESERVE - growth


@pytest.mark.usefixtures("images", clean.__name__)
def test_admission_refuses_images_the_state_fs_cannot_hold(images: list[str]) -> None:
    images += ["dd-big", "dd-fits"]
    room = _room()
    big = (room + 8 * MiB) // MiB + 1
    fits = (room - 8 * MiB) // MiB
    if not 4 <= fits < big <= 256:
        pytest.fail(f"the box's state fs has {room / MiB:.0f} MiB of room: the test needs "
                    "between 12 and 248 (data.max_size is 256M)")
    write_manifest("dd-big", ["-c", "pass"], command="/usr/bin/python3",
                   image=py_image(), oneshot=True, extra=data(f"{big}M"))
    err = refused("run", "dd-big")
    assert "E_DATA_SPACE" in err and "journal's reserve" in err, err
    assert not (IMAGES / "dd-big.img").exists() and "dd-big" not in ps()
    write_manifest("dd-fits", ["-c", "import time; time.sleep(3600)"],
                   command="/usr/bin/python3", image=py_image(), extra=data(f"{fits}M"))
    ctl("run", "dd-fits")
    st = (IMAGES / "dd-fits.img").stat()
    assert st.st_size == fits * MiB and st.st_blocks * 512 < st.st_size // 4  # sparse
    err = refused("run", "dd-big")  # dd-fits' image is counted at its full size now
    assert "E_DATA_SPACE" in err
    for name in ("dd-big", "dd-fits"):
        (SERVICES / f"{name}.toml").unlink()


SHARED = r'''
import time
def write():
    with open("/data/song", "w") as f:
        f.write("la")
    os.chmod("/data/song", 0o644)
    os.chmod("/data", 0o755)  # the owner opens its data dir to the readers it trusts
result({"write": oserr(write)})
while True:
    time.sleep(3600)
'''

READER = r'''
def write():
    with open("/data/x", "w") as f:
        f.write("no")
st = os.stat("/data/song")
result({"song": open("/data/song").read(), "write": oserr(write), "owner": st.st_uid,
        "ro": any(l.split()[4] == "/data" and "ro" in l.split()[5].split(",")
                  for l in open("/proc/self/mountinfo"))})
'''


@pytest.fixture
def policy() -> Iterator[str]:
    """The shipped policy, restored (and agentd restarted with it) after the test."""
    text = POLICY.read_text()
    yield text
    POLICY.write_text(text)
    restart_agentd()


@pytest.mark.usefixtures("images", "policy", clean.__name__)
def test_another_services_data_dir_only_by_a_share_and_read_only(images: list[str],
                                                                 policy: str) -> None:
    images += ["dd-owner"]
    _, own = start_probe("dd-owner", SHARED, extra=data())
    assert own["write"] == "ok", own
    write_manifest("dd-reader", ["-S", "-B", "/probes/dd-reader.py"],
                   command="/usr/bin/python3", image=py_image(), oneshot=True,
                   extra=data(None, source="dd-owner"))
    err = refused("run", "dd-reader")
    assert "E_POLICY_SHARE" in err and "data dir of service dd-owner" in err, err
    assert "dd-reader" not in ps() and not (RUN_CELLS / "dd-reader").exists()
    POLICY.write_text(policy + '\n[[share]]\ndata = "dd-owner"\nreaders = ["dd-reader"]\n')
    restart_agentd()  # the owner is adopted, still running
    assert ps()["dd-owner"]["state"] == "running"
    r = probe("dd-reader", READER, extra=data(None, source="dd-owner"))
    assert r["song"] == "la" and r["write"] == "EROFS" and r["ro"], r
    assert r["owner"] == 65534, r  # the owner's files: ids of another range, unmapped here
    assert not (IMAGES / "dd-reader.img").exists()  # a reader makes no image of its own


def test_loop_and_e2fsprogs_are_in_the_box() -> None:
    """What the adapter needs: the loop driver and e2fsprogs (mke2fs, e2fsck, resize2fs)."""
    assert Path("/dev/loop-control").exists()
    for tool in ("mke2fs", "e2fsck", "resize2fs"):
        r = subprocess.run([tool, "-V"], capture_output=True, text=True)
        assert r.stderr.startswith(f"{tool} 1."), (tool, r.stderr)  # e2fsprogs, not busybox
