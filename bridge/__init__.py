"""The Pigeon service: MQTT and HTTP edges, messaging rules, presence, media, metrics."""
