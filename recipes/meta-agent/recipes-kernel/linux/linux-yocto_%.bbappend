# Kernel options agentd uses (agent.cfg is generated from agent/core/kconfig.py).
# Only for builds that opt in, so that adding the layer changes nothing else:
#   DISTROOVERRIDES .= ":agent-kernel"
# The override is not named "agent": an override equal to a recipe's PN (here
# agent_git.bb's) stops that recipe's parse with the QA errors pn-overrides
# and pkgvarcheck (tests/unit/test_recipes_yocto.py).
FILESEXTRAPATHS:prepend:agent-kernel := "${THISDIR}/linux-yocto:"
SRC_URI:append:agent-kernel = " file://agent.cfg"
