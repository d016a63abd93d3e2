"""The `runcomfy-gateway` console script: api, worker, dev, emulator, openapi.

A bad configuration prints one line saying what is wrong and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

import msgspec

from service.config import ConfigError, Settings, load_settings
from service.logs import configure_logging
from service.runcomfy.emulator import EmulatorConfig

log = logging.getLogger("service")


def _configure_logging() -> None:
    configure_logging(
        os.environ.get("GATEWAY_LOG_LEVEL", "INFO").upper(),
        os.environ.get("GATEWAY_LOG_FORMAT", "text").lower(),
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runcomfy-gateway",
        description="Gateway in front of RunComfy's Hunyuan video-to-video model.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    api = commands.add_parser("api", help="serve the HTTP API")
    api.add_argument("--host", default="0.0.0.0")  # noqa: S104 - a container listens on all
    api.add_argument("--port", type=int, default=8080)
    worker = commands.add_parser("worker", help="run the submitter, poller and dispatcher")
    worker.add_argument("--metrics-port", type=int, default=None)
    dev = commands.add_parser("dev", help="everything in one process, for a laptop")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080)
    emulator = commands.add_parser("emulator", help="the built-in stand-in for RunComfy")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=8188)
    _emulator_flags(emulator)
    commands.add_parser("openapi", help="print the OpenAPI document")
    return parser


def _emulator_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per EmulatorConfig field; a flag overrides its RUNCOMFY_EMULATOR_* variable."""
    group = parser.add_argument_group("behaviour (each also RUNCOMFY_EMULATOR_<NAME>)")
    group.add_argument("--queue-s", type=float, help="seconds a request stays in_queue")
    group.add_argument("--run-s", type=float, help="seconds a request stays in_progress")
    group.add_argument("--fail-rate", type=float, help="share of requests that end failed")
    group.add_argument("--error-5xx-rate", type=float, help="share of calls answered 5xx")
    group.add_argument("--rate-429", type=float, help="share of calls answered 429")
    group.add_argument("--retry-after-s", type=float, help="Retry-After sent with 429")
    group.add_argument(
        "--http200-error-rate", type=float, help="share answered HTTP 200 with error_code"
    )
    group.add_argument("--drop-rate", type=float, help="share of calls dropped unanswered")
    group.add_argument("--latency-ms", type=float, help="latency added to every call")
    group.add_argument(
        "--funds-exhausted", action="store_true", default=None, help="submits answer 402"
    )
    group.add_argument(
        "--faults-on-submit-only",
        action="store_true",
        default=None,
        help="inject faults into submits only",
    )
    group.add_argument("--spread", type=float, help="spread each request's times by ±this share")
    group.add_argument("--speed", type=float, help="divide queue and run times by this")
    group.add_argument(
        "--capacity", type=int, help="requests run at once, first come first served (0: no limit)"
    )
    group.add_argument(
        "--input-scaling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale run_s by resolution, frames and pro_mode (default on)",
    )
    group.add_argument("--token", help="require this Bearer token")
    group.add_argument("--seed", type=int, help="seed for reproducible faults")


def _settings() -> Settings:
    return load_settings(os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command named in `argv` and return the process exit code."""
    args = _parser().parse_args(argv)
    _configure_logging()
    try:
        if args.command == "api":
            from service.api.server import serve_api  # noqa: PLC0415 - load only what runs

            serve_api(_settings(), host=args.host, port=args.port)
        elif args.command == "worker":
            from service.worker.main import worker_main  # noqa: PLC0415

            settings = _settings()
            port = args.metrics_port
            if port is None:
                port = settings.worker_metrics_port
            _run(worker_main(settings, port))
        elif args.command == "dev":
            from service.dev import dev_main  # noqa: PLC0415

            _run(dev_main(os.environ, host=args.host, port=args.port))
        elif args.command == "emulator":
            from service.runcomfy.emulator import run_emulator  # noqa: PLC0415

            run_emulator(_emulator_config(args), args.host, args.port)
        elif args.command == "openapi":
            from service.api.openapi import openapi_document  # noqa: PLC0415

            sys.stdout.write(json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n")
    except ConfigError as exc:
        sys.stderr.write(f"runcomfy-gateway: configuration error: {exc}\n")
        return 2
    return 0


def _emulator_config(args: argparse.Namespace) -> EmulatorConfig:

    try:
        config = EmulatorConfig.from_env(os.environ)
        overrides = {
            name: value
            for name in (
                "queue_s",
                "run_s",
                "fail_rate",
                "error_5xx_rate",
                "rate_429",
                "retry_after_s",
                "http200_error_rate",
                "drop_rate",
                "latency_ms",
                "funds_exhausted",
                "faults_on_submit_only",
                "token",
                "seed",
                "spread",
                "speed",
                "input_scaling",
                "capacity",
            )
            if (value := getattr(args, name)) is not None
        }
        return msgspec.structs.replace(config, **overrides) if overrides else config
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _run(coro: object) -> None:
    """Run `coro` on uvloop where it is installed (it is faster), else asyncio."""
    try:
        import uvloop  # noqa: PLC0415
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
    else:
        uvloop.run(coro)  # type: ignore[arg-type]


if __name__ == "__main__":
    raise SystemExit(main())
