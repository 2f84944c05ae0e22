"""``rfmvp keys`` and ``rfmvp audit``: stored API keys and the audit trail, for operators.

``keys create`` and ``keys rotate`` print a new key once, alone on stdout (so a script
can capture it), and need ``RFMVP_SECRET_KEY``. No command ever prints a secret or a
digest afterwards. Every command is audited under the principal ``cli:<user>``, with
the key's public prefix as the target.
"""

from __future__ import annotations

import argparse
import getpass
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import anyio

from ..config import RateLimit, Settings
from ..errors import RobotFrameworkError, ValidationError
from ..models import ApiKey, AuditEvent, new_id, utcnow
from .audit import verify_store
from .keys import DEFAULT_SCOPES, SCOPES, create_key, parse_duration, require_pepper, rotate_key

if TYPE_CHECKING:
    from ..orchestrator import Orchestrator

__all__ = ["add_commands", "run_audit", "run_keys"]

_PREFIX = re.compile(r"(?:rfmvp_)?([a-z2-7]{8})")


def add_commands(sub: Any) -> None:
    """Add the ``keys`` and ``audit`` subcommands to the ``rfmvp`` parser."""
    keys = sub.add_parser("keys", help="create, list, revoke or rotate stored API keys")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    create = ksub.add_parser("create", help="create a key and print it (shown only once)")
    create.add_argument("--principal", required=True, help="who the key stands for")
    create.add_argument("--tenant", help="whose robots it sees (default: the principal)")
    create.add_argument("--scope", action="append", choices=sorted(SCOPES), dest="scopes",
                        help="repeat for several (default: robots:read and robots:write)")
    create.add_argument("--expires-in", help="e.g. 90d, 12h (default: never)")
    create.add_argument("--rate-limit", help="this key's own limit, e.g. 100/minute "
                        "(default: RFMVP_RATE_LIMIT)")
    create.add_argument("--description", default="", help="a note for `keys list`")
    lst = ksub.add_parser("list", help="every key: prefix, principal, scopes, state, last use")
    lst.add_argument("--principal", help="only this principal's keys")
    revoke = ksub.add_parser("revoke", help="stop a key at once, in every process")
    revoke.add_argument("prefix", help="the key's prefix (from `keys list`)")
    rotate = ksub.add_parser("rotate", help="replace a key; the old one works for --grace")
    rotate.add_argument("prefix", help="the key's prefix (from `keys list`)")
    rotate.add_argument("--grace", default="1h",
                        help="how long the old key keeps working (default 1h; 0s: not at all)")

    audit = sub.add_parser("audit", help="verify or read the audit trail")
    asub = audit.add_subparsers(dest="audit_command", required=True)
    verify = asub.add_parser("verify", help="check every hash link; exit 1 at the first bad one")
    verify.add_argument("--page-size", type=int, default=1000)
    verify.add_argument("--expect", metavar="HASH",
                        help="a head hash printed by an earlier verify: it must still be there")
    tail = asub.add_parser("tail", help="the newest records")
    tail.add_argument("-n", type=int, default=20, help="how many (default 20)")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new records")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")


def _prefix(text: str) -> str:
    match = _PREFIX.fullmatch(text.strip())
    if match is None:
        # Never echo it: it may be a whole key pasted by mistake.
        raise ValidationError("give the key's prefix (8 characters, see `rfmvp keys list`), "
                              "never the whole key")
    return match.group(1)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _key_row(key: ApiKey, now: datetime) -> list[Any]:
    return [key.prefix, key.principal, key.tenant, ",".join(sorted(key.scopes)),
            key.state(now), _when(key.expires_at), _when(key.last_used_at),
            "-" if key.rate_limit is None else str(key.rate_limit), _when(key.created_at),
            key.description]


def _audit(orch: Orchestrator, action: str, target: str | None, outcome: str,
           key: ApiKey | None = None) -> None:
    details = {} if key is None else {"principal": key.principal, "tenant": key.tenant,
                                      "scopes": sorted(key.scopes)}
    orch.audit.record(action=action, outcome=outcome, principal=f"cli:{getpass.getuser()}",
                      target=target, client="cli", request_id=new_id(), details=details)


async def _in_orchestrator(settings: Settings,
                           action: Callable[[Orchestrator], Awaitable[int]]) -> int:
    """Run ``action`` in a started orchestrator; a RobotFrameworkError it raises comes out
    as itself (not wrapped by the orchestrator's task group), for ``main`` to print."""
    from ..orchestrator import Orchestrator

    failure: RobotFrameworkError | None = None
    async with Orchestrator(settings) as orch:
        try:
            return await action(orch)
        except RobotFrameworkError as exc:
            failure = exc
    assert failure is not None
    raise failure


async def run_keys(args: argparse.Namespace) -> int:
    from ..cli import _settings, _table

    settings = _settings()
    secret_key = settings.security.secret_key
    command = args.keys_command
    # Everything a typo can break is checked before the store is touched.
    if command in ("create", "rotate"):
        require_pepper(secret_key)
    prefix = None if command in ("create", "list") else _prefix(args.prefix)
    rate_limit: RateLimit | None = None
    expires_in = grace = None
    if command == "create":
        try:
            rate_limit = None if args.rate_limit is None else RateLimit.parse(args.rate_limit)
        except ValueError:
            raise ValidationError(f"--rate-limit must be {RateLimit.FORM}") from None
        expires_in = None if args.expires_in is None else parse_duration(args.expires_in)
    if command == "rotate":
        grace = parse_duration("0s" if args.grace.strip() == "0" else args.grace)

    async def create(orch: Orchestrator) -> int:
        now = utcnow()
        key, stored = await create_key(
            orch.driver, secret_key, principal=args.principal, tenant=args.tenant,
            scopes=args.scopes or DEFAULT_SCOPES,
            expires_at=None if expires_in is None else now + expires_in,
            rate_limit=rate_limit, description=args.description, now=now)
        _audit(orch, "keys.create", stored.prefix, "created", stored)
        print(key)
        print(f"created key {stored.prefix} for {stored.principal} (tenant {stored.tenant}, "
              f"{', '.join(sorted(stored.scopes))}, expires {_when(stored.expires_at)}). "
              "This is the only time it is shown: store it now.", file=sys.stderr)
        return 0

    async def list_keys(orch: Orchestrator) -> int:
        keys = await orch.driver.list_api_keys(principal=args.principal)
        _audit(orch, "keys.list", None, "ok")
        now = utcnow()
        print(_table([_key_row(k, now) for k in keys],
                     ["prefix", "principal", "tenant", "scopes", "state", "expires",
                      "last used", "rate limit", "created", "description"]))
        return 0

    async def revoke(orch: Orchestrator) -> int:
        assert prefix is not None
        revoked = await orch.driver.revoke_api_key(prefix, utcnow())
        _audit(orch, "keys.revoke", prefix, "revoked" if revoked else "not_found")
        if revoked is None:
            print(f"no active key {prefix}", file=sys.stderr)
            return 1
        print(f"key {prefix} revoked; it is refused from the next request on")
        return 0

    async def rotate(orch: Orchestrator) -> int:
        assert prefix is not None
        assert grace is not None
        rotated = await rotate_key(orch.driver, secret_key, prefix, grace=grace)
        if rotated is None:
            _audit(orch, "keys.rotate", prefix, "not_found")
            print(f"no key {prefix} that can be rotated (unknown or revoked)", file=sys.stderr)
            return 1
        key, stored, old = rotated
        _audit(orch, "keys.rotate", prefix, f"replaced_by:{stored.prefix}", stored)
        print(key)
        print(f"created key {stored.prefix} to replace {prefix}, which works until "
              f"{_when(old.expires_at)}. This is the only time the new key is shown: "
              "store it now.", file=sys.stderr)
        return 0

    actions = {"create": create, "list": list_keys, "revoke": revoke, "rotate": rotate}
    return await _in_orchestrator(settings, actions[command])


def _audit_line(seq: int, event: AuditEvent) -> str:
    return " ".join(str(v) for v in (
        seq, event.ts.isoformat(timespec="milliseconds"), event.principal or "-",
        event.action, event.target or "-", event.outcome, event.client or "-",
        event.request_id))


def _audit_json(seq: int, event: AuditEvent) -> str:
    return json.dumps({"seq": seq, "ts": event.ts.isoformat(), "principal": event.principal,
                       "action": event.action, "target": event.target,
                       "outcome": event.outcome, "client": event.client,
                       "request_id": event.request_id, "details": event.details,
                       "prev_hash": event.prev_hash, "hash": event.hash}, sort_keys=True)


async def run_audit(args: argparse.Namespace) -> int:
    from ..cli import _settings

    if args.audit_command == "verify" and args.page_size < 1:
        raise ValidationError("--page-size must be at least 1")
    return await _in_orchestrator(_settings(), lambda orch: _audit_command(orch, args))


async def _audit_command(orch: Orchestrator, args: argparse.Namespace) -> int:
    if args.audit_command == "verify":
        report = await verify_store(orch.driver, page_size=args.page_size,
                                    expect=args.expect)
        intact = report.intact and report.found_expected is not False
        _audit(orch, "audit.verify", None, "intact" if intact else "broken")
        if not report.intact:
            print(f"audit trail broken at seq {report.first_bad_seq}: that record was "
                  "edited, or the one before it was deleted or edited", file=sys.stderr)
            return 1
        if report.found_expected is False:
            print(f"no record has the hash {args.expect[:80]}: records newer than it "
                  "were cut off, or it is not a hash of this trail", file=sys.stderr)
            return 1
        if report.checked == 0:
            print("audit trail is empty")
            return 0
        start = ("from its first record" if report.anchor is None else
                 f"from seq {report.first_seq} (older records were purged; anchor "
                 f"{report.anchor})")
        print(f"audit trail intact: {report.checked} records, seq {report.first_seq} to "
              f"{report.last_seq}, verified {start}")
        print(f"head hash: {report.head_hash}")
        return 0
    # tail
    _audit(orch, "audit.tail", None, "ok")
    render = _audit_json if args.json else _audit_line
    records = await orch.driver.tail_audit(max(1, args.n))
    for seq, event in records:
        print(render(seq, event), flush=True)
    if not args.follow:
        return 0
    after = records[-1][0] if records else 0
    while True:
        await anyio.sleep(1.0)
        for seq, event in await orch.driver.list_audit(after_seq=after, limit=1000):
            print(render(seq, event), flush=True)
            after = seq

