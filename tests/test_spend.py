"""Spend control against a real Redis: costs, holds, budgets and usage, as a team sees them."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import pytest

from service.config import ConfigError, Settings, load_settings, parse_tenants
from service.models import JobErrorInfo, JobRecord, WebhookEvent, utcnow
from service.store.connection import connect
from service.store.jobs import JobStore, delivery_id, event_body
from service.store.schedules import Schedules
from service.store.spend import SpendStore
from service.tenants_watch import TenantsWatcher
from tests.support import assert_problem, job_record, new_tenant, serve_api

TENANT = new_tenant("orders")
PRICE = 250_000  # micro-dollars: 0.25 USD a run
VIDEO = "https://example.com/in.mp4"


def priced(tenant: str = "orders", *, micros: int = PRICE, **record: Any) -> JobRecord:
    return msgspec.structs.replace(job_record(tenant, **record), estimate_micros=micros)


def next_midnight() -> datetime:
    today = datetime.now(UTC).date()
    return datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)


def first_of_next_month() -> datetime:
    today = datetime.now(UTC).date()
    after = (today.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime(after.year, after.month, 1, tzinfo=UTC)


@pytest.fixture
def jobs(redis, keys):
    return JobStore(redis, keys, retention_s=3600)


@pytest.fixture
def spend(redis, keys):
    return SpendStore(redis, keys)


async def today_usage(spend: SpendStore, tenant: str = "orders"):
    today = await spend.today()
    [(_, row)] = await spend.days(tenant, today, today)
    return row


async def test_a_budget_admits_exactly_what_it_covers_of_concurrent_creates(
    redis_server, keys, spend
):
    """Of 30 creates racing from three replicas, a budget of ten estimates admits exactly ten."""
    replicas = [connect(redis_server.url) for _ in range(3)]
    stores = [JobStore(r, keys, retention_s=3600) for r in replicas]
    budget = 10 * PRICE
    try:
        answers = await asyncio.gather(
            *(
                stores[i % 3].create_many([(priced(), None)], budgets=[(budget, None)])
                for i in range(30)
            )
        )
    finally:
        for client in replicas:
            await client.aclose()
    created = [a for [a] in answers if a.created]
    refused = [a.over_budget for [a] in answers if a.over_budget is not None]
    assert len(created) == 10
    assert len(refused) == 20
    for refusal in refused:
        assert (refusal.period, refusal.budget_micros) == ("day", budget)
        assert (refusal.charged_micros, refusal.held_micros) == (0, budget)
        assert refusal.resets_at == next_midnight()
    assert (await today_usage(spend)).held_micros == budget


async def test_a_monthly_budget_refuses_with_its_own_figures(jobs):
    """A create over the monthly budget is refused naming the month and when it resets."""
    [first] = await jobs.create_many([(priced(), None)], budgets=[(None, PRICE)])
    [second] = await jobs.create_many([(priced(), None)], budgets=[(None, PRICE)])
    assert first.created
    assert second.over_budget is not None
    assert second.over_budget.period == "month"
    assert second.over_budget.held_micros == PRICE
    assert second.over_budget.resets_at == first_of_next_month()


async def test_a_refused_create_stores_nothing(redis, keys, jobs):
    """A create over budget leaves no job and holds nothing."""
    record = priced()
    [refused] = await jobs.create_many([(record, None)], budgets=[(PRICE - 1, None)])
    assert refused.over_budget is not None
    assert await jobs.get(record.id) is None
    assert await redis.exists(keys.spend_day("orders", datetime.now(UTC).date().isoformat())) == 0


async def test_an_idempotent_replay_holds_nothing_again(jobs, spend):
    """Replaying an Idempotency-Key answers the first job and holds its estimate once."""
    key = ("k" * 64, "b" * 64)
    await jobs.create(priced(), idempotency=key)
    replay = await jobs.create(priced(), idempotency=key)
    assert not replay.created
    assert (await today_usage(spend)).held_micros == PRICE


async def test_cancelling_a_pending_job_releases_its_hold(jobs, spend):
    """A cancelled pending job is charged nothing, and its hold makes room for another job."""
    record = priced()
    await jobs.create_many([(record, None)], budgets=[(PRICE, None)])
    await jobs.finish(await jobs.get(record.id), "cancelled", lease=None)
    assert (await jobs.get(record.id)).record.cost().charged_usd == 0
    [again] = await jobs.create_many([(priced(), None)], budgets=[(PRICE, None)])
    assert again.created
    row = await today_usage(spend)
    assert (row.held_micros, row.charged_micros, row.cancelled) == (PRICE, 0, 1)


async def test_a_job_runcomfy_ran_is_charged_its_estimate_and_one_it_never_ran_nothing(
    redis, keys, jobs, spend
):
    """Completed and started-then-failed jobs are charged; one failed before it started is not."""
    schedules = Schedules(redis, keys, lease_s=30)
    completed, ran_then_failed, never_ran = priced(), priced(micros=2 * PRICE), priced()
    for record in (completed, ran_then_failed, never_ran):
        await jobs.create(record)
    await jobs.finish(await jobs.get(completed.id), "completed", lease=None, output={"video": "x"})
    error = JobErrorInfo(code="upstream_other", message="no")
    await jobs.finish(await jobs.get(never_ran.id), "failed", lease=None, error=error)
    claims = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    _, stored = await jobs.record_submit(await jobs.get(ran_then_failed.id), claims[0].lease)
    await jobs.submitted(stored, claims[0].lease, "req-1", poll_in_s=0)
    [poll] = await schedules.claim("poll", 1)
    await jobs.started(await jobs.get(ran_then_failed.id), poll.lease, poll_in_s=0)
    [poll] = await schedules.claim("poll", 1)
    await jobs.finish(await jobs.get(ran_then_failed.id), "failed", lease=poll.lease, error=error)

    charged = {
        r.id: (await jobs.get(r.id)).record.cost().charged_usd
        for r in (completed, ran_then_failed, never_ran)
    }
    assert charged == {completed.id: 0.25, ran_then_failed.id: 0.5, never_ran.id: 0}
    row = await today_usage(spend)
    assert (row.held_micros, row.charged_micros) == (0, 3 * PRICE)
    assert (row.completed, row.failed, row.cancelled) == (1, 2, 0)


async def test_the_webhook_carries_the_jobs_cost(redis, keys, jobs):
    """The final event's job says what the job was charged."""
    record = priced(webhook_url="https://hooks.example.com/x")
    await jobs.create(record)
    await jobs.finish(await jobs.get(record.id), "completed", lease=None, output={"video": "x"})
    stored = await redis.hget(keys.job(record.id), "event_zlib")
    event = msgspec.json.decode(event_body(stored), type=WebhookEvent)
    assert delivery_id(record.id, "job.completed")
    assert (event.data.cost.estimate_usd, event.data.cost.charged_usd) == (0.25, 0.25)


async def test_a_job_counts_in_redis_day_whatever_the_replicas_clock(jobs, spend, monkeypatch):
    """A replica whose clock is three days ahead still holds in Redis's today."""
    ahead = utcnow() + timedelta(days=3)
    monkeypatch.setattr("service.store.jobs.utcnow", lambda: ahead)
    record = priced()
    [created] = await jobs.create_many([(record, None)])
    assert created.created
    assert (await jobs.get(record.id)).hold_day == (await spend.today()).isoformat()
    assert (await today_usage(spend)).held_micros == PRICE


# -- configuration ----------------------------------------------------------------------------


def env_of(tmp_path, redis_url: str, price: str, **budgets: float) -> dict[str, str]:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml(hosts=("hooks.example.com",), **budgets))
    return {
        "REDIS_URL": redis_url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_PRICE_USD": price,
    }


def test_a_budget_without_a_price_is_a_one_line_config_error(tmp_path):
    """A tenant's budget while GATEWAY_PRICE_USD is unset is refused in one line."""
    with pytest.raises(ConfigError) as caught:
        load_settings(env_of(tmp_path, "redis://x", "", budget_usd_per_day=5))
    assert "GATEWAY_PRICE_USD" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("price", "budget"), [("-1", 5), ("abc", 5), ("0.0000001", 5), ("0.2", 0), ("0.2", -3)]
)
def test_prices_and_budgets_must_be_amounts(tmp_path, price, budget):
    """A negative, non-numeric or sub-micro price, or a budget <= 0, is a config error."""
    with pytest.raises(ConfigError):
        load_settings(env_of(tmp_path, "redis://x", price, budget_usd_per_month=budget))


def test_amounts_are_read_exactly_as_decimals(tmp_path):
    """0.1 USD is exactly 100,000 micro-dollars, and a budget is read the same way."""
    settings = load_settings(env_of(tmp_path, "redis://x", "0.1", budget_usd_per_day=0.3))
    assert settings.price_micros == 100_000
    assert settings.tenants.by_id["orders"].budget_micros_per_day == 300_000


# -- the HTTP API -----------------------------------------------------------------------------


@pytest.fixture
def priced_settings(tmp_path, redis_server) -> Settings:
    return load_settings(env_of(tmp_path, redis_server.url, "0.25", budget_usd_per_day=1))


def body(**fields: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": VIDEO, **fields}}


async def test_every_job_answers_its_cost_and_pro_mode_doubles_it(priced_settings, keys):
    """A job's estimate is the price, doubled for pro_mode; nothing is charged before it ends."""
    async with serve_api(priced_settings, keys, TENANT.api_key) as api:
        standard = (await api.post("/v1/jobs", json=body())).json()
        pro = (await api.post("/v1/jobs", json=body(pro_mode=True))).json()
        listed = (await api.get("/v1/jobs")).json()["items"]
    assert standard["cost"] == {"estimate_usd": 0.25, "charged_usd": None}
    assert pro["cost"] == {"estimate_usd": 0.5, "charged_usd": None}
    assert {j["id"]: j["cost"]["estimate_usd"] for j in listed} == {
        standard["id"]: 0.25,
        pro["id"]: 0.5,
    }


async def test_a_submit_over_budget_answers_402_with_the_budget_figures(priced_settings, keys):
    """Past the daily budget a submit answers 402 budget-exceeded; a cancel makes room again."""
    async with serve_api(priced_settings, keys, TENANT.api_key) as api:
        admitted = [(await api.post("/v1/jobs", json=body())).json() for _ in range(4)]
        refused = await api.post("/v1/jobs", json=body())
        problem = assert_problem(refused, 402)
        cancelled = await api.post(f"/v1/jobs/{admitted[0]['id']}/cancel")
        fits = await api.post("/v1/jobs", json=body())
        listed = (await api.get("/v1/jobs")).json()["items"]
    assert problem["type"].endswith("budget-exceeded")
    assert {k: problem[k] for k in ("budget_usd", "charged_usd", "held_usd", "period")} == {
        "budget_usd": 1.0,
        "charged_usd": 0.0,
        "held_usd": 1.0,
        "period": "day",
    }
    assert datetime.fromisoformat(problem["resets_at"]) == next_midnight()
    assert len(listed) == 5  # nothing stored for the refused submit
    assert cancelled.json()["cost"] == {"estimate_usd": 0.25, "charged_usd": 0.0}
    assert fits.status_code == 202


async def test_usage_shows_each_days_jobs_and_spend_and_the_budgets(priced_settings, keys):
    """Usage lists every day asked for, with today's held spend and the budget it counts in."""
    async with serve_api(priced_settings, keys, TENANT.api_key) as api:
        job = (await api.post("/v1/jobs", json=body(pro_mode=True))).json()
        await api.post(f"/v1/jobs/{job['id']}/cancel")
        await api.post("/v1/jobs", json=body())
        today = datetime.now(UTC).date()
        week_ago = today - timedelta(days=6)
        usage = (await api.get(f"/v1/usage?from={week_ago}&to={today}")).json()
        default = (await api.get("/v1/usage")).json()
        metrics = (await api.get("/metrics")).text
    assert usage["tenant"] == "orders"
    assert [d["date"] for d in usage["days"]] == [
        (week_ago + timedelta(days=n)).isoformat() for n in range(7)
    ]
    assert usage["days"][-1] == {
        "date": today.isoformat(),
        "jobs": {"completed": 0, "failed": 0, "cancelled": 1},
        "charged_usd": 0.0,
        "held_usd": 0.25,
    }
    assert usage["days"][0]["held_usd"] == 0
    day = usage["budget"]["day"]
    assert (day["budget_usd"], day["charged_usd"], day["held_usd"]) == (1.0, 0.0, 0.25)
    assert datetime.fromisoformat(day["resets_at"]) == next_midnight()
    assert usage["budget"]["month"] is None
    assert default["days"][0]["date"] == today.replace(day=1).isoformat()
    assert default["days"][-1]["date"] == today.isoformat()
    assert 'rcg_budget_remaining_usd{period="day",tenant="orders"} 0.75' in metrics


@pytest.mark.parametrize(
    "query",
    [
        "from=2026-02-10&to=2026-02-01",
        "from=2026-01-01&to=2026-04-03",
        "from=yesterday",
        "to=2026-13-01",
    ],
)
async def test_usage_refuses_a_bad_range_with_422(priced_settings, keys, query):
    """A range backwards, over 92 days, or of non-dates answers 422 naming the parameter."""
    async with serve_api(priced_settings, keys, TENANT.api_key) as api:
        answer = await api.get(f"/v1/usage?{query}")
    problem = assert_problem(answer, 422)
    assert {e["pointer"] for e in problem["errors"]} <= {"#/from", "#/to"}


async def test_with_the_price_unknown_costs_are_null_and_nothing_is_refused(
    tmp_path, redis_server, keys
):
    """Without GATEWAY_PRICE_USD every cost and usage amount is null and no submit gets 402."""
    settings = load_settings(env_of(tmp_path, redis_server.url, ""))
    async with serve_api(settings, keys, TENANT.api_key) as api:
        answers = [await api.post("/v1/jobs", json=body(pro_mode=True)) for _ in range(3)]
        cancelled = (await api.post(f"/v1/jobs/{answers[0].json()['id']}/cancel")).json()
        usage = (await api.get("/v1/usage")).json()
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert answers[1].json()["cost"] == {"estimate_usd": None, "charged_usd": None}
    assert cancelled["cost"] == {"estimate_usd": None, "charged_usd": None}
    today = usage["days"][-1]
    assert (today["charged_usd"], today["held_usd"], today["jobs"]["cancelled"]) == (None, None, 1)
    assert usage["budget"] == {"day": None, "month": None}


def test_a_reload_cannot_add_a_budget_while_the_price_is_unknown(tmp_path):
    """Without a price, a reloaded file that adds a budget is refused and the old tenants stay."""
    path = tmp_path / "tenants.toml"
    path.write_text(TENANT.toml())
    tenants = parse_tenants(path.read_text())
    watcher = TenantsWatcher(tenants, str(path), budgets_allowed=False)
    path.write_text(TENANT.toml(budget_usd_per_day=5))
    assert watcher.reload() is False
    assert tenants.by_id["orders"].budget_micros_per_day is None
