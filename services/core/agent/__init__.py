"""Agent runtimes behind one interface (`Runtime.reply(context) -> AgentReply`), the context they
see, and the step loop that runs their tool calls under the revision's policies."""

from services.core.agent.context import AgentContext
from services.core.agent.registry import Runtimes
from services.core.agent.runtime import AgentReply, Budget, Runtime, RuntimeFailed
from services.core.agent.steps import Answer, PendingToolCall

__all__ = [
    "AgentContext",
    "AgentReply",
    "Answer",
    "Budget",
    "PendingToolCall",
    "Runtime",
    "RuntimeFailed",
    "Runtimes",
]
