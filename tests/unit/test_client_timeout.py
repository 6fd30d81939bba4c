"""agent.cli.client: a timeout raised after connecting (what ``agentctl run`` and ``stop``
do, to 60 s) applies to the open connection, not only to the next one."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import pytest

from agent.cli.client import Client, TransportError
from agent.core.protocol import decode_request, encode_reply


def _slow_server(path: Path, delay: float) -> tuple[socket.socket, threading.Thread]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            req = decode_request(conn.recv(70000))
            time.sleep(delay)
            with contextlib.suppress(OSError):  # the client may have given up
                conn.send(encode_reply(req.id, "pong"))

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return listener, t


@pytest.mark.parametrize(("raised", "ok"), [(5.0, True), (None, True), (0.1, False)])
def test_a_timeout_changed_after_connecting_applies(tmp_path: Path, raised: float | None,
                                                    ok: bool) -> None:
    listener, t = _slow_server(tmp_path / "s.sock", 0.5)
    try:
        first = 5.0 if raised == 0.1 else 0.1  # the reply comes after 0.5 s
        with Client(tmp_path / "s.sock", timeout=first) as c:
            c.timeout = raised  # after connect, as agentctl run does
            if ok:
                assert c.call("ping") == "pong"
            else:
                with pytest.raises(TransportError) as ei:
                    c.call("ping")
                assert ei.value.code == "E_TIMEOUT"
    finally:
        t.join(5)
        listener.close()
