"""agentctl run/stop wait 60 s for a reply (``_long``), but the client connects first with
the default 5 s: the socket's timeout must follow ``Client.timeout`` at each request, or
a run of more than 5 s failed with "no reply within 60.0 s" (seen in the box under load,
where a cell's start takes 15 s)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from agent.cli.client import Client
from agent.core.protocol import encode_reply


def test_a_longer_timeout_set_after_connect_is_used(tmp_path: Path) -> None:
    path = tmp_path / "s"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        c, _ = srv.accept()
        c.recv(65536)
        time.sleep(0.6)  # longer than the connect-time timeout below
        c.send(encode_reply(1, "pong"))
        c.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with Client(path, timeout=0.2) as client:  # connects with 0.2 s
        client.timeout = 5.0  # what agentctl's run and stop do
        assert client.call("ping") == "pong"
    t.join(5)
    srv.close()
