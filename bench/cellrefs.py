"""The reference rows of bench/cellbench.py: crun, bwrap and the agent's network alone.

crun's network is made by a fixed script of iproute2's ``ip`` and ``bridge`` commands
(never by the agent's code), so the reference stays put when the agent gets faster.
Each row has ``start(i, marker)``, ``stop(i)`` and ``cleanup(n)``; see cellbench.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

IMAGE = Path("/usr/share/agent/images/demo")
BRIDGE = "agbr0"


def _sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


# The crun row's network, made the way crun users make it: a fixed shell script of
# iproute2's `ip` and `bridge` commands (a CNI-style hook), never the agent's own code, so
# the reference does not move when the agent gets faster.  $IP and $BRIDGE_CMD are the
# absolute paths of iproute2's tools (in the box, busybox sh would run its own `ip`).
CRUN_NET_UP = r"""set -eu
"$IP" netns add "$NS"
"$IP" link add "$HOST" type veth peer name "$PEER"
"$IP" link set "$PEER" netns "$NS"
"$IP" link set "$HOST" master "$BR" up
"$BRIDGE_CMD" vlan add dev "$HOST" vid "$VID" pvid untagged
"$BRIDGE_CMD" vlan del dev "$HOST" vid 1
"$IP" -n "$NS" link set "$PEER" name eth0
"$IP" -n "$NS" link set lo up
"$IP" -n "$NS" link set eth0 up
"$IP" -n "$NS" addr add "$ADDR" dev eth0
"$IP" -n "$NS" route add default via "$GW"
"""
CRUN_NET_DOWN = r"""set -u
"$IP" link del "$HOST" 2>/dev/null || true
"$IP" netns del "$NS" 2>/dev/null || true
"""
# The VLAN's gateway, made once before the crun cells and removed after them.
CRUN_GW_UP = r"""set -eu
"$IP" link show "$BR" >/dev/null 2>&1 ||
    "$IP" link add "$BR" type bridge vlan_filtering 1 vlan_default_pvid 0
"$IP" link set "$BR" up
"$BRIDGE_CMD" vlan add dev "$BR" vid "$VID" self
"$IP" link add link "$BR" name "$BR.$VID" type vlan id "$VID"
"$IP" addr add "$GW/24" dev "$BR.$VID"
"$IP" link set "$BR.$VID" up
"""
CRUN_GW_DOWN = r"""set -u
"$IP" link del "$BR.$VID" 2>/dev/null || true
"$BRIDGE_CMD" vlan del dev "$BR" vid "$VID" self 2>/dev/null || true
"""
CRUN_VLAN, CRUN_GW = 300, "10.78.0.1"


def iproute2() -> dict[str, str]:
    """``{"IP": path, "BRIDGE_CMD": path}`` of iproute2's tools (not busybox's)."""
    out = {}
    for var, tool, mark in (("IP", "ip", "iproute2"), ("BRIDGE_CMD", "bridge", "bridge")):
        path = shutil.which(tool, path="/usr/sbin:/usr/bin:/sbin:/bin")
        version = subprocess.run([path or tool, "-V"], capture_output=True,
                                 text=True).stdout if path else ""
        if not path or mark not in version or "BusyBox" in version:
            raise RuntimeError(f"iproute2's {tool} is missing (qemu/packages.txt: iproute2)")
        out[var] = os.path.realpath(path)
    return out


def script(text: str, **env: str) -> None:
    """Run one of the fixed scripts above with ``env`` (names upper-cased)."""
    subprocess.run(["/bin/sh", "-c", text], check=True, capture_output=True,
                   env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", **env})


class CrunRuntime:
    """Debian's crun with an OCI bundle over the same image; its netns and a veth on the
    bridge made by the fixed iproute2 script CRUN_NET_UP (no agent code)."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = {**iproute2(), "BR": BRIDGE, "VID": str(CRUN_VLAN), "GW": CRUN_GW}
        script(CRUN_GW_DOWN, **self.env)  # a previous run's leftover
        script(CRUN_GW_UP, **self.env)

    def net_env(self, i: int) -> dict[str, str]:
        return {**self.env, "NS": f"crun{i}", "HOST": f"crh{i}", "PEER": f"crp{i}",
                "ADDR": f"10.78.0.{2 + i % 250}/24"}

    def config(self, i: int, marker: str) -> dict[str, object]:
        return {
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0}, "cwd": "/", "args": ["/bin/busybox", "sleep",
                                                                  marker],
                "env": ["PATH=/bin"], "noNewPrivileges": True,
                "capabilities": {k: [] for k in ("bounding", "effective", "permitted")},
            },
            "root": {"path": str(IMAGE), "readonly": True},
            "hostname": f"crun-{i}",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "noexec", "size=4m"]},
            ],
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "mount", "uts", "ipc", "cgroup")]
                + [{"type": "network", "path": f"/run/netns/crun{i}"}],
                "cgroupsPath": f"/bench-crun/c{i}",
                "resources": {"memory": {"limit": 16 << 20},
                              "cpu": {"quota": 20000, "period": 100000},
                              "pids": {"limit": 8}},
            },
        }

    def start(self, i: int, marker: str) -> None:
        script(CRUN_NET_UP, **self.net_env(i))
        bundle = self.work / f"c{i}"
        bundle.mkdir(exist_ok=True)
        (bundle / "config.json").write_text(json.dumps(self.config(i, marker)))
        # The container inherits crun's stdio: not a pipe, or run() would wait for it.
        subprocess.run(["crun", "run", "--detach", "--bundle", str(bundle), f"c{i}"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

    def stop(self, i: int) -> None:
        subprocess.run(["crun", "kill", f"c{i}", "KILL"], capture_output=True)
        _sh("crun", "delete", "--force", f"c{i}")
        script(CRUN_NET_DOWN, **self.net_env(i))

    def cleanup(self, n: int) -> None:
        script(CRUN_GW_DOWN, **self.env)


class NetRuntime:
    """The agent's own network set-up alone, in this process: what a cell's plan does
    for its network (make-netns, ensure-gateway, make-link; remove-link, remove-netns,
    remove-gateway: the bench's cells are each the last of their VLAN), through the
    same adapter agentd uses (agent.kernel.net.HostNet).  Its start ends when the
    set-up returns (there is no exec)."""

    VLAN, GW = 301, "10.79.0.1/24"

    def __init__(self, work: Path) -> None:
        from agent.kernel.net import HostNet

        self.hn = HostNet(BRIDGE, work / "netns")  # its own pins: not agentd's cells

    def start(self, i: int, marker: str) -> None:
        self.hn.create_netns(f"nb{i}")
        self.hn.ensure_gateway(self.VLAN, self.GW)
        self.hn.create_link(f"nb{i}", self.VLAN, f"10.79.0.{2 + i % 250}/24", "10.79.0.1")

    def stop(self, i: int) -> None:
        self.hn.destroy_link(f"nb{i}")
        self.hn.destroy_netns(f"nb{i}")
        self.hn.remove_gateway(self.VLAN)

    def cleanup(self, n: int) -> None:
        self.hn.remove_gateway(self.VLAN)
        subprocess.run(["umount", str(self.hn.netns_dir)], capture_output=True)


class BwrapRuntime:
    """Debian's bubblewrap: same image and namespaces (its net namespace has only lo)."""

    def __init__(self) -> None:
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(self, i: int, marker: str) -> None:
        self.procs[i] = subprocess.Popen(
            ["bwrap", "--unshare-all", "--unshare-cgroup", "--ro-bind", str(IMAGE), "/",
             "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "--hostname", f"bw-{i}",
             "--cap-drop", "ALL", "--", "/bin/busybox", "sleep", marker])

    def stop(self, i: int) -> None:
        p = self.procs.pop(i)
        p.kill()
        p.wait()

    def cleanup(self, n: int) -> None:
        pass
