"""What the agent's nftables rules log, and how the monitor reads it back (pure).

Dropped packets worth an event are logged to one NFLOG group (:data:`LOG_GROUP`, the
same number in the host's netns and in every cell's), each log rule behind a ``limit``
so the kernel wakes agentd at most :data:`RATE` times a second per rule (plus
:data:`BURST`), however hard a cell pushes.  The log prefix says what was dropped and
where; the reader (agent.monitor.net) attributes the packet:

=========================  ===========  =================================================
prefix                     table        meaning, and whose event it is
=========================  ===========  =================================================
``agent:l2:REASON:CELL``   bridge       a frame from CELL's port broke the layer-2 rules
                                        (``REASON`` in :data:`L2_REASONS`): CELL's
``agent:deny``             inet host    a routed packet no pair or egress rule allows:
                                        the cell of its source address
``agent:out``              inet cell    the cell's own output chain refused it: that cell
``agent:in``               inet cell    the cell's input chain refused it: the cell of its
                                        source address (same-VLAN traffic never reaches
                                        the host)
``agent:spoof``            inet cell    the cell sent with a source not its own: that cell
=========================  ===========  =================================================

The cell in an ``agent:l2`` prefix is written by the agent's own rule (one chain per
cell port), so it cannot be forged by the frame; a cell's netns is known from the
socket that read its log.  Source addresses are trustworthy because the layer-2 rules
drop every frame whose IPv4 or IPv6 source is not the sending cell's.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BURST",
    "CELL_IN",
    "CELL_OUT",
    "CELL_SPOOF",
    "HOST_DENY",
    "L2_REASONS",
    "LOG_GROUP",
    "RATE",
    "LogPrefix",
    "l2_prefix",
    "parse_prefix",
]

LOG_GROUP = 7707  # NFLOG group of every agent log rule (host netns and each cell netns)
RATE = 10  # log messages per second per rule ...
BURST = 30  # ... after a burst of this many

TAG = "agent"
HOST_DENY = "agent:deny"
CELL_OUT = "agent:out"
CELL_IN = "agent:in"
CELL_SPOOF = "agent:spoof"
# Why a frame from a cell's port was dropped (the l2-drop event's ``reason``):
L2_REASONS = (
    "mac",  # source MAC not the cell's
    "vlan",  # an 802.1Q/802.1ad tag (VLAN hopping, double tagging)
    "arp",  # ARP whose sender MAC or IP is not the cell's
    "dhcp",  # a DHCP (v4 or v6) server message
    "ra",  # an IPv6 router advertisement or redirect
    "ip",  # IPv4 source not the cell's address
    "ip6",  # IPv6 source not the cell's link-local address
    "proto",  # an ethertype other than IPv4, ARP and IPv6
)


def l2_prefix(reason: str, cell: str) -> str:
    if reason not in L2_REASONS:
        raise ValueError(f"unknown layer-2 reason {reason!r}")
    return f"{TAG}:l2:{reason}:{cell}"


@dataclass(frozen=True)
class LogPrefix:
    """A parsed prefix: ``what`` is l2, deny, out, in or spoof."""

    what: str
    reason: str = ""
    cell: str = ""


_PLAIN = {HOST_DENY: "deny", CELL_OUT: "out", CELL_IN: "in", CELL_SPOOF: "spoof"}


def parse_prefix(prefix: str) -> LogPrefix | None:
    """None for a prefix that is not the agent's (another program's log group)."""
    if prefix in _PLAIN:
        return LogPrefix(_PLAIN[prefix])
    parts = prefix.split(":", 3)
    if len(parts) == 4 and parts[0] == TAG and parts[1] == "l2" and parts[2] in L2_REASONS \
            and parts[3]:
        return LogPrefix("l2", parts[2], parts[3])
    return None
