"""Reloading the tenants file: valid files are swapped in, invalid ones refused and counted."""

from __future__ import annotations

import asyncio

from service.config import parse_tenants
from service.tenants_watch import TenantsWatcher
from tests.support import new_tenant, wait_for

FIRST = new_tenant("orders")
SECOND = new_tenant("billing")


def watcher_for(tmp_path, results: list[bool]) -> tuple[TenantsWatcher, object]:
    path = tmp_path / "tenants.toml"
    path.write_text(FIRST.toml())
    tenants = parse_tenants(path.read_text())
    return TenantsWatcher(tenants, str(path), interval_s=0.05, on_result=results.append), path


def test_a_valid_file_replaces_the_tenants_in_place(tmp_path):
    """After a reload, the same Tenants object knows the new file's keys."""
    results: list[bool] = []
    watcher, path = watcher_for(tmp_path, results)
    path.write_text(FIRST.toml() + SECOND.toml())
    assert watcher.reload() is True
    assert watcher.tenants.authenticate(SECOND.api_key)[0].id == "billing"
    assert results == [True]


def test_an_invalid_file_is_refused_and_the_old_tenants_stay(tmp_path, caplog):
    """A broken file is refused whole: the old keys still work and the failure is counted."""
    results: list[bool] = []
    watcher, path = watcher_for(tmp_path, results)
    path.write_text("[tenants.orders]\napi_keys = 'not a list'\n")
    assert watcher.reload() is False
    assert watcher.tenants.authenticate(FIRST.api_key)[0].id == "orders"
    assert (watcher.ok, watcher.failures, results) == (False, 1, [False])
    assert "keeping the previous tenants" in caplog.text
    path.unlink()
    assert watcher.reload() is False
    assert watcher.tenants.authenticate(FIRST.api_key) is not None


async def test_a_changed_file_is_noticed_without_a_signal(tmp_path):
    """Changing the file's content (as a Secret update does) reloads it within an interval."""
    results: list[bool] = []
    watcher, path = watcher_for(tmp_path, results)
    stop = asyncio.Event()
    running = asyncio.create_task(watcher.run(stop))
    try:
        path.write_text(FIRST.toml() + SECOND.toml())
        await wait_for(lambda: _async(watcher.tenants.authenticate(SECOND.api_key)), timeout=5)
        assert results == [True]
    finally:
        stop.set()
        await running


async def _async(value):
    return value
