"""The dashboard (`/ui`) in a real headless browser: Debian's chromium, driven by Playwright.

The gateway runs as processes (emulator, API, worker) as in the end-to-end
tests; the page is used as an operator would: sign in with the admin key, watch a
job complete, open its timeline, re-send its webhook, recover a tenant's failed
webhooks. Chromium must be installed (`.ci/run` installs it): without it these
tests fail, they do not skip. `UPDATE_SCREENSHOTS=1` writes the screenshots the
README shows into docs/.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from service.localredis import LocalRedis, free_port
from tests.support import (
    Receiver,
    admins_toml,
    api_client,
    gateway_env,
    gateway_processes,
    new_tenant,
    wait_for,
)

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
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
DOCS = Path(__file__).resolve().parent.parent / "docs"
TENANT = new_tenant("orders")
OTHER = new_tenant("billing")
ADMIN_KEY = "adm_" + secrets.token_hex(16)
WAIT_MS = 20_000


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Its own Redis, the emulator, the API and a worker, as processes."""
    tmp = tmp_path_factory.mktemp("browser")
    tenants = tmp / "tenants.toml"
    tenants.write_text(TENANT.toml() + OTHER.toml() + admins_toml(ADMIN_KEY))
    redis = LocalRedis().start()
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    emulator_url = f"http://127.0.0.1:{ports['emulator']}"
    env = gateway_env(redis.url, emulator_url, tenants, PRICE_USD="0.25")
    procs = gateway_processes(ports, env, tmp, ["--queue-s", "0.3", "--run-s", "0.5"])
    try:
        yield {"api": f"http://127.0.0.1:{ports['api']}", "tmp": tmp}
    finally:
        for proc in procs.values():
            proc.stop()
        redis.cleanup()


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's chromium, headless; its absence fails the test (CI installs it)."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        yield launched
        await launched.close()


@pytest.fixture
async def page(browser, stack) -> AsyncIterator[Page]:
    context = await browser.new_context(
        base_url=stack["api"], viewport={"width": 1280, "height": 860}
    )
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    yield opened
    await context.close()
    assert not errors, errors


@pytest.fixture
async def tenant_api(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack["api"], TENANT) as client:
        yield client


async def sign_in(page: Page, key: str = ADMIN_KEY, view: str = "") -> None:
    await page.goto(f"/ui{view}")
    await page.fill("#login-key", key)
    await page.click("#login-form button")


async def screenshot(page: Page, name: str, tmp: Path) -> None:
    """A screenshot of the page; into docs/ too with UPDATE_SCREENSHOTS=1."""
    shot = await page.screenshot(full_page=True)
    assert shot.startswith(b"\x89PNG")
    (tmp / name).write_bytes(shot)
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        (DOCS / name).write_bytes(shot)


async def submit(client: httpx.AsyncClient, url: str) -> str:
    body = {
        "input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"},
        "webhook": {"url": url},
    }
    answer = await client.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


async def test_a_tenant_key_is_refused(page):
    """A tenant's API key does not open the dashboard: the page says so and shows nothing."""
    await sign_in(page, TENANT.api_key)
    await expect(page.locator("#login-error")).to_have_text("That key is not an admin key.")
    await expect(page.locator("#nav")).to_be_hidden()
    await expect(page.locator("#overview")).to_be_hidden()
    assert await page.evaluate("sessionStorage.length") == 0


async def test_an_operator_watches_a_job_complete_and_sends_its_webhook_again(
    page, stack, tenant_api, receiver
):
    """An operator sees a new job in the list until it completes, then its timeline.

    The timeline shows each state and the webhook's attempt; re-sending it adds an
    attempt, with the same webhook-id.
    """
    await sign_in(page, view="#jobs")
    await expect(page.locator("#job-table")).to_be_visible()
    job_id = await submit(tenant_api, receiver.url)
    row = page.locator("#job-table tbody tr", has_text=job_id)
    await expect(row).to_be_visible(timeout=WAIT_MS)
    await expect(row.locator(".badge")).to_have_text("completed", timeout=WAIT_MS)
    await row.locator("a").click()
    await expect(page.locator("#job-title")).to_contain_text(job_id)
    timeline = page.locator("#timeline li b")
    await expect(timeline).to_have_text(
        ["created", "sent to RunComfy", "started", "completed"], timeout=WAIT_MS
    )
    attempts = page.locator("#attempts tbody tr")
    await expect(attempts).to_have_count(1, timeout=WAIT_MS)
    await expect(attempts.nth(0)).to_contain_text("200")
    await expect(page.locator("#submits tbody tr")).to_contain_text("accepted")
    await screenshot(page, "ui-job.png", stack["tmp"])
    await page.click("#job-resend")
    await expect(page.locator("#job-message")).to_have_text("Webhook queued again.")
    await expect(attempts).to_have_count(2, timeout=WAIT_MS)
    await wait_for(lambda: _true(len(receiver.received) == 2))
    ids = {received.headers["webhook-id"] for received in receiver.received}
    assert len(ids) == 1


async def test_an_operator_recovers_a_tenants_failed_webhooks(page, tenant_api):
    """Webhooks that failed while their receiver was down are listed, then recovered.

    Recovering the tenant's since yesterday sends each once more, and the list empties.
    """
    down = await Receiver(statuses=[500] * 100).start()
    try:
        jobs = [await submit(tenant_api, down.url) for _ in range(3)]

        async def all_failed() -> bool:
            answers = [(await tenant_api.get(f"/v1/jobs/{j}")).json() for j in jobs]
            return all(a["webhook"] and a["webhook"]["state"] == "failed" for a in answers)

        await wait_for(all_failed, timeout=30)
        sent_while_down = len(down.received)
        down.statuses.clear()  # the receiver is back
        await sign_in(page, view="#deliveries")
        failed = page.locator("#failed-table tbody tr")
        for job_id in jobs:
            await expect(failed.filter(has_text=job_id)).to_have_count(1, timeout=WAIT_MS)
        await page.select_option("#recover-tenant", "orders")
        await page.click("#recover-form button")
        await expect(page.locator("#recover-result")).to_have_text("Recovering 3 deliveries.")
        await wait_for(lambda: _true(len(down.received) == sent_while_down + 3), timeout=30)
        resent = {r.headers["webhook-id"] for r in down.received[sent_while_down:]}
        assert len(resent) == 3
        await expect(page.locator("#failed-empty")).to_be_visible(timeout=WAIT_MS)
    finally:
        await down.stop()


async def test_the_overview_shows_every_tenant_and_the_activity_chart(page, stack):
    """The overview shows the gateway's figures, a row per tenant and a chart of four series."""
    await sign_in(page)
    await expect(page.locator("#tenants tbody tr")).to_have_count(2)
    orders = page.locator("#tenants tbody tr", has_text="orders")
    await expect(orders).to_be_visible()
    await expect(page.locator("#tiles .tile")).to_have_count(4)
    await expect(page.locator("#tiles")).to_contain_text("upstream slots")
    await expect(page.locator("#chart svg polyline")).to_have_count(4)
    async with page.expect_response(lambda answer: "activity?minutes=60" in answer.url):
        await page.select_option("#chart-minutes", "60")
    await screenshot(page, "ui-overview.png", stack["tmp"])


async def _true(value: bool) -> bool:
    return value
