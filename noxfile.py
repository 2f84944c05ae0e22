"""Everything a contributor runs: ``nox`` (tests, lint, types, examples) and ``nox -s bench``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint", "types", "examples"]
nox.options.reuse_existing_virtualenvs = True

PYTHON = ["3.11"]


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The whole test suite (PostgreSQL / Redis tests skip when absent)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and import order."""
    session.install("ruff>=0.8")
    session.run("ruff", "check", "src", "tests", "examples", "bench", "noxfile.py")


@nox.session(python=PYTHON)
def types(session: nox.Session) -> None:
    """mypy --strict over the package."""
    session.install("-e", ".[dev]")
    session.run("mypy")


@nox.session(python=PYTHON)
def examples(session: nox.Session) -> None:
    """Smoke-run the example server: start it, submit a robot over HTTP, stop it."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/http/test_server_smoke.py", "-q")


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Benchmarks on sqlite+memory and on postgresql+redis (see docs/performance.md)."""
    session.install("-e", ".[test]")
    for storage, cache in (
        ("sqlite:///bench-robots.db", "memory://"),
        ("postgresql://postgres@127.0.0.1:5432/test", "redis://127.0.0.1:6379/0"),
    ):
        session.run("python", "bench/run.py", "--storage", storage, "--cache", cache,
                    "-n", "5000", "-c", "10", "--latency-samples", "300")
        session.run("python", "bench/http_load.py", "--storage", storage, "--cache", cache)
