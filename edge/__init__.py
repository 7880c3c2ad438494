"""The edge agent: camera and sensor sources, detection, rules, outbox, MQTT publisher, health."""
