"""H. Durable outputs: the worker's memory while it copies large outputs (issue 15).

Its own Redis, moto's S3 server, the emulator, the API and one worker as processes
on 127.0.0.1 (as the end-to-end tests run them), a tenant with an output_store. One
warm-up copy of 50 MiB (obstore's client and runtime start on first use, and stay),
then a copy of 50 MiB and one of 500 MiB, the worker's resident memory sampled every
10 ms from each submit until the job is completed. The outputs are generated and
streamed by the emulator, so only the worker's own buffers show. Flat means the
500 MiB copy grows the worker no more than the 50 MiB one does (within 16 MiB) and by
less than a tenth of the output.
"""

import asyncio
import tempfile
import time
from pathlib import Path

from harness import Goal, Section

from service.localredis import LocalRedis, free_port
from tests.support import (
    S3Server,
    api_client,
    gateway_processes,
    new_tenant,
    outputs_env,
    process_rss_bytes,
)

MIB = 1024 * 1024
TENANT = new_tenant("bench")
EVERY_S = 0.01


async def one_copy(api_url: str, emulator_url: str, pid: int, size: int) -> tuple[int, int, float]:
    """Copy one output of `size` bytes: the worker's RSS before, its peak, the copy's seconds."""
    async with api_client(api_url, TENANT) as api:
        await api.post(f"{emulator_url}/_emulator/config", json={"output_bytes": size})
        before = peak = process_rss_bytes(pid)
        started = polled = time.monotonic()
        body = {"input": {"prompt": "a boat", "video_url": "https://example.com/in.mp4"}}
        job_id = (await api.post("/v1/jobs", json=body)).json()["id"]
        while True:
            peak = max(peak, process_rss_bytes(pid))
            if time.monotonic() - polled > 0.1:
                polled = time.monotonic()
                job = (await api.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] in {"completed", "failed"}:
                    break
            await asyncio.sleep(EVERY_S)
    assert job["status"] == "completed", job["error"]
    assert job["output_files"][0]["bytes"] == size
    return before, peak, time.monotonic() - started


async def run() -> Section:
    section = Section("H. Durable outputs: worker memory while copying (issue 15)")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        s3 = S3Server(port=free_port(), log=tmp / "moto.log").start()
        redis = LocalRedis().start()
        try:
            bucket = s3.create_bucket()
            tenants = tmp / "tenants.toml"
            tenants.write_text(
                TENANT.toml()
                + f"[tenants.{TENANT.id}.output_store]\n"
                + s3.store_toml(bucket, "bench", presign_s=3600)
            )
            ports = {name: free_port() for name in ("emulator", "api", "worker")}
            emulator_url = f"http://127.0.0.1:{ports['emulator']}"
            env = outputs_env(redis.url, emulator_url, tenants)
            procs = gateway_processes(ports, env, tmp, ["--queue-s", "0.1", "--run-s", "0.1"])
            api_url, pid = f"http://127.0.0.1:{ports['api']}", procs["worker"].proc.pid
            try:
                growth: dict[int, float] = {}
                for label, mib in (("warm-up", 50), ("small", 50), ("large", 500)):
                    before, peak, seconds = await one_copy(api_url, emulator_url, pid, mib * MIB)
                    growth[mib] = (peak - before) / MIB
                    figure = f"RSS {before / MIB:.1f} MiB before, peak +{growth[mib]:.1f} MiB"
                    figure += f", {seconds:.1f} s ({mib / seconds:.0f} MiB/s)"
                    section.figures.append((f"{label} copy of {mib} MiB", figure))
            finally:
                for proc in procs.values():
                    proc.stop()
        finally:
            redis.cleanup()
            s3.stop()
    large = growth[500]
    section.goals.append(
        Goal(
            "H worker RSS growth, 500 MiB copy",
            "< 50 MiB and <= the 50 MiB copy's + 16 MiB",
            f"+{large:.1f} MiB (50 MiB copy: +{growth[50]:.1f} MiB)",
            large < 50 and large <= growth[50] + 16,
        )
    )
    section.summary.append(("RSS growth copying 500 MiB", f"+{large:.1f} MiB"))
    return section
