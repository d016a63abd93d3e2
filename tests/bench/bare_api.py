"""The ceiling of benchmark A: a bare Litestar app that decodes a submit and answers 202.

`python tests/bench/bare_api.py --port P` serves `POST /v1/jobs`, which decodes
the body into the gateway's own `JobRequest` Struct (msgspec, through
Litestar's `data` parameter) and answers it back with 202: no auth, no Redis.
It is served exactly as `runcomfy-gateway api` serves the gateway: the same
`uvicorn.Config` (service.api.server), one process, with only the app swapped.
"""

import argparse

from litestar import Litestar, post

from service.api.server import _config, run_server
from service.config import Settings, Tenants
from service.models import JobRequest


@post("/v1/jobs", status_code=202)
async def submit(data: JobRequest) -> JobRequest:
    """Answer the decoded request."""
    return data


def bare_app() -> Litestar:
    return Litestar(route_handlers=[submit], openapi_config=None, logging_config=None, debug=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    settings = Settings(
        redis_url="redis://127.0.0.1:1/0",
        runcomfy_token="unused",  # noqa: S106 - not a secret: the bare app calls nothing
        tenants=Tenants(by_id={}),
    )
    config = _config(settings, "127.0.0.1", args.port, None)
    config.app = bare_app()  # same server options as the gateway's, another app
    run_server(config)


if __name__ == "__main__":
    main()
