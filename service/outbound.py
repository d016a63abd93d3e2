"""What every outbound HTTP call shares: who the gateway says it is, and how it reads answers.

Both clients (RunComfy's API and tenants' webhook receivers) take these from here, so the
User-Agent, the reading of `Retry-After` and the refusal of cookies are defined once.
"""

import email.utils
import math
import time
from datetime import UTC
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Final

__all__ = ["USER_AGENT", "cookieless_jar", "parse_retry_after"]

USER_AGENT: Final = "runcomfy-gateway/0.1"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds a `Retry-After` value asks for (delay-seconds or HTTP-date), else None.

    A negative, non-finite or unreadable value is None. A date in the past is 0. A date without
    a zone (HTTP's obsolete asctime form) is GMT, as every HTTP-date is.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def cookieless_jar() -> CookieJar:
    """A cookie jar that keeps nothing: an answer has no business setting state for later calls."""
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=()))
