"""Agent runtimes. `run_agent` is the one entry point core calls."""

from services.core.agent.runtime import AgentReply, Runtime, runtime_for

__all__ = ["AgentReply", "Runtime", "runtime_for"]
