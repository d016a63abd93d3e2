"""The RunComfy emulator's HTTP contract, configuration and fault injection."""

import asyncio
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from service.localredis import free_port
from service.runcomfy.emulator import MODEL, OUTPUT_BYTES, EmulatorConfig
from tests.support import Process, StartEmulator, wait_http

INPUT = {"prompt": "a cat surfing", "video_url": "https://example.com/in.mp4"}
SUBMIT = f"/v1/models/{MODEL}"


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as client:
        yield client


async def call(
    http: httpx.AsyncClient, method: str, url: str, **kwargs: Any
) -> tuple[int, Any, httpx.Response]:
    """Make one call and return its status, decoded JSON body (or None) and the response."""
    response = await http.request(method, url, **kwargs)
    is_json = response.headers.get("content-type", "").startswith("application/json")
    return response.status_code, response.json() if is_json else None, response


async def submit(http: httpx.AsyncClient, url: str, **kwargs: Any) -> str:
    status, body, _ = await call(http, "POST", url + SUBMIT, json=INPUT, **kwargs)
    assert status == 200, body
    return str(body["request_id"])


def test_config_from_env_reads_every_variable() -> None:
    """from_env reads one RUNCOMFY_EMULATOR_* variable per field, converting its type."""
    environ = {
        "RUNCOMFY_EMULATOR_QUEUE_S": "0.5",
        "RUNCOMFY_EMULATOR_RUN_S": "2",
        "RUNCOMFY_EMULATOR_FAIL_RATE": "0.1",
        "RUNCOMFY_EMULATOR_ERROR_5XX_RATE": "0.2",
        "RUNCOMFY_EMULATOR_RATE_429": "0.3",
        "RUNCOMFY_EMULATOR_RETRY_AFTER_S": "4",
        "RUNCOMFY_EMULATOR_HTTP200_ERROR_RATE": "0.05",
        "RUNCOMFY_EMULATOR_DROP_RATE": "0.01",
        "RUNCOMFY_EMULATOR_LATENCY_MS": "25",
        "RUNCOMFY_EMULATOR_FUNDS_EXHAUSTED": "true",
        "RUNCOMFY_EMULATOR_FAULTS_ON_SUBMIT_ONLY": "1",
        "RUNCOMFY_EMULATOR_TOKEN": "tok",
        "RUNCOMFY_EMULATOR_SEED": "42",
        "RUNCOMFY_EMULATOR_SPREAD": "0.2",
        "RUNCOMFY_EMULATOR_SPEED": "0.5",
        "RUNCOMFY_EMULATOR_INPUT_SCALING": "false",
        "RUNCOMFY_EMULATOR_CAPACITY": "3",
    }
    assert EmulatorConfig.from_env(environ) == EmulatorConfig(
        queue_s=0.5,
        run_s=2,
        fail_rate=0.1,
        error_5xx_rate=0.2,
        rate_429=0.3,
        retry_after_s=4,
        http200_error_rate=0.05,
        drop_rate=0.01,
        latency_ms=25,
        funds_exhausted=True,
        faults_on_submit_only=True,
        token="tok",  # noqa: S106 -- a test token
        seed=42,
        spread=0.2,
        speed=0.5,
        input_scaling=False,
        capacity=3,
    )


def test_config_from_env_defaults_when_unset_or_empty() -> None:
    """Unset and empty variables keep the defaults."""
    assert EmulatorConfig.from_env({"RUNCOMFY_EMULATOR_TOKEN": ""}) == EmulatorConfig()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("RUNCOMFY_EMULATOR_FAIL_RATE", "1.5"),
        ("RUNCOMFY_EMULATOR_QUEUE_S", "soon"),
        ("RUNCOMFY_EMULATOR_LATENCY_MS", "-1"),
        ("RUNCOMFY_EMULATOR_FUNDS_EXHAUSTED", "maybe"),
        ("RUNCOMFY_EMULATOR_SEED", "1.5"),
        ("RUNCOMFY_EMULATOR_SPEED", "0"),
        ("RUNCOMFY_EMULATOR_CAPACITY", "-1"),
    ],
)
def test_config_from_env_bad_value_names_the_variable(variable: str, value: str) -> None:
    """A bad value raises ValueError naming the variable it came from."""
    with pytest.raises(ValueError, match=variable):
        EmulatorConfig.from_env({variable: value})


async def test_instant_mode_completes_at_once(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With queue_s and run_s both 0 a request is completed on its first status call."""
    url = await emulator(queue_s=0, run_s=0)
    request_id = await submit(http, url)
    status, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
    assert (status, body) == (200, {"request_id": request_id, "status": "completed"})


async def test_queue_position_counts_only_requests_still_queued(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """The queue position counts earlier requests still queued, skipping cancelled ones."""
    url = await emulator(queue_s=30)
    first, second, third = [await submit(http, url) for _ in range(3)]
    _, cancelled, _ = await call(http, "POST", f"{url}/v1/requests/{first}/cancel")
    assert cancelled == {"request_id": first, "outcome": "cancelled"}
    positions = []
    for request_id in (second, third):
        _, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
        positions.append(body["queue_position"])
    assert positions == [0, 1]


async def test_with_capacity_one_requests_run_one_after_another(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With capacity 1 each request starts when the one before it ends; the rest queue in order."""
    url = await emulator(queue_s=0, run_s=30, capacity=1)
    ids = [await submit(http, url) for _ in range(4)]
    answers = []
    for request_id in ids:
        _, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
        answers.append((body["status"], body.get("queue_position")))
    assert answers == [("in_progress", None), ("in_queue", 0), ("in_queue", 1), ("in_queue", 2)]
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    items = {item["request_id"]: item for item in listed["items"]}
    starts = [
        datetime.fromisoformat(items[i]["submitted_at"]).timestamp() + items[i]["queue_s"]
        for i in ids
    ]
    # Each starts as the previous run (30 s) ends, whenever it was submitted.
    assert [round(b - a, 1) for a, b in itertools.pairwise(starts)] == [30.0, 30.0, 30.0]


async def test_without_capacity_every_request_starts_queue_s_after_its_submit(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """Capacity 0 (the default) runs any number at once: each request queues only queue_s."""
    url = await emulator(queue_s=0, run_s=30)
    ids = [await submit(http, url) for _ in range(3)]
    for request_id in ids:
        _, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
        assert body["status"] == "in_progress"


async def test_result_of_a_completed_request_follows_the_contract(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """A completed result has output.video on the emulator, timestamps and a null error."""
    url = await emulator(queue_s=0, run_s=0)
    request_id = await submit(http, url)
    _, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/result")
    assert body["status"] == "completed"
    assert body["output"] == {"video": f"{url}/outputs/{request_id}.mp4"}
    assert body["error"] is None
    assert body["created_at"] <= body["finished_at"]
    video = await http.get(body["output"]["video"])
    assert (video.status_code, video.headers["content-type"]) == (200, "video/mp4")
    assert video.content == OUTPUT_BYTES


async def test_output_of_an_unfinished_or_unknown_request_is_404(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """Outputs exist only for completed requests."""
    url = await emulator(queue_s=30)
    request_id = await submit(http, url)
    for name in (f"{request_id}.mp4", "nobody.mp4", request_id):
        status, body, _ = await call(http, "GET", f"{url}/outputs/{name}")
        assert (status, body["error_code"]) == (404, 404001)


async def test_unknown_model_is_404(emulator: StartEmulator, http: httpx.AsyncClient) -> None:
    """Submitting to a model other than Hunyuan video-to-video answers 404 / 404001."""
    url = await emulator()
    status, body, _ = await call(http, "POST", f"{url}/v1/models/other/model", json=INPUT)
    assert (status, body["error_code"]) == (404, 404001)


@pytest.mark.parametrize(
    "payload",
    [b"not json", b"[1]", b'{"video_url": "https://a/b"}', b'{"prompt": "p", "video_url": 3}'],
)
async def test_invalid_input_is_422(
    emulator: StartEmulator, http: httpx.AsyncClient, payload: bytes
) -> None:
    """A body that is not an object with string prompt and video_url answers 422 / 422001."""
    url = await emulator()
    status, body, _ = await call(http, "POST", url + SUBMIT, content=payload)
    assert (status, body["error_code"]) == (422, 422001)


@pytest.mark.parametrize("action", ["status", "result", "cancel"])
async def test_unknown_request_is_404(
    emulator: StartEmulator, http: httpx.AsyncClient, action: str
) -> None:
    """Status, result and cancel of an unknown request id answer 404 / 404001."""
    url = await emulator()
    method = "POST" if action == "cancel" else "GET"
    status, body, _ = await call(http, method, f"{url}/v1/requests/nope/{action}")
    assert (status, body["error_code"]) == (404, 404001)


async def test_configured_token_is_required(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With a token configured, /v1 calls need exactly that Bearer token (else 401 / 401001)."""
    url = await emulator(token="right")  # noqa: S106 -- a test token
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic right"}):
        status, body, _ = await call(http, "POST", url + SUBMIT, json=INPUT, headers=headers)
        assert (status, body["error_code"]) == (401, 401001)
    await submit(http, url, headers={"Authorization": "Bearer right"})


async def test_without_a_token_any_bearer_is_accepted(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With no token configured, any Bearer token is accepted."""
    url = await emulator()
    await submit(http, url, headers={"Authorization": "Bearer whatever"})


async def test_rate_limit_answers_retry_after_in_whole_seconds(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """A 429 carries Retry-After rounded up to whole seconds and an error_code."""
    url = await emulator(rate_429=1.0, retry_after_s=1.2)
    status, body, response = await call(http, "POST", url + SUBMIT, json=INPUT)
    assert (status, response.headers["Retry-After"], body["error_code"]) == (429, "2", 429001)


async def test_faults_on_submit_only_spare_the_other_calls(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With faults_on_submit_only, status calls answer normally while every submit fails."""
    url = await emulator()
    request_id = await submit(http, url)
    changes = {"error_5xx_rate": 1.0, "faults_on_submit_only": True}
    status, _, _ = await call(http, "POST", f"{url}/_emulator/config", json=changes)
    assert status == 200
    status, _, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
    assert status == 200
    status, body, _ = await call(http, "POST", url + SUBMIT, json=INPUT)
    assert (status // 100, body["error_code"]) == (5, 500001)


async def test_seeded_faults_repeat(emulator: StartEmulator, http: httpx.AsyncClient) -> None:
    """Two emulators with the same seed inject the same faults for the same calls."""
    sequences = []
    for _ in range(2):
        url = await emulator(error_5xx_rate=0.3, rate_429=0.3, seed=1234)
        statuses = [(await call(http, "POST", url + SUBMIT, json=INPUT))[0] for _ in range(30)]
        sequences.append(statuses)
    assert sequences[0] == sequences[1]
    assert {200, 429} <= set(sequences[0])
    assert set(sequences[0]) & {500, 502, 503}


async def test_config_endpoint_changes_faults_at_run_time(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """POST /_emulator/config applies a partial change and answers the config, token masked."""
    url = await emulator(token="secret")  # noqa: S106 -- a test token
    status, body, _ = await call(http, "POST", f"{url}/_emulator/config", json={"rate_429": 1})
    assert status == 200
    assert (body["rate_429"], body["queue_s"], body["token"]) == (1.0, 0.2, "***")
    headers = {"Authorization": "Bearer secret"}
    status, _, _ = await call(http, "POST", url + SUBMIT, json=INPUT, headers=headers)
    assert status == 429


@pytest.mark.parametrize("changes", [{"no_such_field": 1}, {"fail_rate": 2}, [1], "x"])
async def test_config_endpoint_rejects_bad_changes(
    emulator: StartEmulator, http: httpx.AsyncClient, changes: object
) -> None:
    """Unknown fields, out-of-range values and non-objects are refused with 422."""
    url = await emulator()
    status, body, _ = await call(http, "POST", f"{url}/_emulator/config", json=changes)
    assert (status, body["error_code"]) == (422, 422001)


async def test_requests_endpoint_lists_submits_and_reset_clears_them(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """/_emulator/requests lists created requests with their input; reset forgets them."""
    url = await emulator(queue_s=30)
    request_id = await submit(http, url)
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    assert listed["submits"] == 1
    (item,) = listed["items"]
    assert (item["request_id"], item["model"], item["input"], item["status"]) == (
        request_id,
        MODEL,
        INPUT,
        "in_queue",
    )
    assert item["submitted_at"]
    status, _, _ = await call(http, "POST", f"{url}/_emulator/reset")
    assert status == 200
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    assert listed == {"submits": 0, "items": [], "input_requests": {}}


async def test_run_times_follow_the_input_the_spread_and_the_speed(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """Runs scale with resolution, frames and pro_mode, spread ±spread, and slow with speed."""
    url = await emulator(queue_s=10, run_s=100, spread=0.2, seed=3)
    inputs = [
        INPUT,
        {**INPUT, "resolution": "480p", "num_frames": 85},
        {**INPUT, "pro_mode": True},
    ]
    for body in inputs * 20:
        await call(http, "POST", url + SUBMIT, json=body)
    await call(http, "POST", f"{url}/_emulator/config", json={"speed": 0.5, "spread": 0})
    await call(http, "POST", url + SUBMIT, json=INPUT)
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    items = listed["items"]
    runs = {n: [i["run_s"] for i in items[n:60:3]] for n in range(3)}
    for n, base in enumerate((100, 100 * 0.45 * 0.66, 180)):
        assert all(0.8 * base <= r <= 1.2 * base for r in runs[n]), (n, runs[n])
        assert max(runs[n]) - min(runs[n]) > 0.2 * base  # spread, not one value
    assert all(8 <= i["queue_s"] <= 12 for i in items[:60])
    assert (items[-1]["queue_s"], items[-1]["run_s"]) == (20, 200)
    finished = datetime.fromisoformat(items[-1]["finished_at"]).timestamp()
    submitted = datetime.fromisoformat(items[-1]["submitted_at"]).timestamp()
    assert finished - submitted == pytest.approx(220, abs=0.01)


async def test_requests_endpoint_lists_each_status_call(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """Each status call of a request is listed with its time, oldest first."""
    url = await emulator(queue_s=30)
    request_id = await submit(http, url)
    before = time.time()
    for _ in range(3):
        await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    polls = listed["items"][0]["status_polls"]
    assert len(polls) == 3
    assert polls == sorted(polls)
    assert before <= polls[0] <= time.time()


async def test_rejected_submits_create_nothing(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """Submits answered 429, 5xx, HTTP-200 error or 402 leave no request behind."""
    for fault in (
        {"rate_429": 1.0},
        {"error_5xx_rate": 1.0},
        {"http200_error_rate": 1.0},
        {"funds_exhausted": True},
    ):
        url = await emulator(**fault)
        _, body, _ = await call(http, "POST", url + SUBMIT, json=INPUT)
        assert "request_id" not in body, fault
        _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
        assert listed["submits"] == 0, fault


async def test_latency_delays_v1_calls(emulator: StartEmulator, http: httpx.AsyncClient) -> None:
    """latency_ms delays every /v1 answer by at least that long."""
    url = await emulator(latency_ms=150)
    started = time.monotonic()
    await call(http, "GET", f"{url}/v1/requests/nope/status")
    assert time.monotonic() - started >= 0.15


async def test_cancel_after_the_queue_is_not_cancellable(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """A completed request cannot be cancelled and stays completed."""
    url = await emulator(queue_s=0, run_s=0)
    request_id = await submit(http, url)
    _, body, _ = await call(http, "POST", f"{url}/v1/requests/{request_id}/cancel")
    assert body == {"request_id": request_id, "outcome": "not_cancellable"}
    _, body, _ = await call(http, "GET", f"{url}/v1/requests/{request_id}/status")
    assert body["status"] == "completed"


async def test_run_emulator_logs_its_url_and_stops_on_sigterm() -> None:
    """run_emulator serves until SIGTERM, logging its URL, and then exits cleanly."""
    code = (
        "import logging; logging.basicConfig(level=logging.INFO);"
        "from service.runcomfy.emulator import EmulatorConfig, run_emulator;"
        "run_emulator(EmulatorConfig(), '127.0.0.1', 0)"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, stderr=subprocess.PIPE, env={**os.environ}
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), timeout=20)
        match = re.search(rb"listening on (http://\S+)", line)
        assert match, line
        async with httpx.AsyncClient() as http:
            response = await http.get(match.group(1).decode() + "/_emulator/requests")
        assert response.status_code == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_dropped_call_reaches_the_client_as_a_cut_off_answer(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """With drop_rate 1 a submit creates the request and the client gets no complete answer."""
    url = await emulator(drop_rate=1.0)
    with pytest.raises(httpx.RemoteProtocolError):
        await http.post(url + SUBMIT, json=INPUT)
    _, listed, _ = await call(http, "GET", f"{url}/_emulator/requests")
    assert listed["submits"] == 1
    with pytest.raises(httpx.RemoteProtocolError):
        await http.get(f"{url}/v1/requests/{listed['items'][0]['request_id']}/status")


def test_emulator_command_drops_calls_without_logging_a_traceback(tmp_path) -> None:
    """`runcomfy-gateway emulator --drop-rate 1` cuts answers off, logs no traceback, exits 0."""
    port = free_port()
    process = Process(
        ["emulator", "--port", str(port), "--drop-rate", "1"], {**os.environ}, tmp_path / "emu.log"
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/_emulator/requests")
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(url + SUBMIT, json=INPUT)
        assert httpx.get(f"{url}/_emulator/requests").json()["submits"] == 1
    finally:
        assert process.stop() == 0
    assert "Traceback" not in process.output()


async def test_an_input_file_answers_its_type_and_size_to_head_and_get(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """An input file states its type and size; GET streams exactly that many bytes, MP4 first."""
    url = await emulator()
    file = f"{url}/_emulator/inputs/clip.mp4?type=video/webm&size=200000"
    head = await http.head(file)
    assert head.status_code == 200
    assert (head.headers["content-type"], head.headers["content-length"]) == (
        "video/webm",
        "200000",
    )
    assert head.content == b""
    got = await http.get(file)
    assert len(got.content) == 200_000
    assert got.content.startswith(OUTPUT_BYTES)
    state = (await http.get(f"{url}/_emulator/requests")).json()
    assert state["input_requests"] == {"clip.mp4": 2}
    assert state["submits"] == 0


async def test_an_input_file_answers_a_range_with_its_total_size(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """`Range: bytes=0-0` answers 206, one byte, and the whole size in Content-Range."""
    url = await emulator()
    got = await http.get(
        f"{url}/_emulator/inputs/a.mp4?size=5000000", headers={"Range": "bytes=0-0"}
    )
    assert got.status_code == 206
    assert got.headers["content-range"] == "bytes 0-0/5000000"
    assert got.content == OUTPUT_BYTES[:1]


async def test_an_input_file_fails_refuses_head_redirects_or_waits_as_asked(
    emulator: StartEmulator, http: httpx.AsyncClient
) -> None:
    """`status`, `head`, `redirect` and `delay_s` change how an input file answers."""
    url = await emulator()
    base = f"{url}/_emulator/inputs/x.mp4"
    assert (await http.get(f"{base}?status=404")).status_code == 404
    assert (await http.head(f"{base}?head=405")).status_code == 405
    assert (await http.get(f"{base}?head=405")).status_code == 200
    moved = await http.get(f"{base}?redirect=http://169.254.169.254/latest")
    assert (moved.status_code, moved.headers["location"]) == (302, "http://169.254.169.254/latest")
    assert (await http.get(f"{base}?size=-1")).status_code == 400
    started = time.monotonic()
    assert (await http.head(f"{base}?delay_s=0.3")).status_code == 200
    assert time.monotonic() - started >= 0.3
