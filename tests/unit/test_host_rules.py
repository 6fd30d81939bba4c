"""agent.monitor.host.rules: uevents, the mount table, links/addresses/routes, sysctls,
attribution to a cell's allowed trap and the severities (pure, no kernel; the sources
for real: tests/privileged/test_host_watch_host.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.core.names import VETH_PREFIX
from agent.monitor.host.rules import (
    OP_CHANGES,
    WATCHED,
    WINDOW_S,
    Attributor,
    Change,
    NetState,
    attributed,
    mount_change,
    mount_changes,
    own_link,
    own_mount,
    parse_mountinfo,
    parse_uevent,
    sysctl_change,
    sysctl_changes,
    sysctl_path,
    uevent_change,
    uevent_hints_sysctls,
)

# --- uevents ----------------------------------------------------------------------------


def uevent(head: str, **env: str) -> bytes:
    return b"\0".join([head.encode()] + [f"{k}={v}".encode() for k, v in env.items()]) + b"\0"


def test_a_device_uevent() -> None:
    u = parse_uevent(uevent("add@/devices/virtual/net/x0", ACTION="add",
                            DEVPATH="/devices/virtual/net/x0", SUBSYSTEM="net",
                            INTERFACE="x0", SEQNUM="12"))
    assert u is not None and (u.action, u.subsystem) == ("add", "net")
    c = uevent_change(u)
    assert c == Change("uevent", {"action": "add", "subsystem": "net",
                                  "devpath": "/devices/virtual/net/x0", "ifname": "x0"})
    assert not uevent_hints_sysctls(u)


def test_a_module_load_is_a_notice_and_hints_at_sysctls() -> None:
    u = parse_uevent(uevent("add@/module/br_netfilter", ACTION="add",
                            DEVPATH="/module/br_netfilter", SUBSYSTEM="module"))
    assert u is not None and uevent_hints_sysctls(u)
    c = uevent_change(u)
    assert c.severity == "notice" and c.attrs["module"] == "br_netfilter"
    live = parse_uevent(uevent("change@/module/x", ACTION="change", DEVPATH="/module/x",
                               SUBSYSTEM="module"))
    assert live is not None and uevent_change(live).severity == "info"
    assert not uevent_hints_sysctls(live)


def test_what_is_not_a_kernel_uevent() -> None:
    assert parse_uevent(b"libudev\0\xfe\xed\xca\xfe") is None  # udev's re-broadcast
    assert parse_uevent(b"no at sign\0ACTION=add\0") is None
    assert parse_uevent(b"") is None
    assert parse_uevent(b"@\0") is None


@given(st.binary(max_size=400))
def test_parse_uevent_never_raises_and_bounds_what_it_keeps(data: bytes) -> None:
    u = parse_uevent(data)
    assert u is None or (u.action and u.devpath and len(u.env) <= 32)


# --- the mount table --------------------------------------------------------------------

TABLE = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /proc rw,nosuid - proc proc rw
40 22 0:40 / /run/agent rw shared:9 - tmpfs tmpfs rw,size=1024k
41 22 0:41 / /mnt/with\\040space rw - tmpfs none rw
"""


def test_parse_mountinfo_reads_ids_targets_types_and_unescapes() -> None:
    t = parse_mountinfo(TABLE + "garbage line\n9 x\n")
    assert sorted(t) == [22, 23, 40, 41]
    assert t[41].target == "/mnt/with space" and t[41].fstype == "tmpfs"
    assert t[22].options == "rw,relatime,rw" and t[22].source == "/dev/sda1"


def test_mount_changes_in_order() -> None:
    old = parse_mountinfo(TABLE)
    new = dict(old)
    del new[23]
    new[50] = parse_mountinfo("50 22 0:50 / /media/usb rw - vfat /dev/sdb1 rw\n")[50]
    new[40] = parse_mountinfo("40 22 0:40 / /run/agent ro - tmpfs tmpfs ro\n")[40]
    new[41] = parse_mountinfo("41 22 0:41 / /mnt/moved rw - tmpfs none rw\n")[41]
    got = [(a, m.target) for a, m in mount_changes(old, new)]
    assert got == [("umount", "/proc"), ("remount", "/run/agent"), ("move", "/mnt/moved"),
                   ("mount", "/media/usb")]
    assert mount_changes(old, old) == []


def test_the_agents_own_mounts_are_info_everything_else_a_notice() -> None:
    own = ("/run/agent", "/run/agent/", "/run/netns/cell-*")
    assert own_mount("/run/agent", own) and own_mount("/run/agent/cells/web", own)
    assert own_mount("/run/netns/cell-web", own)
    assert not own_mount("/run/netns/other", own) and not own_mount("/run/agentx", own)
    m = parse_mountinfo("50 22 0:50 / /run/agent/x rw - tmpfs t rw\n")[50]
    c = mount_change("mount", m, own)
    assert c.own and c.severity == "info"
    m = parse_mountinfo("51 22 0:50 / /etc rw - tmpfs t rw\n")[51]
    c = mount_change("mount", m, own)
    assert not c.own and c.severity == "notice" and c.attrs["target"] == "/etc"


# --- links, addresses, routes -----------------------------------------------------------


def test_a_links_life_and_which_links_are_the_agents() -> None:
    s = NetState("br-agent")
    [c] = s.link(True, 5, "eth9", False, 0, "veth")
    assert (c.kind, c.attrs["action"], c.severity, c.own) == ("link", "add", "notice", False)
    assert s.link(True, 5, "eth9", False, 0) == []  # nothing changed
    assert [x.attrs["action"] for x in s.link(True, 5, "eth10", True, 3)] == [
        "rename", "up", "master"]
    assert own_link("br-agent", "br-agent") and own_link("br-agent.12", "br-agent")
    assert own_link(VETH_PREFIX + "web", "br-agent") and not own_link("eth0", "br-agent")
    assert not own_link(None, "br-agent") and not own_link("br-agentx", "br-agent")
    [c] = s.link(True, 6, "br-agent", True, 0, "bridge")
    assert c.own and c.severity == "info"


def test_addresses_and_routes_once_each_and_forgotten_with_their_link() -> None:
    s = NetState("br-agent")
    s.link(True, 5, "eth9", True, 0)
    [c] = s.address(True, 5, 2, "10.0.0.1", 24)
    assert c.attrs == {"name": "eth9", "address": "10.0.0.1", "prefixlen": 24,
                       "action": "add"}
    assert s.address(True, 5, 2, "10.0.0.1", 24) == []  # a lifetime renewed
    assert s.address(False, 5, 2, "10.9.9.9", 24) == []  # never seen added
    [c] = s.route(True, 254, None, 0, "10.0.0.254", 5, 2)
    assert c.attrs["dst"] == "default" and c.attrs["dev"] == "eth9"
    assert s.route(True, 254, None, 0, "10.0.0.254", 5, 2) == []
    s.link(True, 5, "eth9", False, 0)  # down: the kernel flushed its routes silently
    assert s.routes == set() and s.addrs
    assert len(s.route(True, 254, None, 0, "10.0.0.254", 5, 2)) == 1  # new again
    s.link(False, 5, "eth9", False, 0)
    assert s.routes == set() and s.addrs == set()


def test_the_state_is_bounded() -> None:
    s = NetState("br")
    for i in range(5000):
        s.address(True, 1, 2, f"10.{i // 256}.{i % 256}.1", 32)
    assert len(s.addrs) == 4096


# --- sysctls ----------------------------------------------------------------------------


def test_the_watch_list_and_drift() -> None:
    names = [w.name for w in WATCHED]
    assert len(names) == len(set(names)) and "net.ipv4.ip_forward" in names
    assert {w.name for w in WATCHED if w.severity == "alert"} == {"kernel.modprobe",
                                                                   "kernel.core_pattern"}
    assert sysctl_path("net.bridge.bridge-nf-call-iptables") == \
        "sys/net/bridge/bridge-nf-call-iptables"
    old = {"a": "1", "b": None, "c": "x"}
    new = {"a": "0", "b": "1", "c": "x", "d": "new"}
    assert sysctl_changes(old, new) == [("a", "1", "0"), ("b", None, "1")]
    c = sysctl_change("kernel.modprobe", "/sbin/modprobe", "/tmp/x")
    assert c.severity == "alert" and c.attrs == {"name": "kernel.modprobe",
                                                 "old": "/sbin/modprobe", "new": "/tmp/x"}
    assert sysctl_change("not.watched", "1", "2").severity == "notice"


# --- attribution ------------------------------------------------------------------------


def test_a_change_just_after_an_allowed_trap_of_its_op_is_that_cells() -> None:
    a = Attributor()
    assert a.trap("ntp", "set_time", "allowed", 100.0)
    clock = Change("clock-set", {"delta_s": 3.0}, "notice")
    assert a.who(clock, 100.5) == "ntp"
    assert a.who(clock, 100.6) is None  # each trap explains one change
    assert a.trap("web", "sysctl_net", "allowed", 200.0)
    fwd = Change("sysctl", {"name": "net.ipv4.ip_forward"}, "notice")
    modprobe = Change("sysctl", {"name": "kernel.modprobe"}, "alert")
    assert a.who(modprobe, 200.1) is None  # sysctl_net explains net.* only
    assert a.who(fwd, 200.1) == "web"


def test_what_a_trap_does_not_explain() -> None:
    a = Attributor()
    assert not a.trap("web", "set_time", "denied", 0.0)
    assert not a.trap(None, "set_time", "allowed", 0.0)
    assert not a.trap("web", "none", "allowed", 0.0)
    assert not a.trap("web", 7, "allowed", 0.0)
    a.trap("ntp", "set_time", "allowed", 10.0)
    clock = Change("clock-set", {}, "notice")
    assert a.who(clock, 10.0 + WINDOW_S + 0.1) is None  # too late
    a.trap("ntp", "set_time", "allowed", 20.0)
    assert a.who(clock, 19.0) is None  # a change before the trap is not its
    own = Change("mount", {"target": "/run/agent/x"}, "info", own=True)
    a.trap("usb", "mount_usb", "allowed", 30.0)
    assert a.who(own, 30.1) is None and a.who(Change("mount", {}), 30.1) == "usb"


@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([*OP_CHANGES, "x"]),
                          st.sampled_from(["allowed", "denied"]), st.floats(0, 3)),
                max_size=30),
       st.lists(st.tuples(st.sampled_from(["clock-set", "mount", "sysctl"]),
                          st.floats(0, 10)), max_size=30))
def test_every_attribution_is_backed_by_one_allowed_trap_in_the_window(
        traps: list[tuple[str, str, str, float]], changes: list[tuple[str, float]]) -> None:
    a = Attributor()
    now, log = 0.0, []
    for cell, op, verdict, gap in traps:
        now += gap
        if a.trap(cell, op, verdict, now):
            log.append([cell, op, now, False])
    for kind, at in changes:
        c = Change(kind, {"name": "net.ipv4.ip_forward"} if kind == "sysctl" else {})
        who = a.who(c, at)
        if who is not None:
            backing = [t for t in log if t[0] == who and not t[3] and t[2] <= at + 0.001
                       and at - t[2] <= WINDOW_S and t[1] == EXPLAINS[kind]]
            assert backing
            backing[-1][3] = True
    assert sum(1 for t in log if t[3]) <= len(log)


EXPLAINS = {"clock-set": "set_time", "mount": "mount_usb", "sysctl": "sysctl_net"}


def test_attributed_events_carry_by_and_a_granted_change_is_never_an_alert() -> None:
    c = Change("sysctl", {"name": "kernel.core_pattern"}, "alert")
    assert attributed(c, None) == (None, "alert", {"name": "kernel.core_pattern",
                                                   "by": None})
    assert attributed(c, "web") == ("web", "notice", {"name": "kernel.core_pattern",
                                                      "by": "web"})
    info = Change("mount", {"target": "/run/agent/x"}, "info", own=True)
    assert attributed(info, None)[1] == "info"
