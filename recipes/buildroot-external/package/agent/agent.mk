################################################################################
#
# agent
#
################################################################################

AGENT_VERSION = 0.1.0
AGENT_SITE = $(BR2_EXTERNAL_AGENT_PATH)/../..
AGENT_SITE_METHOD = local
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
