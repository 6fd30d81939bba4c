"""Data images on the host's real kernel: loop devices, ext4, ownership (agent.kernel.dataimage).

Everything is made under a temp dir and taken down after: images, mount points, and the
loop devices (they are bound with autoclear: after the last unmount the kernel frees
them, which the fixture checks).  e2fsprogs (mke2fs, e2fsck, resize2fs, debugfs) is
installed by ./dev test; missing, the tests fail rather than skip.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.core.cellctx import DataMount
from agent.core.errors import AgentError, KernelError, NotFoundError
from agent.core.names import HOSTS_FILE
from agent.core.reclaim import BoxView, CollectOrphan, KernelObject, ReclaimConfig, reclaim_pass
from agent.kernel import loopdev
from agent.kernel.dataimage import DataImages, fs_size
from agent.kernel.dirs import CellDirs, remove_tree
from agent.kernel.orphans import KernelObjects

MiB = 1 << 20
BASE_A, BASE_B, COUNT = 300_000, 365_536, 65_536


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("mke2fs", "e2fsck", "resize2fs", "debugfs"):
        if shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin") is None:
            pytest.fail(f"{tool} is not installed: ./dev test installs it (e2fsprogs)")
    if not Path("/dev/loop-control").exists():
        pytest.fail("no /dev/loop-control: the host kernel needs the loop driver")


@pytest.fixture
def images(tmp_path: Path) -> Iterator[DataImages]:
    di = DataImages()
    yield di
    for mount in sorted(tmp_path.rglob("*")):
        if mount.is_dir() and os.path.ismount(mount):
            di.unmount(mount)
    for img in tmp_path.rglob("*.img"):
        assert loopdev.find(img) is None, f"loop device left bound to {img}"


def released(image: Path) -> None:
    """Wait until the kernel has let go of the image's loop device (autoclear may run in a
    work queue after the last unmount): debugfs below edits the file behind the loop
    device's cache, which only a released image makes a fair test of the check."""
    deadline = time.monotonic() + 10
    while (found := loopdev.find(image)) is not None:
        os.close(found[1])
        assert time.monotonic() < deadline, f"{image} still bound to {found[0]}"
        time.sleep(0.01)


def request(tmp: Path, name: str = "web", cell: str | None = None, *, size: int = 8 * MiB,
            base: int = BASE_A, uid: int = 1000, readonly: bool = False) -> DataMount:
    run = tmp / "run/cells" / (cell or name)
    run.mkdir(parents=True, exist_ok=True)  # PrepareDirs' run dir, made before MountData
    return DataMount(tmp / "state/data" / f"{name}.img", run / "data", 0 if readonly else size,
                     base + uid, base + uid, base, COUNT, readonly)


def test_made_on_first_use_sparse_owned_and_kept(tmp_path: Path, images: DataImages) -> None:
    req = request(tmp_path)
    out = images.mount(req)
    assert out["made"] is True and out["device"].startswith("/dev/loop")
    assert os.path.ismount(req.mount)
    st = req.image.stat()
    assert st.st_size == 8 * MiB and st.st_blocks * 512 < 4 * MiB  # sparse
    assert st.st_mode & 0o777 == 0o600
    root = os.stat(req.mount)
    assert (root.st_uid, root.st_gid, root.st_mode & 0o777) == (BASE_A + 1000, BASE_A + 1000,
                                                                0o700)
    lf = os.stat(req.mount / "lost+found")
    assert (lf.st_uid, lf.st_gid) == (BASE_A + 1000, BASE_A + 1000)
    (req.mount / "db").write_text("precious")
    images.unmount(req.mount)
    assert not req.mount.exists() and loopdev.find(req.image) is None  # autoclear
    again = images.mount(req)
    assert again["made"] is False and (req.mount / "db").read_text() == "precious"
    images.unmount(req.mount)
    images.unmount(req.mount)  # nothing mounted: fine


def test_a_full_image_is_enospc_for_its_writer_only(tmp_path: Path,
                                                    images: DataImages) -> None:
    req = request(tmp_path)
    images.mount(req)
    before = shutil.disk_usage(tmp_path).free
    with pytest.raises(OSError) as ei, open(req.mount / "fill", "wb") as f:
        for _ in range(64):
            f.write(b"\xa5" * MiB)
            f.flush()
            os.fsync(f.fileno())
    assert ei.value.errno == errno.ENOSPC
    assert req.image.stat().st_size == 8 * MiB  # the image did not grow past its size
    assert before - shutil.disk_usage(tmp_path).free <= 9 * MiB
    (tmp_path / "outside").write_bytes(b"x" * MiB)  # the state fs still takes writes


def test_a_reader_shares_the_loop_device_read_only(tmp_path: Path,
                                                   images: DataImages) -> None:
    owner = request(tmp_path)
    reader = request(tmp_path, cell="player", readonly=True)
    with pytest.raises(NotFoundError) as ei:
        images.mount(reader)
    assert ei.value.code == "E_DATA_SOURCE"
    dev = images.mount(owner)["device"]
    (owner.mount / "song").write_text("la")
    (owner.mount / "song").chmod(0o644)
    os.chmod(owner.mount, 0o755)  # the owner opens its root to readers
    assert images.mount(reader)["device"] == dev  # one loop device, one superblock
    assert (reader.mount / "song").read_text() == "la"
    with pytest.raises(OSError) as e2:
        (reader.mount / "x").write_text("no")
    assert e2.value.errno == errno.EROFS
    (owner.mount / "song").write_text("la la")
    assert (reader.mount / "song").read_text() == "la la"
    images.unmount(owner.mount)  # the reader keeps its mount
    assert (reader.mount / "song").read_text() == "la la"
    images.unmount(reader.mount)


def test_grown_offline_never_shrunk(tmp_path: Path, images: DataImages) -> None:
    req = request(tmp_path)
    images.mount(req)
    (req.mount / "keep").write_text("x")
    images.unmount(req.mount)
    small = fs_size(req.image)[0]
    out = images.mount(replace(req, size=24 * MiB))
    assert out["grown"] is True and fs_size(req.image)[0] == 24 * MiB > small
    assert (req.mount / "keep").read_text() == "x"
    assert shutil.disk_usage(req.mount).total > 16 * MiB
    images.unmount(req.mount)
    assert images.mount(req)["grown"] is False  # asks 8M: stays 24M
    assert fs_size(req.image)[0] == 24 * MiB and req.image.stat().st_size == 24 * MiB
    images.unmount(req.mount)


def test_files_of_another_range_are_shifted_into_the_cells(tmp_path: Path,
                                                           images: DataImages) -> None:
    req = request(tmp_path)
    images.mount(req)
    (req.mount / "d").mkdir()
    (req.mount / "d/f").write_text("x")
    os.symlink("f", req.mount / "d/l")
    for p in ("d", "d/f"):
        os.chown(req.mount / p, BASE_A + 5, BASE_A + 6)
    os.lchown(req.mount / "d/l", BASE_A + 7, BASE_A + 7)
    os.chown(req.mount / "d/f", BASE_A + 5, 0)  # an id outside the old range stays
    images.unmount(req.mount)
    moved = replace(req, uid=BASE_B + 1000, gid=BASE_B + 1000, id_base=BASE_B)
    assert images.mount(moved)["shifted_from"] == BASE_A
    ids = {p: (os.lstat(req.mount / p).st_uid, os.lstat(req.mount / p).st_gid)
           for p in ("", "d", "d/f", "d/l", "lost+found")}
    assert ids == {"": (BASE_B + 1000, BASE_B + 1000), "d": (BASE_B + 5, BASE_B + 6),
                   "d/f": (BASE_B + 5, 0), "d/l": (BASE_B + 7, BASE_B + 7),
                   "lost+found": (BASE_B + 1000, BASE_B + 1000)}
    images.unmount(req.mount)
    assert images.mount(moved)["shifted_from"] is None  # in range now: nothing to do
    images.unmount(req.mount)


def test_a_damaged_file_system_is_repaired_before_it_is_mounted(tmp_path: Path,
                                                                images: DataImages) -> None:
    req = request(tmp_path)
    images.mount(req)
    (req.mount / "lost").write_text("x" * 10_000)
    (req.mount / "kept").write_text("y")
    images.unmount(req.mount)
    released(req.image)
    # clear the inode of `lost` behind ext4's back (its dir entry now points at nothing)
    # and mark the file system not cleanly unmounted, as a power cut leaves it
    for cmd in ("clri /lost", "ssv state 0"):
        subprocess.run(["debugfs", "-w", "-R", cmd, str(req.image)], check=True,
                       capture_output=True)
    assert subprocess.run(["e2fsck", "-n", str(req.image)],
                          capture_output=True).returncode == 4  # errors left
    images.mount(req)
    assert (req.mount / "kept").read_text() == "y" and not (req.mount / "lost").exists()
    images.unmount(req.mount)
    assert subprocess.run(["e2fsck", "-fn", str(req.image)],
                          capture_output=True).returncode == 0


def debugfs(image: Path, cmd: str) -> str:
    return subprocess.run(["debugfs", "-w", "-R", cmd, str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_what_preening_may_not_fix_is_fixed_unattended(tmp_path: Path, images: DataImages,
                                                       caplog: pytest.LogCaptureFixture
                                                       ) -> None:
    req = request(tmp_path)
    images.mount(req)
    for name in ("a", "b", "kept"):
        (req.mount / name).write_text(name)
    images.unmount(req.mount)
    released(req.image)
    block = debugfs(req.image, "bmap /a 0")
    debugfs(req.image, f"sif /b block[5] {block}")  # b's extent now starts at a's block
    debugfs(req.image, "ssv state 0")
    assert subprocess.run(["e2fsck", "-p", str(req.image)],
                          capture_output=True).returncode == 4  # "RUN fsck MANUALLY"
    images.mount(req)
    assert "repairing with e2fsck -y" in caplog.text
    assert (req.mount / "kept").read_text() == "kept"
    images.unmount(req.mount)
    assert subprocess.run(["e2fsck", "-fn", str(req.image)],
                          capture_output=True).returncode == 0


def test_what_is_not_an_image_is_refused_and_nothing_stays_mounted(
        tmp_path: Path, images: DataImages) -> None:
    req = request(tmp_path)
    req.image.parent.mkdir(parents=True)
    req.image.write_bytes(b"\0" * (2 * MiB))
    with pytest.raises(AgentError) as ei:
        images.mount(req)
    assert ei.value.code == "E_DATA_FSCK" and "no ext4" in ei.value.message
    assert not os.path.ismount(req.mount) and loopdev.find(req.image) is None


def test_missing_tools_and_loop_driver_are_named(tmp_path: Path) -> None:
    req = request(tmp_path)
    with pytest.raises(AgentError) as ei:
        DataImages(tools=str(tmp_path / "nowhere")).mount(req)
    assert ei.value.code == "E_DATA_TOOL" and "e2fsprogs" in (ei.value.hint or "")
    assert not req.image.exists()  # the half-made image went with it
    images = DataImages(dev=tmp_path / "nodev")  # a kernel without the loop driver
    with pytest.raises(KernelError) as e2:
        images.mount(req)
    assert "CONFIG_BLK_DEV_LOOP" in (e2.value.hint or "")
    assert not os.path.ismount(req.mount)


def test_a_run_dir_is_never_removed_through_a_mount(tmp_path: Path,
                                                    images: DataImages) -> None:
    req = request(tmp_path)
    dirs = CellDirs(images)
    run = req.mount.parent
    dirs.make_run_dir(run, "127.0.0.1\tlocalhost\n")
    images.mount(req)
    (req.mount / "db").write_text("precious")
    with pytest.raises(KernelError) as ei:
        dirs.remove_run_dir(run)
    assert ei.value.errno == errno.EBUSY and str(req.mount) in ei.value.message
    dirs.discard_run_dir(run)  # the undo path: quietly keeps everything
    assert (req.mount / "db").read_text() == "precious" and (run / HOSTS_FILE).exists()
    dirs.unmount_data(req.mount)
    dirs.remove_run_dir(run)
    assert not run.exists()
    remove_tree(run)  # gone: fine
    usage = dirs.data_usage(req.image.parent, tmp_path)
    assert usage.images["web"].size == 8 * MiB and usage.avail > 0


def test_a_forgotten_data_mount_is_collected_by_the_reclaim_loop(tmp_path: Path,
                                                                 images: DataImages) -> None:
    """agentd killed between forgetting a cell and unmounting its data: the mount is below
    the run dir's cells/, where the orphan scan looks (agent.kernel.orphans, kind mount)."""
    req = request(tmp_path, cell="ghost")
    images.mount(req)
    (req.mount / "db").write_text("precious")
    objs = KernelObjects(None, "agbr-none", run_dir=tmp_path / "run")  # type: ignore[arg-type]
    found = [f for f in objs.scan_mounts() if f[1] == str(req.mount)]
    assert found == [("mount", str(req.mount), "ghost")]
    box = BoxView(None, False, frozenset(), tuple(
        KernelObject(k, n, c, 0.0) for k, n, c in found))
    (act,) = [a for a in reclaim_pass([], box, 100.0, ReclaimConfig())
              if isinstance(a, CollectOrphan)]
    objs.collect(act)
    assert not os.path.ismount(req.mount) and not req.mount.exists()
    assert loopdev.find(req.image) is None  # the loop device went with its last mount
    again = images.mount(req)  # the data is still there for the service's next cell
    assert again["made"] is False and (req.mount / "db").read_text() == "precious"
    images.unmount(req.mount)
