"""Core: applies inbound envelopes to conversations under the state machine and runs the agent."""
