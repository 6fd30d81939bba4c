SUMMARY = "agentd: cell isolation and security agent for set-top boxes"
DESCRIPTION = "agentd runs every service of a set-top box or home gateway \
               in its own cell (Linux namespaces, a cgroup leaf, a seccomp \
               filter and a VLAN port on a bridge), sizes cells to demand and \
               watches them; agentctl drives it."
HOMEPAGE = "https://github.com/agent-stb/agent"
BUGTRACKER = "https://github.com/agent-stb/agent/issues"
SECTION = "admin"
CVE_PRODUCT = "agentd"
LICENSE = "Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE;md5=3b83ef96387f14655fc854ddc3c6bd57"

# The agent is built from a pinned commit of its public repository: the
# default never asks the network at parse time (no AUTOREV) and does not
# depend on where this layer sits, so it parses the same when the layer is
# copied into a BSP's layers/ folder.  Each release moves the pin (both
# builds pin the same commit: tests/unit/test_recipes_yocto.py checks it is
# a commit of this repository).
#
# Developers building their own tree, in local.conf (docs/firmware.md):
#   INHERIT += "externalsrc"
#   EXTERNALSRC:pn-agent = "/path/to/agent"
# or another clone and branch, at its head:
#   AGENT_GIT_URI = "git:///path/to/agent;protocol=file"
#   AGENT_GIT_BRANCH = "my-branch"
#   SRCREV:pn-agent = "${AUTOREV}"
PV = "0.1.0+git"

AGENT_GIT_URI ?= "git://github.com/agent-stb/agent.git;protocol=https"
AGENT_GIT_BRANCH ?= "main"
SRC_URI = "${AGENT_GIT_URI};branch=${AGENT_GIT_BRANCH};destsuffix=${BP} \
           file://agentd.init \
           file://agentd.service \
           file://agentd.default \
           "
SRCREV = "3358b8c63186e8d69ce69cb148df9eee0dfddf97"

inherit python_setuptools_build_meta update-rc.d systemd

# Where the file:// entries land: UNPACKDIR from styhead on, WORKDIR before.
AGENT_FILES = "${@d.getVar('UNPACKDIR') or d.getVar('WORKDIR')}"

do_install:append() {
    install -d ${D}${sysconfdir}/default
    install -m 0644 ${AGENT_FILES}/agentd.default ${D}${sysconfdir}/default/agentd
    if ${@bb.utils.contains('DISTRO_FEATURES', 'sysvinit', 'true', 'false', d)}; then
        install -d ${D}${sysconfdir}/init.d
        install -m 0755 ${AGENT_FILES}/agentd.init ${D}${sysconfdir}/init.d/agentd
    fi
    if ${@bb.utils.contains('DISTRO_FEATURES', 'systemd', 'true', 'false', d)}; then
        install -d ${D}${systemd_system_unitdir}
        install -m 0644 ${AGENT_FILES}/agentd.service ${D}${systemd_system_unitdir}/agentd.service
    fi
}

INITSCRIPT_NAME = "agentd"
INITSCRIPT_PARAMS = "defaults 50"
SYSTEMD_SERVICE:${PN} = "agentd.service"

CONFFILES:${PN} = "${sysconfdir}/default/agentd"

# cgroupspy is the backend for legacy cgroup-v1 kernels only.
PACKAGECONFIG ??= ""
PACKAGECONFIG[cgroupv1] = ",,,python3-cgroupspy"

# Exactly the standard-library packages (oe-core python3-manifest.json) that
# the modules of agent/ import, and the tools agentd runs: nftables (the nft
# tool, from meta-networking), without which networked cells are refused.
# tests/unit/test_recipes_yocto.py checks both.
RDEPENDS:${PN} += "nftables \
                   python3-asyncio \
                   python3-cbor2 \
                   python3-compression \
                   python3-core \
                   python3-crypt \
                   python3-ctypes \
                   python3-difflib \
                   python3-fcntl \
                   python3-io \
                   python3-json \
                   python3-logging \
                   python3-netclient \
                   python3-numbers \
                   python3-pynacl \
                   python3-pyroute2 \
                   python3-resource \
                   python3-tomllib \
                   python3-unicodedata \
                   "
