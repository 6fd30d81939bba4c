"""What a cell may be granted per mode (agent.core.grants): the capability table, the set a
cell may keep without a user namespace, the checks on a manifest's ids and capabilities,
and the copy of the table in docs/isolation.md.

The kernel side (a spec outside these rules refused before fork, the allowed set kept
through exec) is tests/privileged/test_spawn.py; the refusal by a live agentd is
tests/guest/test_isolation.py.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.core.grants import (
    CAPABILITIES,
    CAPABILITY_MODES,
    NOUSERNS_KEEPABLE,
    REFUSED_CAPABILITIES,
    capability_table,
    without_userns,
)

ROOT = Path(__file__).resolve().parents[2]
# Decided one by one in docs/isolation.md: each acts only inside the cell's own namespaces
# (or nowhere) even when the cell shares the host's user namespace.
KEPT_WITHOUT_USERNS = {"CAP_FSETID", "CAP_KILL", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
                       "CAP_NET_BROADCAST", "CAP_IPC_OWNER", "CAP_SYS_CHROOT",
                       "CAP_AUDIT_WRITE"}


def test_every_capability_has_one_decision() -> None:
    assert set(REFUSED_CAPABILITIES) | set(CAPABILITY_MODES) == set(CAPABILITIES)
    assert not set(REFUSED_CAPABILITIES) & set(CAPABILITY_MODES)
    assert len(CAPABILITIES) == 41  # up to CAP_CHECKPOINT_RESTORE (Linux 5.9 - 6.x)


def test_the_set_kept_without_a_user_namespace() -> None:
    kept = {c for c, m in CAPABILITY_MODES.items() if m.keep_without_userns}
    assert kept == KEPT_WITHOUT_USERNS
    assert NOUSERNS_KEEPABLE == {CAPABILITIES[c] for c in KEPT_WITHOUT_USERNS}
    # issue 10: these are real without a user namespace
    for cap in ("CAP_NET_RAW", "CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_IPC_LOCK",
                "CAP_WAKE_ALARM", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_FOWNER",
                "CAP_DAC_OVERRIDE", "CAP_SETFCAP", "CAP_LEASE"):
        assert not CAPABILITY_MODES[cap].keep_without_userns, cap


def test_every_decision_says_what_it_reaches_in_both_modes() -> None:
    for cap, mode in CAPABILITY_MODES.items():
        assert mode.with_userns and mode.without_userns, cap


def test_host_ids_and_host_capabilities_are_named() -> None:
    assert without_userns(["CAP_KILL"], 1000, 1000) == []
    got = without_userns(["CAP_NET_RAW", "CAP_KILL", "CAP_SYS_ADMIN"], 0, 0)
    assert [key for key, _ in got] == ["service.uid", "service.gid",
                                       "privileges.capabilities", "privileges.capabilities"]
    assert "host root" in got[0][1]
    assert got[2][1].startswith("CAP_NET_RAW: raw and packet sockets")
    assert got[3][1].startswith("CAP_SYS_ADMIN: mounts")


@given(caps=st.sets(st.sampled_from(sorted(CAPABILITIES))),
       uid=st.integers(0, 65535), gid=st.integers(0, 65535))
def test_refused_exactly_when_outside_the_rules(caps: set[str], uid: int, gid: int) -> None:
    got = without_userns(caps, uid, gid)
    expected = (uid == 0) + (gid == 0) + len(caps - KEPT_WITHOUT_USERNS)
    assert len(got) == expected


def test_docs_show_the_capability_table() -> None:
    doc = (ROOT / "docs/isolation.md").read_text()
    assert capability_table() in doc, (
        "docs/isolation.md is stale: paste the output of `python -m agent.core.grants`")
