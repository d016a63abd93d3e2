"""What `GET /v1/usage` answers and `/metrics` reports of budgets, from the spend ledger."""

from __future__ import annotations

from datetime import date
from typing import Final

from service.api.validation import InvalidInputError
from service.config import Tenant, Tenants
from service.models import (
    BudgetPeriod,
    Budgets,
    BudgetState,
    DayUsage,
    FieldError,
    JobCounts,
    Usage,
    usd,
)
from service.store.spend import Period, Spend, SpendStore, day_period, month_period

MAX_USAGE_DAYS: Final = 92
"""The longest range `GET /v1/usage` answers, in days (the ledger keeps a little more)."""


def usage_range(first: date | None, last: date | None, today: date) -> tuple[date, date]:
    """The days asked for, inclusive: by default this month so far; 422 for a bad range."""
    last = last or (today if first is None or first <= today else first)
    first = first or last.replace(day=1)
    errors = []
    if first > last:
        errors.append(FieldError(pointer="#/from", detail="must not be after `to`"))
    elif (last - first).days + 1 > MAX_USAGE_DAYS:
        errors.append(
            FieldError(pointer="#/to", detail=f"must be at most {MAX_USAGE_DAYS} days from `from`")
        )
    if errors:
        raise InvalidInputError(errors)
    return first, last


async def usage_of(
    spend: SpendStore, tenant: Tenant, first: date, last: date, *, price_known: bool
) -> Usage:
    """The tenant's usage from `first` to `last`, and its budgets now (amounts null if unpriced)."""
    days = [
        DayUsage(
            date=day.isoformat(),
            jobs=JobCounts(completed=row.completed, failed=row.failed, cancelled=row.cancelled),
            charged_usd=usd(row.charged_micros) if price_known else None,
            held_usd=usd(row.held_micros) if price_known else None,
        )
        for day, row in await spend.days(tenant.id, first, last)
    ]
    return Usage(tenant=tenant.id, days=days, budget=await budgets_of(spend, tenant))


async def budgets_of(spend: SpendStore, tenant: Tenant) -> Budgets:
    """The tenant's budgets and what counts against them in the current day and month."""
    if tenant.budget_micros_per_day is None and tenant.budget_micros_per_month is None:
        return Budgets(day=None, month=None)
    today = await spend.today()
    day, month = await spend.current(tenant.id, today)
    return Budgets(
        day=_state(tenant.budget_micros_per_day, day, day_period(today)),
        month=_state(tenant.budget_micros_per_month, month, month_period(today)),
    )


def _state(budget: int | None, spent: Spend, period: Period) -> BudgetState | None:
    if budget is None:
        return None
    return BudgetState(
        budget_usd=usd(budget),
        charged_usd=usd(spent.charged_micros),
        held_usd=usd(spent.held_micros),
        resets_at=period.resets_at,
    )


async def budget_remaining(spend: SpendStore, tenants: Tenants) -> dict[tuple[str, str], float]:
    """What each budget has left in its current period, by (tenant, period), for `/metrics`."""
    remaining: dict[tuple[str, str], float] = {}
    for tenant in tenants.by_id.values():
        budgets = await budgets_of(spend, tenant)
        periods: dict[BudgetPeriod, BudgetState | None] = {
            "day": budgets.day,
            "month": budgets.month,
        }
        for period, state in periods.items():
            if state is not None:
                left = state.budget_usd - state.charged_usd - state.held_usd
                remaining[tenant.id, period] = round(left, 6)
    return remaining
