"""The embedded MQTT broker (amqtt) with Pigeon's authentication, permissions and fixes."""
