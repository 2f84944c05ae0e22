"""Every request, accepted or refused, is in the audit trail, which stays one verifiable
chain through retention."""

from __future__ import annotations

import json
from datetime import timedelta

import anyio
import pytest
from secsite import Site

from robotframework_mvp.models import AuditEvent, utcnow
from robotframework_mvp.security.audit import verify_store

pytestmark = pytest.mark.anyio


async def trail(site: Site) -> list[AuditEvent]:
    await site.orch.audit.flush()
    return [e for _, e in await site.orch.driver.list_audit(after_seq=0, limit=10_000)]


async def test_accepted_and_refused_requests_are_recorded_with_who_what_and_where(
    site: Site,
) -> None:
    robot = (await site.submit("alice", client="192.0.2.1")).body
    await site.api.get_robot(robot["id"], {**site.headers("bob"), "X-Request-Id": "req-bob-1"},
                             "192.0.2.2")
    await site.api.list_robots({}, {"X-API-Key": "wrong-key-000000"}, "192.0.2.3")
    await site.api.cancel_robot(robot["id"], site.headers("reader"), "192.0.2.4")
    events = await trail(site)
    rows = [(e.principal, e.action, e.target, e.outcome, e.client) for e in events]
    assert ("alice", "robots.submit", robot["id"], "created", "192.0.2.1") in rows
    assert ("bob", "robots.get", robot["id"], "refused:not_found", "192.0.2.2") in rows
    assert (None, "robots.list", None, "refused:unauthenticated", "192.0.2.3") in rows
    assert ("reader", "robots.cancel", robot["id"], "refused:forbidden", "192.0.2.4") in rows
    assert any(e.request_id == "req-bob-1" for e in events)
    assert all(e.ts is not None and e.request_id for e in events)
    text = json.dumps([[e.principal, e.target, e.details] for e in events])
    assert "wrong-key-000000" not in text
    assert (await verify_store(site.orch.driver)).intact


async def test_auditing_costs_the_request_path_an_append_to_a_buffer(site: Site) -> None:
    writes = 0
    append = site.orch.driver.append_audit

    async def counting(events: object) -> object:
        nonlocal writes
        writes += 1
        return await append(events)  # type: ignore[arg-type]

    site.orch.audit.driver.append_audit = counting  # type: ignore[method-assign]
    site.orch.audit.flush_interval = 3600.0
    await anyio.sleep(0.05)  # the writer's current short wait ends; the next is long
    await site.orch.audit.flush()
    writes = 0
    for _ in range(50):
        await site.api.list_robots({}, site.headers("alice"), "c")
    assert writes == 0  # nothing written on the request path
    assert site.orch.audit.pending == 50
    await site.orch.audit.flush()
    assert writes == 1  # one batch, one transaction


async def test_cleanup_keeps_audit_records_for_their_own_retention(site: Site) -> None:
    old = utcnow() - timedelta(days=100)
    await site.orch.audit.flush()
    await site.orch.driver.append_audit([
        AuditEvent(ts=old, principal="p", action="robots.get", target=None, outcome="ok",
                   client=None, request_id=f"old-{n}") for n in range(3)])
    await site.submit("alice")
    await site.orch.audit.flush()
    # Robots are kept 30 days by default: with the audit's own 365 days nothing goes.
    await site.orch.background.cleanup_once()
    assert {"old-0", "old-1", "old-2"} <= {e.request_id for e in await trail(site)}
    short = attrs_evolve_security(site, audit_retention_days=30.0)
    await short.background.cleanup_once()
    remaining = await trail(site)
    assert not {"old-0", "old-1", "old-2"} & {e.request_id for e in remaining}
    report = await verify_store(site.orch.driver)
    assert report.intact


def attrs_evolve_security(site: Site, **changes: object) -> object:
    """The site's orchestrator with some security settings changed (for one call)."""
    import attrs

    site.orch.settings = attrs.evolve(
        site.orch.settings, security=attrs.evolve(site.orch.settings.security, **changes))
    return site.orch
