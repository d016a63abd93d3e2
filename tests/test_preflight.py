"""The input pre-flight check against real local servers: the emulator's input files."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest

from service.runcomfy.emulator import OUTPUT_BYTES
from service.worker.preflight import (
    InputOk,
    InputRefused,
    InputRetry,
    check_input,
    create_input_client,
)
from tests.support import FakeResolver, StartEmulator, redirects_to

MAX_BYTES = 1_000_000


@pytest.fixture
async def inputs(emulator: StartEmulator) -> str:
    """The URL prefix of the emulator's input files."""
    return f"{await emulator()}/_emulator/inputs"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """The pre-flight client, allowed to reach the local servers."""
    async with create_input_client(allow_hosts=("127.0.0.1",)) as http:
        yield http


async def check(client: httpx.AsyncClient, url: str, deadline_s: float = 5) -> object:
    return await check_input(client, url, max_bytes=MAX_BYTES, deadline_s=deadline_s)


async def test_a_video_within_the_limit_passes_with_its_size(client, inputs):
    """A HEAD answered 200, video/mp4 and a Content-Length within the limit passes."""
    verdict = await check(client, f"{inputs}/in.mp4?size={MAX_BYTES}")
    assert verdict == InputOk(content_type="video/mp4", size=MAX_BYTES)


async def test_octet_stream_passes_and_any_video_type_too(client, inputs):
    """application/octet-stream and any video/* subtype count as video."""
    for media_type in ("application/octet-stream", "video/webm", "Video/MP4; codecs=avc1"):
        verdict = await check(client, f"{inputs}/in?type={quote(media_type)}")
        assert isinstance(verdict, InputOk), media_type


async def test_where_head_is_refused_one_byte_is_got_and_its_content_range_gives_the_size(
    client, inputs
):
    """HEAD answered 405 (or 501) leads to a GET of one byte; the size is Content-Range's total."""
    for refused in (405, 501):
        verdict = await check(client, f"{inputs}/in.mp4?head={refused}&size=700000")
        assert verdict == InputOk(content_type="video/mp4", size=700_000)
    too_large = await check(client, f"{inputs}/in.mp4?head=405&size={MAX_BYTES + 1}")
    assert isinstance(too_large, InputRefused)
    assert too_large.code == "input_too_large"


async def test_a_stated_size_over_the_limit_is_too_large(client, inputs):
    """A Content-Length above the limit fails with input_too_large."""
    verdict = await check(client, f"{inputs}/big.mp4?size={200 * MAX_BYTES}")
    assert isinstance(verdict, InputRefused)
    assert verdict.code == "input_too_large"
    assert str(200 * MAX_BYTES) in verdict.message


@pytest.mark.parametrize("media_type", ["text/html", "", "video/", "image/png"])
async def test_anything_but_a_video_type_is_not_video(client, inputs, media_type):
    """HTML, an image, a bare `video/` or no Content-Type at all fail with input_not_video."""
    verdict = await check(client, f"{inputs}/page?type={quote(media_type)}")
    assert isinstance(verdict, InputRefused)
    assert verdict.code == "input_not_video"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410])
async def test_a_client_error_is_unreachable(client, inputs, status):
    """A 4xx answer (but 429) fails with input_unreachable, naming the status."""
    verdict = await check(client, f"{inputs}/gone.mp4?status={status}")
    assert verdict == InputRefused("input_unreachable", f"video_url answered HTTP {status}")


async def test_a_retry_carries_the_servers_retry_after(client, inputs):
    """A 429's Retry-After comes with the verdict, as the hint for the next try."""
    verdict = await check(client, f"{inputs}/busy.mp4?status=429&retry_after=7")
    assert verdict == InputRetry("video_url answered HTTP 429", retry_after_s=7.0)


@pytest.mark.parametrize("status", [429, 500, 502, 503])
async def test_a_busy_or_failing_server_is_worth_another_try(client, inputs, status):
    """429 and 5xx answers ask for a retry rather than failing the job."""
    verdict = await check(client, f"{inputs}/busy.mp4?status={status}")
    assert verdict == InputRetry(f"video_url answered HTTP {status}")


async def test_a_slow_input_is_worth_another_try_after_the_deadline(client, inputs):
    """No answer within the deadline is a retry, and the check ends at the deadline."""
    started = time.monotonic()
    verdict = await check(client, f"{inputs}/slow.mp4?delay_s=1", deadline_s=0.3)
    assert isinstance(verdict, InputRetry)
    assert time.monotonic() - started < 0.9


async def test_three_redirects_are_followed_and_a_fourth_is_refused(client, inputs):
    """A chain of three redirects reaches the input; one more fails with input_unreachable."""
    target = f"{inputs}/in.mp4?size=1234"
    three = redirects_to(target, inputs, 3)
    assert await check(client, three) == InputOk(content_type="video/mp4", size=1234)
    four = redirects_to(target, inputs, 4)
    verdict = await check(client, four)
    assert verdict == InputRefused("input_unreachable", "video_url redirects more than 3 times")


async def test_a_redirect_to_the_metadata_address_is_refused_without_connecting(client, inputs):
    """A redirect to 169.254.169.254 is refused by the guard, even with 127.0.0.1 allowed."""
    started = time.monotonic()
    verdict = await check(
        client, redirects_to("http://169.254.169.254/latest/meta-data/", inputs, 1)
    )
    assert isinstance(verdict, InputRefused)
    assert verdict.code == "input_unreachable"
    assert "may not reach" in verdict.message
    assert time.monotonic() - started < 1  # refused at once: nothing was dialled and waited on


async def test_a_name_resolving_to_a_private_address_is_refused_unless_allowed(inputs):
    """Only allowed hosts may be reached on private addresses; an unlisted name is refused."""
    port = httpx.URL(inputs).port
    resolver = FakeResolver({"cdn.test": ["127.0.0.1"]})
    url = f"http://cdn.test:{port}/_emulator/inputs/in.mp4"
    async with create_input_client(allow_hosts=("127.0.0.1",), resolver=resolver) as strict:
        verdict = await check(strict, url)
    assert isinstance(verdict, InputRefused)
    assert verdict.code == "input_unreachable"
    async with create_input_client(allow_hosts=("*.test",), resolver=resolver) as allowed:
        assert await check(allowed, url) == InputOk("video/mp4", len(OUTPUT_BYTES))


async def test_a_refused_connection_is_unreachable(client):
    """Nothing listening on the port fails with input_unreachable at once."""
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    verdict = await check(client, f"http://127.0.0.1:{port}/in.mp4")
    assert verdict == InputRefused("input_unreachable", "could not connect to video_url's host")
