"""libnftables in agentd's process: the library the ``nft`` tool is made of, through ctypes.

Each ``nft`` run cost about 200 ms in the emulated box before it did anything (a fork of a
50 MiB process, the exec, the tool's start; ``nsenter`` for a cell's netns), two runs per
cell start; through the library the same batch costs 40-50 ms (bench: docs/performance.md).
The library takes the same JSON batches and prints the same errors; its netlink socket
is opened by each context, so a context made and used in a thread that has entered a
cell's netns (agent.kernel.netns.in_own_thread) talks to that netns.

Bound by hand, six functions of libnftables(3): Debian's ``python3-nftables`` is the same
kind of ctypes binding, but Buildroot packages no Python binding for nftables, and the
library itself ships with the ``nft`` tool everywhere.  Without the library (or with
``AGENT_NFT=exec``) agent.kernel.nft runs the ``nft`` tool as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading

__all__ = ["LibNft", "load"]

NFT_CTX_OUTPUT_JSON = 1 << 4  # libnftables.h: enum nft_output_flags

_lock = threading.Lock()  # one context at a time: the library keeps some global state


class LibNft:
    """``run(text)``: one nft command line or JSON batch, JSON output; raises
    ``LibNftError`` with the library's error text."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        f = lib
        f.nft_ctx_new.restype = ctypes.c_void_p
        f.nft_ctx_new.argtypes = [ctypes.c_uint32]
        f.nft_ctx_free.restype = None
        f.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(f, name).restype = ctypes.c_int
            getattr(f, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(f, name).restype = ctypes.c_char_p
            getattr(f, name).argtypes = [ctypes.c_void_p]
        f.nft_ctx_output_get_flags.restype = ctypes.c_uint
        f.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        f.nft_ctx_output_set_flags.restype = None
        f.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        f.nft_run_cmd_from_buffer.restype = ctypes.c_int
        f.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self._f = f

    def run(self, text: str) -> str:
        f = self._f
        with _lock:
            ctx = f.nft_ctx_new(0)
            if not ctx:
                raise LibNftError("nft_ctx_new failed (out of memory?)")
            try:
                f.nft_ctx_buffer_output(ctx)
                f.nft_ctx_buffer_error(ctx)
                f.nft_ctx_output_set_flags(ctx, f.nft_ctx_output_get_flags(ctx)
                                           | NFT_CTX_OUTPUT_JSON)
                rc = f.nft_run_cmd_from_buffer(ctx, text.encode())
                out = (f.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
                err = (f.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
            finally:
                f.nft_ctx_free(ctx)
        if rc != 0:
            raise LibNftError(err or f"libnftables returned {rc}")
        return out


class LibNftError(Exception):
    pass


def load() -> LibNft | None:
    """The library, or None: not installed, or ``AGENT_NFT=exec`` in the environment."""
    if os.environ.get("AGENT_NFT", "") == "exec":
        return None
    for name in ("libnftables.so.1", ctypes.util.find_library("nftables")):
        if not name:
            continue
        try:
            return LibNft(ctypes.CDLL(name))
        except (OSError, AttributeError):
            continue
    return None
