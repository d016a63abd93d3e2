"""Tenants' output stores: S3-compatible buckets written with obstore.

obstore (Rust's `object_store`) streams an async iterator of chunks into a multipart
upload of `PART_BYTES` parts, `PARTS_IN_FLIGHT` at a time, so a copy holds a few parts in
memory however large the object; the object appears only when the upload completes, and an
upload whose chunks stop with an exception is aborted. Credentials are never configured
here: obstore reads the worker's AWS environment (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or web identity (`AWS_WEB_IDENTITY_TOKEN_FILE`
with `AWS_ROLE_ARN`), else the instance's metadata service.

    StoreError          the store refused or failed a write or a signature: worth another
                        try later (an outage, a throttle, credentials being rotated)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Final

import obstore
from obstore.exceptions import BaseError
from obstore.store import S3Store

from service.config import OutputStore

__all__ = ["PARTS_IN_FLIGHT", "PART_BYTES", "OutputStores", "StoreError", "describe_store_error"]

PART_BYTES: Final = 8 * 1024 * 1024
"""One part of a multipart upload (S3's least is 5 MiB but for the last)."""
PARTS_IN_FLIGHT: Final = 2
"""Parts of one object uploaded at once: what a copy holds in memory is about this many parts."""
_RETRIES: Final = 3
_RETRY_WINDOW: Final = timedelta(seconds=30)
_S3_CODE: Final = re.compile(r"<Code>(\w+)</Code>")
_KEY_ID: Final = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")


class StoreError(Exception):
    """The store did not take the object (or sign its URL); the message holds no secret."""


class OutputStores:
    """One obstore client per configured store, built on first use and reused."""

    def __init__(self) -> None:
        self._clients: dict[OutputStore, S3Store] = {}

    def _client(self, config: OutputStore) -> S3Store:
        client = self._clients.get(config)
        if client is None:
            options: dict[str, object] = {}
            if config.endpoint_url is not None:
                options["endpoint"] = config.endpoint_url
            if config.region is not None:
                options["region"] = config.region
            client = S3Store(
                config.bucket,
                prefix=config.prefix or None,
                client_options={
                    "allow_http": (config.endpoint_url or "").startswith("http://"),
                    "connect_timeout": timedelta(seconds=10),
                    "timeout": timedelta(seconds=120),
                },
                retry_config={
                    "max_retries": _RETRIES,
                    "retry_timeout": _RETRY_WINDOW,
                    "backoff": {
                        "init_backoff": timedelta(milliseconds=200),
                        "max_backoff": timedelta(seconds=5),
                        "base": 2,
                    },
                },
                **options,  # type: ignore[arg-type]
            )
            self._clients[config] = client
        return client

    async def put(
        self, config: OutputStore, path: str, chunks: AsyncIterator[bytes], content_type: str
    ) -> None:
        """Stream `chunks` into `path` (under the store's prefix) as one object.

        An exception raised by `chunks` aborts the upload and comes out unchanged; the
        store's own failures come out as `StoreError`.
        """
        try:
            await obstore.put_async(
                self._client(config),
                path,
                chunks,
                attributes={"Content-Type": content_type},
                chunk_size=PART_BYTES,
                max_concurrency=PARTS_IN_FLIGHT,
            )
        except BaseError as exc:
            raise StoreError(describe_store_error(exc)) from exc

    async def url(self, config: OutputStore, path: str) -> str:
        """Where a stored object is: a presigned GET URL with `presign_s`, else `s3://`."""
        if config.presign_s is None:
            return f"s3://{config.bucket}/{full_key(config, path)}"
        try:
            return await obstore.sign_async(
                self._client(config), "GET", path, timedelta(seconds=config.presign_s)
            )
        except BaseError as exc:
            raise StoreError(describe_store_error(exc)) from exc


def full_key(config: OutputStore, path: str) -> str:
    """The object's key in its bucket: the store's prefix, then `path`."""
    return f"{config.prefix}/{path}" if config.prefix else path


def describe_store_error(exc: BaseError) -> str:
    """The store's error in one line, safe to log and to put in a job's error.

    The error class, the message up to any XML body the store answered, and that body's
    S3 error code; an access key id that slipped into the message is masked.
    """
    text = " ".join(str(exc).split())
    code = _S3_CODE.search(text)
    head = _KEY_ID.sub("[access key id]", text.split("<", 1)[0].strip())[:240]
    return f"{type(exc).__name__}: {head}" + (f" (S3 {code[1]})" if code else "")
