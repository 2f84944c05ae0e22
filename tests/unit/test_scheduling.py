"""Specification of the pure parts of scheduling: cron and time zones, misfire plans,
chain templates and ``run_at``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from robotframework_mvp import ValidationError
from robotframework_mvp.chains import followup_for, parse_followup, render_payload
from robotframework_mvp.models import ErrorInfo, FollowUp, MisfirePolicy, Robot, RobotStatus
from robotframework_mvp.scheduling import (
    COUNT_CAP,
    next_due_time,
    parse_cron,
    parse_timezone,
    plan_fires,
)
from robotframework_mvp.security.sanitize import PayloadLimits, validate_run_at

T0 = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)


# -- cron expressions ------------------------------------------------------------------------


@pytest.mark.parametrize("expression", ["*/5 * * * *", "0 9 * * mon-fri", "  0  0 1 * *  ",
                                        "*/2 * * * * *", "30 15 10 * * *"])
def test_five_and_six_field_expressions_are_accepted_and_normalized(expression: str) -> None:
    assert parse_cron(expression) == " ".join(expression.split())


@pytest.mark.parametrize("expression", ["", "* * * *", "* * * * * * *", "61 * * * *",
                                        "every minute", "0 0 30 2 *", 5, None, "x" * 300])
def test_anything_else_is_refused_with_the_cron_path(expression: object) -> None:
    with pytest.raises(ValidationError) as caught:
        parse_cron(expression)
    assert caught.value.path == "$.cron"


def test_the_sixth_field_is_seconds_and_comes_first() -> None:
    utc = ZoneInfo("UTC")
    assert next_due_time("15 * * * * *", utc, T0) == T0 + timedelta(seconds=15)
    assert next_due_time("*/2 * * * * *", utc, T0) == T0 + timedelta(seconds=2)
    assert next_due_time("* * * * *", utc, T0) == T0 + timedelta(minutes=1)


def test_time_zones_are_iana_names() -> None:
    assert parse_timezone("Europe/Paris").key == "Europe/Paris"
    for bad in ("Mars/Olympus", "../etc/passwd", "", 3, "Europe/Paris\n"):
        with pytest.raises(ValidationError) as caught:
            parse_timezone(bad)
        assert caught.value.path == "$.timezone"


def test_due_times_follow_the_wall_clock_of_the_schedule_time_zone() -> None:
    paris = parse_timezone("Europe/Paris")
    # 09:00 in Paris is 08:00 UTC in winter and 07:00 UTC in summer.
    assert next_due_time("0 9 * * *", paris, datetime(2030, 1, 10, tzinfo=UTC)) == \
        datetime(2030, 1, 10, 8, tzinfo=UTC)
    assert next_due_time("0 9 * * *", paris, datetime(2030, 7, 10, tzinfo=UTC)) == \
        datetime(2030, 7, 10, 7, tzinfo=UTC)


def test_dst_a_skipped_wall_time_fires_at_the_end_of_the_gap_and_a_repeated_one_twice() -> None:
    """The documented DST behaviour (croniter's): 02:30 does not exist on 2026-03-29 in
    Paris, so the daily 02:30 fires at 03:00 local; it exists twice on 2026-10-25, so it
    fires at both instants."""
    paris = parse_timezone("Europe/Paris")
    spring = next_due_time("30 2 * * *", paris, datetime(2026, 3, 28, 23, tzinfo=UTC))
    assert spring == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)  # 03:00 CEST
    first = next_due_time("30 2 * * *", paris, datetime(2026, 10, 24, 23, tzinfo=UTC))
    second = next_due_time("30 2 * * *", paris, first)
    assert first == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    assert second == datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET


# -- misfire plans ---------------------------------------------------------------------------


def plan(policy: MisfirePolicy, *, last: datetime, now: datetime, grace: float = 1.0,
         limit: int = 100, cron: str = "* * * * * *"):  # type: ignore[no-untyped-def]
    return plan_fires(cron=cron, tz=UTC, policy=policy, misfire_limit=limit, last_due_at=last,
                      now=now, grace=grace)


@pytest.mark.parametrize("policy", list(MisfirePolicy))
def test_nothing_is_planned_before_the_next_due_time(policy: MisfirePolicy) -> None:
    assert plan(policy, last=T0, now=T0 + timedelta(milliseconds=999)) is None


@pytest.mark.parametrize("policy", list(MisfirePolicy))
def test_a_due_time_within_the_grace_fires_whatever_the_policy(policy: MisfirePolicy) -> None:
    planned = plan(policy, last=T0, now=T0 + timedelta(seconds=1.3))
    assert planned is not None
    assert planned.fires == [(T0 + timedelta(seconds=1), False, 1)]
    assert planned.skipped == 0
    assert planned.last_due_at == T0 + timedelta(seconds=1)
    assert planned.next_due_at == T0 + timedelta(seconds=2)


def test_skip_fires_only_the_due_times_still_within_the_grace() -> None:
    planned = plan(MisfirePolicy.SKIP, last=T0, now=T0 + timedelta(seconds=10.5))
    assert planned is not None
    assert planned.fires == [(T0 + timedelta(seconds=10), False, 1)]
    assert planned.skipped == 9
    assert planned.last_due_at == T0 + timedelta(seconds=10)


def test_run_once_fires_one_late_robot_for_all_missed_due_times() -> None:
    planned = plan(MisfirePolicy.RUN_ONCE, last=T0, now=T0 + timedelta(seconds=10.5))
    assert planned is not None
    assert planned.fires == [(T0 + timedelta(seconds=9), True, 9),
                             (T0 + timedelta(seconds=10), False, 1)]
    assert planned.skipped == 0


def test_run_all_fires_each_missed_due_time_up_to_the_limit_latest_first() -> None:
    planned = plan(MisfirePolicy.RUN_ALL, last=T0, now=T0 + timedelta(seconds=10.5), limit=4)
    assert planned is not None
    assert planned.fires == [(T0 + timedelta(seconds=s), True, 1) for s in (6, 7, 8, 9)] + \
        [(T0 + timedelta(seconds=10), False, 1)]
    assert planned.skipped == 5


def test_a_late_scheduler_with_nothing_on_time_still_decides_the_whole_interval() -> None:
    planned = plan(MisfirePolicy.SKIP, last=T0, now=T0 + timedelta(seconds=3.5), grace=0.2)
    assert planned is not None
    assert planned.fires == []
    assert planned.skipped == 3
    assert planned.last_due_at == T0 + timedelta(seconds=3)


def test_a_very_long_outage_is_walked_only_up_to_the_count_cap() -> None:
    planned = plan(MisfirePolicy.SKIP, last=T0, now=T0 + timedelta(days=1))
    assert planned is not None
    assert planned.truncated
    assert planned.skipped == COUNT_CAP - 2  # two due times (now and 1 s ago) are on time
    assert planned.last_due_at == T0 + timedelta(days=1)


# -- chains ----------------------------------------------------------------------------------


def parent(**changes: object) -> Robot:
    fields: dict[str, object] = {"id": "p-1", "kind": "ocr", "payload": {}, "owner": "o",
                                 "tenant": "t", "status": RobotStatus.RUNNING}
    fields.update(changes)
    return Robot(**fields)  # type: ignore[arg-type]


def test_templates_replace_whole_strings_only_and_leave_the_rest() -> None:
    template = {
        "source": "$parent.id", "everything": "$parent.result", "text": "$parent.result.doc.text",
        "first": "$parent.result.pages.0", "missing": "$parent.result.nope.deeper",
        "why": "$parent.error", "literal": "$$parent.id", "inline": "id: $parent.id",
        "nested": [{"deep": "$parent.result.doc"}], "number": 3,
    }
    rendered = render_payload(template, "p-1", {"doc": {"text": "hi"}, "pages": [7, 8]}, None)
    assert rendered == {
        "source": "p-1", "everything": {"doc": {"text": "hi"}, "pages": [7, 8]},
        "text": "hi", "first": 7, "missing": None, "why": None, "literal": "$parent.id",
        "inline": "id: $parent.id", "nested": [{"deep": {"text": "hi"}}], "number": 3,
    }


def test_a_failure_template_sees_the_error_and_no_result() -> None:
    rendered = render_payload({"e": "$parent.error", "r": "$parent.result"}, "p-1", None,
                              ErrorInfo("ValueError", "boom"))
    assert rendered == {"e": {"type": "ValueError", "message": "boom"}, "r": None}


def test_which_follow_up_an_end_status_starts() -> None:
    ok, ko = FollowUp("notify", {}), FollowUp("alert", {})
    robot = parent(on_success=ok, on_failure=ko)
    assert followup_for(robot, RobotStatus.SUCCEEDED) == ("on_success", ok)
    assert followup_for(robot, RobotStatus.FAILED) == ("on_failure", ko)
    assert followup_for(robot, RobotStatus.TIMED_OUT) == ("on_failure", ko)
    assert followup_for(robot, RobotStatus.CANCELLED) is None
    assert followup_for(parent(), RobotStatus.SUCCEEDED) is None


def test_follow_ups_are_checked_like_submissions_with_their_own_paths() -> None:
    limits = PayloadLimits()
    assert parse_followup({"kind": "ocr"}, {"ocr"}, limits, path="$.on_success") == \
        FollowUp("ocr", {})
    for value, path in (({"kind": "nope"}, "$.on_success.kind"),
                        ({"kind": "ocr", "payload": []}, "$.on_success.payload"),
                        ({"kind": "ocr", "extra": 1}, "$.on_success.extra"),
                        ("ocr", "$.on_success")):
        with pytest.raises(ValidationError) as caught:
            parse_followup(value, {"ocr"}, limits, path="$.on_success")
        assert caught.value.path == path


# -- run_at ----------------------------------------------------------------------------------


def test_run_at_takes_aware_datetimes_and_iso_text_with_an_offset() -> None:
    now = T0
    assert validate_run_at(None, now) is None
    assert validate_run_at(T0 + timedelta(hours=1), now) == T0 + timedelta(hours=1)
    assert validate_run_at("2030-01-01T14:00:00+01:00", now) == T0 + timedelta(hours=1)
    assert validate_run_at("2030-01-01T13:00:00Z", now) == T0 + timedelta(hours=1)
    assert validate_run_at("2020-01-01T00:00:00Z", now) == datetime(2020, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("value", [datetime(2030, 1, 1, 13), "2030-01-01T13:00:00", "soon",
                                   1893499200, "2032-01-01T00:00:00Z"])
def test_run_at_refuses_naive_times_other_types_and_more_than_a_year(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_run_at(value, T0)
    assert caught.value.path == "$.run_at"
