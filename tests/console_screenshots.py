"""Regenerate the console screenshots in docs/console/: `python -m tests.console_screenshots`.

It drives the real console in headless Chromium against the whole gateway running in-process
(the browser tests' fixtures), with a few SMS and API conversations waiting for people, and
saves the inbox, a conversation and the approvals view. pytest does not collect this module on
its own (its name does not start with `test_`); the command runs it explicitly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from playwright.async_api import expect

from tests.browser.test_console import WAIT_MS, Tab, browser, operator_key, tab
from tests.conftest import Stack
from tests.integration.test_sms import post_signed, sms_form

__all__ = ["browser", "tab"]  # the fixtures this module's test uses
OUT = Path(__file__).resolve().parent.parent / "docs" / "console"
MAYA, LEE, SAM = "+14155550123", "+14155550177", "+14155550142"


async def test_console_screenshots(tab: Tab, stack: Stack) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    # Three people by SMS: one asks for a human, one is already with Ana, one wants a refund.
    await post_signed(stack, "/twilio/sms", sms_form("how long do refunds take?", sender=LEE))
    await post_signed(stack, "/twilio/sms", sms_form("I want to talk to a person", sender=LEE))
    await post_signed(
        stack, "/twilio/sms", sms_form("my parcel is late, can a human help?", sender=MAYA)
    )
    await post_signed(stack, "/twilio/sms", sms_form("status of order 67890", sender=SAM))
    await post_signed(stack, "/twilio/sms", sms_form("please refund order 12345", sender=SAM))
    ana = await tab(await operator_key(stack, "Ana"))
    handoffs = ana.get_by_test_id("handoff")
    await expect(handoffs).to_have_count(2, timeout=WAIT_MS)
    await expect(ana.get_by_test_id("inbox-approval")).to_have_count(1, timeout=WAIT_MS)

    await handoffs.filter(has_text=LEE).get_by_role("link").click()
    await expect(ana.get_by_test_id("handoff-state")).to_contain_text("Waiting for a person")
    await ana.get_by_test_id("claim").click()
    await expect(ana.get_by_test_id("handoff-state")).to_have_text("You have this conversation.")
    await ana.get_by_test_id("reply").fill("Hi, this is Ana from Acme. How can I help?")
    await ana.get_by_test_id("send").click()
    await expect(ana.locator('[data-author="operator"]')).to_have_count(1, timeout=WAIT_MS)
    await post_signed(stack, "/twilio/sms", sms_form("my refund has not arrived yet", sender=LEE))
    await expect(ana.get_by_test_id("turn")).to_have_count(7, timeout=WAIT_MS)
    await ana.screenshot(path=str(OUT / "conversation.png"), full_page=True)

    await ana.get_by_test_id("nav-inbox").click()
    await expect(handoffs.filter(has_text="with Ana")).to_have_count(1, timeout=WAIT_MS)
    await ana.screenshot(path=str(OUT / "inbox.png"), full_page=True)

    await ana.get_by_test_id("nav-approvals").click()
    await expect(ana.get_by_test_id("approval")).to_have_count(1, timeout=WAIT_MS)
    await ana.get_by_test_id("approval-note").fill("Regular customer, fine by me")
    await ana.screenshot(path=str(OUT / "approvals.png"), full_page=True)


def main() -> int:
    return pytest.main([__file__, "-q", "-p", "no:cacheprovider"])


if __name__ == "__main__":
    sys.exit(main())
