"""Telemetry that must reach the fleet: the durable outbox between producers and the MQTT link."""
