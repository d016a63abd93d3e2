"""What the benchmarks share: the machine, child processes, the counted emulator, a receiver.

Every benchmark starts its own private Redis, emulator and gateway processes on
free ports of 127.0.0.1 and stops them when it ends (children also die with
this process, via PR_SET_PDEATHSIG). Figures are gathered into `Section`s that
`run.py` prints side by side.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Coroutine, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.support` below

import httpx
import redis
import uvloop
from litestar import Litestar, Request, Response, post
from litestar.params import RawBody
from standardwebhooks.webhooks import Webhook

from service.localredis import LocalRedis, _die_with_parent, free_port
from service.serving import listen, serve
from tests.support import TestTenant, new_tenant

ROOT = Path(__file__).resolve().parents[2]
BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable
GATEWAY = [PYTHON, "-m", "service"]
PROFILES = Path(tempfile.gettempdir()) / "rcg-bench-profiles"
"""Where py-spy's collapsed stacks are kept (the summaries are printed)."""
JOB_BODY: dict[str, Any] = {
    "input": {"prompt": "a paper boat on a pond", "video_url": "https://example.com/in.mp4"},
}
"""A minimal valid submit; benchmarks add their receiver as the webhook."""
T = TypeVar("T")


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run a benchmark on uvloop, as the gateway's processes run, so the driver keeps up."""
    return uvloop.run(main)


# -- the machine -----------------------------------------------------------------------------


def machine() -> list[tuple[str, str]]:
    """What the figures were measured on."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(
        [shutil.which("redis-server") or "redis-server", "--version"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split(" ")[2:3]
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", model),
        ("Python", platform.python_version()),
        ("redis-server", redis_version[0].removeprefix("v=") if redis_version else "?"),
        ("load generator", loadgen_name()),
    ]


def loadgen_name() -> str:
    """`wrk` when it is on PATH (apt-get install wrk), else loadgen.py on aiohttp."""
    return "wrk" if shutil.which("wrk") else "aiohttp (tests/bench/loadgen.py)"


# -- reporting -------------------------------------------------------------------------------


@dataclass
class Goal:
    """One target of issue 7 and whether this run met it."""

    name: str
    target: str
    actual: str
    met: bool


@dataclass
class Section:
    """One benchmark's figures, goals and notes."""

    title: str
    figures: list[tuple[str, str]] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[tuple[str, str]] = field(default_factory=list)
    """The key figures, repeated in run.py's closing summary."""

    def render(self) -> str:
        lines = [self.title, "=" * len(self.title)]
        lines += table(["figure", "value"], self.figures)
        if self.notes:
            lines.append("")
            lines += self.notes
        return "\n".join(lines)


def table(header: list[str], rows: list[tuple[str, ...]] | list[list[str]]) -> list[str]:
    """Rows as aligned text columns (numbers are pre-formatted by the caller)."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(str(cell))) for w, cell in zip(widths, row, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
    out.append("  ".join("-" * w for w in widths))
    out += [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return out


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of `values`."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(p / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


# -- child processes -------------------------------------------------------------------------


class Child:
    """A child process with its output in a log file; stopped with SIGTERM, then killed."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], logdir: Path) -> None:
        self.name = name
        self.log = logdir / f"{name}.log"
        self._file = self.log.open("wb")
        self.proc = subprocess.Popen(
            args,
            env=dict(env),
            cwd=ROOT,
            stdout=self._file,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 15) -> str:
        text = self.log.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._file.close()


class Stack(contextlib.AsyncExitStack):
    """Owns a benchmark's temporary directory, Redis and child processes; stops all at exit."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="rcg-bench-"))
        self.callback(shutil.rmtree, self.dir, ignore_errors=True)
        self.children: list[Child] = []

    def redis(self) -> LocalRedis:
        server = LocalRedis().start()
        self.callback(server.cleanup)
        return server

    def child(self, name: str, args: list[str], env: Mapping[str, str]) -> Child:
        process = Child(name, args, env, self.dir)
        self.children.append(process)
        self.callback(process.stop)
        return process

    def check_alive(self) -> None:
        for process in self.children:
            if process.proc.returncode is None:
                process.check_alive()

    async def emulator(self, *, queue_s: float, run_s: float) -> tuple[Child, str]:
        """The counted emulator (counted_emulator.py) in its own process; its base URL."""
        port = free_port()
        args = [PYTHON, str(BENCH / "counted_emulator.py"), "--port", str(port)]
        args += ["--queue-s", str(queue_s), "--run-s", str(run_s)]
        process = self.child("emulator", args, os.environ)
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/_bench/counts", process)
        return process, url

    def tenants_file(self, tenant: TestTenant) -> Path:
        path = self.dir / "tenants.toml"
        path.write_text(tenant.toml())
        return path

    async def api(self, env: Mapping[str, str]) -> tuple[Child, str]:
        """`runcomfy-gateway api` on a free port; its base URL."""
        port = free_port()
        process = self.child(
            "api", [*GATEWAY, "api", "--host", "127.0.0.1", "--port", str(port)], env
        )
        url = f"http://127.0.0.1:{port}"
        await wait_http(f"{url}/healthz", process)
        return process, url

    async def worker(self, env: Mapping[str, str]) -> Child:
        """`runcomfy-gateway worker`, waited for until its health port answers."""
        port = free_port()
        process = self.child("worker", [*GATEWAY, "worker", "--metrics-port", str(port)], env)
        await wait_http(f"http://127.0.0.1:{port}/healthz", process, ok_below=600)
        return process


def gateway_env(
    redis_url: str, upstream_url: str, tenants: Path, **settings: str | float
) -> dict[str, str]:
    """The environment of `api` and `worker`; `settings` are GATEWAY_* overrides by suffix."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "RUNCOMFY_BASE_URL": upstream_url,
        "RUNCOMFY_API_TOKEN": "bench-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_LOG_LEVEL": "WARNING",
        "GATEWAY_SHUTDOWN_S": "5",
        # The bench's inputs are never served, and the peers check none: measure the rest.
        "GATEWAY_PREFLIGHT": "off",
    }
    env.update({f"GATEWAY_{name.upper()}": str(value) for name, value in settings.items()})
    return env


def peer_env(
    redis_url: str, upstream_url: str, tenant: TestTenant, **settings: str | float
) -> dict[str, str]:
    """The environment of peer_arq.py's API and worker; `settings` are PEER_* by suffix."""
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "RUNCOMFY_BASE_URL": upstream_url,
        "RUNCOMFY_API_TOKEN": "bench-token",
        "PEER_API_KEY": tenant.api_key,
        "PEER_WEBHOOK_SECRET": tenant.whsec,
    }
    env.update({f"PEER_{name.upper()}": str(value) for name, value in settings.items()})
    return env


FAST_FLOW: Mapping[str, str | float] = {
    "poll_interval_min_s": 0.1,
    "upstream_rate_per_s": 100_000,
    "upstream_burst": 100_000,
    "upstream_max_in_flight": 100_000,
}
"""B and D: default settings, except a short first poll and upstream limits out of the way."""


async def wait_http(
    url: str, process: Child | None = None, *, timeout: float = 30.0, ok_below: int = 500
) -> None:
    """Wait until `url` answers with a status below `ok_below`."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=1, trust_env=False) as client:
        while True:
            if process is not None:
                process.check_alive()
            with contextlib.suppress(httpx.HTTPError, OSError):
                if (await client.get(url)).status_code < ok_below:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up within {timeout:g}s")
            await asyncio.sleep(0.05)


async def get_json(url: str) -> Any:
    """GET `url` and decode its JSON answer (the emulator's own and its counting endpoints)."""
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        answer = await client.get(url)
        answer.raise_for_status()
        return answer.json()


async def emulator_counts(url: str) -> Counter[str]:
    """The counted emulator's calls so far, by kind (submit, status, result, cancel, other)."""
    return Counter(await get_json(f"{url}/_bench/counts"))


async def poll_gaps(url: str) -> dict[str, float]:
    """Gaps between polls of one request since the last call (p50, p99, max, n); then reset."""
    gaps: dict[str, float] = await get_json(f"{url}/_bench/gaps")
    return gaps


async def upstream_finished_at(url: str) -> dict[str, float]:
    """Unix time each emulator request was created; in instant mode that is when it completed."""
    items = (await get_json(f"{url}/_emulator/requests"))["items"]
    return {item["request_id"]: parse_rfc3339(item["submitted_at"]) for item in items}


def parse_rfc3339(value: str) -> float:
    """Unix time of an RFC 3339 timestamp."""
    return datetime.fromisoformat(value).timestamp()


# -- CPU use ---------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_cpu_seconds() -> float:
    """CPU seconds every process on the machine has used (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _TICKS


class CpuMeter:
    """CPU use of named processes over a window, in % of one core.

    `machine` is every process on the machine together (of nproc x 100%): the
    benchmark's own driver and load generator, and anything else running.
    """

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._machine = machine_cpu_seconds()
        self._t0 = time.monotonic()

    def percent(self) -> dict[str, float]:
        elapsed = time.monotonic() - self._t0
        shares = {
            name: 100 * (cpu_seconds(pid) - self._start[name]) / elapsed
            for name, pid in self.pids.items()
        }
        shares["machine"] = 100 * (machine_cpu_seconds() - self._machine) / elapsed
        return shares


def redis_pid(server: LocalRedis) -> int:
    """The redis-server's process id, as it reports it."""
    client = redis.Redis(port=server.port)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


# -- profiles --------------------------------------------------------------------------------


def pyspy() -> str | None:
    """The py-spy binary beside this Python, or on PATH (`pip install py-spy`)."""
    beside = Path(PYTHON).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


async def profile(pid: int, seconds: float, out: Path, *, top: int = 18) -> list[str]:
    """Sample `pid` with py-spy for `seconds`; the hottest functions, inclusive and self."""
    binary = pyspy()
    if binary is None:
        return ["(profile skipped: py-spy is not installed; .venv/bin/pip install py-spy)"]
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".txt")
    process = await asyncio.create_subprocess_exec(
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(round(seconds)),
        "--rate",
        "100",
        "--format",
        "raw",
        "--function",
        "--output",
        str(raw),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await process.communicate()
    if process.returncode != 0 or not raw.exists():
        return [f"(profile failed: {err.decode(errors='replace').strip()[-300:]})"]
    return [*summarize_profile(raw.read_text(), top=top), f"(raw stacks: {raw})"]


_SCAFFOLDING = (
    "<frozen runpy>",
    "asyncio/runners.py",
    "asyncio/base_events.py",
    "asyncio/events.py",
    "uvicorn/server.py",
    "uvicorn/_compat.py",
    "service/cli.py",
    "service/__main__.py",
    "service/api/server.py",
)
"""Frames every sample passes through (the process's main and the event loop): not shown."""

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    found = _FRAME.match(frame)
    if found is None:
        return frame
    path = found["file"]
    for marker in ("site-packages/", f"{ROOT}/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{found['func']} ({path})"


def summarize_profile(collapsed: str, *, top: int) -> list[str]:
    """Inclusive and self shares of samples per function, from py-spy's collapsed stacks."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread (")]
        if not frames:
            continue
        total += count
        frames = [f for f in frames if not any(s in f for s in _SCAFFOLDING)] or frames[-1:]
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    if not total:
        return ["(no samples)"]

    def rows(counter: Counter[str]) -> list[tuple[str, str]]:
        return [(f"{100 * n / total:5.1f}%", name) for name, n in counter.most_common(top)]

    lines = [f"{total} samples of the busy threads (py-spy leaves out idle waiting)"]
    lines += ["", "inclusive (function and what it calls):"]
    lines += table(["share", "function"], rows(inclusive))
    lines += ["", "self (time in the function's own code):"]
    lines += table(["share", "function"], rows(own))
    return lines


# -- a verifying webhook receiver ------------------------------------------------------------


@dataclass
class Arrival:
    """A webhook that passed signature verification, first copy only."""

    webhook_id: str
    at: float  # unix time of arrival
    event: dict[str, Any]


class Receiver:
    """A webhook endpoint that verifies every signature with `standardwebhooks`."""

    def __init__(self, tenant: TestTenant) -> None:
        self._webhook = Webhook(tenant.whsec)
        self.arrivals: dict[str, Arrival] = {}
        self.duplicates = 0
        self.rejected = 0
        self._wanted = 0
        self._enough = asyncio.Event()
        self.last_at = 0.0
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _receive(self, request: Request[Any, Any, Any], body: RawBody) -> Response[str]:
        at = time.time()
        try:
            event = self._webhook.verify(body, dict(request.headers))
        except Exception:  # noqa: BLE001 - any failure to verify is a rejection
            self.rejected += 1
            return Response("bad signature", status_code=400)
        webhook_id = request.headers["webhook-id"]
        if webhook_id in self.arrivals:
            self.duplicates += 1
        else:
            self.arrivals[webhook_id] = Arrival(webhook_id, at, event)
            self.last_at = time.perf_counter()
            if self._wanted and len(self.arrivals) >= self._wanted:
                self._enough.set()
        return Response("ok", status_code=200)

    async def wait_for(self, count: int, timeout: float) -> None:
        """Wait until `count` distinct verified webhooks arrived."""
        self._wanted = count
        if len(self.arrivals) >= count:
            return
        try:
            await asyncio.wait_for(self._enough.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(
                f"only {len(self.arrivals)} of {count} webhooks within {timeout:g}s"
            ) from None

    def arrived_between(self, start: float, end: float) -> int:
        """Distinct verified webhooks that arrived in [start, end) (unix time)."""
        return sum(1 for a in self.arrivals.values() if start <= a.at < end)

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[Receiver]:
        """Serve the receiver in this process on Litestar, as the gateway serves its own apps."""
        app = Litestar([post("/hook")(self._receive)], openapi_config=None, logging_config=None)
        served = await serve(app, listen("127.0.0.1", self.port), keep_alive_s=75)
        try:
            yield self
        finally:
            await served.stop()


def submit_body(webhook_url: str | None) -> bytes:
    """A valid submit, naming `webhook_url` as its webhook when given."""
    webhook = {"webhook": {"url": webhook_url}} if webhook_url else {}
    return json.dumps({**JOB_BODY, **webhook}).encode()


async def submit_jobs(
    api_url: str,
    api_key: str,
    count: int,
    *,
    webhook_url: str | None = None,
    concurrency: int = 50,
    per_second: float | None = None,
) -> list[str]:
    """Submit `count` jobs (all must answer 202); their ids.

    A burst goes through loadgen.py in its own process, `concurrency` at a time,
    so this process (and the receiver it serves) does not bound it; paced
    submits (`per_second`) are few enough a second to send from here with httpx.
    """
    body = submit_body(webhook_url)
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
    if per_second is None:
        return await _burst(f"{api_url}/v1/jobs", headers, body, count, concurrency)
    ids: list[str] = []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:

        async def one() -> None:
            answer = await client.post(f"{api_url}/v1/jobs", content=body, headers=headers)
            if answer.status_code != 202:
                raise RuntimeError(f"submit answered {answer.status_code}: {answer.text[:300]}")
            ids.append(answer.json()["id"])

        started = time.perf_counter()
        tasks = []
        for i in range(count):
            delay = started + i / per_second - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return ids


async def _burst(
    url: str, headers: dict[str, str], body: bytes, count: int, concurrency: int
) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="rcg-submit-") as tmp:
        body_file, ids_file = Path(tmp) / "body.json", Path(tmp) / "ids.txt"
        body_file.write_bytes(body)
        args = [PYTHON, str(BENCH / "loadgen.py"), "--url", url, "--method", "POST"]
        args += ["--body-file", str(body_file), "--concurrency", str(min(concurrency, count))]
        args += ["--warmup", "0", "--requests", str(count), "--ids-out", str(ids_file)]
        for name, value in headers.items():
            args += ["--header", f"{name}: {value}"]
        process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
        result = json.loads((await process.communicate())[0])
        ids = ids_file.read_text().split()
    if result["statuses"] != {"202": count} or len(ids) != count:
        raise RuntimeError(f"the burst of {count} submits was answered {result['statuses']}")
    return ids


def bench_tenant() -> TestTenant:
    return new_tenant("bench")
