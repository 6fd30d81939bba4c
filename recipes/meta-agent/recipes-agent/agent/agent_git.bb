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

# The agent is built from a git checkout of its repository.  By default the
# one this layer lives in (recipes/meta-agent/ inside it); point AGENT_GIT_DIR
# elsewhere in local.conf, and pin SRCREV for a release build.
PV = "0.1.0+git"

AGENT_GIT_DIR ?= "${THISDIR}/../../../.."
AGENT_GIT_BRANCH ?= "main"
SRC_URI = "git://${AGENT_GIT_DIR};protocol=file;branch=${AGENT_GIT_BRANCH};destsuffix=${BP} \
           file://agentd.init \
           file://agentd.service \
           file://agentd.default \
           "
# A layer kept inside the agent's own repository builds that repository's
# branch head; a release build pins the commit, e.g. in local.conf:
#   SRCREV:pn-agent = "<commit>"
# nooelint: oelint.vars.autorev
SRCREV ?= "${AUTOREV}"

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
# the modules of agent/ import; tests/unit/test_recipes_yocto.py checks it.
RDEPENDS:${PN} += "python3-asyncio \
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
                   python3-pyroute2 \
                   python3-resource \
                   python3-tomllib \
                   "
