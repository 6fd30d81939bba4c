################################################################################
#
# agent
#
################################################################################

# A pinned commit of the agent's repository (the same as SRCREV in the Yocto
# layer), so the package does not depend on where this tree sits.  To build
# your own tree, put AGENT_OVERRIDE_SRCDIR = /path/to/agent in local.mk
# (BR2_PACKAGE_OVERRIDE_FILE; docs/firmware.md).
AGENT_VERSION = 3358b8c63186e8d69ce69cb148df9eee0dfddf97
AGENT_SITE = https://github.com/agent-stb/agent.git
AGENT_SITE_METHOD = git
# The commit id pins the content; the hash of the tarball Buildroot makes
# from it goes into agent.hash with the first tagged release.
BR_NO_CHECK_HASH_FOR += $(AGENT_SOURCE)
AGENT_SETUP_TYPE = setuptools
AGENT_LICENSE = Apache-2.0
AGENT_LICENSE_FILES = LICENSE

define AGENT_INSTALL_INIT_SYSV
	$(INSTALL) -D -m 0755 $(AGENT_PKGDIR)/S50agentd \
		$(TARGET_DIR)/etc/init.d/S50agentd
endef

define AGENT_INSTALL_INIT_SYSTEMD
	$(INSTALL) -D -m 0644 $(AGENT_PKGDIR)/agentd.service \
		$(TARGET_DIR)/usr/lib/systemd/system/agentd.service
endef

$(eval $(python-package))
