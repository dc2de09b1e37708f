"""What handlers are given instead of looking it up: the gateway, the keyring, the calling key, and
the conversation the caller may see; and the parameter types several routes share.

`require_scope` (auth.py) has already checked the key when these run, so `caller` is always set.
A conversation the calling key may not see is 404, as if it did not exist: a client key with `own`
visibility learns nothing about other keys' conversations, not even that they exist.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request
from litestar.datastructures import State
from litestar.di import Provide
from litestar.params import HeaderParameter, Parameter

from services.api.auth import KeyRing, sees_only_its_own
from services.api.gateway import Gateway
from services.api.schemas import PostTurn
from shared.errors import NotFound, error_from_code
from shared.models import ApiKey, Conversation

Limit = Annotated[int, Parameter(ge=1, le=100)]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="A retry with the same key and body is the same request, answered once; the "
        "same key with another body is 422 `idempotency_key_reused` (kept for 24 h).",
    ),
]
_enc = msgspec.json.Encoder()


def _gateway(state: State) -> Gateway:
    return state.gateway  # type: ignore[no-any-return]


def _keyring(state: State) -> KeyRing:
    return state.keyring  # type: ignore[no-any-return]


def _caller(request: Request[Any, Any, Any]) -> ApiKey:
    return request.state.api_key  # type: ignore[no-any-return]


class VisibleConversation:
    """The conversation in the path, if the calling key may see it (404 otherwise): looked up when
    the handler awaits it, after Litestar has validated the rest of the request, so a malformed
    request is 422 whether or not the conversation exists. Dependencies resolve before that
    validation, which is why this is not the conversation itself. The caller is read from the
    request, like `conversation_for_turn` does, so `gateway` is its only dependency (one per level:
    no task group per request).
    """

    def __init__(
        self, conversation_id: str, gateway: Gateway, request: Request[Any, Any, Any]
    ) -> None:
        self._id, self._gateway, self._caller = conversation_id, gateway, _caller(request)

    async def __call__(self) -> Conversation:
        conv = await self._gateway.store.get_conversation(self._id)
        _check_visible(self._caller, conv)
        return conv


async def conversation_for_turn(
    conversation_id: str,
    data: PostTurn,
    gateway: Gateway,
    request: Request[Any, Any, Any],
    idempotency_key: IdempotencyKey = None,
) -> Conversation:
    """The conversation a turn is posted to: 404 when unknown, 409 when closed, 429 when the key
    or the conversation's end user is over its limit, 422 when `idempotency_key` came before with
    another body (the same body is a retry: the envelope id derived from the key replays it).
    It takes every input of the turn handlers, so Litestar validates them all before it runs.

    The caller is read from the request, not injected: Litestar resolves two dependencies of one
    level (`gateway` and `caller`) in an anyio task group, two tasks per turn for two attribute
    reads; with `gateway` alone below it, each level is one plain call."""
    caller = _caller(request)
    conv = await gateway.conversation_for_turn(conversation_id, caller.id)
    _check_visible(caller, conv)
    if conv.status == "closed":
        raise error_from_code("conversation_closed", "conversation is closed", {"status": "closed"})
    if idempotency_key is not None:
        await gateway.store.remember_idempotency_key(
            f"turns:{conv.id}", idempotency_key, _enc.encode(data)
        )
    return conv


def _check_visible(key: ApiKey, conv: Conversation) -> None:
    if sees_only_its_own(key) and conv.created_by != key.id:
        raise NotFound(f"conversation {conv.id} not found", details={"conversation_id": conv.id})


# Every handler may ask for these by name; `conversation` is bound per controller or handler.
APP_DEPENDENCIES = {
    "gateway": Provide(_gateway, sync_to_thread=False),
    "keyring": Provide(_keyring, sync_to_thread=False),
    "caller": Provide(_caller, sync_to_thread=False),
}
VISIBLE_CONVERSATION = {"conversation": Provide(VisibleConversation, sync_to_thread=False)}
TURN_CONVERSATION = {"conversation": Provide(conversation_for_turn)}
