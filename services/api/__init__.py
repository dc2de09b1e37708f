"""The HTTP API channel: API clients drive conversations programmatically."""
