"""When to poll a job next: from what recent jobs of its input class took, or by today's rule.

RunComfy sends no completion webhook, so the gateway learns a job ended only at
its next status poll. Polls are spent where an end is likely:

* `rule_interval_s` is the interval policy: a tenth of the time since the job's
  last change, clamped to [min, max]. It is what a cold gateway (fewer than
  `min_samples` recent jobs of the class) and a job that outlives what was
  learned use.
* `learn_window` turns recent lengths of one phase (queue: submit to start; run:
  start to RunComfy's end) into a `Window`: its 5th and 95th percentiles and the
  spacing of polls between them, chosen so that jobs of those lengths are polled
  on average no more than the rule would poll them (`BUDGET_SHARE` of it).
* `next_poll_s` then gives sparse polls before the window (equal gaps of at most
  max, landing on its start), `step_s` inside it (never sparser than the rule:
  a short phase has too few polls to budget, and its end decides when the next
  phase's polls start), and the rule after it.

A queued job at a known queue position is timed by the waits per place learned
for its position's bucket, `scaled` to the places left (the poller picks it,
`service/worker/poller.py`), with the rule counted from the job's submit.

Every interval stays within [min, max]: a job is polled at least every max.
`LearnedTiming` is the worker's cache of windows, read from Redis
(`service/store/runlengths.py`) every `refresh_s`, never per poll.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from redis.exceptions import RedisError

from service.store.runlengths import RunLengths, Samples

log = logging.getLogger(__name__)

LOW_Q: Final = 0.05
HIGH_Q: Final = 0.95
BUDGET_SHARE: Final = 1.0
"""Of the polls the interval rule makes on average, the share the learned policy may spend."""
CHANGE_MIN: Final = 4
"""The newest samples that, all beyond every older one, mark a change of RunComfy's speed."""
_MAX_RULE_POLLS: Final = 10_000


@dataclass(frozen=True)
class Window:
    """Where one phase of one input class is likely to end (seconds since the phase began)."""

    low_s: float
    median_s: float
    high_s: float
    step_s: float
    samples: int


def rule_interval_s(age_s: float, min_s: float, max_s: float) -> float:
    """The interval policy: a tenth of the time since the job's last change, within [min, max]."""
    return min(max_s, max(min_s, age_s / 10))


def rule_polls(length_s: float, min_s: float, max_s: float) -> int:
    """How many polls the interval policy makes in a phase of `length_s` seconds."""
    at, polls = 0.0, 0
    while at < length_s and polls < _MAX_RULE_POLLS:
        at += rule_interval_s(at, min_s, max_s)
        polls += 1
    return polls


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, linearly interpolated."""
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def current_regime(lengths: Sequence[float]) -> Sequence[float]:
    """The samples (oldest first) since RunComfy's speed last changed clearly.

    A change splits the samples into older ones and at least `CHANGE_MIN` newest
    ones that all lie above every older one, or all below, by a clear gap: a
    quarter of the older ones' spread and of their median at least.
    Jobs submitted together end shortest first, so without the gap a batch alone
    would look like a slowdown. Of the splits that pass, the widest gap is the
    change (a split a little earlier can pass too, by chance); after it only the
    newest count.
    """
    best, widest = 0, 0.0
    for newest in range(CHANGE_MIN, len(lengths) - 1):
        older, recent = lengths[:-newest], lengths[-newest:]
        gap = max(min(recent) - max(older), min(older) - max(recent))
        clear = max(0.25 * (max(older) - min(older)), 0.25 * statistics.median(older))
        if gap > clear and gap > widest:
            best, widest = newest, gap
    return lengths[-best:] if best else lengths


def learn_window(
    lengths: Sequence[float], *, min_s: float, max_s: float, min_samples: int
) -> Window | None:
    """The window of one phase from its recent lengths (oldest first); None below `min_samples`."""
    recent = sorted(current_regime(lengths))
    if len(recent) < max(1, min_samples):
        return None
    low, median, high = (quantile(recent, q) for q in (LOW_Q, 0.5, HIGH_Q))
    # Polls a job of each recent length would get: the sparse ones up to `low`, then one
    # per step for the part of its phase inside the window (about one more past it).
    rule_mean = sum(rule_polls(length, min_s, max_s) for length in recent) / len(recent)
    dense_mean = sum(max(0.0, min(length, high) - low) for length in recent) / len(recent)
    budget = BUDGET_SHARE * rule_mean - math.ceil(low / max_s) - 1
    step = dense_mean / budget if budget >= 1 else max_s
    return Window(
        low_s=low,
        median_s=median,
        high_s=high,
        step_s=min(max_s, max(min_s, step)),
        samples=len(recent),
    )


def next_poll_s(
    elapsed_s: float,
    window: Window | None,
    *,
    min_s: float,
    max_s: float,
    age_s: float | None = None,
) -> float:
    """Seconds until the next poll of a job `elapsed_s` into its phase; always within [min, max].

    The rule counts from the job's last change: `age_s` when that is not where
    `elapsed_s` counts from (a queue position is no change of the job's).
    """
    rule = rule_interval_s(elapsed_s if age_s is None else age_s, min_s, max_s)
    if window is None or elapsed_s >= window.high_s + window.step_s:
        return rule
    if elapsed_s < window.low_s - min_s:
        left = window.low_s - elapsed_s
        return min(max_s, max(min_s, left / math.ceil(left / max_s)))
    return min(rule, max(min_s, window.step_s))


def scaled(window: Window, places: int) -> Window:
    """A per-place window of queue waits as the window of a job `places` places from its start."""
    return Window(
        low_s=window.low_s * places,
        median_s=window.median_s * places,
        high_s=window.high_s * places,
        step_s=window.step_s * places,
        samples=window.samples,
    )


class LearnedTiming:
    """The worker's windows per input class and phase, read from Redis every `refresh_s`."""

    def __init__(
        self,
        runs: RunLengths,
        *,
        min_s: float,
        max_s: float,
        min_samples: int,
        refresh_s: float = 5.0,
        on_refresh: Callable[[Mapping[tuple[str, str], Window]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runs = runs
        self.min_s, self.max_s = min_s, max_s
        self.min_samples = min_samples
        self.refresh_s = refresh_s
        self._on_refresh = on_refresh
        self._clock = clock
        self._windows: dict[tuple[str, str], Window] = {}
        self._next_refresh = 0.0

    def window(self, input_class: str, phase: str) -> Window | None:
        """The learned window of a class's phase; None while too little is known."""
        return self._windows.get((input_class, phase))

    def next_poll_s(self, input_class: str, phase: str, elapsed_s: float) -> float:
        """Seconds until the next poll of a job of this class `elapsed_s` into `phase`."""
        return next_poll_s(
            elapsed_s, self.window(input_class, phase), min_s=self.min_s, max_s=self.max_s
        )

    async def refresh_if_due(self) -> None:
        """Read every class's samples again when `refresh_s` has passed; keep the old on failure."""
        now = self._clock()
        if now < self._next_refresh:
            return
        self._next_refresh = now + self.refresh_s
        try:
            found = await self.runs.read()
        except (RedisError, OSError) as exc:
            log.warning("poll timing: run lengths not read (%s); keeping what was learned", exc)
            return
        self.update(found)

    def update(self, found: Sequence[Samples]) -> None:
        """Replace the windows with those learned from `found`."""
        windows: dict[tuple[str, str], Window] = {}
        for samples in found:
            window = learn_window(
                samples.seconds,
                min_s=self.min_s,
                max_s=self.max_s,
                min_samples=self.min_samples,
            )
            if window is not None:
                windows[samples.input_class, samples.phase] = window
        self._windows = windows
        if self._on_refresh is not None:
            self._on_refresh(windows)
