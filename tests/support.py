"""Test helpers: tenants with known keys, a real webhook receiver, waiting on conditions."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import secrets
import select
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import obstore
from litestar import Litestar, Request, Response, post
from litestar.params import RawBody
from obstore.store import S3Store
from standardwebhooks.webhooks import Webhook

from service.api.app import create_app
from service.config import Settings, Tenant, Tenants
from service.localredis import LocalRedis, free_port
from service.models import EventType, JobRecord, VideoInput, WebhookSpec, utcnow
from service.runcomfy.emulator import output_chunks
from service.serving import Served, listen, serve
from service.store.connection import new_id
from service.store.keys import Keys

PROBLEM = "application/problem+json"

StartEmulator = Callable[..., Awaitable[str]]
TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
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

    def toml(self, *, hosts: tuple[str, ...] = ("127.0.0.1",), **numbers: float) -> str:
        """The tenant's table; `numbers` are further keys (`budget_usd_per_day=1.5`)."""
        digest = hashlib.sha256(self.api_key.encode()).hexdigest()
        host_list = ", ".join(f'"{h}"' for h in hosts)
        return (
            f"[tenants.{self.id}]\n"
            f'api_keys = ["{digest}"]\n'
            f'webhook_secret = "{self.whsec}"\n'
            f"callback_hosts = [{host_list}]\n"
        ) + "".join(f"{name} = {value}\n" for name, value in numbers.items())


def api_client(base_url: str, tenant: TestTenant) -> httpx.AsyncClient:
    """A client of the gateway's API at `base_url`, authenticated as `tenant`."""
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    return httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10)


def new_tenant(tenant_id: str = "orders") -> TestTenant:
    return TestTenant(
        id=tenant_id, api_key="key_" + secrets.token_hex(8), secret=secrets.token_bytes(24)
    )


ORDERS = new_tenant("orders")
"""The tenant the in-process API tests call as (conftest's `api`)."""
BILLING = new_tenant("billing")
"""Another tenant, whose jobs `ORDERS` must never see (conftest's `other`)."""


def admins_toml(*api_keys: str) -> str:
    """The tenants file's `[admins]` table for these plain admin keys."""
    digests = ", ".join(f'"{hashlib.sha256(key.encode()).hexdigest()}"' for key in api_keys)
    return f"[admins]\napi_keys = [{digests}]\n"


def tenants_of(*tenants: Tenant) -> Tenants:
    return Tenants(by_id={t.id: t for t in tenants})


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    at: float = field(default_factory=time.time)  # wall clock, to compare with job timestamps

    def verified_by(self, whsec: str) -> dict[str, Any]:
        """The event, verified with the stock standardwebhooks library (raises if invalid)."""
        return Webhook(whsec).verify(self.body, self.headers)  # type: ignore[no-any-return]


@dataclass
class Receiver:
    """A real webhook receiver on 127.0.0.1; `statuses` scripts its answers, then 200."""

    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    port: int = 0
    failure_body: bytes = b"nope"
    """What a non-2xx answer says."""
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
        return Response(b"ok" if status < 300 else self.failure_body, status_code=status)

    async def start(self) -> Receiver:
        app = Litestar([post("/hook")(self._receive)], openapi_config=None, logging_config=None)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self._served = await serve(app, sock)
        return self

    async def stop(self) -> None:
        if self._served is not None:
            await self._served.stop()


@dataclass
class HangingReceiver:
    """A real webhook receiver that never answers until stopped, on `ports` ports of each host."""

    hosts: tuple[str, ...] = ("127.0.0.1",)
    ports: int = 1
    urls: list[str] = field(default_factory=list)
    arrived: int = 0  # requests received, every one of them still unanswered
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _served: list[Served] = field(default_factory=list)

    async def _hang(self) -> str:
        self.arrived += 1
        await self._stopped.wait()
        return "too late"

    async def start(self) -> HangingReceiver:
        app = Litestar([post("/hook")(self._hang)], openapi_config=None, logging_config=None)
        for host in self.hosts:
            for _ in range(self.ports):
                sock = listen(host, 0)
                self._served.append(await serve(app, sock))
                self.urls.append(f"http://{host}:{sock.getsockname()[1]}/hook")
        return self

    async def stop(self) -> None:
        self._stopped.set()
        for served in self._served:
            await served.stop()


@asynccontextmanager
async def serve_api(
    settings: Settings, keys: Keys, api_key: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    """The app in this event loop (lifespan included), and a client that calls it."""
    app = create_app(settings, keys=keys)
    started, stop = asyncio.Event(), asyncio.Event()

    async def run_lifespan() -> None:
        # One task enters and leaves the lifespan: pytest may run a fixture's
        # setup and teardown in different tasks, which anyio's scopes refuse.
        async with app.lifespan():
            started.set()
            await stop.wait()

    lifespan = asyncio.create_task(run_lifespan())
    ready = asyncio.ensure_future(started.wait())
    await asyncio.wait({lifespan, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert started.is_set(), lifespan
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://gateway.test", headers=headers
        ) as client:
            yield client
    finally:
        stop.set()
        await lifespan


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """The answer is a problem+json of this status, naming nothing internal; its body."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM)
    problem = answer.json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:runcomfy-gateway:problem:")
    assert problem["title"]
    assert problem["detail"]
    assert "Traceback" not in answer.text
    return problem


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
    video_url: str = "https://example.com/v.mp4",
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
        input=VideoInput(prompt="a cat on a skateboard", video_url=video_url),
        webhook=webhook,
        created_at=now,
        deadline_at=now + timedelta(seconds=timeout_s),
    )


CLI = [sys.executable, "-m", "service"]

NO_PREFLIGHT = {"GATEWAY_PREFLIGHT": "off"}
"""For gateways whose tests are not about the input pre-flight: their inputs are never served."""


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


def gateway_processes(
    ports: dict[str, int], env: dict[str, str], logs: Path, emulator_args: list[str]
) -> dict[str, Process]:
    """The emulator, the API and a worker as processes on `ports`, each up and answering."""
    procs = {
        "emulator": Process(
            ["emulator", "--port", str(ports["emulator"]), *emulator_args],
            env,
            logs / "emulator.log",
        ),
        "api": Process(
            ["api", "--host", "127.0.0.1", "--port", str(ports["api"])], env, logs / "api.log"
        ),
        "worker": Process(
            ["worker", "--metrics-port", str(ports["worker"])], env, logs / "worker.log"
        ),
    }
    try:
        wait_http(f"http://127.0.0.1:{ports['emulator']}/_emulator/requests")
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz")
        wait_http(f"http://127.0.0.1:{ports['worker']}/healthz")
    except AssertionError:
        for proc in procs.values():
            proc.stop()
        raise
    return procs


@contextlib.contextmanager
def gateway_stack(
    tmp: Path, tenant: TestTenant, emulator_args: list[str], **settings: str
) -> Iterator[dict[str, str]]:
    """A gateway of one tenant on its own Redis: emulator, API and worker; their URLs by name.

    `settings` as for `gateway_env`; everything is stopped when the block ends.
    """
    tenants = tmp / "tenants.toml"
    tenants.write_text(tenant.toml())
    redis = LocalRedis().start()
    try:
        ports = {name: free_port() for name in ("emulator", "api", "worker")}
        emulator_url = f"http://127.0.0.1:{ports['emulator']}"
        env = gateway_env(redis.url, emulator_url, tenants, **settings)
        procs = gateway_processes(ports, env, tmp, emulator_args)
        try:
            yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
        finally:
            for proc in procs.values():
                proc.stop()
    finally:
        redis.cleanup()


@asynccontextmanager
async def gateway_clients(
    urls: dict[str, str], tenant: TestTenant
) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """Clients of a `gateway_stack`: the tenant's API client, the emulator and the worker."""
    async with (
        api_client(urls["api"], tenant) as api,
        httpx.AsyncClient(base_url=urls["emulator"], timeout=10) as emulator,
        httpx.AsyncClient(base_url=urls["worker"], timeout=10) as worker,
    ):
        yield {"api": api, "emulator": emulator, "worker": worker}


_LABEL = re.compile(r'(\w+)="([^"]*)"')


def metric_samples(exposition: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The labels and value of each sample of metric `name` in a Prometheus text exposition."""
    found = []
    for line in exposition.splitlines():
        sample, _, value = line.rpartition(" ")
        if sample.split("{", 1)[0] == name:
            found.append((dict(_LABEL.findall(sample)), float(value)))
    return found


def unix(value: str) -> float:
    """An RFC 3339 time as Unix seconds."""
    return datetime.fromisoformat(value).timestamp()


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


def redirects_to(target: str, inputs: str, hops: int) -> str:
    """A URL of the emulator's input files (`inputs`) that redirects `hops` times to `target`."""
    url = target
    for hop in range(hops):
        url = f"{inputs}/hop{hop}?redirect={quote(url, safe='')}"
    return url


def gateway_env(
    redis_url: str,
    emulator_url: str,
    tenants_file: Path,
    *,
    token: str = "test-token",  # noqa: S107 - the emulator takes any token
    **settings: str,
) -> dict[str, str]:
    """The environment of a gateway process: fast polls and retries, then `settings`.

    `settings` are GATEWAY_* variables without their prefix, e.g. `LEASE_S="3"`. The input
    pre-flight is off (inputs like https://example.com/v.mp4 are never fetched) unless a
    test turns it on with `PREFLIGHT="on"`.
    """
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "RUNCOMFY_BASE_URL": emulator_url,
        "RUNCOMFY_API_TOKEN": token,
        "GATEWAY_TENANTS_FILE": str(tenants_file),
        "GATEWAY_POLL_INTERVAL_MIN_S": "0.1",
        "GATEWAY_POLL_INTERVAL_MAX_S": "0.3",
        "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.1,0.1,0.1",
        "GATEWAY_SHUTDOWN_S": "2",
        **NO_PREFLIGHT,
        **{f"GATEWAY_{name}": value for name, value in settings.items()},
    }


@asynccontextmanager
async def tcp_server(handler: TcpHandler, tls: ssl.SSLContext | None = None) -> AsyncIterator[str]:
    """A raw TCP (or TLS) server on 127.0.0.1 running `handler` per connection; yields its URL."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    scheme = "http" if tls is None else "https"
    try:
        yield f"{scheme}://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


async def read_http_request(reader: asyncio.StreamReader) -> bytes:
    """Read one HTTP/1.1 request with a Content-Length body (as our clients send) off `reader`."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


class FakeResolver:
    """Answers from a fixed table, like a DNS server an attacker controls."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int) -> list[str]:  # noqa: ARG002 - any port
        """Answer from the table, or fail like getaddrinfo for an unknown name."""
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return self.table[host]


def send_raw(sock: socket.socket, data: bytes) -> None:
    """Send bytes, tolerating a server that answers and closes before it read them all."""
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        sock.sendall(data)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it stays open."""
    deadline = time.monotonic() + timeout
    received = b""
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([sock], [], [], left)
        if not readable:
            break
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    return None


def status_of(answer: bytes) -> int | None:
    """The status code of a raw HTTP/1.1 answer, None when there is none."""
    first = answer.split(b"\r\n", 1)[0].split()
    return int(first[1]) if len(first) > 1 and first[0].startswith(b"HTTP/") else None


def inet_aton_spelling(value: int, parts: int, bases: list[int]) -> str:
    """An IPv4 address (as an int) written in 1-4 inet_aton parts, each in its base (8, 10, 16)."""
    numbers = [(value >> (8 * (3 - i))) & 0xFF for i in range(parts - 1)]
    numbers.append(value & ((1 << (8 * (5 - parts))) - 1))
    forms = {8: lambda n: f"0{n:o}", 10: str, 16: lambda n: f"0x{n:x}"}
    return ".".join(forms[base](n) for n, base in zip(numbers, bases, strict=False))


@dataclass
class ServerEvent:
    """One event of a `text/event-stream`, its data decoded as JSON."""

    event: str
    id: str
    data: dict[str, Any]


async def server_events(answer: httpx.Response) -> AsyncIterator[ServerEvent]:
    """The events of a streamed answer as they arrive (comments skipped), until it ends."""
    fields: dict[str, str] = {}
    async for line in answer.aiter_lines():
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")
        elif fields:
            yield ServerEvent(fields["event"], fields["id"], json.loads(fields["data"]))
            fields = {}


@asynccontextmanager
async def job_stream(
    client: httpx.AsyncClient, job_id: str, **headers: str
) -> AsyncIterator[AsyncIterator[ServerEvent]]:
    """`GET /v1/jobs/{id}/events` as a stream of its events."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as answer:
        assert answer.status_code == 200, await answer.aread()
        assert answer.headers["content-type"].startswith("text/event-stream")
        yield server_events(answer)


# -- durable outputs: a real S3-compatible server (moto's) and what tests read back from it ----

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_REGION": "us-east-1",
}
"""Credentials a worker's environment holds for the S3 server (moto takes any)."""


def outputs_env(
    redis_url: str, emulator_url: str, tenants_file: Path, **settings: str
) -> dict[str, str]:
    """`gateway_env` for durable outputs: the emulator's host allowed, S3 credentials set."""
    return {
        **gateway_env(
            redis_url,
            emulator_url,
            tenants_file,
            OUTPUT_HOSTS="127.0.0.1",
            PREFLIGHT_ALLOW_HOSTS="127.0.0.1",
            **settings,
        ),
        **S3_ENV,
    }


@dataclass
class S3Server:
    """moto's S3 server as a process on 127.0.0.1 (`python -m moto.server`), for real S3 calls."""

    port: int
    log: Path
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        with self.log.open("wb") as out:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(f"{self.url}/moto-api/")
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def create_bucket(self) -> str:
        """A new empty bucket (moto asks no signature for it); its name."""
        bucket = "outputs-" + secrets.token_hex(6)
        assert httpx.put(f"{self.url}/{bucket}", timeout=10).status_code == 200
        return bucket

    def store_toml(self, bucket: str, prefix: str, presign_s: int | None = None) -> str:
        """A tenant's `[output_store]` table body on this server (add it under the tenant's)."""
        presign = f"presign_s = {presign_s}\n" if presign_s is not None else ""
        return (
            f'url = "s3://{bucket}/{prefix}"\nendpoint_url = "{self.url}"\n'
            f'region = "us-east-1"\n{presign}'
        )

    def client(self, bucket: str) -> S3Store:
        """An obstore client of `bucket`, with the test credentials."""
        return S3Store(
            bucket,
            endpoint=self.url,
            region="us-east-1",
            access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"],
            secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"],
            client_options={"allow_http": True},
        )

    async def objects(self, bucket: str, prefix: str) -> dict[str, int]:
        """Every object under `prefix` in `bucket`: key -> size."""
        found = await obstore.list(self.client(bucket), prefix=prefix).collect_async()
        return {item["path"]: item["size"] for item in found}

    async def sha256(self, bucket: str, key: str) -> str:
        """The sha256 of an object's bytes, read as a stream."""
        digest = hashlib.sha256()
        answer = await obstore.get_async(self.client(bucket), key)
        async for chunk in answer.stream():
            digest.update(chunk)
        return digest.hexdigest()

    async def delete(self, bucket: str, key: str) -> None:
        """Remove an object (a large one, once a test has read it)."""
        await obstore.delete_async(self.client(bucket), key)


def emulator_output(size: int) -> tuple[str, int]:
    """The sha256 and size of the emulator's output video of `size` bytes."""
    digest = hashlib.sha256()
    for chunk in output_chunks(size):
        digest.update(chunk)
    return digest.hexdigest(), size


def process_rss_bytes(pid: int) -> int:
    """A process's resident set size now, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")
