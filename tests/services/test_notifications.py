"""Notifications reach a real HTTP receiver (which checks the signature) and a real SMTP
server, retried while failures are transient, and never slow a robot down."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest

from robotframework_mvp import (
    ConfigError,
    ModuleContext,
    Orchestrator,
    PermanentError,
    Robot,
    RobotStatus,
    hookimpl,
    module,
)
from robotframework_mvp.services.notifications import (
    DeliveryRecord,
    Notification,
    NotificationService,
    NotifyConfig,
    SmtpChannel,
    Subscription,
    WebhookChannel,
    verify_signature,
)
from robotframework_mvp.services.notifications.config import ENV_VARIABLES, load_from_env
from robotframework_mvp.testing import TEST_API_KEY, running_orchestrator, test_settings

pytestmark = pytest.mark.anyio

# The receiver and the SMTP server are fixtures of conftest.py (see their docstrings).
WebhookReceiver = Any
SmtpServer = Any
Receiver = Callable[..., AbstractAsyncContextManager[WebhookReceiver]]

FAST = NotifyConfig(retry_base_seconds=0.01, retry_cap_seconds=0.05, timeout=5.0,
                    max_attempts=3, shutdown_grace_seconds=3.0)


@module("work", kinds=["ocr.page", "report.daily"])
async def work(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Succeeds with a small result."""
    return {"pages": 1, "kind": robot.kind}


@module("broken", kinds=["flaky"])
async def broken(robot: Robot, ctx: ModuleContext) -> dict[str, Any]:
    """Fails at once."""
    raise PermanentError("the input cannot be read")


@attrs.define(eq=False)
class RecordingChannel:
    """A channel of another plugin: remembers what it was sent."""

    name: str
    sent: list[Notification] = attrs.field(factory=list)

    async def send(self, notification: Notification) -> None:
        self.sent.append(notification)


@asynccontextmanager
async def orchestrator(service: NotificationService, *plugins: object
                       ) -> AsyncIterator[Orchestrator]:
    async with running_orchestrator(work, broken, plugins=[service, *plugins]) as orch:
        yield orch


async def run(orch: Orchestrator, kind: str) -> Robot:
    robot = await orch.process_robot(kind, {}, api_key=TEST_API_KEY, timeout=10)
    assert robot.is_terminal
    return robot


async def settled(service: NotificationService, count: int = 1, timeout: float = 10.0
                  ) -> list[DeliveryRecord]:
    """The delivery log once ``count`` deliveries have ended."""
    with anyio.fail_after(timeout):
        while True:
            done = [r for r in service.deliveries() if r.state != "pending"]
            if len(done) >= count:
                return done
            await anyio.sleep(0.01)


async def in_flight(service: NotificationService, timeout: float = 5.0) -> None:
    """Until a delivery is under way (the delivery task updates the counter)."""
    with anyio.fail_after(timeout):
        while service.stats()["in_flight"] == 0:  # noqa: ASYNC110 - a counter, not an event
            await anyio.sleep(0.01)


def webhook(receiver: WebhookReceiver, **subscription: Any) -> Subscription:
    return Subscription(channel=WebhookChannel(receiver.url, receiver.secret), **subscription)


# -- webhooks --------------------------------------------------------------------------


async def test_a_finished_robot_is_posted_as_signed_json(webhook_receiver: Receiver) -> None:
    async with webhook_receiver() as receiver:
        service = NotificationService([webhook(receiver, kinds=("ocr*",))], config=FAST)
        async with orchestrator(service) as orch:
            robot = await run(orch, "ocr.page")
            (record,) = await settled(service)
        (request,) = receiver.received
    assert request.verified
    assert request.status == 200
    assert verify_signature(receiver.secret, request.body,
                            request.headers["x-rfmvp-timestamp"],
                            request.headers["x-rfmvp-signature"])
    body = json.loads(request.body)
    assert body["event"] == "robot.finished"
    assert body["robot"]["id"] == robot.id
    assert body["robot"]["kind"] == "ocr.page"
    assert body["robot"]["status"] == "succeeded"
    assert body["robot"]["result"] == {"pages": 1, "kind": "ocr.page"}
    assert "payload" not in body["robot"]
    assert request.headers["x-rfmvp-delivery"] == body["id"] == record.id
    assert request.headers["x-rfmvp-event"] == "robot.finished"
    assert record.state == "delivered"
    assert len(record.attempts) == 1
    assert record.attempts[0].ok
    assert service.stats()["delivered"] == 1


async def test_a_receiver_failing_twice_with_503_gets_it_once_after_three_attempts(
    webhook_receiver: Receiver,
) -> None:
    async with webhook_receiver() as receiver:
        receiver.statuses = [503, 503]
        service = NotificationService([webhook(receiver)], config=FAST)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            (record,) = await settled(service)
    assert [r.status for r in receiver.received] == [503, 503, 200]
    assert len(receiver.accepted) == 1
    assert record.state == "delivered"
    assert [a.error for a in record.attempts] == ["HTTP 503", "HTTP 503", None]
    assert [a.number for a in record.attempts] == [1, 2, 3]
    assert service.stats()["retries"] == 2
    # Every attempt carries the same delivery id: the receiver can deduplicate on it.
    assert len({r.headers["x-rfmvp-delivery"] for r in receiver.received}) == 1


async def test_a_400_answer_is_not_retried(webhook_receiver: Receiver) -> None:
    async with webhook_receiver() as receiver:
        receiver.statuses = [400]
        service = NotificationService([webhook(receiver)], config=FAST)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            (record,) = await settled(service)
            await anyio.sleep(0.3)  # time enough for retries, were there any
    assert [r.status for r in receiver.received] == [400]
    assert record.state == "failed"
    assert record.error == "HTTP 400"
    assert len(record.attempts) == 1


async def test_a_429_answer_is_retried(webhook_receiver: Receiver) -> None:
    async with webhook_receiver() as receiver:
        receiver.statuses = [429]
        service = NotificationService([webhook(receiver)], config=FAST)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            (record,) = await settled(service)
    assert [r.status for r in receiver.received] == [429, 200]
    assert record.state == "delivered"


async def test_a_wrong_secret_is_refused_by_the_receiver_and_not_retried(
    webhook_receiver: Receiver,
) -> None:
    async with webhook_receiver() as receiver:
        wrong = Subscription(channel=WebhookChannel(receiver.url, "not-the-shared-secret"))
        service = NotificationService([wrong], config=FAST)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            (record,) = await settled(service)
    (request,) = receiver.received
    assert not request.verified
    assert request.status == 401
    assert record.state == "failed"
    assert len(record.attempts) == 1


async def test_an_unreachable_webhook_is_retried_until_the_attempts_run_out(
    free_port: Callable[[], int],
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/hook"
    service = NotificationService([Subscription(channel=WebhookChannel(closed, "s3cret"))],
                                  config=FAST)
    async with orchestrator(service) as orch:
        await run(orch, "report.daily")
        (record,) = await settled(service)
    assert record.state == "failed"
    assert len(record.attempts) == FAST.max_attempts
    assert all("ConnectError" in (a.error or "") for a in record.attempts)


# -- e-mail ----------------------------------------------------------------------------


async def test_a_failed_robot_is_mailed_through_a_real_smtp_server(
    smtp_server: SmtpServer,
) -> None:
    channel = SmtpChannel(smtp_server.host, smtp_server.port, sender="robots@acme.test",
                          recipients=["ops@acme.test", "lead@acme.test"], security="none")
    service = NotificationService(
        [Subscription(channel=channel, statuses=("failed", "timed_out"))], config=FAST)
    async with orchestrator(service) as orch:
        robot = await run(orch, "flaky")
        (record,) = await settled(service)
    await smtp_server.wait_for(1)
    (message,) = smtp_server.messages
    assert record.state == "delivered"
    assert smtp_server.envelopes == [("robots@acme.test", ["ops@acme.test", "lead@acme.test"])]
    subject = str(message["Subject"])
    assert robot.id in subject
    assert "flaky" in subject
    assert "failed" in subject
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    text = body.get_content()
    assert f"Robot:    {robot.id}" in text
    assert "Status:   failed" in text
    assert "the input cannot be read" in text
    assert message["X-RFMVP-Delivery"] == record.id


async def test_an_smtp_server_that_is_down_is_retried_then_fails(
    free_port: Callable[[], int],
) -> None:
    channel = SmtpChannel("127.0.0.1", free_port(), sender="robots@acme.test",
                          recipients=["ops@acme.test"], security="none", timeout=2)
    service = NotificationService([Subscription(channel=channel)], config=FAST)
    async with orchestrator(service) as orch:
        await run(orch, "flaky")
        (record,) = await settled(service)
    assert record.state == "failed"
    assert len(record.attempts) == FAST.max_attempts


async def test_starttls_asked_of_a_server_without_it_fails_at_once(
    smtp_server: SmtpServer,
) -> None:
    channel = SmtpChannel(smtp_server.host, smtp_server.port, sender="robots@acme.test",
                          recipients=["ops@acme.test"], security="starttls")
    service = NotificationService([Subscription(channel=channel)], config=FAST)
    async with orchestrator(service) as orch:
        await run(orch, "flaky")
        (record,) = await settled(service)
    assert record.state == "failed"
    assert len(record.attempts) == 1
    assert record.error is not None
    assert "STARTTLS" in record.error
    assert smtp_server.messages == []


# -- subscriptions and channels --------------------------------------------------------


class Channels:
    """A third-party plugin contributing two channels through the hook."""

    def __init__(self) -> None:
        self.ocr = RecordingChannel("ocr-team")
        self.oncall = RecordingChannel("on-call")

    @hookimpl
    def notification_channels(self, settings: object) -> Sequence[RecordingChannel]:
        return [self.ocr, self.oncall]


async def test_subscriptions_pick_robots_by_kind_pattern_and_status() -> None:
    channels = Channels()
    service = NotificationService([
        Subscription(channel="ocr-team", kinds=("ocr*",), statuses=("succeeded",)),
        Subscription(channel="on-call", kinds=("*",), statuses=("failed", "timed_out")),
    ], config=FAST)
    async with orchestrator(service, channels) as orch:
        ocr = await run(orch, "ocr.page")
        await run(orch, "report.daily")  # succeeded, not ocr*: nobody is told
        failed = await run(orch, "flaky")
        await settled(service, 2)
        await anyio.sleep(0.1)
    assert [(n.robot.id, n.robot.status) for n in channels.ocr.sent] == [
        (ocr.id, RobotStatus.SUCCEEDED)]
    assert [(n.robot.id, n.robot.status) for n in channels.oncall.sent] == [
        (failed.id, RobotStatus.FAILED)]
    assert service.stats()["enqueued"] == 2


async def test_a_queued_subscription_is_told_when_a_robot_is_created() -> None:
    seen = RecordingChannel("created")
    service = NotificationService(
        [Subscription(channel="created", kinds=("report.*",), statuses=("queued",))],
        config=FAST, channels=[seen])
    async with orchestrator(service) as orch:
        robot = await run(orch, "report.daily")
        await settled(service)
    (notification,) = seen.sent
    assert notification.event == "robot.created"
    assert notification.robot.id == robot.id


async def test_a_subscription_naming_an_unknown_channel_fails_startup() -> None:
    service = NotificationService([Subscription(channel="pager")], config=FAST)
    # The orchestrator may report it inside an exception group (its task group's).
    with pytest.RaisesGroup(pytest.RaisesExc(ConfigError, match="pager"),
                            allow_unwrapped=True, flatten_subgroups=True):
        async with orchestrator(service):
            pass


def test_a_subscription_refuses_a_status_that_is_never_notified() -> None:
    with pytest.raises(ConfigError, match="running"):
        Subscription(channel="log", statuses=("running",))


# -- never in the way ------------------------------------------------------------------


async def test_a_slow_receiver_does_not_slow_the_robot_down(webhook_receiver: Receiver) -> None:
    async with webhook_receiver() as receiver:
        receiver.gate = anyio.Event()  # the receiver holds every request until set
        service = NotificationService([webhook(receiver)], config=FAST)
        async with orchestrator(service) as orch:
            with anyio.fail_after(3):
                robot = await run(orch, "report.daily")
            stored = await orch.get(robot.id, api_key=TEST_API_KEY)
            assert stored.status == RobotStatus.SUCCEEDED
            await in_flight(service)
            # The robot is finished, and its notification is still blocked in the receiver.
            assert receiver.received == []
            assert service.deliveries()[0].state == "pending"
            receiver.gate.set()
            (record,) = await settled(service)
    assert record.state == "delivered"
    assert len(receiver.accepted) == 1


async def test_shutdown_delivers_an_interrupted_notification_again(
    webhook_receiver: Receiver,
) -> None:
    async with webhook_receiver() as receiver, anyio.create_task_group() as tg:
        receiver.gate = anyio.Event()
        service = NotificationService([webhook(receiver)], config=FAST)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            await in_flight(service)

            async def open_the_gate_soon() -> None:
                await anyio.sleep(0.3)
                assert receiver.gate is not None
                receiver.gate.set()

            tg.start_soon(open_the_gate_soon)
        # Leaving the orchestrator cancelled the first attempt; on_shutdown tried again.
        (record,) = service.deliveries()
        assert record.state == "delivered"
        await receiver.wait_for(1)
    assert {r.headers["x-rfmvp-delivery"] for r in receiver.received} == {record.id}


async def test_what_is_undelivered_when_the_grace_period_ends_is_abandoned(
    webhook_receiver: Receiver,
) -> None:
    async with webhook_receiver() as receiver:
        receiver.gate = anyio.Event()  # never set: the receiver never answers in time
        config = attrs.evolve(FAST, shutdown_grace_seconds=0.3)
        service = NotificationService([webhook(receiver)], config=config)
        async with orchestrator(service) as orch:
            await run(orch, "report.daily")
            await in_flight(service)
        (record,) = service.deliveries()
    assert record.state == "abandoned"
    assert service.stats()["abandoned"] == 1


async def test_a_full_queue_drops_and_counts_instead_of_blocking(
    webhook_receiver: Receiver,
) -> None:
    async with webhook_receiver() as receiver:
        receiver.gate = anyio.Event()
        config = attrs.evolve(FAST, queue_size=1, concurrency=1, shutdown_grace_seconds=5.0)
        service = NotificationService([webhook(receiver)], config=config)
        async with orchestrator(service) as orch:
            for _ in range(4):
                await run(orch, "report.daily")
                await anyio.sleep(0.05)  # the first is taken out of the queue at once
            assert service.stats()["dropped"] == 2
            receiver.gate.set()
            await settled(service, 4)
    states = sorted(r.state for r in service.deliveries())
    assert states == ["delivered", "delivered", "dropped", "dropped"]


# -- configuration ---------------------------------------------------------------------


def test_subscriptions_and_delivery_settings_come_from_the_environment(tmp_path: Path) -> None:
    subscriptions = tmp_path / "subscriptions.json"
    subscriptions.write_text(json.dumps([
        {"name": "ocr", "kinds": ["ocr*"], "statuses": ["succeeded", "failed"],
         "webhook": "https://hooks.acme.test/rfmvp", "secret_env": "ACME_HOOK_SECRET"},
        {"kinds": ["*"], "statuses": ["failed"], "email": "ops@acme.test"},
        {"kinds": ["invoice*"], "channel": "log"},
    ]))
    config, subs = load_from_env({
        "RFMVP_NOTIFY_SUBSCRIPTIONS_FILE": str(subscriptions),
        "ACME_HOOK_SECRET": "whsec-from-the-environment",
        "RFMVP_NOTIFY_MAX_ATTEMPTS": "7", "RFMVP_NOTIFY_RETRY_BASE_SECONDS": "0.5",
        "RFMVP_NOTIFY_SMTP_HOST": "smtp.acme.test", "RFMVP_NOTIFY_SMTP_FROM": "r@acme.test",
        "RFMVP_NOTIFY_SMTP_PASSWORD": "smtp-password-123",
    })
    assert (config.max_attempts, config.retry_base_seconds) == (7, 0.5)
    hook, mail, logged = subs
    assert isinstance(hook.channel, WebhookChannel)
    assert hook.channel.url == "https://hooks.acme.test/rfmvp"
    assert (hook.name, hook.kinds, hook.statuses) == ("ocr", ("ocr*",), ("succeeded", "failed"))
    assert isinstance(mail.channel, SmtpChannel)
    assert (mail.channel.host, mail.channel.port) == ("smtp.acme.test", 587)
    assert mail.channel.recipients == ("ops@acme.test",)
    assert logged.channel == "log"
    shown = repr(subs)
    assert "whsec-from-the-environment" not in shown
    assert "smtp-password-123" not in shown


@pytest.mark.parametrize(("entry", "fragment"), [
    ({"webhook": "https://h.test/x", "secret_env": "NOT_SET_ANYWHERE"}, "NOT_SET_ANYWHERE"),
    ({"webhook": "https://h.test/x"}, "secret"),
    ({"webhook": "ftp://h.test/x", "secret": "s"}, "http"),
    ({"channel": "log", "kinds": ["*"], "statuse": ["failed"]}, "statuse"),
    ({"channel": "log", "statuses": ["running"]}, "running"),
    ({"kinds": ["*"]}, "exactly one of webhook, email or channel"),
    ({"email": ["ops@acme.test"]}, "RFMVP_NOTIFY_SMTP_HOST"),
])
def test_a_bad_subscription_fails_naming_where_it_is(entry: dict[str, Any], fragment: str
                                                     ) -> None:
    with pytest.raises(ConfigError, match=r"RFMVP_NOTIFY_SUBSCRIPTIONS\[0\]") as caught:
        load_from_env({"RFMVP_NOTIFY_SUBSCRIPTIONS": json.dumps([entry])})
    assert fragment in str(caught.value)


def test_notify_variables_do_not_trigger_the_unknown_setting_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from robotframework_mvp import Settings

    with caplog.at_level(logging.WARNING):
        Settings.from_env(env_file=None, environ={f"RFMVP_{n}": "1" for n in ENV_VARIABLES})
    assert "is not a setting" not in caplog.text


async def test_listing_the_plugin_in_rfmvp_plugins_builds_the_service_from_the_environment(
    webhook_receiver: Receiver, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)  # no stray .env file
    async with webhook_receiver() as receiver:
        monkeypatch.setenv("RFMVP_NOTIFY_SUBSCRIPTIONS", json.dumps(
            [{"kinds": ["report.*"], "webhook": receiver.url, "secret_env": "TEST_HOOK_SECRET"}]))
        monkeypatch.setenv("TEST_HOOK_SECRET", receiver.secret)
        settings = test_settings(f"sqlite:///{tmp_path / 'robots.db'}",
                                 plugins=("robotframework_mvp.services.notifications",))
        with caplog.at_level(logging.DEBUG):
            async with running_orchestrator(work, settings=settings) as orch:
                robot = await run(orch, "report.daily")
                await receiver.wait_for(1)
                services = [p for p in orch.pm.get_plugins()
                            if isinstance(p, NotificationService)]
                assert len(services) == 1
                (record,) = await settled(services[0])
    assert record.state == "delivered"
    (request,) = receiver.received
    assert request.verified
    assert json.loads(request.body)["robot"]["id"] == robot.id
    assert receiver.secret not in caplog.text


def test_verify_signature_refuses_tampered_bodies_and_old_timestamps() -> None:
    from robotframework_mvp.services.notifications import sign

    body, secret = b'{"robot":{"id":"r1"}}', "whsec-0123456789"
    signature = sign(secret, "1700000000", body)
    assert verify_signature(secret, body, "1700000000", signature, now=1700000100)
    assert not verify_signature(secret, body + b" ", "1700000000", signature, now=1700000100)
    assert not verify_signature(secret, body, "1700000001", signature, now=1700000100)
    assert not verify_signature("other", body, "1700000000", signature, now=1700000100)
    assert not verify_signature(secret, body, "1700000000", signature, now=1700000400)
    assert not verify_signature(secret, body, None, signature)
