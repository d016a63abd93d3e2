"""A job's outputs as URLs: which of RunComfy's output fields to copy, and where to.

RunComfy answers `output` as `{"video"?, "videos"?, "image"?, "images"?}` (a URL or a
list of URLs each, other fields possible). Every http(s) URL in it, in the order the
fields came, is one output file; file `n` (from 0) is stored as `<job id>/<n>.<ext>`
under the tenant's prefix, and the job's `output` keeps RunComfy's shape with each URL
replaced by the stored one.
"""

from __future__ import annotations

import mimetypes
import re
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any, Final
from urllib.parse import urlsplit

__all__ = ["object_path", "output_urls", "replace_urls"]

_EXTENSION: Final = re.compile(r"^\.[a-z0-9]{1,8}$")


def _is_url(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def output_urls(output: Mapping[str, Any] | None) -> list[str]:
    """Every http(s) URL of RunComfy's `output`, field by field, lists in order."""
    urls: list[str] = []
    for value in (output or {}).values():
        if _is_url(value):
            urls.append(value)
        elif isinstance(value, list):
            urls.extend(item for item in value if _is_url(item))
    return urls


def replace_urls(output: Mapping[str, Any], stored: Mapping[str, str]) -> dict[str, Any]:
    """`output` with each URL that `stored` maps replaced by its stored URL."""
    replaced: dict[str, Any] = {}
    for name, value in output.items():
        if _is_url(value):
            replaced[name] = stored.get(value, value)
        elif isinstance(value, list):
            replaced[name] = [stored.get(v, v) if _is_url(v) else v for v in value]
        else:
            replaced[name] = value
    return replaced


def object_path(job_id: str, n: int, upstream_url: str, content_type: str) -> str:
    """Where output `n` of a job is stored under the tenant's prefix: `<job id>/<n>.<ext>`.

    The extension is the URL's own when it has a plain one, else the content type's, else `bin`.
    """
    suffix = PurePosixPath(urlsplit(upstream_url).path).suffix.lower()
    if not _EXTENSION.match(suffix):
        suffix = mimetypes.guess_extension(content_type, strict=False) or ".bin"
    return f"{job_id}/{n}{suffix}"
