"""Egress: delivers what core emits, each channel through its connector (`connector.py`)."""
