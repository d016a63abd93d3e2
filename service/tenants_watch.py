"""Re-reading the tenants file without a restart: on SIGHUP, and when its content changes.

In Kubernetes the file is a mounted Secret, which the kubelet updates in place
(an atomic symlink swap) some time after the Secret changes; polling the
content is what notices that reliably, whatever the filesystem does with
mtimes. A file that does not parse is refused as a whole: the previous tenants
stay in force, and the failure is logged and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from service.config import ConfigError, Tenants, parse_tenants

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 5.0


class TenantsWatcher:
    """Keeps a `Tenants` in step with its file; `on_result(ok)` is told of every reload."""

    def __init__(
        self,
        tenants: Tenants,
        path: str,
        *,
        interval_s: float = DEFAULT_INTERVAL_S,
        on_result: Callable[[bool], None] | None = None,
        budgets_allowed: bool = True,
    ) -> None:
        """`budgets_allowed=False` (no price set) refuses a file that adds a budget."""
        self.tenants = tenants
        self.budgets_allowed = budgets_allowed
        self.path = Path(path)
        self.interval_s = interval_s
        self.on_result = on_result
        self.ok = True
        self.failures = 0
        self._digest = self._read_digest()
        self._hup = asyncio.Event()

    def _read_digest(self) -> str | None:
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def reload(self) -> bool:
        """Read the file now; swap the tenants in if it is valid, else keep the old ones."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            self._digest = None
            return self._done(ok=False, reason=exc.strerror or type(exc).__name__)
        # A bad file is not read again until it changes: no error every interval.
        self._digest = hashlib.sha256(data).hexdigest()
        try:
            new = parse_tenants(
                data.decode("utf-8"), where=str(self.path), budgets_allowed=self.budgets_allowed
            )
        except (UnicodeDecodeError, ConfigError) as exc:
            return self._done(ok=False, reason=str(exc))
        self.tenants.replace_with(new)
        log.info("tenants: reloaded %d tenant(s) from %s", len(new.by_id), self.path)
        return self._done(ok=True)

    def _done(self, *, ok: bool, reason: str = "") -> bool:
        self.ok = ok
        if not ok:
            self.failures += 1
            log.error("tenants: reload refused, keeping the previous tenants: %s", reason)
        if self.on_result is not None:
            self.on_result(ok)
        return ok

    def install_sighup(self) -> None:
        """Reload on SIGHUP (where the platform has it)."""
        with contextlib.suppress(NotImplementedError, AttributeError, RuntimeError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self._hup.set)

    async def run(self, stop: asyncio.Event) -> None:
        """Until `stop`: reload on SIGHUP, or when the file's content has changed."""
        while not stop.is_set():
            waiters = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._hup.wait()),
            }
            await asyncio.wait(waiters, timeout=self.interval_s, return_when="FIRST_COMPLETED")
            for waiter in waiters:
                waiter.cancel()
            if stop.is_set():
                return
            if self._hup.is_set():
                self._hup.clear()
                log.info("tenants: SIGHUP, reloading %s", self.path)
                self.reload()
            elif self._read_digest() != self._digest:
                self.reload()
