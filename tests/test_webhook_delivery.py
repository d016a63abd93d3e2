import asyncio
import contextlib
import email.utils
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator

import msgspec
import pytest
import trustme
from litestar import Litestar, Request, Response, post
from litestar.params import RawBody
from litestar.response import Stream

from service.outbound import parse_retry_after
from service.serving import listen, serve
from service.webhooks.delivery import (
    AttemptResult,
    create_webhook_client,
    deliver_once,
    next_delay,
    outcome,
    parse_retry_schedule,
)
from tests.support import FakeResolver, read_http_request, tcp_server

BODY = b'{"type":"job.completed","data":{"id":"job_1","note":"caf\xc3\xa9"}}'
HEADERS = {
    "webhook-id": "msg_1",
    "webhook-timestamp": "1700000000",
    "webhook-signature": "v1,c2lnbmF0dXJl",
    "content-type": "application/json",
    "user-agent": "runcomfy-gateway/0.1",
}
DEADLINE_S = 0.5
# Generous: the point is that the attempt ends near its deadline, not how close.
DEADLINE_SLACK_S = 2.0


class Receiver:
    """A webhook receiver on 127.0.0.1, Litestar served as ours are: one route per behaviour."""

    def __init__(self):
        self.received = []
        self.stop = asyncio.Event()
        self.base = ""
        self._served = None
        self.app = Litestar(
            [
                post("/ok", status_code=200)(self.ok),
                post("/gone")(self.status(410)),
                post("/error")(self.status(500, {"Retry-After": "120"})),
                post("/redirect")(self.redirect),
                post("/target", status_code=200)(self.ok),
                post("/hang", status_code=200)(self.hang),
                post("/trickle", status_code=200)(self.trickle),
                post("/huge", status_code=200)(self.huge),
                post("/nul")(self.body(b"\x00" * 20 * 1024)),
                post("/accents")(self.body("é".encode() * 10 * 1024)),
                post("/quotes")(self.body(b'"\\\n' * 5 * 1024)),
            ],
            openapi_config=None,
            logging_config=None,
        )

    async def start(self):
        sock = listen("127.0.0.1", 0)
        self._served = await serve(self.app, sock)
        self.base = self._served.url

    async def close(self):
        self.stop.set()
        await self._served.stop()

    def record(self, request: Request, body: bytes) -> None:
        """Keep what arrived, for the test to inspect (header names in lower case)."""
        headers = {name.lower(): value for name, value in request.headers.items()}
        self.received.append((request.url.path, body, headers))

    async def ok(self, request: Request, body: RawBody) -> str:
        """Accept the webhook."""
        self.record(request, body)
        return "thanks"

    def status(self, code, headers=None):
        """Build a handler answering `code`."""

        async def handler(request: Request, body: RawBody) -> Response[str]:
            self.record(request, body)
            return Response(f"answer {code}", status_code=code, headers=headers)

        return handler

    async def redirect(self, request: Request, body: RawBody) -> Response[str]:
        """Answer 302 towards /target."""
        self.record(request, body)
        return Response("", status_code=302, headers={"Location": self.base + "/target"})

    async def hang(self, request: Request, body: RawBody) -> str:
        """Never answer (until the fixture tears down)."""
        self.record(request, body)
        await self.stop.wait()
        return "too late"

    async def trickle(self, request: Request, body: RawBody) -> Stream:
        """Answer 200, then send the body one byte at a time, forever."""
        self.record(request, body)

        async def dots() -> AsyncIterator[bytes]:
            while not self.stop.is_set():
                yield b"."
                # The trickle itself is the behaviour under test: one byte every 50 ms.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), 0.05)

        return Stream(dots())

    def body(self, content):
        """Build a handler answering 500 with `content` as its body."""

        async def handler(request: Request, body: RawBody) -> Response[bytes]:
            self.record(request, body)
            return Response(content, status_code=500)

        return handler

    async def huge(self, request: Request, body: RawBody) -> bytes:
        """Answer with a 1 MB body."""
        self.record(request, body)
        return b"x" * (1024 * 1024)


@pytest.fixture
async def receiver():
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.close()


@pytest.fixture
async def head_trickler():
    """A raw TCP server that sends its status line one byte at a time, forever."""
    stop = asyncio.Event()

    async def serve(reader, writer):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
        with contextlib.suppress(ConnectionError):
            for i in range(10_000):
                if stop.is_set():
                    break
                writer.write(head[i % len(head) : i % len(head) + 1])
                await writer.drain()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.05)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}/hook"
    stop.set()
    server.close()
    await server.wait_closed()


@pytest.fixture
async def session():
    async with create_webhook_client() as client:
        yield client


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


async def test_2xx_is_delivered_with_the_exact_bytes_and_headers(receiver, session):
    """A 2xx answer is delivered, and the receiver got our exact body and headers."""
    result = await deliver_once(session, receiver.base + "/ok", HEADERS, BODY)
    assert result.status_code == 200
    assert result.error is None
    assert result.response_excerpt == "thanks"
    assert outcome(result) == "delivered"
    [(path, body, headers)] = receiver.received
    assert path == "/ok"
    assert body == BODY
    for name, value in HEADERS.items():
        assert headers[name] == value
    assert "cookie" not in headers


async def test_410_means_gone(receiver, session):
    """A 410 answer stops retries."""
    result = await deliver_once(session, receiver.base + "/gone", HEADERS, BODY)
    assert (result.status_code, result.error) == (410, "http_status")
    assert outcome(result) == "gone"


async def test_redirect_is_not_followed(receiver, session):
    """A 302 is a failed attempt, and the redirect target receives nothing."""
    result = await deliver_once(session, receiver.base + "/redirect", HEADERS, BODY)
    assert (result.status_code, result.error) == (302, "redirect")
    assert outcome(result) == "retry"
    assert [path for path, _, _ in receiver.received] == ["/redirect"]


async def test_500_is_an_http_status_failure_with_its_retry_after(receiver, session):
    """A 500 is retried, keeps the answer's excerpt and reports its Retry-After."""
    result = await deliver_once(session, receiver.base + "/error", HEADERS, BODY)
    assert (result.status_code, result.error) == (500, "http_status")
    assert result.response_excerpt == "answer 500"
    assert result.retry_after_s == 120
    assert outcome(result) == "retry"


async def test_a_receiver_that_never_answers_times_out_at_the_deadline(receiver, session):
    """A receiver that never answers ends the attempt as a timeout at its deadline."""
    started = time.monotonic()
    result = await deliver_once(session, receiver.base + "/hang", HEADERS, BODY, deadline_s=0.5)
    elapsed = time.monotonic() - started
    assert (result.status_code, result.error) == (None, "timeout")
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + DEADLINE_SLACK_S
    assert result.latency_ms >= DEADLINE_S * 900
    assert outcome(result) == "retry"


async def test_a_receiver_trickling_its_head_times_out_at_the_deadline(head_trickler, session):
    """A receiver sending its status line byte by byte is cut off at the deadline."""
    started = time.monotonic()
    result = await deliver_once(session, head_trickler, HEADERS, BODY, deadline_s=DEADLINE_S)
    elapsed = time.monotonic() - started
    assert (result.status_code, result.error) == (None, "timeout")
    assert elapsed < DEADLINE_S + DEADLINE_SLACK_S


async def test_a_receiver_trickling_its_body_is_cut_off_at_the_deadline(receiver, session):
    """A 2xx whose body trickles forever is cut off at the deadline; its status still counts."""
    started = time.monotonic()
    result = await deliver_once(
        session, receiver.base + "/trickle", HEADERS, BODY, deadline_s=DEADLINE_S
    )
    elapsed = time.monotonic() - started
    assert DEADLINE_S * 0.9 <= elapsed < DEADLINE_S + DEADLINE_SLACK_S
    assert (result.status_code, result.error) == (200, None)
    assert 0 < len(result.response_excerpt) < 100
    assert set(result.response_excerpt) == {"."}


async def test_a_huge_answer_is_truncated_to_max_read(receiver, session):
    """Only max_read bytes of a large answer are kept."""
    result = await deliver_once(session, receiver.base + "/huge", HEADERS, BODY, max_read=1000)
    assert result.status_code == 200
    assert result.response_excerpt == "x" * 1000


def stored_size(text: str) -> int:
    """UTF-8 bytes of a string as the attempt log stores it (a JSON string, without quotes)."""
    return len(msgspec.json.encode(text)) - 2


@pytest.mark.parametrize(
    ("path", "looks_like"),
    [("/nul", "?"), ("/accents", "é"), ("/quotes", '"\\\n')],
)
async def test_the_stored_excerpt_stays_within_2_kb_whatever_the_answer(
    receiver, session, path, looks_like
):
    """20 KB of NULs, accents or JSON-escaped characters keep at most 2048 bytes as stored."""
    result = await deliver_once(session, receiver.base + path, HEADERS, BODY)
    assert (result.status_code, result.error) == (500, "http_status")
    assert 2048 - 4 < stored_size(result.response_excerpt) <= 2048
    assert set(result.response_excerpt) == set(looks_like)


async def test_the_session_still_works_after_cutting_answers_short(receiver, session):
    """A connection closed mid-answer does not poison the pool for the next attempt."""
    await deliver_once(session, receiver.base + "/huge", HEADERS, BODY, max_read=10)
    await deliver_once(session, receiver.base + "/trickle", HEADERS, BODY, deadline_s=0.2)
    result = await deliver_once(session, receiver.base + "/ok", HEADERS, BODY)
    assert (result.status_code, result.response_excerpt) == (200, "thanks")


async def test_connection_refused_is_a_connect_error(session):
    """Nothing listening on the port is a connect_error, retried later."""
    result = await deliver_once(session, f"http://127.0.0.1:{free_port()}/hook", HEADERS, BODY)
    assert (result.status_code, result.error) == (None, "connect_error")
    assert outcome(result) == "retry"


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fd00:ec2::254]/",
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://100.100.100.200/",
    ],
)
async def test_a_forbidden_ip_literal_is_refused_without_connecting(url):
    """An IP-literal URL naming a metadata address is refused before any connection."""
    resolver = FakeResolver({})
    async with create_webhook_client(resolver=resolver) as client:
        result = await deliver_once(client, url, HEADERS, BODY, deadline_s=5)
    assert (result.status_code, result.error) == (None, "forbidden_address")
    assert result.latency_ms < 1000
    assert resolver.asked == []


async def test_a_name_rebound_to_metadata_is_refused_at_connect_time(receiver):
    """A host name resolving to 169.254.169.254 at delivery time is never dialled."""
    port = receiver.base.rsplit(":", 1)[1]
    resolver = FakeResolver({"rebind.test": ["169.254.169.254"], "ok.test": ["127.0.0.1"]})
    async with create_webhook_client(resolver=resolver) as client:
        refused = await deliver_once(client, f"http://rebind.test:{port}/ok", HEADERS, BODY)
        accepted = await deliver_once(client, f"http://ok.test:{port}/ok", HEADERS, BODY)
    assert (refused.status_code, refused.error) == (None, "forbidden_address")
    assert outcome(refused) == "retry"
    assert (accepted.status_code, accepted.error) == (200, None)
    assert len(receiver.received) == 1


async def test_forbidden_answers_are_dropped_and_the_rest_dialled(receiver):
    """Of a mixed DNS answer, only the allowed address is dialled."""
    port = receiver.base.rsplit(":", 1)[1]
    resolver = FakeResolver({"mixed.test": ["169.254.169.254", "127.0.0.1"]})
    async with create_webhook_client(resolver=resolver) as client:
        result = await deliver_once(client, f"http://mixed.test:{port}/ok", HEADERS, BODY)
    assert (result.status_code, result.error) == (200, None)


async def test_tls_is_checked_against_the_url_host_not_the_address_dialled():
    """Over TLS the guard dials the resolved address, yet the certificate must name the URL host."""
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hooks.test").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)

    async def answer(reader, writer):
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            await read_http_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\ntls ok")
            await writer.drain()
        writer.close()

    resolver = FakeResolver({"hooks.test": ["127.0.0.1"], "other.test": ["127.0.0.1"]})
    async with (
        tcp_server(answer, tls=server_tls) as base,
        create_webhook_client(resolver=resolver, verify=client_tls) as client,
    ):
        port = base.rsplit(":", 1)[1]
        named = await deliver_once(client, f"https://hooks.test:{port}/h", HEADERS, BODY)
        other = await deliver_once(client, f"https://other.test:{port}/h", HEADERS, BODY)
    assert (named.status_code, named.error, named.response_excerpt) == (200, None, "tls ok")
    assert (other.status_code, other.error) == (None, "tls_error")


@pytest.mark.parametrize(
    "url", ["ftp://example.com/hook", "not a url", "http:///nohost", "http://2130706433/"]
)
async def test_an_undiallable_url_is_invalid_url(session, url):
    """A URL that cannot be dialled is reported as invalid_url, not raised."""
    result = await deliver_once(session, url, HEADERS, BODY)
    assert (result.status_code, result.error) == (None, "invalid_url")


async def test_session_ignores_environment_proxies(receiver, monkeypatch):
    """An HTTP_PROXY in the environment is never used for deliveries."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with create_webhook_client() as client:
        result = await deliver_once(client, receiver.base + "/ok", HEADERS, BODY)
    assert result.status_code == 200


def test_retry_after_parses_seconds_and_http_dates():
    """Retry-After is read as delay-seconds or as an HTTP-date (any of its forms) from now."""
    now = 1_700_000_000.0
    assert parse_retry_after("120") == 120
    assert parse_retry_after(" 0 ") == 0
    date = email.utils.formatdate(now + 90, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(90)
    past = email.utils.formatdate(now - 90, usegmt=True)
    assert parse_retry_after(past, now=now) == 0
    asctime = time.asctime(time.gmtime(now + 60))  # HTTP's obsolete date form, zone-less GMT
    assert parse_retry_after(asctime, now=now) == pytest.approx(60)
    for junk in (None, "", "-5", "soon", "nan", "inf"):
        assert parse_retry_after(junk) is None


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (AttemptResult(200, 5, None), "delivered"),
        (AttemptResult(204, 5, None), "delivered"),
        (AttemptResult(299, 5, None), "delivered"),
        (AttemptResult(410, 5, "http_status"), "gone"),
        (AttemptResult(301, 5, "redirect"), "retry"),
        (AttemptResult(404, 5, "http_status"), "retry"),
        (AttemptResult(429, 5, "http_status"), "retry"),
        (AttemptResult(503, 5, "http_status"), "retry"),
        (AttemptResult(None, 5, "timeout"), "retry"),
        (AttemptResult(None, 5, "forbidden_address"), "retry"),
    ],
)
def test_outcome(result, expected):
    """Any 2xx is delivered, 410 is gone, everything else is retried."""
    assert outcome(result) == expected


def test_parse_retry_schedule_reads_the_default():
    """The default schedule parses into its seconds."""
    assert parse_retry_schedule("5,300,1800,7200,18000,36000,36000") == (
        5,
        300,
        1800,
        7200,
        18000,
        36000,
        36000,
    )
    assert parse_retry_schedule(" 0 , 1.5 ") == (0, 1.5)


@pytest.mark.parametrize("text", ["", " ", "5,,10", "5,-1", "five", "5;10", "nan", "inf"])
def test_parse_retry_schedule_rejects_malformed_text(text):
    """An empty, negative or non-numeric schedule raises a ValueError saying what is expected."""
    with pytest.raises(ValueError, match="non-negative seconds"):
        parse_retry_schedule(text)


def test_next_delay_jitters_within_20_percent():
    """Each delay is its scheduled value within ±20%, and the jitter varies."""
    rng = random.Random(7)
    delays = [next_delay([100.0, 1000.0], 1, None, rng) for _ in range(500)]
    assert all(d is not None and 80 <= d <= 120 for d in delays)
    assert max(d for d in delays if d) - min(d for d in delays if d) > 20
    second = next_delay([100.0, 1000.0], 2, None, rng)
    assert second is not None
    assert 800 <= second <= 1200


def test_next_delay_is_none_when_the_schedule_is_exhausted():
    """A schedule of n entries allows n retries after the first attempt, then stops."""
    rng = random.Random(1)
    schedule = parse_retry_schedule("5,300,1800")
    assert [next_delay(schedule, n, None, rng) is not None for n in (1, 2, 3, 4, 5)] == [
        True,
        True,
        True,
        False,
        False,
    ]


def test_next_delay_clamps_retry_after_into_delay_and_twice_delay():
    """A Retry-After is honoured, but never below the delay nor above twice it."""
    jittered = next_delay([100.0], 1, None, random.Random(3))
    assert jittered is not None
    assert next_delay([100.0], 1, 1.0, random.Random(3)) == jittered
    assert next_delay([100.0], 1, 10_000.0, random.Random(3)) == 2 * jittered
    within = jittered * 1.5
    assert next_delay([100.0], 1, within, random.Random(3)) == within


def test_next_delay_needs_an_attempt_first():
    """Asking for a delay before any attempt is a programming error."""
    with pytest.raises(ValueError, match="at least one attempt"):
        next_delay([5.0], 0, None, random.Random(0))
