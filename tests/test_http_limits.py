"""The `api` process bounds request heads: their size, their header count, the time to send them."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from service.api import server
from service.localredis import LocalRedis, free_port
from tests.support import (
    Process,
    gateway_env,
    new_tenant,
    read_until_closed,
    send_raw,
    status_of,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
HEAD_TIMEOUT_S = 5  # what the API promises; the ingress in deploy/ says the same
SLACK_S = 3  # scheduling on a busy test machine


@pytest.fixture(scope="module")
def api(tmp_path_factory, redis_server: LocalRedis) -> Iterator[tuple[str, int]]:
    """The `api` command as a process on 127.0.0.1."""
    tmp = tmp_path_factory.mktemp("http-limits")
    tenants = tmp / "tenants.toml"
    tenants.write_text(TENANT.toml())
    env = gateway_env(redis_server.url, "http://127.0.0.1:9", tenants)  # no upstream call
    port = free_port()
    proc = Process(["api", "--host", "127.0.0.1", "--port", str(port)], env, tmp / "api.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        yield ("127.0.0.1", port)
    finally:
        proc.stop()


def exchange(address: tuple[str, int], request: bytes, timeout: float = 10) -> bytes | None:
    """Send one request on a new connection that asks to be closed; the whole answer."""
    with socket.create_connection(address, timeout=timeout) as sock:
        send_raw(sock, request)
        return read_until_closed(sock, timeout)


def head(*headers: bytes, target: bytes = b"/healthz") -> bytes:
    lines = [b"GET " + target + b" HTTP/1.1", b"Host: gateway", b"Connection: close", *headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def test_an_ordinary_request_with_an_8_kb_header_is_served(api):
    """A head of ordinary shape, with one 8 KB header (a big cookie), answers 200."""
    answer = exchange(api, head(b"Cookie: " + b"c" * 8192))
    assert answer is not None
    assert status_of(answer) == 200


def test_a_1_mb_header_is_refused(api):
    """A 1 MB header answers 431 and the connection is closed."""
    answer = exchange(api, head(b"X-Big: " + b"a" * 1_000_000))
    assert answer is not None, "the connection stayed open"
    assert status_of(answer) in {431, 400, None}


def test_10000_small_headers_are_refused(api):
    """10,000 small headers answer 431 and the connection is closed."""
    answer = exchange(api, head(*(b"X-H%d: v" % n for n in range(10_000))))
    assert answer is not None, "the connection stayed open"
    assert status_of(answer) in {431, 400, None}


def test_150_tiny_headers_are_refused(api):
    """More than 100 header fields answer 431 even when they are small altogether."""
    answer = exchange(api, head(*(b"X%d: v" % n for n in range(150))))
    assert answer is not None
    assert status_of(answer) == 431


def test_a_large_body_is_not_taken_for_a_large_head(api):
    """A 900 KB body after a small head reaches the API (422 for a too long prompt)."""
    body = json.dumps(
        {"input": {"prompt": "p" * 900_000, "video_url": "https://example.com/a.mp4"}}
    ).encode()
    request = (
        b"POST /v1/jobs HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        b"Authorization: Bearer " + TENANT.api_key.encode() + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body
    answer = exchange(api, request)
    assert answer is not None
    assert status_of(answer) == 422


def _answer_on_kept_alive(sock: socket.socket) -> bytes:
    """Read one answer (with Content-Length) from a connection that stays open."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    head_part, body = received.split(b"\r\n\r\n", 1)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head_part.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head_part


def test_connections_that_do_not_finish_a_head_in_time_are_closed(api):
    """Silent, half-sent, byte-by-byte and kept-alive-then-stalled heads are closed in ~5 s."""
    socks = {name: socket.create_connection(api) for name in ("silent", "half", "drip", "reused")}
    try:
        send_raw(socks["half"], b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n")
        send_raw(socks["reused"], b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
        assert status_of(_answer_on_kept_alive(socks["reused"])) == 200
        send_raw(socks["reused"], b"GET /healthz HTTP/1.1\r\nHost: gat")
        drip = iter(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n" + b"X-Slow: " + b"s" * 10_000)
        started = time.monotonic()
        closed_after: dict[str, float] = {}
        while len(closed_after) < len(socks):
            if time.monotonic() - started > HEAD_TIMEOUT_S + SLACK_S:
                break
            open_socks = [s for name, s in socks.items() if name not in closed_after]
            readable, _, _ = select.select(open_socks, [], [], 0.5)
            for name, sock in socks.items():
                if sock in readable and read_until_closed(sock, 1) is not None:
                    closed_after[name] = time.monotonic() - started
            if "drip" not in closed_after:
                send_raw(socks["drip"], bytes([next(drip)]))
        assert set(closed_after) == set(socks), f"still open: {set(socks) - set(closed_after)}"
        assert all(after <= HEAD_TIMEOUT_S + SLACK_S for after in closed_after.values())
    finally:
        for sock in socks.values():
            sock.close()


async def _slow_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """An ASGI app that takes its time over every answer."""
    if scope["type"] != "http":
        return
    await asyncio.sleep(2)
    headers = [(b"content-length", b"14")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"slow and whole"})


async def test_a_stalled_head_behind_a_slow_answer_lets_that_answer_finish(monkeypatch):
    """A half head pipelined behind a slow answer: that answer arrives whole, then the close."""
    monkeypatch.setattr(server, "HEAD_TIMEOUT_S", 0.5)
    port = free_port()
    config = uvicorn.Config(
        _slow_app, host="127.0.0.1", port=port, http=server.BoundedHeadProtocol, log_config=None
    )
    slow = uvicorn.Server(config)
    serving = asyncio.create_task(slow.serve())
    try:

        async def started() -> bool:
            return slow.started

        await wait_for(started)
        with socket.create_connection(("127.0.0.1", port)) as sock:
            send_raw(sock, b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a")
            answer = await asyncio.to_thread(read_until_closed, sock, 10)
    finally:
        slow.should_exit = True
        await serving
    assert answer is not None, "the connection stayed open"
    assert status_of(answer) == 200
    assert answer.endswith(b"\r\n\r\nslow and whole")  # nothing cut in, nothing after
