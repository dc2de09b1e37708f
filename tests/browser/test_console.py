"""The operator console driven in headless Chromium (Playwright over the system's `chromium`).

One browser per module; every test gets the whole gateway in-process on real sockets (tests/
conftest.py's `stack`), an SMS user speaking through signed Twilio webhooks, and the Twilio fake
receiving what the console's operator writes.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect

from tests.conftest import Stack, eventually
from tests.integration.test_sms import post_signed, sent_messages, sms_form
from tests.twilio_forms import ALICE

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000
HAVE_CHROMIUM = os.path.exists(CHROMIUM)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    if not HAVE_CHROMIUM:
        if os.environ.get("CI"):
            pytest.fail(
                f"{CHROMIUM} is missing in CI: `python3 dev.py test` installs it with apt-get"
            )
        pytest.skip(
            f"{CHROMIUM} is not installed here (`python3 dev.py test` installs it with apt-get where it can)"
        )
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        yield browser
        await browser.close()


async def operator_key(stack: Stack, display_name: str, scope: str = "operator") -> str:
    created = await stack.api.post(
        "/v1/api-keys",
        json={"name": display_name.lower(), "scopes": [scope], "display_name": display_name},
    )
    assert created.status_code == 201, created.text
    return str(created.json()["key"])


Tab = Callable[[str | None], Awaitable[Page]]


@pytest.fixture
async def tab(browser: Browser, stack: Stack) -> AsyncIterator[Tab]:
    """Opens fresh tabs (each its own sessionStorage) on the console, signed in with a key; all
    are closed before the gateway stops, so no event stream outlives its test."""
    contexts: list[BrowserContext] = []

    async def open_tab(key: str | None) -> Page:
        context = await browser.new_context(viewport={"width": 1100, "height": 900})
        contexts.append(context)
        page = await context.new_page()
        await page.goto(f"{stack.base_url}/console")
        if key is not None:
            await page.get_by_test_id("key").fill(key)
            await page.get_by_test_id("sign-in-button").click()
            await expect(page.get_by_test_id("live")).to_have_text("live", timeout=WAIT_MS)
            await expect(page.get_by_test_id("inbox")).to_be_visible()
        return page

    yield open_tab
    for context in contexts:
        await context.close()


def bodies(stack: Stack) -> list[str]:
    return [m["Body"] for m in sent_messages(stack)]


async def sms_sent(stack: Stack, text: str) -> list[str]:
    async def sent() -> list[str] | None:
        found = bodies(stack)
        return found if any(text in b for b in found) else None

    return await eventually(sent, timeout=15, what=f"an SMS containing {text!r}")


async def test_an_operator_takes_an_sms_conversation_and_approves_a_refund_in_the_console(
    tab: Tab, stack: Stack
) -> None:
    ana = await tab(await operator_key(stack, "Ana"))
    await expect(ana.get_by_test_id("who")).to_have_text("Ana")

    # An SMS user asks for a person: the inbox shows it without a reload.
    await post_signed(stack, "/twilio/sms", sms_form("I want to talk to a human please"))
    waiting = ana.get_by_test_id("handoff")
    await expect(waiting).to_have_count(1, timeout=WAIT_MS)
    await expect(waiting).to_contain_text("sms")
    await expect(waiting).to_contain_text("+14155550109")
    await expect(waiting).to_contain_text("unclaimed")
    await expect(waiting.get_by_test_id("last-message")).to_have_text(
        "I want to talk to a human please"
    )
    await sms_sent(stack, "connect you with a member of our team")

    # Claim, reply (the reply reaches Twilio), hand back.
    await waiting.get_by_role("link").click()
    await expect(ana.get_by_test_id("handoff-state")).to_contain_text("Waiting for a person")
    await ana.get_by_test_id("claim").click()
    await expect(ana.get_by_test_id("handoff-state")).to_have_text(
        "You have this conversation.", timeout=WAIT_MS
    )
    await ana.get_by_test_id("reply").fill("Hi, this is Ana from Acme.")
    await ana.get_by_test_id("send").click()
    await sms_sent(stack, "Hi, this is Ana from Acme.")
    operator_turn = ana.locator('[data-testid="turn"][data-author="operator"]')
    await expect(operator_turn).to_contain_text("operator · Ana", timeout=WAIT_MS)
    await ana.get_by_test_id("hand-back").click()
    await expect(ana.get_by_test_id("handoff-state")).to_have_text(
        "The agent has this conversation.", timeout=WAIT_MS
    )

    # The agent proposes a refund: it appears under approvals, is approved in the page, and the
    # user gets the result by SMS.
    await ana.get_by_test_id("nav-approvals").click()
    await post_signed(stack, "/twilio/sms", sms_form("please refund order 12345"))
    approval = ana.get_by_test_id("approval")
    await expect(approval).to_have_count(1, timeout=WAIT_MS)
    await expect(approval.get_by_test_id("approval-tool")).to_have_text("issue_refund")
    await expect(approval.get_by_test_id("approval-arguments")).to_contain_text('"12345"')
    await expect(approval).to_contain_text("left")
    await expect(approval).to_contain_text(f"from {ALICE}")  # who asked, not an id
    await approval.get_by_test_id("approval-note").fill("customer is a regular")
    await approval.get_by_test_id("approve").click()
    await expect(ana.get_by_test_id("notice")).to_have_text("Approved: issue_refund.")
    await sms_sent(stack, "the refund for order 12345 has been issued")
    await expect(approval).to_have_count(0, timeout=WAIT_MS)
    decided = (await stack.api.get("/v1/approvals", params={"status": "approved"})).json()
    assert [(a["reviewer_name"], a["note"]) for a in decided["items"]] == [
        ("Ana", "customer is a regular")
    ]

    # The user asks again; Ana claims; a second operator's claim is refused, naming Ana.
    await post_signed(stack, "/twilio/sms", sms_form("a human again please"))
    await ana.get_by_test_id("nav-inbox").click()
    await expect(ana.get_by_test_id("handoff")).to_have_count(1, timeout=WAIT_MS)
    await ana.get_by_test_id("handoff").get_by_role("link").click()
    await expect(ana.get_by_test_id("handoff-state")).to_contain_text("Waiting for a person")
    await ana.get_by_test_id("claim").click()
    await expect(ana.get_by_test_id("handoff-state")).to_have_text(
        "You have this conversation.", timeout=WAIT_MS
    )
    bo = await tab(await operator_key(stack, "Bo"))
    await expect(bo.get_by_test_id("handoff")).to_contain_text("with Ana", timeout=WAIT_MS)
    await bo.get_by_test_id("handoff").get_by_role("link").click()
    await expect(bo.get_by_test_id("handoff-state")).to_have_text("Ana has this conversation.")
    await bo.get_by_test_id("claim").click()
    await expect(bo.get_by_test_id("notice")).to_have_text(
        "Could not claim this conversation: Ana already claimed this conversation."
    )


async def test_hostile_text_renders_as_text_and_never_runs(tab: Tab, stack: Stack) -> None:
    page = await tab(await operator_key(stack, "Ana"))
    hostile = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
    await post_signed(stack, "/twilio/sms", sms_form("I need a human"))
    await expect(page.get_by_test_id("handoff")).to_have_count(1, timeout=WAIT_MS)
    await post_signed(stack, "/twilio/sms", sms_form(hostile))
    last = page.get_by_test_id("handoff").get_by_test_id("last-message")
    await expect(last).to_have_text(hostile, timeout=WAIT_MS)
    await page.get_by_test_id("handoff").get_by_role("link").click()
    contents = page.get_by_test_id("turn-content")
    await expect(contents.filter(has_text="window.__pwned")).to_have_text(hostile, timeout=WAIT_MS)
    assert await page.evaluate("window.__pwned") is None
    assert await page.locator("#transcript script, #transcript img, #handoffs img").count() == 0


async def test_failures_read_as_what_happened(tab: Tab, stack: Stack) -> None:
    """A lost claim, a conversation closed meanwhile and a revoked key each say so. The live
    stream is cut for this page, so what it shows is stale exactly as on a slow connection."""
    key = await operator_key(stack, "Ana")
    page = await tab(None)
    await page.route("**/v1/events/stream", lambda route: route.abort())
    await page.get_by_test_id("key").fill(key)
    await page.get_by_test_id("sign-in-button").click()
    await post_signed(stack, "/twilio/sms", sms_form("a person please"))
    await eventually(lambda: _one_requested(stack), timeout=15, what="the handoff")
    await page.reload()  # no live stream: read the inbox again
    await page.get_by_test_id("handoff").get_by_role("link").click()
    await expect(page.get_by_test_id("handoff-state")).to_contain_text("Waiting for a person")
    await page.get_by_test_id("claim").click()
    await expect(page.get_by_test_id("handoff-state")).to_have_text("You have this conversation.")
    handoff = (await _one_requested(stack, "assigned"))[0]

    # An admin takes the conversation over: Ana's next reply is refused, naming who has it.
    taken = await stack.api.post(f"/v1/handoffs/{handoff['id']}/claim", json={"reassign": True})
    assert taken.status_code == 200
    await page.get_by_test_id("reply").fill("still me")
    await page.get_by_test_id("send").click()
    await expect(page.get_by_test_id("notice")).to_have_text(
        "You no longer hold this conversation: bootstrap has it now."
    )

    # The conversation is closed meanwhile.
    closed = await stack.api.post(f"/v1/conversations/{handoff['conversation_id']}/close", json={})
    assert closed.status_code == 200
    await page.get_by_test_id("reply").fill("hello?")
    await page.get_by_test_id("send").click()
    await expect(page.get_by_test_id("notice")).to_have_text(
        "Could not send your reply: the conversation was closed meanwhile."
    )

    # Ana's key is revoked: the next request signs her out with the reason.
    async with stack.client(key) as ana:
        me = (await ana.get("/v1/whoami")).json()
    assert (await stack.api.delete(f"/v1/api-keys/{me['id']}")).status_code == 204
    await page.get_by_test_id("nav-inbox").click()
    await expect(page.get_by_test_id("notice")).to_have_text(
        "Your key is no longer valid (expired or revoked). Sign in again."
    )
    await expect(page.get_by_test_id("sign-in")).to_be_visible()


async def _one_requested(stack: Stack, status: str = "requested") -> list[dict[str, Any]] | None:
    items = (await stack.api.get("/v1/handoffs", params={"status": status})).json()["items"]
    return items if len(items) == 1 else None


async def test_an_invalid_key_is_refused_with_a_message(tab: Tab) -> None:
    page = await tab(None)
    await page.get_by_test_id("key").fill("sk_not_a_key")
    await page.get_by_test_id("sign-in-button").click()
    await expect(page.get_by_test_id("notice")).to_have_text(
        "Your key is no longer valid (expired or revoked). Sign in again."
    )
    await expect(page.get_by_test_id("sign-in")).to_be_visible()


async def test_the_console_is_served_offline_with_a_strict_content_security_policy(
    stack: Stack,
) -> None:
    async with stack.client(None) as anonymous:
        page = await anonymous.get("/console")
        script = await anonymous.get("/console/console.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp
    assert "script-src 'self'" in csp
    assert "unsafe-inline" not in csp
    assert script.headers["content-type"].startswith("text/javascript")
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script.text
    # Every asset comes from this origin: nothing in the page points elsewhere.
    assert "http://" not in page.text
    assert "https://" not in page.text
