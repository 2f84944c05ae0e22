"""Specification of ``rfmvp keys`` and ``rfmvp audit``, run as an operator runs them."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import sqlite3
import sys
from pathlib import Path

import anyio
import pytest

from robotframework_mvp import AuthenticationError, Orchestrator, RateLimit, Settings
from robotframework_mvp.cli import main
from robotframework_mvp.models import AuditEvent
from robotframework_mvp.security.validator import RequestInfo
from robotframework_mvp.testing import test_settings

PEPPER = "cli-tests-pepper-1e2d3c4b5a69"
KEY = re.compile(r"rfmvp_([a-z2-7]{8})_[A-Za-z0-9_-]{43}")


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean RFMVP_* environment on a fresh SQLite file; returns the file."""
    for name in list(os.environ):
        if name.startswith("RFMVP_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "robots.db"
    monkeypatch.setenv("RFMVP_STORAGE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("RFMVP_SECRET_KEY", PEPPER)
    return db


def rfmvp(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def settings_for(db: Path) -> Settings:
    return test_settings(f"sqlite:///{db}", security={"secret_key": PEPPER},
                         worker={"enabled": False})


async def use(db: Path, key: str) -> str:
    async with Orchestrator(settings_for(db)) as orch:
        try:
            principal = await orch.security.authorize(key, RequestInfo("t", "r"),
                                                      scope="robots:read")
        except AuthenticationError as exc:
            return f"refused: {exc.message}"
        return f"{principal.id}@{principal.tenant}:{','.join(sorted(principal.scopes))}"


def audit_records(db: Path) -> list[AuditEvent]:
    async def read() -> list[AuditEvent]:
        async with Orchestrator(settings_for(db)) as orch:
            return [e for _, e in await orch.driver.list_audit(after_seq=0, limit=10_000)]

    return anyio.run(read)


def test_keys_create_prints_the_key_once_and_it_works(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = rfmvp(capsys, "keys", "create", "--principal", "billing", "--tenant",
                           "acme", "--scope", "robots:read", "--expires-in", "30d",
                           "--rate-limit", "100/minute", "--description", "nightly job")
    assert code == 0
    key = out.strip()
    match = KEY.fullmatch(key)
    assert match is not None
    prefix = match.group(1)
    assert key not in err
    assert "only time" in err
    assert anyio.run(use, env, key) == "billing@acme:robots:read"

    code, out, _ = rfmvp(capsys, "keys", "list")
    assert code == 0
    assert prefix in out
    assert "billing" in out
    assert "nightly job" in out
    assert "100/minute" in out
    assert "active" in out
    assert key.split("_", 2)[2] not in out

    async def stored() -> tuple[str, RateLimit | None]:
        async with Orchestrator(settings_for(env)) as orch:
            record = await orch.driver.get_api_key_by_prefix(prefix)
            assert record is not None
            assert record.expires_at is not None
            return record.digest, record.rate_limit

    digest, rate_limit = anyio.run(stored)
    assert rate_limit == RateLimit(100, 60.0)
    code, out, err = rfmvp(capsys, "keys", "list", "--principal", "billing")
    assert digest not in out + err


def test_keys_create_without_the_secret_key_fails_clearly_and_stores_nothing(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RFMVP_SECRET_KEY")
    code, out, err = rfmvp(capsys, "keys", "create", "--principal", "billing")
    assert code == 2
    assert out == ""
    assert "RFMVP_SECRET_KEY is not set" in err
    monkeypatch.setenv("RFMVP_SECRET_KEY", PEPPER)
    code, out, _ = rfmvp(capsys, "keys", "list")
    assert "billing" not in out


@pytest.mark.parametrize(("args", "says"), [
    (["--expires-in", "soon"], "duration"), (["--rate-limit", "lots"], "--rate-limit"),
    (["--tenant", "a\tb"], "tenant"),
])
def test_keys_create_refuses_bad_options(
    env: Path, capsys: pytest.CaptureFixture[str], args: list[str], says: str,
) -> None:
    code, out, err = rfmvp(capsys, "keys", "create", "--principal", "p", *args)
    assert code == 2
    assert out == ""
    assert err.startswith("rfmvp: ")
    assert says in err


def test_keys_create_refuses_an_unknown_scope(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["keys", "create", "--principal", "p", "--scope", "root"])
    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_keys_revoke_stops_a_key_and_is_audited(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = rfmvp(capsys, "keys", "create", "--principal", "alice")
    key = out.strip()
    prefix = key.split("_")[1]
    code, out, _ = rfmvp(capsys, "keys", "revoke", prefix)
    assert code == 0
    assert "revoked" in out
    assert anyio.run(use, env, key).startswith("refused: this API key has been revoked")
    code, _, err = rfmvp(capsys, "keys", "revoke", prefix)
    assert code == 1
    assert "no active key" in err
    code, out, _ = rfmvp(capsys, "keys", "list")
    assert "revoked" in out

    records = [e for e in audit_records(env) if e.action.startswith("keys.")]
    assert [(e.action, e.target, e.outcome) for e in records] == [
        ("keys.create", prefix, "created"), ("keys.revoke", prefix, "revoked"),
        ("keys.revoke", prefix, "not_found"), ("keys.list", None, "ok")]
    assert {e.principal for e in records} == {f"cli:{getpass.getuser()}"}
    assert records[0].details == {"principal": "alice", "tenant": "alice",
                                  "scopes": ["robots:read", "robots:write"]}
    assert key.split("_", 2)[2] not in json.dumps([e.details for e in records])


def test_a_whole_key_given_instead_of_a_prefix_is_refused_without_echo(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = rfmvp(capsys, "keys", "create", "--principal", "alice")
    key = out.strip()
    code, out, err = rfmvp(capsys, "keys", "revoke", key)
    assert code == 2
    assert key not in out + err
    assert key.split("_", 2)[2] not in out + err
    assert "prefix" in err


def test_keys_rotate_gives_a_new_key_and_the_old_one_stops_after_the_grace(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = rfmvp(capsys, "keys", "create", "--principal", "alice", "--scope", "admin")
    old = out.strip()
    code, out, err = rfmvp(capsys, "keys", "rotate", old.split("_")[1], "--grace", "0s")
    assert code == 0
    new = out.strip()
    assert KEY.fullmatch(new)
    assert new != old
    assert "only time" in err
    assert anyio.run(use, env, old).startswith("refused: this API key has expired")
    assert anyio.run(use, env, new) == "alice@alice:admin"
    code, out, _ = rfmvp(capsys, "keys", "rotate", old.split("_")[1], "--grace", "1h")
    assert code == 0  # an expired key may still be replaced (it was not revoked)
    code, _, err = rfmvp(capsys, "keys", "rotate", "zzzzzzzz")
    assert code == 1
    assert "no key zzzzzzzz" in err


def test_a_key_revoked_by_another_process_is_refused_on_the_next_request(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    _, out, _ = rfmvp(capsys, "keys", "create", "--principal", "alice")
    key = out.strip()

    async def serve_then_revoke_elsewhere() -> str:
        async with Orchestrator(settings_for(env)) as orch:
            info = RequestInfo("t", "r")
            await orch.security.authorize(key, info, scope="robots:read")
            revoke = await anyio.run_process(
                [sys.executable, "-m", "robotframework_mvp.cli", "keys", "revoke",
                 key.split("_")[1]], check=False)
            assert revoke.returncode == 0, revoke.stderr
            try:
                await orch.security.authorize(key, info, scope="robots:read")
            except AuthenticationError as exc:
                return exc.message
            return "accepted"

    assert "revoked" in anyio.run(serve_then_revoke_elsewhere)


# -- audit ---------------------------------------------------------------------------------


def make_trail(db: Path, capsys: pytest.CaptureFixture[str], n: int = 4) -> None:
    for i in range(n):
        rfmvp(capsys, "keys", "create", "--principal", f"p{i}")


def sql(db: Path, statement: str, *params: object) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(statement, params).fetchall()
        conn.commit()
        return rows


def test_audit_verify_says_intact_and_prints_the_head_hash(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys)
    code, out, _ = rfmvp(capsys, "audit", "verify", "--page-size", "2")
    assert code == 0
    assert "audit trail intact" in out
    head = re.search(r"head hash: ([0-9a-f]{64})", out)
    assert head is not None
    code, out, _ = rfmvp(capsys, "audit", "verify", "--expect", head.group(1))
    assert code == 0


def test_audit_verify_finds_an_edited_record(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys)
    seqs = [row[0] for row in sql(env, "SELECT seq FROM audit_log ORDER BY seq")]
    victim = seqs[2]
    sql(env, "UPDATE audit_log SET outcome = 'created' || '!' WHERE seq = ?", victim)
    code, _, err = rfmvp(capsys, "audit", "verify", "--page-size", "2")
    assert code == 1
    assert f"broken at seq {victim}" in err


def test_audit_verify_finds_a_deleted_record(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys)
    seqs = [row[0] for row in sql(env, "SELECT seq FROM audit_log ORDER BY seq")]
    sql(env, "DELETE FROM audit_log WHERE seq = ?", seqs[1])
    code, _, err = rfmvp(capsys, "audit", "verify")
    assert code == 1
    assert f"broken at seq {seqs[2]}" in err


def test_audit_verify_with_a_remembered_head_finds_a_cut_tail(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys)
    _, out, _ = rfmvp(capsys, "audit", "verify")
    head = re.search(r"head hash: ([0-9a-f]{64})", out)
    assert head is not None
    last = sql(env, "SELECT MAX(seq) FROM audit_log")[0][0]
    # Everything from the remembered head on is cut off: the rest still chains up.
    cut = sql(env, "SELECT seq FROM audit_log WHERE hash = ?", head.group(1))[0][0]
    sql(env, "DELETE FROM audit_log WHERE seq >= ?", cut)
    assert last
    code, _, err = rfmvp(capsys, "audit", "verify", "--expect", head.group(1))
    assert code == 1
    assert "cut off" in err


def test_audit_verify_after_retention_anchors_on_the_oldest_remaining_record(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys, n=6)
    seqs = [row[0] for row in sql(env, "SELECT seq FROM audit_log ORDER BY seq")]
    sql(env, "DELETE FROM audit_log WHERE seq < ?", seqs[3])  # as retention would
    code, out, _ = rfmvp(capsys, "audit", "verify")
    assert code == 0
    assert f"from seq {seqs[3]} (older records were purged" in out


def test_audit_tail_prints_the_newest_records(
    env: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    make_trail(env, capsys, n=5)
    code, out, _ = rfmvp(capsys, "audit", "tail", "-n", "3")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert all("keys.create" in line for line in lines)
    code, out, _ = rfmvp(capsys, "audit", "tail", "-n", "2", "--json")
    records = [json.loads(line) for line in out.strip().splitlines()]
    # The first tail's own record is in the trail by now; the second's is not yet.
    assert [r["action"] for r in records] == ["keys.create", "audit.tail"]
    assert all(set(r) >= {"seq", "ts", "principal", "action", "hash"} for r in records)
