"""agent.monitor.exec.service_watch.written_path: where the cell sees a written file,
also when the kernel names it from the data mount's own root (the cell's mounts gone)."""

from __future__ import annotations

from agent.core.ratelimit import TokenBucket
from agent.monitor.exec.service_watch import Watch, written_path


def watch(data: tuple[str, str] | None) -> Watch:
    return Watch("c", None, None, 0, TokenBucket(1, 1), data)  # type: ignore[arg-type]


def test_paths_in_the_data_dir_are_kept_and_mount_relative_ones_get_the_mount_point() -> None:
    w = watch(("/data/", "c"))
    assert written_path(w, "/data/tool", gone=False) == "/data/tool"
    assert written_path(w, "/data", gone=False) == "/data"
    assert written_path(w, "/tool", gone=False) == "/data/tool"  # (mounts gone meanwhile)
    assert written_path(w, "/database/x", gone=False) == "/data/database/x"
    assert written_path(w, "/data/x", gone=True) == "/data/data/x"  # gone: always relative
    assert written_path(w, "/", gone=True) == "/data"
    assert written_path(watch(None), "/tool", gone=True) == "/tool"
