"""What the poller learns from finished jobs: how long RunComfy queued and ran each input class.

Every worker shares it through Redis. Per input class (resolution, frames,
pro_mode; `input_class`) and phase (`queue`: submit to start, `run`: start to
RunComfy's end) a sorted set holds the latest samples, scored by when they were
recorded (Redis's clock, ms), each member `<milliseconds>:<job id>`. It is
bounded twice: at most `keep` samples, and none older than `max_age_s`, so a
change in RunComfy's speed replaces what was learned within the hour at most
(the poll policy follows a clear change sooner: `service/worker/timing.py`). A
recording is one script; a read is one script that drops nothing but answers
only samples younger than `max_age_s`, by Redis's clock.

The queue is learned a second way, for every class at once (class `any`): the
wait from when a job was first seen at a queue position (bucketed:
`position_phase`) to the poll that saw it running, per place (over the jobs
ahead plus one). RunComfy runs what is ahead first, so a position times the
wait per place says when a job that far back can start.

Each job's hash also counts its status polls (field `polls`), so the count
survives the job moving between workers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from typing import Final, Literal, cast, get_args

import msgspec
import redis.asyncio as aioredis

from service.models import VideoInput
from service.store.connection import text
from service.store.keys import LUA_NOW, Keys

Phase = Literal["queue", "run"]
PHASES: Final[tuple[Phase, ...]] = ("queue", "run")
ANY_CLASS: Final = "any"
"""The class of the waits from a queue position: RunComfy's one queue holds every class."""
POSITION_BUCKETS: Final = ((0, "0"), (1, "1"), (2, "2-3"), (4, "4-7"), (8, "8-15"), (16, "16+"))
"""Queue positions (jobs ahead) grouped by their lowest one: 0, 1, 2-3, 4-7, 8-15, 16 and more."""
POSITION_PHASES: Final = tuple(f"queue_at_{name}" for _, name in POSITION_BUCKETS)


def position_phase(position: int) -> str:
    """The phase of a wait from queue position `position`: `queue_at_0`, ..., `queue_at_16+`."""
    name = next(name for low, name in reversed(POSITION_BUCKETS) if position >= low)
    return f"queue_at_{name}"


def input_class(video: VideoInput) -> str:
    """The class a job's run length depends on: `720p:129:std`, `480p:85:pro`, ..."""
    return f"{video.resolution}:{video.num_frames}:{'pro' if video.pro_mode else 'std'}"


def _every_class() -> tuple[str, ...]:
    """Every class the input schema allows, from its Literal types (one place for the values)."""
    types = {field.name: field.type for field in msgspec.structs.fields(VideoInput)}
    resolutions, frames = get_args(types["resolution"]), get_args(types["num_frames"])
    return tuple(f"{r}:{n}:{m}" for r, n, m in product(resolutions, frames, ("std", "pro")))


INPUT_CLASSES: Final = _every_class()
"""Every input class there is (3 resolutions x 2 frame counts x pro_mode): 12."""

# KEYS: sets of samples. ARGV: member suffix (job id), keep, max_age_ms, then one value
# (ms; -1: not known) per key. Adds the known samples, then drops those older than
# max_age_ms and all but the newest `keep`; each set expires when nothing is recorded.
_RECORD = (
    LUA_NOW
    + """
local job, keep, max_age = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
for i = 1, #KEYS do
  local value = tonumber(ARGV[i + 3])
  if value >= 0 then
    redis.call('ZADD', KEYS[i], now, value .. ':' .. job)
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - max_age)
    local extra = redis.call('ZCARD', KEYS[i]) - keep
    if extra > 0 then redis.call('ZREMRANGEBYRANK', KEYS[i], 0, extra - 1) end
    redis.call('PEXPIRE', KEYS[i], max_age)
  end
end
return 1
"""
)

# KEYS: sets to read. ARGV: max_age_ms. The members of each set younger than that, oldest
# first. Read only.
_READ = (
    LUA_NOW
    + """
local since = now_ms() - tonumber(ARGV[1])
local out = {}
for i, key in ipairs(KEYS) do
  out[i] = redis.call('ZRANGEBYSCORE', key, '(' .. since, '+inf')
end
return out
"""
)

# KEYS: the job's hash. Counts one poll of a job that still exists; the new count, 0 if gone.
_COUNT_POLL = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'polls', 1)
"""


@dataclass(frozen=True)
class Samples:
    """The recent lengths (seconds, oldest first) of one class's phase."""

    input_class: str
    phase: str
    seconds: tuple[float, ...]


class RunLengths:
    """Record and read the queue and run lengths of recent jobs, per input class."""

    def __init__(
        self, redis: aioredis.Redis, keys: Keys, *, keep: int = 24, max_age_s: float = 1800.0
    ) -> None:
        self._keys = keys
        self.keep = keep
        self._max_age_ms = max(1, round(max_age_s * 1000))
        self._record = redis.register_script(_RECORD)
        self._read = redis.register_script(_READ)
        self._count_poll = redis.register_script(_COUNT_POLL)

    async def record(
        self, klass: str, job_id: str, *, queue_s: float | None, run_s: float | None
    ) -> None:
        """Add one finished job's queue and run seconds (either may be unknown) to its class."""
        if queue_s is None and run_s is None:
            return
        await self._add(job_id, {(klass, "queue"): queue_s, (klass, "run"): run_s})

    async def record_waits(self, job_id: str, waits: Mapping[str, float]) -> None:
        """Add a started job's waits per place from the queue positions it was seen at."""
        if waits:
            await self._add(job_id, {(ANY_CLASS, phase): s for phase, s in waits.items()})

    async def _add(self, job_id: str, samples: Mapping[tuple[str, str], float | None]) -> None:
        keys = [self._keys.run_lengths(klass, phase) for klass, phase in samples]
        args: list[str | int] = [job_id, self.keep, self._max_age_ms]
        args += [_ms(seconds) for seconds in samples.values()]
        await self._record(keys=keys, args=args)

    async def read(self, classes: Sequence[str] = INPUT_CLASSES) -> list[Samples]:
        """Recent samples (younger than `max_age_s`) of every class and position, in one trip."""
        pairs: list[tuple[str, str]] = [(klass, phase) for klass in classes for phase in PHASES]
        pairs += [(ANY_CLASS, phase) for phase in POSITION_PHASES]
        keys = [self._keys.run_lengths(klass, phase) for klass, phase in pairs]
        found = cast("list[list[bytes]]", await self._read(keys=keys, args=[self._max_age_ms]))
        return [
            Samples(klass, phase, tuple(int(text(m).split(":", 1)[0]) / 1000 for m in members))
            for (klass, phase), members in zip(pairs, found, strict=True)
        ]

    async def count_poll(self, job_id: str) -> int:
        """Count one status poll of the job; how many it has had (0 when the job is gone)."""
        return int(await self._count_poll(keys=[self._keys.job(job_id)], args=[]))


def _ms(seconds: float | None) -> int:
    return -1 if seconds is None else max(0, round(seconds * 1000))
