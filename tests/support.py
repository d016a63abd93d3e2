"""Test helpers: tenants with known keys, a real webhook receiver, waiting on conditions."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, Request, Response, post
from litestar.params import RawBody
from standardwebhooks.webhooks import Webhook

from service.config import Tenant, Tenants
from service.models import EventType, JobRecord, VideoInput, WebhookSpec, utcnow
from service.serving import Served, listen, serve
from service.store.connection import new_id

StartEmulator = Callable[..., Awaitable[str]]
"""The `emulator` fixture: start an emulator with EmulatorConfig fields, get its URL."""


@dataclass
class TestTenant:
    """A tenant and the plain secrets a caller and a receiver would hold."""

    id: str
    api_key: str
    secret: bytes

    @property
    def whsec(self) -> str:
        return "whsec_" + base64.b64encode(self.secret).decode()

    def tenant(self, *, hosts: tuple[str, ...] = ("127.0.0.1",), **limits: Any) -> Tenant:
        return Tenant(
            id=self.id,
            api_key_hashes=(hashlib.sha256(self.api_key.encode()).hexdigest(),),
            webhook_secrets=(self.secret,),
            callback_hosts=hosts,
            **limits,
        )

    def toml(self, *, hosts: tuple[str, ...] = ("127.0.0.1",)) -> str:
        digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        host_list = ", ".join(f'"{h}"' for h in hosts)
        return (
            f"[tenants.{self.id}]\n"
            f'api_keys = ["{digest}"]\n'
            f'webhook_secret = "{self.whsec}"\n'
            f"callback_hosts = [{host_list}]\n"
        )


def new_tenant(tenant_id: str = "orders") -> TestTenant:
    return TestTenant(
        id=tenant_id, api_key="key_" + secrets.token_hex(8), secret=secrets.token_bytes(24)
    )


def tenants_of(*tenants: Tenant) -> Tenants:
    return Tenants(by_id={t.id: t for t in tenants})


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    def verified_by(self, whsec: str) -> dict[str, Any]:
        """The event, verified with the stock standardwebhooks library (raises if invalid)."""
        return Webhook(whsec).verify(self.body, self.headers)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A real webhook receiver on 127.0.0.1; `statuses` scripts its answers, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    _served: Served | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def answer(self, delivery: Received) -> int:
        """Keep the delivery and choose the status it is answered with."""
        self.received.append(delivery)
        return self.statuses.pop(0) if self.statuses else 200

    async def _receive(self, request: Request[Any, Any, Any], body: RawBody) -> Response[bytes]:
        status = self.answer(Received(dict(request.headers), body))
        return Response(b"ok" if status < 300 else b"nope", status_code=status)

    async def start(self) -> Receiver:
        app = Litestar([post("/hook")(self._receive)], openapi_config=None, logging_config=None)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self._served = await serve(app, sock)
        return self

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.stop()


async def wait_for(
    check: Callable[[], Awaitable[Any]], *, timeout: float = 15.0, every: float = 0.05
) -> Any:
    """Poll `check` until it returns something truthy, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last: {value!r})")
        await asyncio.sleep(every)


def job_record(
    tenant: str,
    *,
    webhook_url: str | None = None,
    timeout_s: float = 7200,
    events: list[EventType] | None = None,
) -> JobRecord:
    """A pending job as the API would store it."""
    now = utcnow()
    webhook = None
    if webhook_url is not None:
        webhook = WebhookSpec(url=webhook_url)
        if events is not None:
            webhook.events = events
    return JobRecord(
        id=new_id("job_"),
        tenant=tenant,
        key_id="key_test",
        input=VideoInput(prompt="a cat on a skateboard", video_url="https://example.com/v.mp4"),
        webhook=webhook,
        created_at=now,
        deadline_at=now + timedelta(seconds=timeout_s),
    )


CLI = [sys.executable, "-m", "service"]


class Process:
    """A gateway command as a child process, its output kept in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._file = log.open("wb")
        self.proc = subprocess.Popen(
            CLI + args, env=env, stdout=self._file, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()
        return self.proc.returncode


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not come up within {timeout}s")
        time.sleep(0.05)
