"""Fixtures of the resilience tests: fault proxies in front of the real servers."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "faults"))

from killers import POSTGRES_URL, REDIS_URL
from proxy import FaultProxy


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or default_port


@pytest.fixture
async def pg_proxy(postgres_url: str) -> AsyncIterator[FaultProxy]:
    host, port = _host_port(POSTGRES_URL, 5432)
    async with FaultProxy(host, port) as proxy:
        yield proxy


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[FaultProxy]:
    host, port = _host_port(REDIS_URL, 6379)
    async with FaultProxy(host, port) as proxy:
        yield proxy
