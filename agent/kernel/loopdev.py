"""Loop devices for data images (thin adapter: ioctls on /dev/loop-control and /dev/loopN).

:func:`attach` binds a file to a free loop device with ``LO_FLAGS_AUTOCLEAR``, so the
kernel releases the device by itself when its last user goes (the last mount of the
file system on it, and the fd returned here): nothing is left to detach after an
unmount, a lazy one included.  :func:`find` returns the loop device a file is already
bound to, verified on an open fd (the open fd keeps the binding alive: an autoclear
between the look-up and the mount cannot hand the device to another file).  A file is
never bound twice: two loop devices on one ext4 image would be two superblocks writing
the same blocks.

Both return ``(node, fd)``; the caller mounts ``node`` and then closes ``fd``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from pathlib import Path

from agent.core.errors import KernelError

__all__ = ["INFO64", "attach", "find"]

# <linux/loop.h>
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A  # Linux 5.8
LOOP_CTL_GET_FREE = 0x4C82
LO_FLAGS_AUTOCLEAR = 4
# struct loop_info64: device, inode, rdevice, offset, sizelimit (u64); number,
# encrypt_type, encrypt_key_size, flags (u32); file_name[64], crypt_name[64],
# encrypt_key[32]; init[2] (u64)
INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_CONFIG = struct.Struct(f"=II{INFO64.size}s64x")  # fd, block_size, info, reserved[8]
_ATTEMPTS = 16  # another process may take the free device between GET_FREE and the bind


def _kernel_dev(dev: int) -> tuple[int, int]:
    """(major, minor) of the kernel's ``huge_encode_dev`` form (loop_info64.lo_device)."""
    return (dev >> 8) & 0xFFF, (dev & 0xFF) | ((dev >> 12) & 0xFFF00)


def _open(node: Path, flags: int) -> int:
    for _ in range(50):  # devtmpfs makes the node a moment after the device exists
        try:
            return os.open(node, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            time.sleep(0.01)
    return os.open(node, flags | os.O_CLOEXEC)


def _info(fd: int) -> bytes | None:
    buf = bytearray(INFO64.size)
    try:
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf, True)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # not bound
            return None
        raise
    return bytes(buf)


def find(image: Path, dev: Path = Path("/dev"), sys_block: Path = Path("/sys/block")
         ) -> tuple[Path, int] | None:
    """The loop device ``image`` is bound to, with an open fd on it; None if unbound."""
    st = os.stat(image)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    for entry in sorted(sys_block.glob("loop[0-9]*")):
        node = dev / entry.name
        try:
            fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            info = _info(fd)
        except OSError:
            info = None
        if info is not None:
            device, inode = INFO64.unpack(info)[:2]
            if (*_kernel_dev(device), inode) == want:
                return node, fd
        os.close(fd)
    return None


def _bind(lfd: int, ffd: int) -> None:
    info = bytearray(INFO64.size)
    struct.pack_into("=I", info, 52, LO_FLAGS_AUTOCLEAR)  # lo_flags
    try:
        fcntl.ioctl(lfd, LOOP_CONFIGURE, _CONFIG.pack(ffd, 0, bytes(info)))
        return
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTTY):  # EINVAL/ENOTTY: before 5.8
            raise
    fcntl.ioctl(lfd, LOOP_SET_FD, ffd)
    try:
        fcntl.ioctl(lfd, LOOP_SET_STATUS64, bytes(info))
    except OSError:
        fcntl.ioctl(lfd, LOOP_CLR_FD, 0)
        raise


def attach(image: Path, dev: Path = Path("/dev")) -> tuple[Path, int]:
    """Bind ``image`` (read-write) to a free loop device with autoclear; ``(node, fd)``."""
    control = dev / "loop-control"
    hint = "the kernel needs CONFIG_BLK_DEV_LOOP (built in, or the loop module loaded)"
    try:
        ffd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise KernelError.from_oserror("open", str(image), exc) from exc
    try:
        try:
            cfd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KernelError.from_oserror("open", str(control), exc, hint) from exc
        try:
            for _ in range(_ATTEMPTS):
                try:
                    n = fcntl.ioctl(cfd, LOOP_CTL_GET_FREE)
                    node = dev / f"loop{n}"
                    lfd = _open(node, os.O_RDWR)
                except OSError as exc:
                    raise KernelError.from_oserror("loop get free", str(control), exc,
                                                   hint) from exc
                try:
                    _bind(lfd, ffd)
                except OSError as exc:
                    os.close(lfd)
                    if exc.errno == errno.EBUSY:  # taken meanwhile: ask for another
                        continue
                    raise KernelError.from_oserror("loop bind", f"{node} {image}",
                                                   exc) from exc
                return node, lfd
            raise KernelError("loop bind", str(image), errno.EBUSY,
                              f"no free loop device after {_ATTEMPTS} attempts")
        finally:
            os.close(cfd)
    finally:
        os.close(ffd)
