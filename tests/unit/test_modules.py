"""Specification of the module API: ``@module``, health checks and ``Module.run``."""

from __future__ import annotations

import threading

import pytest

from robotframework_mvp import Module, ModuleContext, Robot, RobotStatus, ValidationError, module

pytestmark = pytest.mark.anyio


def _robot(payload: dict[str, object] | None = None) -> Robot:
    return Robot(id="r-1", kind="k", payload=payload or {}, owner="o", tenant="o",
                 status=RobotStatus.RUNNING, module="m", attempts=1)


def _ctx(reports: list[tuple[float, str | None]] | None = None) -> ModuleContext:
    async def report(percent: float, message: str | None) -> None:
        if reports is not None:
            reports.append((percent, message))

    return ModuleContext(robot_id="r-1", attempt=1, module="m", report=report)


# -- @module -----------------------------------------------------------------------------


def test_a_module_handles_the_kind_named_like_it_unless_told_otherwise() -> None:
    @module("ocr")
    async def ocr(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        """Read text from a scanned document.

        Longer explanation that is not part of the description.
        """
        return {}

    assert isinstance(ocr, Module)
    assert ocr.name == "ocr"
    assert ocr.kinds == ("ocr",)
    assert ocr.description == "Read text from a scanned document."
    assert ocr.is_async


def test_a_module_may_handle_several_kinds_with_its_own_limits() -> None:
    @module("mail", kinds=["mail.read", "mail.send"], capacity=2, timeout=5.0, max_attempts=7)
    def mail(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {}

    assert mail.kinds == ("mail.read", "mail.send")
    assert (mail.capacity, mail.timeout, mail.max_attempts) == (2, 5.0, 7)
    assert not mail.is_async


@pytest.mark.parametrize(
    ("name", "options", "mentions"),
    [
        ("", {}, "name"),
        ("m", {"kinds": []}, "kind"),
        ("m", {"kinds": ["ok", ""]}, "kind"),
        ("m", {"capacity": 0}, "capacity"),
        ("m", {"capacity": -3}, "capacity"),
        ("m", {"timeout": 0}, "timeout"),
        ("m", {"timeout": -1.5}, "timeout"),
        ("m", {"max_attempts": 0}, "max_attempts"),
    ],
)
def test_a_badly_declared_module_is_refused_at_declaration(
    name: str, options: dict[str, object], mentions: str
) -> None:
    with pytest.raises(ValidationError, match=mentions):
        module(name, **options)  # type: ignore[arg-type]


# -- health checks -----------------------------------------------------------------------


async def test_a_module_without_a_health_check_counts_as_healthy() -> None:
    @module("plain")
    async def plain(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {}

    assert await plain.check_health() is True


async def test_the_health_check_decorator_attaches_a_sync_check() -> None:
    @module("partner")
    async def partner(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {}

    up = False

    @partner.health_check
    def partner_is_up() -> bool:
        return up

    assert partner.health_func is partner_is_up
    assert await partner.check_health() is False
    up = True
    assert await partner.check_health() is True


async def test_the_health_check_decorator_attaches_an_async_check() -> None:
    @module("partner")
    async def partner(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {}

    @partner.health_check
    async def partner_is_up() -> bool:
        return False

    assert await partner.check_health() is False


async def test_a_health_check_may_be_given_to_the_decorator() -> None:
    @module("partner", health_check=lambda: 0)
    async def partner(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {}

    assert await partner.check_health() is False


# -- Module.run --------------------------------------------------------------------------


async def test_run_returns_what_an_async_module_returns() -> None:
    @module("echo")
    async def echo(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        await ctx.progress(50, "half way")
        return {"echo": robot.payload}

    reports: list[tuple[float, str | None]] = []
    assert await echo.run(_robot({"x": 1}), _ctx(reports)) == {"echo": {"x": 1}}
    assert reports == [(50.0, "half way")]


async def test_a_plain_function_runs_in_a_worker_thread() -> None:
    seen: list[int] = []

    @module("blocking")
    def blocking(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        seen.append(threading.get_ident())
        return {"ok": True}

    assert await blocking.run(_robot(), _ctx()) == {"ok": True}
    assert seen
    assert seen[0] != threading.get_ident()


async def test_a_module_whose_function_is_replaced_runs_the_new_one_the_way_it_needs(
) -> None:
    """``is_async`` is looked up once, so replacing ``func`` must look it up again: an
    ``async def`` put in place of a plain function is awaited, not sent to a thread."""
    seen: list[int] = []

    @module("swapped")
    def plain(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        seen.append(threading.get_ident())
        return {"how": "thread"}

    async def awaited(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        seen.append(threading.get_ident())
        return {"how": "loop"}

    plain.func = awaited
    assert plain.is_async
    assert await plain.run(_robot(), _ctx()) == {"how": "loop"}
    assert seen == [threading.get_ident()]


async def test_a_module_that_returns_nothing_has_an_empty_result() -> None:
    @module("quiet")
    async def quiet(robot: Robot, ctx: ModuleContext) -> None:
        return None

    assert await quiet.run(_robot(), _ctx()) == {}


@pytest.mark.parametrize("bad", [[1, 2], "done", 42, (("a", 1),)])
async def test_run_rejects_a_result_that_is_not_a_dict(bad: object) -> None:
    @module("sloppy")
    async def sloppy(robot: Robot, ctx: ModuleContext) -> object:
        return bad

    with pytest.raises(TypeError, match="sloppy"):
        await sloppy.run(_robot(), _ctx())


@pytest.mark.parametrize(("result", "problem"), [
    ({"text": "a\x00b"}, "a NUL character"),
    ({"k\x00": 1}, "a NUL character"),
    ({"n": [{"deep": "\x00"}]}, "a NUL character"),
    ({"text": "a\ud800b"}, "a lone surrogate"),
    ({"k\udfff": 1}, "a lone surrogate"),
    ({"n": [{"deep": "\udc80"}]}, "a lone surrogate"),
])
async def test_run_rejects_a_result_holding_what_no_store_keeps(
        result: dict[str, object], problem: str) -> None:
    @module("odd")
    async def odd(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return result

    with pytest.raises(TypeError, match=f"'odd' returned a result with {problem}"):
        await odd.run(_robot(), _ctx())


async def test_run_keeps_a_result_with_characters_beyond_the_basic_plane() -> None:
    @module("emoji")
    async def emoji(robot: Robot, ctx: ModuleContext) -> dict[str, object]:
        return {"mood": "😀 ünïcode"}

    assert await emoji.run(_robot(), _ctx()) == {"mood": "😀 ünïcode"}


async def test_run_rejects_a_non_dict_result_of_a_plain_function_too() -> None:
    @module("sloppy_sync")
    def sloppy_sync(robot: Robot, ctx: ModuleContext) -> object:
        return ["not", "a", "dict"]

    with pytest.raises(TypeError, match="must return a dict"):
        await sloppy_sync.run(_robot(), _ctx())


@pytest.mark.parametrize("percent", [-0.1, 100.5, 1000])
async def test_progress_outside_0_to_100_is_a_programming_error(percent: float) -> None:
    reports: list[tuple[float, str | None]] = []
    with pytest.raises(ValueError, match="between 0 and 100"):
        await _ctx(reports).progress(percent)
    assert reports == []
