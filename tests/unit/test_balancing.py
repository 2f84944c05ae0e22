"""Specification of module selection: scores, skipping broken modules, weighted choice."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Sequence

import pytest

from robotframework_mvp import ValidationError, module
from robotframework_mvp.balancing import (
    Candidate,
    LoadBalancer,
    ModuleStats,
    score_module,
    weighted_choice,
)
from robotframework_mvp.models import ModuleRecord
from robotframework_mvp.performance import PerformanceTracker


def _score(**changes: object) -> float:
    args: dict[str, object] = {"health": "healthy", "circuit_state": "closed",
                               "success_rate": 1.0, "latency_ewma_ms": 10.0, "load": 0,
                               "capacity": 10}
    args.update(changes)
    return score_module(**args)  # type: ignore[arg-type]


def _balancer(
    stats: dict[str, ModuleStats],
    hook: object = None,
) -> LoadBalancer:
    modules = {}
    for name in stats:
        @module(name, kinds=["work"], capacity=4)
        async def process(robot: object, ctx: object) -> dict[str, object]:
            return {}
        modules[name] = process

    def select_hook(kind: str, candidates: Sequence[Candidate]) -> str | None:
        return hook(kind, candidates) if callable(hook) else None

    return LoadBalancer(modules, stats, PerformanceTracker(), select_hook)


def _candidate(name: str, score: float) -> Candidate:
    return Candidate(name=name, score=score, load=0, capacity=1, health="healthy",
                     circuit_state="closed", success_rate=1.0, latency_ewma_ms=None)


# -- score_module ------------------------------------------------------------------------


def test_an_open_circuit_scores_zero_however_good_the_module_is() -> None:
    assert _score(circuit_state="open") == 0.0
    assert _score(circuit_state="open", latency_ewma_ms=0.0, success_rate=1.0) == 0.0


def test_an_unhealthy_module_scores_zero() -> None:
    assert _score(health="unhealthy") == 0.0


def test_scores_stay_between_0_and_1() -> None:
    for health in ("healthy", "unknown", "degraded", "unhealthy", "weird"):
        for circuit in ("closed", "half_open", "open"):
            for load in (0, 5, 10, 20):
                s = _score(health=health, circuit_state=circuit, load=load,
                           latency_ewma_ms=None, success_rate=1.0)
                assert 0.0 <= s <= 1.0


def test_the_score_falls_as_latency_rises() -> None:
    scores = [_score(latency_ewma_ms=ms) for ms in (0.0, 1.0, 50.0, 200.0, 1_000.0, 60_000.0)]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert scores[-1] > 0.0  # slow is not dead: it still gets a little traffic


def test_the_score_falls_as_load_rises() -> None:
    scores = [_score(load=load, capacity=10) for load in range(0, 10)]
    assert all(a > b for a, b in itertools.pairwise(scores))
    assert _score(load=10, capacity=10) > 0.0


def test_the_score_falls_with_the_success_rate_and_worse_health() -> None:
    assert _score(success_rate=1.0) > _score(success_rate=0.5) > _score(success_rate=0.0)
    assert _score(health="healthy") > _score(health="unknown") > _score(health="degraded")
    assert _score(circuit_state="closed") > _score(circuit_state="half_open") > 0.0


# -- weighted_choice ---------------------------------------------------------------------


def test_weighted_choice_follows_the_scores() -> None:
    candidates = [_candidate("a", 0.6), _candidate("b", 0.3), _candidate("c", 0.1)]
    rng = random.Random(20240501)
    picks = Counter(weighted_choice(candidates, rng) for _ in range(10_000))
    for name, expected in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(picks[name] / 10_000 - expected) <= 0.03, picks


def test_a_zero_score_candidate_is_never_chosen_while_others_score() -> None:
    candidates = [_candidate("dead", 0.0), _candidate("alive", 0.01)]
    rng = random.Random(7)
    assert {weighted_choice(candidates, rng) for _ in range(2_000)} == {"alive"}


def test_weighted_choice_is_uniform_when_every_score_is_zero() -> None:
    candidates = [_candidate("a", 0.0), _candidate("b", 0.0)]
    rng = random.Random(11)
    picks = Counter(weighted_choice(candidates, rng) for _ in range(10_000))
    assert abs(picks["a"] / 10_000 - 0.5) <= 0.03, picks


# -- LoadBalancer.select -----------------------------------------------------------------


@pytest.mark.parametrize(
    "broken", [ModuleStats(circuit_state="open"), ModuleStats(health="unhealthy")]
)
def test_an_open_circuit_or_unhealthy_module_is_skipped_while_another_is_available(
    broken: ModuleStats,
) -> None:
    balancer = _balancer({"broken": broken, "fine": ModuleStats(health="degraded",
                                                               latency_ewma_ms=5_000.0)})
    assert {balancer.select("work") for _ in range(200)} == {"fine"}


def test_when_every_module_is_broken_the_best_one_is_still_chosen() -> None:
    balancer = _balancer({"open": ModuleStats(circuit_state="open"),
                          "sick": ModuleStats(health="unhealthy")})
    assert balancer.select("work") in {"open", "sick"}


def test_the_select_hook_decides_among_available_modules() -> None:
    seen: list[list[str]] = []

    def hook(kind: str, candidates: Sequence[Candidate]) -> str:
        seen.append(sorted(c.name for c in candidates))
        return "b"

    balancer = _balancer({"a": ModuleStats(), "b": ModuleStats(),
                          "c": ModuleStats(circuit_state="open")}, hook)
    assert {balancer.select("work") for _ in range(50)} == {"b"}
    assert seen
    assert all(names == ["a", "b"] for names in seen)


def test_a_hook_answer_that_is_not_an_available_candidate_is_ignored() -> None:
    balancer = _balancer({"a": ModuleStats(), "b": ModuleStats(),
                          "c": ModuleStats(circuit_state="open")}, lambda k, c: "c")
    assert {balancer.select("work") for _ in range(200)} <= {"a", "b"}


def test_modules_recorded_by_other_processes_are_candidates_too() -> None:
    balancer = _balancer({"local": ModuleStats(circuit_state="open")})
    balancer.set_remote_records([ModuleRecord(name="remote", kinds=("work", "other"),
                                              capacity=3, health="healthy", score=0.9)])
    assert balancer.select("work") == "remote"
    assert balancer.select("other") == "remote"
    assert {"work", "other"} <= balancer.known_kinds()


def test_an_unknown_kind_is_a_validation_error_at_kind() -> None:
    balancer = _balancer({"a": ModuleStats()})
    with pytest.raises(ValidationError) as caught:
        balancer.select("nobody-does-this")
    assert caught.value.path == "$.kind"
    assert caught.value.status == 422
