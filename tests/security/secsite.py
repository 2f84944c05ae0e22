"""The site under attack in tests/security: an orchestrator with stored keys in two tenants.

Keys: ``alice`` and ``carol`` (tenant ``acme``), ``bob`` (tenant ``globex``), ``reader``
(acme, robots:read only), ``writer`` (acme, robots:write only), ``admin`` (admin), plus a
revoked and an expired acme key. Requests go through ``HttpApi`` (the adapters' core),
so status codes, headers and bodies are exactly what a client gets.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import attrs

from robotframework_mvp import Orchestrator
from robotframework_mvp.http import HttpApi, HttpResponse
from robotframework_mvp.models import utcnow
from robotframework_mvp.security.keys import create_key

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

PEPPER = "security-tests-pepper-5f1e9c0a7b3d"


@attrs.define
class Site:
    """An orchestrator under attack, its HTTP core and its keys by name."""

    orch: Orchestrator
    api: HttpApi
    keys: dict[str, str]
    prefixes: dict[str, str]

    async def submit(self, who: str, payload: Mapping[str, Any] | None = None,
                     client: str = "192.0.2.10", **fields: Any) -> HttpResponse:
        import json

        body = json.dumps({"kind": "echo", "payload": payload or {}, **fields}).encode()
        return await self.api.submit_robot(body, {"X-API-Key": self.keys[who]}, client)

    def headers(self, who: str) -> dict[str, str]:
        return {"X-API-Key": self.keys[who]}


async def build_site(orch: Orchestrator) -> Site:
    keys: dict[str, str] = {}
    prefixes: dict[str, str] = {}
    specs: dict[str, dict[str, Any]] = {
        "alice": {"principal": "alice", "tenant": "acme"},
        "carol": {"principal": "carol", "tenant": "acme"},
        "bob": {"principal": "bob", "tenant": "globex"},
        "reader": {"principal": "reader", "tenant": "acme", "scopes": {"robots:read"}},
        "writer": {"principal": "writer", "tenant": "acme", "scopes": {"robots:write"}},
        "admin": {"principal": "ops", "tenant": "ops", "scopes": {"admin"}},
        "revoked": {"principal": "alice", "tenant": "acme"},
        "expired": {"principal": "alice", "tenant": "acme",
                    "expires_at": utcnow() - timedelta(minutes=1)},
    }
    for name, spec in specs.items():
        key, stored = await create_key(orch.driver, PEPPER, **spec)
        keys[name], prefixes[name] = key, stored.prefix
    await orch.driver.revoke_api_key(prefixes["revoked"], utcnow())
    return Site(orch=orch, api=HttpApi(orch), keys=keys, prefixes=prefixes)
