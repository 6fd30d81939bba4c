include $(sort $(wildcard $(BR2_EXTERNAL_AGENT_PATH)/package/*/*.mk))
