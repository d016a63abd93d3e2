"""Durable outputs: the worker's memory while it copies one large output (issue 15).

`python tests/bench/bench_outputs.py [--size-mb 500] [--every-ms 10] [--runs 3]` starts its
own Redis, moto's S3 server, the emulator, the API and one worker as processes on
127.0.0.1 (as the end-to-end tests do), submits a job whose output is `--size-mb` MiB for a
tenant with an output_store, and samples the worker's resident memory every `--every-ms`
from the submit until the job is completed: before, peak, after, the peak's growth, the
copy's duration and rate, and the samples at each tenth of the run. The output is
generated and streamed by the emulator, so only the worker's own buffers show.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.localredis import LocalRedis, free_port  # noqa: E402
from tests.support import (  # noqa: E402
    S3Server,
    api_client,
    gateway_processes,
    new_tenant,
    outputs_env,
    process_rss_bytes,
)

MIB = 1024 * 1024
TENANT = new_tenant("bench")


async def one_copy(stack: dict[str, object], size: int, every_s: float) -> dict[str, object]:
    """Copy one output of `size` bytes; the worker's RSS samples and the copy's duration."""
    pid = stack["worker_pid"]
    assert isinstance(pid, int)
    async with api_client(str(stack["api"]), TENANT) as api:
        await api.post(  # the emulator's output size for the next request
            f"{stack['emulator']}/_emulator/config", json={"output_bytes": size}
        )
        before = process_rss_bytes(pid)
        samples: list[tuple[float, int]] = []
        started = time.monotonic()
        body = {"input": {"prompt": "a boat", "video_url": "https://example.com/in.mp4"}}
        job_id = (await api.post("/v1/jobs", json=body)).json()["id"]
        polled = 0.0
        while True:
            now = time.monotonic()
            samples.append((now - started, process_rss_bytes(pid)))
            if now - polled > 0.1:
                polled = now
                job = (await api.get(f"/v1/jobs/{job_id}")).json()
                if job["status"] in {"completed", "failed"}:
                    break
            await asyncio.sleep(every_s)
        after = process_rss_bytes(pid)
    assert job["status"] == "completed", job["error"]
    assert job["output_files"][0]["bytes"] == size
    return {"before": before, "after": after, "samples": samples, "seconds": samples[-1][0]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mb", type=int, default=500, help="the output's size in MiB")
    parser.add_argument("--every-ms", type=float, default=10, help="RSS sampling interval")
    parser.add_argument("--runs", type=int, default=3, help="copies, one after the other")
    args = parser.parse_args()
    size = args.size_mb * MIB
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
            env = outputs_env(redis.url, f"http://127.0.0.1:{ports['emulator']}", tenants)
            procs = gateway_processes(ports, env, tmp, ["--queue-s", "0.1", "--run-s", "0.1"])
            stack: dict[str, object] = {
                "api": f"http://127.0.0.1:{ports['api']}",
                "emulator": f"http://127.0.0.1:{ports['emulator']}",
                "worker_pid": procs["worker"].proc.pid,
            }
            try:
                print(f"copying a {args.size_mb} MiB output, worker RSS every {args.every_ms} ms")
                print("run  before MiB  peak MiB  growth MiB  after MiB  seconds  MiB/s")
                for run in range(1, args.runs + 1):
                    result = await one_copy(stack, size, args.every_ms / 1000)
                    samples = result["samples"]
                    assert isinstance(samples, list)
                    before, after = result["before"], result["after"]
                    assert isinstance(before, int)
                    assert isinstance(after, int)
                    seconds = float(result["seconds"])  # type: ignore[arg-type]
                    peak = max(rss for _, rss in samples)
                    print(
                        f"{run:>3}  {before / MIB:>10.1f}  {peak / MIB:>8.1f}  "
                        f"{(peak - before) / MIB:>10.1f}  {after / MIB:>9.1f}  "
                        f"{seconds:>7.1f}  {size / MIB / seconds:>5.0f}"
                    )
                    tenths = [samples[len(samples) * i // 10][1] / MIB for i in range(10)]
                    print("     RSS at each tenth (MiB): " + " ".join(f"{v:.0f}" for v in tenths))
            finally:
                for proc in procs.values():
                    proc.stop()
        finally:
            redis.cleanup()
            s3.stop()


if __name__ == "__main__":
    asyncio.run(main())
