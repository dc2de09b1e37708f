"""The small common package every Switchboard service may import.

Schemas, subject names, settings, the bus, the store, ids and telemetry. Nothing channel-specific.
"""
