"""The `openai` runtime: any OpenAI-compatible chat-completions server (OpenAI, Azure, vLLM,
Ollama, llama.cpp), called with the official SDK and always streamed.

The prompt is the revision's system prompt plus what the turn's context knows (channel, end
user, `context_variables`, knowledge-base evidence), then the end user's recent turns across
channels (a turn from another channel is marked `[via sms]`), then the message; tool results of
this turn follow as assistant `tool_calls` and `tool` messages. The revision's tools are offered
as functions. The API key is read from the environment variable the revision names, at call
time, and never stored. Failures are retried within the turn's budget like the `http` runtime.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from services.core.agent.context import AgentContext
from services.core.agent.runtime import (
    AgentReply,
    AttemptFailed,
    Attempts,
    Budget,
    DeltaSink,
    ProposedToolCall,
    RuntimeFailed,
)
from shared.models import OpenAIRuntimeConfig


def messages_for(config: OpenAIRuntimeConfig, context: AgentContext) -> list[dict[str, Any]]:
    facts = [
        f"Channel: {context.conversation.channel}.",
        f"End user: {context.end_user.id}.",
    ]
    if context.context_variables:
        facts.append(f"Context variables: {json.dumps(context.context_variables)}")
    if context.evidence:
        facts.append("Knowledge base excerpts (cite them when you use them):")
        facts.extend(f"- [{e.chunk_id}] {e.text}" for e in context.evidence)
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": f"{config.system_prompt}\n\n" + "\n".join(facts)}
    ]
    history = context.history[-config.max_history_turns :] if config.max_history_turns else ()
    for turn in history:
        if turn.role == "system":
            continue
        text = turn.text
        if turn.channel is not None and turn.channel != context.conversation.channel:
            text = f"[via {turn.channel}] {text}"
        messages.append({"role": turn.role, "content": text})
    messages.append({"role": "user", "content": context.message.text})
    for outcome in context.tool_results:
        messages.append(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": outcome.id,
                        "type": "function",
                        "function": {
                            "name": outcome.name,
                            "arguments": json.dumps(outcome.arguments),
                        },
                    }
                ],
            }
        )
        result = outcome.result
        if outcome.decision == "deny":
            result = {"error": "denied by policy", **(result if isinstance(result, dict) else {})}
        messages.append({"role": "tool", "tool_call_id": outcome.id, "content": json.dumps(result)})
    return messages


def functions_for(context: AgentContext) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": tool.name,
                "description": tool.description,
                "parameters": tool.parameters,
            },
        }
        for tool in context.tools
    ]


class OpenAIRuntime:
    wants_history = True

    def __init__(self, config: OpenAIRuntimeConfig, budget: Budget) -> None:
        self.config = config
        # The SDK's own errors, and an answer whose tool arguments do not parse, are retried.
        self.attempts = Attempts(
            budget, config.timeout_seconds, failures=(openai.OpenAIError, ValueError, KeyError)
        )
        self._client: AsyncOpenAI | None = None
        self._key: str | None = None

    def client(self) -> AsyncOpenAI:
        env = self.config.api_key_env
        key = os.environ.get(env) if env else "unused"  # local servers often want none
        if not key:
            raise RuntimeFailed(f"api_key_missing: environment variable {env} is not set")
        if self._client is None or key != self._key:
            self._client = AsyncOpenAI(
                api_key=key,
                base_url=self.config.base_url,
                max_retries=0,  # retried here, within the turn's budget
                timeout=self.config.timeout_seconds,
            )
            self._key = key
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def reply(self, context: AgentContext, on_delta: DeltaSink | None = None) -> AgentReply:
        attempt = functools.partial(self._attempt, self.client(), context, on_delta)
        return await self.attempts.within_budget(attempt, conversation_id=context.conversation.id)

    async def _attempt(
        self,
        client: AsyncOpenAI,
        context: AgentContext,
        on_delta: DeltaSink | None,
        sent: list[str],
    ) -> AgentReply:
        extra: dict[str, Any] = {}
        if context.tools:
            extra["tools"] = cast(list[ChatCompletionToolParam], functions_for(context))
        if self.config.temperature is not None:
            extra["temperature"] = self.config.temperature
        try:
            stream = await client.chat.completions.create(
                model=self.config.model,
                messages=cast(list[ChatCompletionMessageParam], messages_for(self.config, context)),
                stream=True,
                **extra,
            )
        except openai.APIStatusError as exc:
            # Only the response's status raises this (a broken stream is an `APIError`): a 429
            # or a 5xx is worth another attempt, any other 4xx is the server saying no.
            code = exc.status_code
            retryable = code >= 500 or code == 429
            raise AttemptFailed(f"http_{code}", retryable=retryable) from exc
        calls: dict[int, dict[str, str]] = {}
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                sent.append(delta.content)
                if on_delta is not None:
                    await on_delta(delta.content)
            for piece in delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                if piece.function is not None:
                    call["name"] += piece.function.name or ""
                    call["arguments"] += piece.function.arguments or ""
        proposed = []
        for index in sorted(calls):
            call = calls[index]
            arguments = json.loads(call["arguments"]) if call["arguments"].strip() else {}
            if not isinstance(arguments, dict):
                raise ValueError("tool arguments are not an object")
            proposed.append(
                ProposedToolCall(name=call["name"], arguments=arguments, id=call["id"] or None)
            )
        return AgentReply(
            text="".join(sent),
            tool_calls=tuple(proposed),
            # The excerpts the model was shown are the answer's evidence.
            evidence=context.evidence if not proposed else (),
            streamed=bool(sent) and not proposed,
        )
