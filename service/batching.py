"""Coalescing concurrent callers' Redis work into one round trip.

Each Redis call from redis-py costs more CPU than the work around it (a
pooled connection taken and given back, a timeout armed, a write, a read, a
reply parsed): in the API about as much as the rest of a submit. In a burst
dozens of submits want one at the same time, and without batching a burst's
p99 exceeds what issue 12 allows (`make bench`, A: burst). A `Coalescer`
queues each call with a future; whatever is queued when the event loop comes
round goes out as one batch, and while batches are on their way (at most
`max_in_flight`) new calls queue for the next one. So an idle caller
waits for one round trip as before, and a busy process pays for a round trip
per batch rather than per request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH: Final = 128
"""At most this many calls per round trip, so one reply never grows without bound."""


class Coalescer(Generic[Item, Result]):
    """`await coalescer(item)` runs `send([item, ...])` with other callers' items, in order.

    `send` answers one result per item, in the items' order. If it raises,
    every caller of that batch gets the error (a Redis outage answers each
    request 503, as one call would).
    """

    def __init__(
        self,
        send: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_in_flight: int = 2,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._send = send
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[Item, asyncio.Future[Result]]] = []
        self._in_flight = 0
        self._flush_due = False
        self._sending: set[asyncio.Task[None]] = set()  # held so they are not collected mid-way

    async def __call__(self, item: Item) -> Result:
        """The result of `item`, sent in a batch with whatever else is queued."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.append((item, future))
        if not self._flush_due and self._in_flight < self._max_in_flight:
            # At the end of this turn of the loop, not now: let the other ready requests queue.
            self._flush_due = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_due = False
        while self._queue and self._in_flight < self._max_in_flight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        try:
            results = await self._send([item for item, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller, who answers it
            _settle(batch, exc)
        else:
            _settle(batch, results)
        finally:
            self._in_flight -= 1
            if self._queue and not self._flush_due:
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush)

    async def aclose(self) -> None:
        """Wait until every queued call is answered (the lifespan calls it before closing Redis)."""
        while self._sending or self._flush_due:
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # a flush is due this turn: let it start its batch


def _settle(
    batch: list[tuple[Item, asyncio.Future[Result]]], outcome: Sequence[Result] | Exception
) -> None:
    """Give each caller of `batch` its result, or every caller the error."""
    if not isinstance(outcome, Exception) and len(outcome) != len(batch):
        outcome = RuntimeError(f"{len(outcome)} results for a batch of {len(batch)}")
    for i, (_, future) in enumerate(batch):
        if future.done():  # its request was cancelled meanwhile
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome[i])
