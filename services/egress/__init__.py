"""Egress: delivers what core emits, each channel through its own worker (webhooks so far)."""
