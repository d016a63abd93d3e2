"""Validating a job request, naming every offending field at once.

msgspec stops at the first error, which would make a caller fix one field per
round trip. So `validate_job_request` walks the request Structs field by field
(`msgspec.structs.fields`), converts each value to its field's type in strict
mode, and collects one `FieldError` (a JSON pointer and what is wrong) per
offending field, unknown fields included, at every level. Only a request with
no error is converted to `JobRequest`, by msgspec itself, so the Structs in
`models.py` stay the single definition of the shape.

That walk costs more than the rest of a submit together, and nearly every
request is valid. So `parse_job_request`, what the API calls, first tries a
fast path (`_accept`): msgspec converts the whole document at once and the
rules it cannot state are checked on the result. Anything the fast path does
not accept, for whatever reason, goes the full way (`decode_object`, then
`validate_job_request`), which says precisely what is wrong. The fast path
only ever accepts what the full way accepts, with the same result; a property
test holds the two to that.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, Union, get_args, get_origin
from urllib.parse import urlsplit

import msgspec
from msgspec import Struct

from service.models import (
    MAX_METADATA_BYTES,
    EventType,
    FieldError,
    JobRequest,
    VideoInput,
    WebhookSpec,
)
from service.store.jobs import body_hash
from service.webhooks.guard import (
    callback_url_problem,
    host_listed,
    is_forbidden_address,
    is_public_address,
    parse_host_address,
)

MAX_IDEMPOTENCY_KEY_CHARS: Final = 255

MIN_SEED: Final = -(2**63)
MAX_SEED: Final = 2**64 - 1
"""A seed is any integer a 64-bit signed or unsigned seed holds; JSON allows more, RunComfy not."""

MAX_METADATA_DEPTH: Final = 32
"""How deeply `metadata` may nest: 4 KB of `[[[…]]]` would otherwise reach recursion limits."""

# Canonical bytes of a validated request: sorted keys, defaults filled, so two
# bodies that differ only in formatting, key order or spelled-out defaults match.
_canonical = msgspec.json.Encoder(order="sorted")
_json = msgspec.json.Encoder()
_any_json = msgspec.json.Decoder()


class MalformedBodyError(ValueError):
    """The body is not a JSON object; the message says what it is instead."""


class InvalidInputError(ValueError):
    """The request names fields that break the schema; `errors` has one entry per field."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        super().__init__(f"{len(errors)} invalid field(s)")
        self.errors = list(errors)


def parse_job_request(
    body: bytes, *, callback_hosts: Sequence[str], input_hosts: Sequence[str] = ()
) -> JobRequest:
    """The body as a valid `JobRequest`; `MalformedBodyError` or `InvalidInputError` otherwise.

    `input_hosts` (`GATEWAY_PREFLIGHT_ALLOW_HOSTS`) may serve `video_url` from private addresses.
    """
    context = _Context(tuple(callback_hosts), tuple(input_hosts))
    accepted = _accept(body, context)
    if accepted is not None:
        return accepted
    return _validate(decode_object(body), context)


def _accept(body: bytes, context: _Context) -> JobRequest | None:
    r"""The request if the fast path can vouch for it, else None (the full way decides).

    Where the fast path keeps each rule of the full way: malformed JSON,
    invalid UTF-8, too deep, not an object, unknown fields, types, enums,
    lengths and bounds fail msgspec's decode or convert; there is no NUL
    without a `\u` escape (a raw one is not JSON); `_census` sees a repeated
    member name; the seed's 64 bits, the URLs, events and metadata are
    checked by the very rule functions of the full way.
    """
    if b"\\u" in body:  # escapes hide NULs and colons from the census: the full way judges
        return None
    try:
        document = _any_json.decode(body)
        if type(document) is not dict:
            return None
        request = msgspec.convert(document, JobRequest, strict=True)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return None
    if _census(document) != body.count(b":") or not _keeps_the_rules(request, context):
        return None
    webhook = request.webhook
    if webhook is not None and len(set(webhook.events)) != len(webhook.events):
        events, _ = _events(list(webhook.events), context)
        return msgspec.structs.replace(
            request, webhook=msgspec.structs.replace(webhook, events=events)
        )
    return request


def _keeps_the_rules(request: JobRequest, context: _Context) -> bool:
    """Whether a converted request keeps the rules msgspec cannot state (`_RULES`)."""
    video, webhook = request.input, request.webhook
    # The rules called one by one, not looped over: this runs on every submit.
    return (
        _video_url(video.video_url, context)[1] is None
        and (isinstance(video.seed, msgspec.UnsetType) or _seed(video.seed, context)[1] is None)
        and (request.metadata is None or _metadata(request.metadata, context)[1] is None)
        and (webhook is None or _webhook_url(webhook.url, context)[1] is None)
    )


def _census(document: dict[str, Any]) -> int:
    """Object members plus the colons inside strings: the body's colons if no name repeats.

    Without escapes, each colon of a JSON text either separates a member from
    its value or sits inside a string. A repeated name leaves one member (and
    its strings) out of the decoded document, so the count falls short.
    """
    count = 0
    pending: list[Any] = [document]
    while pending:
        item = pending.pop()
        if type(item) is dict:
            count += len(item) + sum(key.count(":") for key in item)
            item = item.values()
        for value in item:
            kind = type(value)
            if kind is str:
                count += value.count(":")
            elif kind is dict or kind is list:
                pending.append(value)
    return count


def decode_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object, or `MalformedBodyError` saying why it is not one."""
    if not body.strip():
        raise MalformedBodyError("the body is empty; send a JSON object")
    try:
        value = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise MalformedBodyError(f"the body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:  # invalid UTF-8 inside a string
        raise MalformedBodyError("the body is not valid JSON: it is not UTF-8") from None
    except RecursionError:  # msgspec stops at the interpreter's depth limit
        raise MalformedBodyError("the body is not valid JSON: it is nested too deeply") from None
    if not isinstance(value, dict):
        raise MalformedBodyError(f"the body must be a JSON object, not {_json_type(value)}")
    _reject_repeated_members(body)
    return value


def _reject_repeated_members(body: bytes) -> None:
    """Refuse an object that names a member twice: parsers disagree on which one counts.

    msgspec keeps the last silently, so the standard library parses the body again,
    building no values, only to see each object's member names.
    """

    def check(pairs: list[tuple[str, None]]) -> None:
        names = [name for name, _ in pairs]
        if len(set(names)) < len(names):
            repeated = next(name for name in names if names.count(name) > 1)
            shown = _json.encode(repeated[:100]).decode()
            raise MalformedBodyError(f"the body names the member {shown} twice in one object")

    try:
        json.loads(body, object_pairs_hook=check, parse_int=_nothing, parse_float=_nothing)
    except RecursionError:
        raise MalformedBodyError("the body is not valid JSON: it is nested too deeply") from None


def _nothing(_: str) -> None:
    return None


@dataclass(frozen=True)
class _Context:
    callback_hosts: tuple[str, ...]
    input_hosts: tuple[str, ...] = ()


# A rule checks a value that already has its field's type and returns the value
# to keep (possibly normalised) and the problem with it, if any.
_Rule = Callable[[Any, _Context], tuple[Any, str | None]]


def _video_url(url: str, context: _Context) -> tuple[Any, str | None]:
    if _CONTROL.search(url):  # urlsplit silently drops some of them; RunComfy would not
        return url, "must not contain whitespace or control characters"
    return url, video_url_problem(url, context.input_hosts)


# One return per rule reads better than folding them together.
def video_url_problem(url: str, input_hosts: Sequence[str] = ()) -> str | None:  # noqa: PLR0911
    """Say why `url` is not a public http(s) URL RunComfy could fetch, or None when it is.

    A host is read as a fetcher would read it: IDNA-mapped (fullwidth digits are digits),
    trailing dot ignored, and an address in any inet_aton spelling (127.1, 0x7f000001).
    A host in `input_hosts` may be private or loopback, never link-local or metadata.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "must be a valid URL"
    if parts.scheme not in {"http", "https"}:
        return "must be an http or https URL"
    if not host or _WHITESPACE.search(url):
        return "must be an absolute http(s) URL with a host"
    name = _fetched_host(host)
    if name is None:
        return "must be a valid URL: its host is not a valid host name"
    listed = host_listed(name, input_hosts)
    if not listed and (name == "localhost" or name.endswith(".localhost")):
        return "must be a public URL, not localhost"
    if ":" not in name and not name.rpartition(".")[2][:1].isdigit():
        return None  # a name: no top-level domain starts with a digit, every address does
    address = parse_host_address(name)
    if address is None:
        return "must be a valid URL: its host is neither a host name nor an IP address"
    if not is_public_address(address) and not (listed and not is_forbidden_address(address)):
        return "must be a public URL, not a private or reserved address"
    return None


def _fetched_host(host: str) -> str | None:
    """The host a fetcher looks up: IDNA-mapped, without its trailing dot; None if none is."""
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            return None
    name = host.rstrip(".")
    return name if name and "%" not in name else None


def _seed(seed: int, _: _Context) -> tuple[Any, str | None]:
    # A rule, not Meta bounds: msgspec's integer bounds stop at int64, a seed may be uint64.
    if MIN_SEED <= seed <= MAX_SEED:
        return seed, None
    return seed, f"must be between {MIN_SEED} and {MAX_SEED}"


def _webhook_url(url: str, context: _Context) -> tuple[Any, str | None]:
    return url, _callback_url_problem(url, tuple(context.callback_hosts))


@functools.lru_cache(maxsize=1024)
def _callback_url_problem(url: str, callback_hosts: tuple[str, ...]) -> str | None:
    """`callback_url_problem`, remembered: a tenant sends the same few webhook URLs again."""
    return callback_url_problem(url, callback_hosts)


def _events(events: list[str], _: _Context) -> tuple[Any, str | None]:
    unique = list(dict.fromkeys(events))  # a repeated event means the same as once
    return unique, None if unique else "must name at least one event"


def _metadata(metadata: dict[str, Any] | None, _: _Context) -> tuple[Any, str | None]:
    if metadata is None:
        return None, None
    if _depth(metadata) > MAX_METADATA_DEPTH:
        return metadata, f"must be nested at most {MAX_METADATA_DEPTH} levels deep"
    size = len(_json.encode(metadata))
    if size > MAX_METADATA_BYTES:
        return metadata, f"must be at most {MAX_METADATA_BYTES} bytes as JSON, is {size}"
    return metadata, None


_RULES: Final[dict[tuple[type[Struct], str], _Rule]] = {
    (VideoInput, "video_url"): _video_url,
    (VideoInput, "seed"): _seed,
    (WebhookSpec, "url"): _webhook_url,
    (WebhookSpec, "events"): _events,
    (JobRequest, "metadata"): _metadata,
}

# Fields checked against another type than their declared one, with the rule
# doing the rest: events are checked item by item (so a pointer names the bad
# item) before duplicates are dropped and the length is judged.
_CHECK_AS: Final[dict[tuple[type[Struct], str], Any]] = {
    (WebhookSpec, "events"): list[EventType],
}

_CONTROL: Final = re.compile(r"[\x00-\x20\x7f]")
_WHITESPACE: Final = re.compile(r"\s")  # what str.isspace calls whitespace


def validate_job_request(
    data: dict[str, Any], *, callback_hosts: Sequence[str], input_hosts: Sequence[str] = ()
) -> JobRequest:
    """The request as a `JobRequest` with defaults filled; `InvalidInputError` names every error."""
    return _validate(data, _Context(tuple(callback_hosts), tuple(input_hosts)))


def _validate(data: dict[str, Any], context: _Context) -> JobRequest:
    errors: list[FieldError] = []
    cleaned = _walk(JobRequest, data, "#", errors, context)
    if errors:
        raise InvalidInputError(errors)
    try:
        return msgspec.convert(cleaned, JobRequest, strict=True)
    except msgspec.ValidationError as exc:  # a rule the walk missed: still name the field
        pointer, detail = _locate(str(exc), "#", JobRequest)
        raise InvalidInputError([FieldError(pointer=pointer, detail=detail)]) from None


def request_digest(request: JobRequest) -> str:
    """What an Idempotency-Key replay is compared with: the hash of the canonical request."""
    return body_hash(_canonical.encode(request))


def idempotency_key_hash(key: str) -> str:
    """The stored form of an Idempotency-Key: its SHA-256, so any characters are safe in Redis."""
    return hashlib.sha256(key.encode()).hexdigest()


def _walk(
    struct: type[Struct],
    value: dict[str, Any],
    pointer: str,
    errors: list[FieldError],
    context: _Context,
) -> dict[str, Any]:
    """Check one object against `struct`, appending to `errors`; return it with values cleaned."""
    fields = _fields(struct)
    known = {field.encode_name for field in fields}
    errors.extend(
        FieldError(pointer=_child(pointer, name), detail="is not a known field")
        for name in value
        if name not in known
    )
    cleaned: dict[str, Any] = {}
    for field in fields:
        here = _child(pointer, field.encode_name)
        if field.encode_name not in value:
            if field.required:
                errors.append(FieldError(pointer=here, detail="is required"))
            continue
        item = value[field.encode_name]
        nested = _struct_in(field.type)
        if nested is not None and isinstance(item, dict):
            cleaned[field.encode_name] = _walk(nested, item, here, errors, context)
            continue
        check_as = _CHECK_AS.get((struct, field.encode_name), field.type)
        try:
            typed = msgspec.convert(item, check_as, strict=True)
        except msgspec.ValidationError as exc:
            error_pointer, detail = _locate(str(exc), here, check_as)
            errors.append(FieldError(pointer=error_pointer, detail=detail))
            continue
        if (nul := _nul_at(typed, here)) is not None:
            # Much downstream cannot hold U+0000 (PostgreSQL text and jsonb, C strings).
            errors.append(FieldError(pointer=nul, detail="must not contain NUL (U+0000)"))
            continue
        rule = _RULES.get((struct, field.encode_name))
        if rule is not None:
            item, problem = rule(typed, context)
            if problem is not None:
                errors.append(FieldError(pointer=here, detail=problem))
                continue
        cleaned[field.encode_name] = item
    return cleaned


def _nul_at(value: object, pointer: str) -> str | None:
    """The pointer to the first string in `value` holding a NUL character, if any.

    A member name holding one is reported at its object: a pointer naming it would carry it.
    """
    pending = [(value, pointer)]
    while pending:
        item, here = pending.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return here
        elif isinstance(item, dict):
            if any("\x00" in key for key in item):
                return here
            pending.extend((child, _child(here, key)) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            pending.extend((child, f"{here}/{i}") for i, child in reversed(list(enumerate(item))))
    return None


def _depth(value: object) -> int:
    """How deeply `value` nests arrays and objects (a scalar is 0), without recursing."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            children = item.values() if isinstance(item, dict) else item
            pending.extend((child, depth + 1) for child in children)
    return deepest


def _struct_in(annotation: object) -> type[Struct] | None:
    """The Struct type a field holds (`VideoInput`, `WebhookSpec | None`), if any."""
    if isinstance(annotation, type) and issubclass(annotation, Struct):
        return annotation
    if get_origin(annotation) in {Union, types.UnionType}:
        for arg in get_args(annotation):
            if isinstance(arg, type) and issubclass(arg, Struct):
                return arg
    return None


def _child(pointer: str, name: str) -> str:
    """`pointer` extended by one member name, escaped as RFC 6901 says."""
    return f"{pointer}/{name.replace('~', '~0').replace('/', '~1')}"


_AT = re.compile(r"^(?P<message>.*) - at `\$(?P<path>.*)`$", re.DOTALL)
_PATH_PART = re.compile(r"\[(\d+)\]|\.([A-Za-z0-9_]+)")


def _locate(message: str, pointer: str, annotation: object) -> tuple[str, str]:
    """Turn msgspec's "... - at `$[1]`" into a JSON pointer and a readable detail."""
    match = _AT.match(message)
    if match is not None:
        message = match["message"]
        for index, name in _PATH_PART.findall(match["path"]):
            pointer = _child(pointer, index or name)
    return pointer, readable_error(message, annotation)


_TYPE_NAMES: Final = {
    "int": "an integer",
    "float": "a number",
    "str": "a string",
    "bool": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}
_EXPECTED_TYPE = re.compile(r"^Expected `(\w+)(?: \| null)?`, got `(\w+)`$")
_BOUND = re.compile(r"^Expected `(\w+)` (>=|<=|>|<) (\S+)$")
_LENGTH = re.compile(r"^Expected `(\w+)` of length (>=|<=) (\d+)$")
_PATTERN = re.compile(r"^Expected `str` matching regex '(.*)'$")


def readable_error(message: str, annotation: object = None) -> str:  # noqa: PLR0911 - one return per message shape
    """Say msgspec's message about a value of type `annotation` the way the API says things."""
    if message.startswith("Invalid enum value"):
        allowed = _literal_values(annotation)
        if allowed:
            return "must be one of " + ", ".join(_json.encode(v).decode() for v in allowed)
    if match := _EXPECTED_TYPE.match(message):
        expected, got = match.groups()
        return f"must be {_name(expected)}, not {_name(got)}"
    if match := _BOUND.match(message):
        _, op, bound = match.groups()
        return f"must be {op} {bound}"
    if match := _LENGTH.match(message):
        kind, op, bound = match.groups()
        if op == ">=" and bound == "1":
            return "must not be empty"
        unit = "characters" if kind == "str" else "items"
        return f"must have {'at least' if op == '>=' else 'at most'} {bound} {unit}"
    if match := _PATTERN.match(message):
        return f"must match {match[1]}"
    return message


def _name(msgspec_type: str) -> str:
    return _TYPE_NAMES.get(msgspec_type, f"`{msgspec_type}`")


def _literal_values(annotation: object) -> tuple[Any, ...]:
    """The allowed values of a Literal, looking through Annotated, unions and lists."""
    origin = get_origin(annotation)
    if origin is Literal:
        return get_args(annotation)
    if origin in {Annotated, list, Union, types.UnionType}:
        for arg in get_args(annotation):
            if values := _literal_values(arg):
                return values
    return ()


def _json_type(value: object) -> str:
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return "null"


@functools.cache
def _fields(struct: type[Struct]) -> tuple[msgspec.structs.FieldInfo, ...]:
    """A Struct's fields, worked out once per type.

    `msgspec.structs.fields` re-evaluates the class annotations on every call;
    profiling `POST /v1/jobs` showed that as 41% of the API's CPU.
    """
    return msgspec.structs.fields(struct)
