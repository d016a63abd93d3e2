"""Poll timing: the policy's pure functions, and what workers learn in Redis."""

from __future__ import annotations

import math
import random
import statistics

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import ConfigError, load_settings
from service.store.keys import Keys
from service.store.runlengths import INPUT_CLASSES, POSITION_PHASES, RunLengths, position_phase
from service.worker.poller import Queued
from service.worker.timing import (
    LearnedTiming,
    Window,
    current_regime,
    learn_window,
    next_poll_s,
    rule_interval_s,
    rule_polls,
    scaled,
)
from tests.support import job_record
from tests.test_config import base_env

BOUNDED = settings(max_examples=300, deadline=None, derandomize=True)

bounds = st.tuples(st.floats(0.05, 30, allow_nan=False), st.floats(0.05, 120, allow_nan=False)).map(
    lambda pair: (min(pair), max(pair))
)
lengths = st.lists(st.floats(0, 20_000, allow_nan=False), min_size=0, max_size=64)


@st.composite
def windows(draw: st.DrawFn) -> Window:
    low, median, high = sorted(draw(st.floats(0, 20_000, allow_nan=False)) for _ in range(3))
    return Window(low, median, high, draw(st.floats(0, 500, allow_nan=False)), draw(st.integers(1)))


@BOUNDED
@given(st.floats(0, 1e6, allow_nan=False), st.none() | windows(), bounds)
def test_every_interval_is_within_the_poll_bounds(elapsed, window, limits):
    """Whatever was learned, a job's next poll is at least min and at most max away."""
    low, high = limits
    interval = next_poll_s(elapsed, window, min_s=low, max_s=high)
    assert low <= interval <= high


@BOUNDED
@given(lengths, bounds, st.integers(1, 16))
def test_a_learned_window_is_ordered_and_its_step_within_bounds(samples, limits, min_samples):
    """A window's quantiles are ordered and its poll spacing is within [min, max]."""
    low, high = limits
    window = learn_window(samples, min_s=low, max_s=high, min_samples=min_samples)
    if window is None:
        assert len(current_regime(samples)) < min_samples
        return
    assert window.low_s <= window.median_s <= window.high_s
    assert low <= window.step_s <= high


@BOUNDED
@given(st.floats(0, 1e5, allow_nan=False), bounds)
def test_a_cold_policy_is_the_interval_rule(elapsed, limits):
    """With nothing learned the next poll is a tenth of the job's age, clamped."""
    low, high = limits
    assert next_poll_s(elapsed, None, min_s=low, max_s=high) == rule_interval_s(elapsed, low, high)


@BOUNDED
@given(st.floats(0, 1e5, allow_nan=False), windows(), bounds)
def test_inside_the_window_polls_are_never_sparser_than_the_rule(elapsed, window, limits):
    """Where runs end, a job is polled at least as often as the interval rule polls it."""
    low, high = limits
    if window.low_s - low <= elapsed:
        interval = next_poll_s(elapsed, window, min_s=low, max_s=high)
        assert interval <= rule_interval_s(elapsed, low, high)


@BOUNDED
@given(windows(), bounds, st.floats(0, 1, allow_nan=False))
def test_sparse_polls_never_jump_past_the_window(window, limits, share):
    """Before the window, polls land on its start at the latest."""
    low, high = limits
    elapsed = share * max(0.0, window.low_s - low)
    if elapsed < window.low_s - low:
        assert elapsed + next_poll_s(elapsed, window, min_s=low, max_s=high) <= window.low_s + 1e-6


def test_polls_are_sparse_before_the_window_dense_in_it_and_the_rule_after():
    """A learned 5-minute run: max-spaced polls up to p05, then dense, then the rule."""
    samples = [240 + 120 * i / 23 for i in range(24)]  # 240..360 s, evenly, in any order
    random.Random(1).shuffle(samples)
    window = learn_window(samples, min_s=2, max_s=15, min_samples=8)
    assert window is not None
    assert window.low_s == pytest.approx(246, abs=0.5)
    assert window.high_s == pytest.approx(354, abs=0.5)
    assert 2 <= window.step_s < 4
    times, at = [], 0.0
    while at < 400:
        at += next_poll_s(at, window, min_s=2, max_s=15)
        times.append(at)
    before = [t for t in times if t < window.low_s - 1e-6]
    inside = [t for t in times if window.low_s - 1e-6 <= t <= window.high_s]
    assert len(before) == math.ceil(window.low_s / 15) - 1
    assert all(b - a <= 15 + 1e-9 for a, b in zip([0.0, *times], times, strict=False))
    assert len(inside) >= len(times) // 2  # most polls where runs end
    # On average over runs of these lengths, no more polls than the interval rule makes.
    polls = [sum(1 for t in times if t < end) + 1 for end in samples]
    assert statistics.mean(polls) <= statistics.mean(rule_polls(end, 2, 15) for end in samples)


def test_a_clear_change_of_speed_keeps_only_the_samples_since():
    """When the newest samples all lie beyond every older one, only they count."""
    old = [10.0, 11, 9, 10.5, 9.5, 10, 11.5, 8.5] * 2
    slower = [20.0, 21, 19, 22]
    assert list(current_regime(old + slower)) == slower
    assert list(current_regime(old + slower[:3])) == old + slower[:3]  # three may be chance
    assert list(current_regime(old)) == old
    # A batch submitted together ends shortest first: no change of speed.
    assert list(current_regime(sorted(old))) == sorted(old)
    batch = [240 + i for i in range(24)]
    assert list(current_regime(batch)) == batch


async def test_recorded_lengths_are_shared_bounded_and_read_per_class(
    redis: aioredis.Redis, keys: Keys
):
    """Workers read what any worker recorded; each class keeps only its newest samples."""
    writer = RunLengths(redis, keys, keep=5, max_age_s=60)
    for n in range(8):
        await writer.record("720p:129:std", f"job_{n}", queue_s=1.0 + n, run_s=10.0 + n)
    await writer.record("480p:85:pro", "job_x", queue_s=None, run_s=3.25)
    found = {(s.input_class, s.phase): s.seconds for s in await RunLengths(redis, keys).read()}
    assert found["720p:129:std", "queue"] == (4.0, 5.0, 6.0, 7.0, 8.0)
    assert found["720p:129:std", "run"] == (13.0, 14.0, 15.0, 16.0, 17.0)
    assert found["480p:85:pro", "run"] == (3.25,)
    assert found["480p:85:pro", "queue"] == ()
    assert len(found) == 2 * len(INPUT_CLASSES) + len(POSITION_PHASES)
    assert 0 < await redis.pttl(keys.run_lengths("720p:129:std", "run")) <= 60_000


async def test_waits_from_queue_positions_are_kept_per_bucket_for_every_class(
    redis: aioredis.Redis, keys: Keys
):
    """A started job's waits land in the buckets of the positions it was seen at, class `any`."""
    assert [position_phase(p) for p in (0, 1, 2, 3, 4, 7, 8, 15, 16, 900)] == [
        "queue_at_0",
        "queue_at_1",
        "queue_at_2-3",
        "queue_at_2-3",
        "queue_at_4-7",
        "queue_at_4-7",
        "queue_at_8-15",
        "queue_at_8-15",
        "queue_at_16+",
        "queue_at_16+",
    ]
    runs = RunLengths(redis, keys, keep=3)
    for n in range(5):
        await runs.record_waits(f"job_{n}", {"queue_at_4-7": 30.0 + n, "queue_at_0": 2.5})
    await runs.record_waits("job_none", {})
    found = {(s.input_class, s.phase): s.seconds for s in await runs.read([])}
    assert found["any", "queue_at_4-7"] == (32.0, 33.0, 34.0)
    assert found["any", "queue_at_0"] == (2.5, 2.5, 2.5)
    assert found["any", "queue_at_1"] == ()


async def test_samples_older_than_the_max_age_are_not_read(redis: aioredis.Redis, keys: Keys):
    """A sample recorded longer ago than max_age_s (by Redis's clock) no longer counts."""
    runs = RunLengths(redis, keys, max_age_s=60)
    await runs.record("720p:129:std", "job_new", queue_s=1, run_s=2)
    now_ms = int((await redis.time())[0]) * 1000
    await redis.zadd(keys.run_lengths("720p:129:std", "run"), {"9000:job_old": now_ms - 61_000})
    found = {(s.input_class, s.phase): s.seconds for s in await runs.read(["720p:129:std"])}
    assert found["720p:129:std", "run"] == (2.0,)


async def test_polls_are_counted_on_the_job_and_never_create_one(redis: aioredis.Redis, keys: Keys):
    """Each poll adds one to the job's count; a job that is gone stays gone."""
    runs = RunLengths(redis, keys)
    job = job_record("orders")
    await redis.hset(keys.job(job.id), "status", "in_queue")
    assert [await runs.count_poll(job.id) for _ in range(3)] == [1, 2, 3]
    assert await runs.count_poll("job_gone") == 0
    assert not await redis.exists(keys.job("job_gone"))


async def test_the_worker_cache_reads_redis_only_every_refresh(redis: aioredis.Redis, keys: Keys):
    """Windows come from the last read; a read happens once per refresh period."""
    runs = RunLengths(redis, keys)
    clock = [0.0]
    seen: list[int] = []
    timing = LearnedTiming(
        runs,
        min_s=0.1,
        max_s=1,
        min_samples=3,
        refresh_s=5,
        on_refresh=lambda w: seen.append(len(w)),
        clock=lambda: clock[0],
    )
    await timing.refresh_if_due()
    assert timing.window("720p:129:std", "run") is None
    for n in range(3):
        await runs.record("720p:129:std", f"job_{n}", queue_s=0.5, run_s=4 + n)
    clock[0] = 4.9
    await timing.refresh_if_due()
    assert timing.window("720p:129:std", "run") is None  # not read again yet
    clock[0] = 5.0
    await timing.refresh_if_due()
    window = timing.window("720p:129:std", "run")
    assert window is not None
    assert (window.low_s, window.high_s) == (pytest.approx(4.1), pytest.approx(5.9))
    assert seen == [0, 2]


def test_the_poll_policy_is_learned_by_default_and_can_be_the_interval_rule(tmp_path):
    """GATEWAY_POLL_POLICY defaults to learned; interval and the learning knobs are read."""
    env = base_env(tmp_path)
    assert load_settings(env).poll_policy == "learned"
    settings = load_settings(
        {
            **env,
            "GATEWAY_POLL_POLICY": "interval",
            "GATEWAY_POLL_LEARN_SAMPLES": "40",
            "GATEWAY_POLL_LEARN_MIN_SAMPLES": "10",
            "GATEWAY_POLL_LEARN_MAX_AGE_S": "600",
            "GATEWAY_POLL_LEARN_REFRESH_S": "2",
        }
    )
    assert (settings.poll_policy, settings.poll_learn_samples) == ("interval", 40)
    assert (settings.poll_learn_min_samples, settings.poll_learn_max_age_s) == (10, 600)
    assert settings.poll_learn_refresh_s == 2


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GATEWAY_POLL_POLICY", "smart"),
        ("GATEWAY_POLL_LEARN_SAMPLES", "1"),
        ("GATEWAY_POLL_LEARN_MIN_SAMPLES", "30"),
    ],
)
def test_a_bad_poll_setting_is_named(tmp_path, name, value):
    """A bad poll policy or learning knob stops the process with a line naming it."""
    with pytest.raises(ConfigError, match=name):
        load_settings({**base_env(tmp_path), name: value})


def test_a_queue_position_counts_from_the_poll_that_first_saw_it():
    """A job's wait at a position counts from its first sighting; each bucket keeps its first."""
    queued = Queued(position=5, since=0.0)
    queued.seen(5, 0.0)
    queued.seen(5, 10.0)
    assert (queued.position, queued.since) == (5, 0.0)
    queued.seen(3, 20.0)
    assert (queued.position, queued.since) == (3, 20.0)
    queued.seen(2, 30.0)
    assert (queued.position, queued.since) == (2, 30.0)
    assert queued.waits_per_place(40.0) == {
        "queue_at_4-7": 40.0 / 6,  # five ahead and itself
        "queue_at_2-3": 20.0 / 4,  # first seen three back, at 20 s
    }


def test_a_per_place_window_scales_to_the_places_left():
    """Three places from the start waits three per-place waits: every bound times three."""
    window = Window(low_s=8.0, median_s=9.0, high_s=10.0, step_s=2.0, samples=12)
    assert scaled(window, 3) == Window(24.0, 27.0, 30.0, 6.0, 12)
    assert scaled(window, 1) == window


def test_the_rule_counts_from_the_jobs_last_change_not_from_a_queue_position():
    """Since a new position (no change of the job's), the rule still counts from the submit."""
    window = Window(low_s=10.0, median_s=15.0, high_s=20.0, step_s=6.0, samples=8)
    assert next_poll_s(12.0, window, min_s=2, max_s=15) == 2.0  # the rule at 12 s: 2 s
    assert next_poll_s(12.0, window, min_s=2, max_s=15, age_s=100.0) == 6.0  # the step
    assert next_poll_s(30.0, window, min_s=2, max_s=15, age_s=100.0) == 10.0  # past: the rule
    assert next_poll_s(4.0, window, min_s=2, max_s=15, age_s=100.0) == 6.0  # sparse to low
