"""``pigeon bench``: simulated devices over real MQTT, measured against the broker's own relay."""
