"""A. Submit throughput: `POST /v1/jobs` on the gateway's API vs a bare Litestar app.

Both are served the same way (uvicorn, the gateway's options, one process) and
loaded the same way: `wrk` (or the aiohttp load generator) in its own process,
50 connections, a warm-up, then a fixed duration. The gateway authenticates a
tenant key, validates, and stores the job in a real Redis; the bare app only
decodes the body into the same Struct and answers 202. Their ratio is how much
of the server's ceiling the gateway keeps (goal >= 0.7).

Then a burst: 10,000 submits from 50 connections, as fast as they are answered,
on the gateway alone. Its p99 is issue 12's measured need rule: the API batches
concurrent submits' Redis work only if, without batching, it is above 100 ms.
"""

import argparse
import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

from harness import (
    BENCH,
    JOB_BODY,
    PROFILES,
    PYTHON,
    CpuMeter,
    Goal,
    Section,
    Stack,
    bench_tenant,
    free_port,
    gateway_env,
    loadgen_name,
    profile,
    redis_pid,
    run_async,
    wait_http,
)

CONNECTIONS = 50
BURST = 10_000
BURST_P99_MS = 100.0


async def load(
    url: str, headers: dict[str, str], body: bytes, seconds: float, tmp: Path
) -> dict[str, Any]:
    """POST `body` to `url` with 50 connections for `seconds`; rate, latency, bad answers."""
    if shutil.which("wrk"):
        return await _wrk(url, headers, body, seconds, tmp)
    return await _loadgen(url, headers, body, seconds, tmp)


async def _wrk(
    url: str, headers: dict[str, str], body: bytes, seconds: float, tmp: Path
) -> dict[str, Any]:
    script = tmp / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(body.decode())}"]
    lines += [f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    process = await asyncio.create_subprocess_exec(
        "wrk",
        "-t1",
        f"-c{CONNECTIONS}",
        f"-d{seconds:g}s",
        "--latency",
        "-s",
        str(script),
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out = (await process.communicate())[0].decode()
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if rate is None or total is None:
        raise RuntimeError(f"wrk said:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    latency = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.MULTILINE))
    return {
        "rate": float(rate[1]),
        "requests": int(total[1]),
        "bad": int(bad[1]) if bad else 0,
        "socket_errors": errors[1] if errors else "",
        "p50": latency.get("50", "?"),
        "p99": latency.get("99", "?"),
    }


async def burst(
    url: str, headers: dict[str, str], body: bytes, tmp: Path, *, requests: int = BURST
) -> dict[str, Any]:
    """POST `body` `requests` times from 50 connections, each sent once the last is answered."""
    return await _loadgen(url, headers, body, 0, tmp, requests=requests)


async def _loadgen(
    url: str,
    headers: dict[str, str],
    body: bytes,
    seconds: float,
    tmp: Path,
    *,
    requests: int = 0,
    client: str = "aiohttp",
) -> dict[str, Any]:
    body_file = tmp / "body.json"
    body_file.write_bytes(body)
    args = [PYTHON, str(BENCH / "loadgen.py"), "--url", url, "--method", "POST"]
    args += ["--body-file", str(body_file), "--concurrency", str(CONNECTIONS)]
    args += ["--duration", str(seconds), "--warmup", "0", "--requests", str(requests)]
    args += ["--client", client]
    for name, value in headers.items():
        args += ["--header", f"{name}: {value}"]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    result = json.loads((await process.communicate())[0])
    good = sum(v for k, v in result["statuses"].items() if k.startswith("2"))
    return {
        "rate": result["rate"],
        "requests": result["requests"],
        "bad": result["requests"] - good,
        "socket_errors": "",
        "p50": f"{result['p50_ms']:.1f}ms",
        "p99": f"{result['p99_ms']:.1f}ms",
        "p99_ms": result["p99_ms"],
        "loadgen_cpu": result["cpu_percent"],
    }


ROUNDS = 2


async def run(
    *, seconds: float = 6.0, warmup: float = 2.0, rounds: int = ROUNDS, profile_s: float = 0.0
) -> Section:
    """Both servers up at once; loaded in turn, `rounds` times, so drift hits both alike."""
    tenant = bench_tenant()
    body = json.dumps({**JOB_BODY, "webhook": {"url": "http://127.0.0.1:9/hook"}}).encode()
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {tenant.api_key}"}
    section = Section("A. Submit throughput: POST /v1/jobs, one uvicorn process, 50 connections")
    async with Stack() as stack:
        server = stack.redis()
        env = gateway_env(server.url, "http://127.0.0.1:9", stack.tenants_file(tenant))
        api, api_url = await stack.api(env)
        port = free_port()
        bare = stack.child("bare", [PYTHON, str(BENCH / "bare_api.py"), "--port", str(port)], env)
        bare_url = f"http://127.0.0.1:{port}"
        await wait_http(f"{bare_url}/v1/jobs", bare, ok_below=600)
        targets = {
            "gateway": (f"{api_url}/v1/jobs", {"api": api.pid, "redis": redis_pid(server)}),
            "bare": (f"{bare_url}/v1/jobs", {"bare": bare.pid}),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
        for url, _ in targets.values():
            await load(url, headers, body, warmup, stack.dir)
        for _ in range(rounds):
            for name, (url, pids) in targets.items():
                meter = CpuMeter(pids)
                result = await load(url, headers, body, seconds, stack.dir)
                result["cpu"] = meter.percent()
                runs[name].append(result)
        bursts = await burst(f"{api_url}/v1/jobs", headers, body, stack.dir)
        # Why the load generator stays on aiohttp: the same load from httpx, on the ceiling.
        httpx_load = await _loadgen(
            f"{bare_url}/v1/jobs", headers, body, 3.0, stack.dir, client="httpx"
        )
        profiled: list[str] = []
        if profile_s:
            sampling = asyncio.create_task(profile(api.pid, profile_s, PROFILES / "api"))
            await asyncio.sleep(0.3)
            await load(f"{api_url}/v1/jobs", headers, body, profile_s, stack.dir)
            profiled = ["", "Profile of the API process under the same load (py-spy):"]
            profiled += await sampling
        stack.check_alive()

    ours, ceiling = (sum(r["rate"] for r in runs[n]) / rounds for n in ("gateway", "bare"))
    ratio = ours / ceiling
    # CPU per answered request of the serving process: steadier than the rates when other
    # work shares the machine, since a starved server answers fewer requests, not dearer ones.
    server = {"gateway": "api", "bare": "bare"}
    cost = {
        name: sum(r["cpu"][server[name]] / 100 / r["rate"] for r in runs[name]) / rounds * 1e6
        for name in targets
    }
    costs = f"gateway {cost['gateway']:.0f} us, bare {cost['bare']:.0f} us"
    section.figures = [
        ("gateway API", f"{ours:,.0f} req/s"),
        ("bare Litestar (ceiling)", f"{ceiling:,.0f} req/s"),
        ("ratio gateway / bare", f"{ratio:.2f}"),
        ("CPU per request", f"{costs} (bare / gateway {cost['bare'] / cost['gateway']:.2f})"),
    ]
    for name in targets:
        for i, result in enumerate(runs[name], 1):
            cpu = ", ".join(f"{n} {v:.0f}%" for n, v in result["cpu"].items())
            section.figures.append(
                (
                    f"  {name}, round {i}",
                    (
                        f"{result['rate']:,.0f} req/s, p50 {result['p50']}, "
                        f"p99 {result['p99']}, non-2xx {result['bad']}; CPU {cpu}"
                    ),
                )
            )
    burst_figure = (
        f"{bursts['rate']:,.0f} req/s, p50 {bursts['p50']}, p99 {bursts['p99']}, "
        f"non-2xx {bursts['bad']}"
    )
    section.figures.append((f"burst of {BURST:,} submits, gateway", burst_figure))
    section.summary = [*section.figures[:4], section.figures[-1]]
    section.figures.append(
        (
            "load generator check: bare Litestar from httpx",
            (
                f"{httpx_load['rate']:,.0f} req/s at {httpx_load['loadgen_cpu']:.0f}% of a core "
                f"(aiohttp: {ceiling:,.0f} req/s), so the load generator stays on aiohttp"
            ),
        )
    )
    burst_p99 = bursts["p99_ms"]
    section.goals = [
        Goal("A submit throughput ratio", ">= 0.70", f"{ratio:.2f}", ratio >= 0.7),
        Goal(
            "A burst p99 (batching only above)",
            f"<= {BURST_P99_MS:g} ms",
            f"{burst_p99:.1f} ms",
            burst_p99 <= BURST_P99_MS,
        ),
    ]
    section.notes = [
        f"load: {loadgen_name()} in its own process, {CONNECTIONS} connections; {warmup:g} s",
        f"warm-up each, then {rounds} rounds of {seconds:g} s, gateway and bare in turn (mean).",
        "Body: input + webhook (~150 bytes); the gateway answers the whole job (~700 bytes).",
        "CPU is in % of one core, over the round; `machine` is every process together.",
        "CPU per request: the serving process's CPU time over the requests it answered.",
        *profiled,
    ]
    if any(r["bad"] for results in runs.values() for r in results):
        section.notes.append("WARNING: some answers were not 2xx; the rates count them too.")
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=6.0, help="per round and server")
    parser.add_argument("--profile", type=float, default=0.0, help="profile the API for N s")
    args = parser.parse_args()
    started = time.monotonic()
    section = run_async(run(seconds=args.seconds, profile_s=args.profile))
    print(section.render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
