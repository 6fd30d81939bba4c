# Kernel options agentd uses (agent.cfg is generated from agent/kconfig.py).
# Only for distros that opt in, so that adding the layer changes nothing else:
#   DISTROOVERRIDES .= ":agent"
FILESEXTRAPATHS:prepend:agent := "${THISDIR}/linux-yocto:"
SRC_URI:append:agent = " file://agent.cfg"
