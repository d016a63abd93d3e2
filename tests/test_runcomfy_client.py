"""The RunComfy client against a real emulator server (and small scripted servers)."""

import asyncio
import contextlib
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import msgspec
import pytest
from litestar import Litestar, Request, Response, route

from service.runcomfy.client import (
    RunComfyClient,
    UpstreamError,
    UpstreamOutcomeUnknown,
    UpstreamRejected,
    UpstreamUnreachable,
    create_upstream_client,
)
from service.runcomfy.emulator import MODEL
from service.runcomfy.wire import (
    CANCEL_DECODER,
    ERROR_DECODER,
    RESULT_DECODER,
    STATUS_DECODER,
    SUBMIT_DECODER,
)
from service.serving import Served, listen, serve
from tests.support import StartEmulator, read_http_request, tcp_server

TOKEN = "sk-test-9f8e7d6c5b4a-secret"  # noqa: S105 -- a test token, the one we hunt for
INPUT = msgspec.json.encode({"prompt": "a cat surfing", "video_url": "https://example.com/in.mp4"})

Handler = Callable[[Request[Any, Any, Any]], Awaitable[Response[Any]]]
ServeScript = Callable[[Handler], Awaitable[str]]


@pytest.fixture
async def scripted() -> AsyncIterator[ServeScript]:
    """Serve one handler for every path: an upstream that answers exactly as a test scripts it."""
    served: list[Served] = []

    async def start(handler: Handler) -> str:
        @route(["/", "/{tail:path}"], http_method=["GET", "POST"], status_code=200)
        async def every_path(request: Request[Any, Any, Any]) -> Response[Any]:
            return await handler(request)

        app = Litestar([every_path], openapi_config=None, logging_config=None)
        served.append(await serve(app, listen("127.0.0.1", 0)))
        return served[-1].url

    yield start
    for server in served:
        await server.stop()


@pytest.fixture
async def session() -> AsyncIterator[httpx.AsyncClient]:
    async with create_upstream_client() as upstream_client:
        yield upstream_client


def hidden(exc: BaseException) -> bool:
    """Whether the token stays out of everything an exception shows."""
    return TOKEN not in str(exc) and TOKEN not in repr(exc) and TOKEN not in repr(exc.args)


async def emulator_requests(session: httpx.AsyncClient, url: str) -> dict[str, Any]:
    response = await session.get(f"{url}/_emulator/requests")
    return msgspec.json.decode(response.content)  # type: ignore[no-any-return]


async def wait_for(
    check: Callable[[], Awaitable[Any]], what: str, deadline_s: float = 5.0, every_s: float = 0.02
) -> Any:
    """Poll ``check`` until it returns something truthy, failing after the deadline."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(every_s)
    pytest.fail(f"timed out waiting for {what}")


async def wait_for_status(client: RunComfyClient, request_id: str, status: str) -> Any:
    async def check() -> Any:
        answer = await client.status(request_id)
        return answer if answer.status == status else None

    return await wait_for(check, f"status {status}")


async def test_status_goes_from_queue_to_progress_to_completed(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A request is in_queue with a 0-based queue position, then in_progress, then completed."""
    url = await emulator(queue_s=0.5, run_s=0.3)
    client = RunComfyClient(session, url, TOKEN)
    first = await client.submit(MODEL, INPUT)
    second = await client.submit(MODEL, INPUT)
    assert first.request_id
    assert second.request_id

    first_status = await client.status(first.request_id)
    second_status = await client.status(second.request_id)
    assert (first_status.status, first_status.queue_position) == ("in_queue", 0)
    assert (second_status.status, second_status.queue_position) == ("in_queue", 1)

    running = await wait_for_status(client, second.request_id, "in_progress")
    assert running.queue_position is None
    done = await wait_for_status(client, second.request_id, "completed")
    assert done.request_id == second.request_id


async def test_submit_answers_absolute_urls_to_follow(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Submit answers status, result and cancel URLs on the emulator's own host."""
    url = await emulator()
    answer = await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    assert answer.status_url == f"{url}/v1/requests/{answer.request_id}/status"
    assert answer.result_url == f"{url}/v1/requests/{answer.request_id}/result"
    assert answer.cancel_url == f"{url}/v1/requests/{answer.request_id}/cancel"


async def test_completed_result_has_a_fetchable_output(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A completed request's result carries a video URL the emulator itself serves."""
    url = await emulator(queue_s=0, run_s=0)
    client = RunComfyClient(session, url, TOKEN)
    submitted = await client.submit(MODEL, INPUT)
    assert submitted.request_id
    result = await client.result(submitted.request_id)

    assert result.status == "completed"
    assert result.error is None
    assert result.created_at
    assert result.finished_at
    assert result.output is not None
    video = await session.get(result.output["video"])
    assert video.status_code == 200
    assert video.headers["Content-Type"].split(";")[0] == "video/mp4"
    assert len(video.content) > 0


async def test_result_before_the_end_answers_only_the_status(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Before a request is final its result is just the current status, without output."""
    url = await emulator(queue_s=30)
    client = RunComfyClient(session, url, TOKEN)
    submitted = await client.submit(MODEL, INPUT)
    assert submitted.request_id
    result = await client.result(submitted.request_id)
    assert (result.status, result.output, result.error) == ("in_queue", None, None)


async def test_failed_request_reports_its_error_as_string_or_object(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A failed request's result has no output and an error, sent as a string or an object."""
    url = await emulator(queue_s=0, run_s=0, fail_rate=1.0)
    client = RunComfyClient(session, url, TOKEN)
    shapes = set()
    for _ in range(10):
        submitted = await client.submit(MODEL, INPUT)
        assert submitted.request_id
        result = await client.result(submitted.request_id)
        assert (result.status, result.output) == ("failed", None)
        _code, message = result.error_parts()
        assert message
        shapes.add(type(result.error))
    assert shapes == {str, dict}


async def test_cancel_of_a_queued_request_cancels_it(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Cancelling a queued request answers outcome cancelled and its status becomes cancelled."""
    url = await emulator(queue_s=30)
    client = RunComfyClient(session, url, TOKEN)
    submitted = await client.submit(MODEL, INPUT)
    assert submitted.request_id
    answer = await client.cancel(submitted.request_id)
    assert (answer.request_id, answer.outcome) == (submitted.request_id, "cancelled")
    assert (await client.status(submitted.request_id)).status == "cancelled"


async def test_cancel_of_a_running_request_is_not_cancellable(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Cancelling a request already in progress answers not_cancellable and it keeps running."""
    url = await emulator(queue_s=0, run_s=30)
    client = RunComfyClient(session, url, TOKEN)
    submitted = await client.submit(MODEL, INPUT)
    assert submitted.request_id
    assert (await client.cancel(submitted.request_id)).outcome == "not_cancellable"
    assert (await client.status(submitted.request_id)).status == "in_progress"


async def test_rate_limited_submit_is_retryable_with_retry_after(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A 429 is a retryable rate_limited rejection carrying Retry-After, and creates nothing."""
    url = await emulator(rate_429=1.0, retry_after_s=2)
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    rejected = caught.value
    assert (rejected.http_status, rejected.kind, rejected.retry_after_s) == (429, "rate_limited", 2)
    assert rejected.retryable
    assert hidden(rejected)
    assert (await emulator_requests(session, url))["submits"] == 0


async def test_server_error_is_a_retryable_server_rejection(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A 5xx with error_code 500001 is a retryable server rejection, and creates nothing."""
    url = await emulator(error_5xx_rate=1.0)
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    rejected = caught.value
    assert rejected.http_status in {500, 502, 503}
    assert (rejected.kind, rejected.error_code, rejected.retryable) == ("server", "500001", True)
    assert rejected.message
    assert hidden(rejected)
    assert (await emulator_requests(session, url))["submits"] == 0


async def test_http_200_with_error_code_is_a_rejection(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """HTTP 200 with a top-level error_code and no request_id is a (server) rejection."""
    url = await emulator(http200_error_rate=1.0)
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    rejected = caught.value
    assert (rejected.http_status, rejected.error_code, rejected.kind) == (200, "500001", "server")
    assert rejected.retryable
    assert hidden(rejected)
    assert (await emulator_requests(session, url))["submits"] == 0


async def test_http_200_with_error_code_on_status_is_a_rejection(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A status call answered HTTP 200 with only an error_code raises, not a blank status."""
    url = await emulator()
    client = RunComfyClient(session, url, TOKEN)
    submitted = await client.submit(MODEL, INPUT)
    assert submitted.request_id
    configured = await session.post(f"{url}/_emulator/config", json={"http200_error_rate": 1.0})
    assert configured.status_code == 200
    with pytest.raises(UpstreamRejected) as caught:
        await client.status(submitted.request_id)
    assert (caught.value.http_status, caught.value.error_code) == (200, "500001")


async def test_exhausted_funds_are_insufficient_funds(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A 402 with error_code 10001 is a retryable insufficient_funds rejection."""
    url = await emulator(funds_exhausted=True)
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    rejected = caught.value
    assert (rejected.http_status, rejected.kind, rejected.error_code) == (
        402,
        "insufficient_funds",
        "10001",
    )
    assert rejected.retryable


async def test_wrong_token_is_an_auth_rejection_that_never_shows_the_token(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A wrong token answers 401 (auth, not retryable); the token appears nowhere in the error."""
    url = await emulator(token="the-right-token")  # noqa: S106 -- a test token
    client = RunComfyClient(session, url, TOKEN)
    with pytest.raises(UpstreamRejected) as caught:
        await client.submit(MODEL, INPUT)
    rejected = caught.value
    assert (rejected.http_status, rejected.kind, rejected.error_code) == (401, "auth", "401001")
    assert not rejected.retryable
    assert hidden(rejected)
    assert TOKEN not in repr(client)


async def test_unknown_request_is_not_found(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Asking about a request RunComfy does not know is a not_found rejection."""
    url = await emulator()
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).status("no-such-request")
    assert (caught.value.http_status, caught.value.kind) == (404, "not_found")
    assert not caught.value.retryable


async def test_invalid_input_is_an_invalid_rejection(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Input without a prompt is a 422 invalid rejection that is not worth retrying."""
    url = await emulator()
    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, b'{"video_url": "https://a/b"}')
    assert (caught.value.http_status, caught.value.kind, caught.value.error_code) == (
        422,
        "invalid",
        "422001",
    )
    assert not caught.value.retryable


async def test_refused_connection_is_unreachable(session: httpx.AsyncClient) -> None:
    """A port nobody listens on makes the call UpstreamUnreachable: nothing was sent."""
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        url = f"http://127.0.0.1:{placeholder.getsockname()[1]}"
        with pytest.raises(UpstreamUnreachable) as caught:
            await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    assert hidden(caught.value)


@pytest.fixture
def unanswered_port() -> Any:
    """A port whose accept queue is full, so a new TCP connect hangs until it times out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)  # noqa: FBT003 -- socket API
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for sock in [*fillers, server]:
        sock.close()


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping SYNs to a full queue")
async def test_connect_timeout_is_unreachable(
    session: httpx.AsyncClient, unanswered_port: int
) -> None:
    """A connect that times out is UpstreamUnreachable, even when the whole-call timeout fires."""
    client = RunComfyClient(session, f"http://127.0.0.1:{unanswered_port}", TOKEN, timeout_s=0.3)
    with pytest.raises(UpstreamUnreachable, match="timed out connecting"):
        await client.submit(MODEL, INPUT)


async def test_latency_beyond_the_timeout_leaves_the_submit_outcome_unknown(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A submit whose answer comes after the timeout is UpstreamOutcomeUnknown, and it did land."""
    url = await emulator(latency_ms=600)
    client = RunComfyClient(session, url, TOKEN, timeout_s=0.2)
    with pytest.raises(UpstreamOutcomeUnknown) as caught:
        await client.submit(MODEL, INPUT)
    assert hidden(caught.value)

    async def landed() -> bool:
        return bool((await emulator_requests(session, url))["submits"] == 1)

    await wait_for(landed, "the late submit to create its request")


async def test_slow_status_is_outcome_unknown(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A status answer slower than the timeout is UpstreamOutcomeUnknown."""
    url = await emulator(latency_ms=600)
    with pytest.raises(UpstreamOutcomeUnknown):
        await RunComfyClient(session, url, TOKEN, timeout_s=0.2).status("any")


async def test_dropped_submit_is_unknown_yet_created_upstream(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A submit whose connection drops unanswered is UpstreamOutcomeUnknown; the request exists."""
    url = await emulator(drop_rate=1.0)
    with pytest.raises(UpstreamOutcomeUnknown) as caught:
        await RunComfyClient(session, url, TOKEN).submit(MODEL, INPUT)
    assert hidden(caught.value)
    listed = await emulator_requests(session, url)
    assert listed["submits"] == 1
    assert [item["input"]["prompt"] for item in listed["items"]] == ["a cat surfing"]


async def test_dropped_status_is_outcome_unknown(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """A status call whose connection drops unanswered is UpstreamOutcomeUnknown."""
    url = await emulator(drop_rate=1.0)
    with pytest.raises(UpstreamOutcomeUnknown):
        await RunComfyClient(session, url, TOKEN).status("any")


async def test_unknown_fields_and_statuses_are_tolerated(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """Answers with extra fields and unfamiliar statuses (succeeded) decode without complaint."""

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        return Response(
            {
                "request_id": "r1",
                "status": "succeeded",
                "queue_position": "3",
                "outcome": "cancellation_requested",
                "output": {"videos": ["https://x/1.mp4"], "extra": {"a": 1}},
                "error": {"code": 7, "message": "nope", "trace": []},
                "brand_new_field": [1, 2, 3],
            }
        )

    client = RunComfyClient(session, await scripted(answer), TOKEN)
    status = await client.status("r1")
    assert (status.status, status.queue_position) == ("succeeded", 3)
    result = await client.result("r1")
    assert result.output == {"videos": ["https://x/1.mp4"], "extra": {"a": 1}}
    assert result.error_parts() == ("7", "nope")
    assert (await client.cancel("r1")).outcome == "cancellation_requested"


def test_wire_decoders_ignore_unknown_fields() -> None:
    """Every wire decoder ignores fields it does not know and leaves missing ones None."""
    body = b'{"request_id": "r", "surprise": {"deep": [1]}, "status": "weird", "error": "boom"}'
    assert SUBMIT_DECODER.decode(body).request_id == "r"
    assert SUBMIT_DECODER.decode(body).status_url is None
    assert STATUS_DECODER.decode(body).status == "weird"
    assert RESULT_DECODER.decode(body).error_parts() == (None, "boom")
    assert CANCEL_DECODER.decode(body).outcome is None
    error = ERROR_DECODER.decode(b'{"error_code": "10001", "error_message": "m", "x": 1}')
    assert (error.error_code, error.error_message) == ("10001", "m")


async def test_garbage_body_on_success_is_outcome_unknown(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """HTTP 200 with a body that is not JSON is no answer at all: UpstreamOutcomeUnknown."""

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        return Response("<html>gateway hiccup</html>", media_type="text/html")

    with pytest.raises(UpstreamOutcomeUnknown, match="undecodable"):
        await RunComfyClient(session, await scripted(answer), TOKEN).submit(MODEL, INPUT)


async def test_success_without_request_id_is_a_rejection(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """A 2xx submit answer naming no request (and no error_code) is an 'other' rejection."""

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        return Response({"ok": True})

    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, await scripted(answer), TOKEN).submit(MODEL, INPUT)
    assert (caught.value.http_status, caught.value.kind) == (200, "other")


async def test_error_text_echoing_the_token_is_scrubbed(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """An upstream error message that echoes the Authorization header never leaks the token."""

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        header = request.headers["Authorization"]
        return Response({"error": {"message": f"bad token {header}"}}, status_code=403)

    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, await scripted(answer), TOKEN).status("r")
    assert caught.value.kind == "auth"
    assert "bad token Bearer ***" in caught.value.message
    assert hidden(caught.value)


async def test_retry_after_as_http_date_is_read(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """Retry-After given as an HTTP-date becomes the seconds until that date."""
    when = datetime.now(UTC) + timedelta(seconds=30)

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        headers = {"Retry-After": format_datetime(when, usegmt=True)}
        return Response({"message": "slow down"}, status_code=503, headers=headers)

    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, await scripted(answer), TOKEN).status("r")
    assert caught.value.kind == "server"
    assert caught.value.retry_after_s is not None
    assert 25 <= caught.value.retry_after_s <= 30


async def test_error_status_without_json_is_still_a_rejection(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """An HTML error page from a proxy is a definite rejection with an excerpt as its message."""

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        return Response("<h1>Bad Gateway</h1>", status_code=502, media_type="text/html")

    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, await scripted(answer), TOKEN).submit(MODEL, INPUT)
    assert (caught.value.http_status, caught.value.kind, caught.value.error_code) == (
        502,
        "server",
        None,
    )
    assert "Bad Gateway" in caught.value.message


async def test_redirects_are_not_followed(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """A redirect is answered as an 'other' rejection, never followed with the token."""
    hits: list[str] = []

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        hits.append(request.url.path)
        return Response("", status_code=307, headers={"Location": "/elsewhere"})

    with pytest.raises(UpstreamRejected) as caught:
        await RunComfyClient(session, await scripted(answer), TOKEN).status("r")
    assert (caught.value.http_status, caught.value.kind) == (307, "other")
    assert hits == ["/v1/requests/r/status"]


async def test_calls_send_the_token_and_identify_themselves(
    scripted: ServeScript, session: httpx.AsyncClient
) -> None:
    """Every call carries the Bearer token, JSON Accept and the gateway's User-Agent."""
    seen: list[tuple[str, str, str, str, bytes]] = []

    async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
        headers = request.headers
        seen.append(
            (
                request.method,
                headers["Authorization"],
                headers["Accept"],
                headers["User-Agent"],
                await request.body(),
            )
        )
        return Response({"request_id": "r1"})

    await RunComfyClient(session, await scripted(answer), TOKEN).submit(MODEL, INPUT)
    assert seen == [("POST", f"Bearer {TOKEN}", "application/json", "runcomfy-gateway/0.1", INPUT)]


async def test_every_raised_error_is_an_upstream_error(
    emulator: StartEmulator, session: httpx.AsyncClient
) -> None:
    """Each failure kind the client raises shares the UpstreamError base."""
    url = await emulator(error_5xx_rate=1.0)
    with pytest.raises(UpstreamError):
        await RunComfyClient(session, url, TOKEN).status("r")


async def test_a_connection_dropped_after_the_request_is_outcome_unknown() -> None:
    """A server that reads the whole submit, then closes without answering: outcome unknown."""
    received: list[bytes] = []

    async def read_then_drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await read_http_request(reader))
        writer.close()

    async with tcp_server(read_then_drop) as url, create_upstream_client() as http:
        with pytest.raises(UpstreamOutcomeUnknown) as caught:
            await RunComfyClient(http, url, TOKEN).submit(MODEL, INPUT)
    assert hidden(caught.value)
    assert [request.endswith(INPUT) for request in received] == [True]


async def test_an_answer_trickling_past_the_deadline_is_outcome_unknown() -> None:
    """An answer whose body trickles on past the whole-call deadline is outcome unknown."""
    stop = asyncio.Event()

    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_http_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        while not stop.is_set():
            writer.write(b" ")
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
        writer.close()

    client_deadline_s = 0.5
    async with tcp_server(trickle) as url, create_upstream_client() as http:
        started = time.monotonic()
        client = RunComfyClient(http, url, TOKEN, timeout_s=client_deadline_s)
        with pytest.raises(UpstreamOutcomeUnknown, match="in time"):
            await client.submit(MODEL, INPUT)
        stop.set()
    assert time.monotonic() - started < client_deadline_s + 2.0


NOTHING_SENT = [
    httpx.ConnectError("refused"),
    httpx.ConnectTimeout("no SYN-ACK"),
    httpx.PoolTimeout("no free connection"),
]
MAYBE_SENT = [
    httpx.WriteTimeout("send buffer full"),
    httpx.WriteError("broken pipe"),
    httpx.ReadTimeout("no answer"),
    httpx.ReadError("reset"),
    httpx.RemoteProtocolError("disconnected without a response"),
    httpx.LocalProtocolError("body shorter than its length"),
    httpx.ProxyError("proxy hung up"),
]


def failing_client(exc: Exception, calls: list[httpx.Request]) -> httpx.AsyncClient:
    def fail(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise exc

    return create_upstream_client(transport=httpx.MockTransport(fail))


@pytest.mark.parametrize("exc", NOTHING_SENT, ids=lambda e: type(e).__name__)
async def test_transport_errors_before_sending_make_a_submit_unreachable(exc: Exception) -> None:
    """Connect errors and timeouts and pool timeouts mean nothing was sent: unreachable, once."""
    calls: list[httpx.Request] = []
    async with failing_client(exc, calls) as http:
        with pytest.raises(UpstreamUnreachable):
            await RunComfyClient(http, "https://model-api.test", TOKEN).submit(MODEL, INPUT)
    assert len(calls) == 1


@pytest.mark.parametrize("exc", MAYBE_SENT, ids=lambda e: type(e).__name__)
async def test_transport_errors_once_sending_began_leave_a_submit_unknown(exc: Exception) -> None:
    """Any transport error once the request may have left the host is outcome unknown, once."""
    calls: list[httpx.Request] = []
    async with failing_client(exc, calls) as http:
        with pytest.raises(UpstreamOutcomeUnknown):
            await RunComfyClient(http, "https://model-api.test", TOKEN).submit(MODEL, INPUT)
    assert len(calls) == 1


async def test_a_scripted_transport_answers_like_runcomfy() -> None:
    """An injected MockTransport sees the submit's exact request and its answer is decoded."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"request_id": "r-7", "status": "in_queue"})

    async with create_upstream_client(transport=httpx.MockTransport(answer)) as http:
        submitted = await RunComfyClient(http, "https://model-api.test", TOKEN).submit(MODEL, INPUT)
    assert submitted.request_id == "r-7"
    [request] = seen
    assert (request.method, str(request.url)) == (
        "POST",
        f"https://model-api.test/v1/models/{MODEL}",
    )
    assert request.content == INPUT
    assert request.headers["Content-Type"] == "application/json"
