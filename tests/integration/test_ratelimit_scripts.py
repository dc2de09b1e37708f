"""The API's rate-limited conversation read runs its limit scripts by sha alone (no SCRIPT EXISTS
round trip per turn): a Valkey that lost its scripts still counts each hit exactly once."""

from __future__ import annotations

from tests.conftest import Stack


async def test_a_turn_after_valkey_lost_its_scripts_is_answered_and_counted_once(
    stack: Stack,
) -> None:
    conv = (await stack.api.post("/v1/conversations", json={})).json()
    turns = f"/v1/conversations/{conv['id']}/turns"
    assert (await stack.api.post(turns, json={"user_message": "hi"})).status_code == 200
    r = stack.core.store.connection.redis
    await r.script_flush()  # as after a restart without persistence of the script cache
    answered = await stack.api.post(turns, json={"user_message": "what are your hours?"})
    assert answered.status_code == 200, answered.text
    windows = [k async for k in r.scan_iter(match=f"{stack.namespace}:rate:user:*")]
    assert len(windows) == 1
    assert int(await r.get(windows[0])) == 2  # one hit per turn, none counted twice
