"""Specification of how traffic moves between modules as their latency changes.

Deterministic: a seeded random, synthetic durations and a fake clock drive
``ModuleStats`` and ``LoadBalancer`` directly; nothing here depends on the wall clock.
A "round" is what happens between two refreshes of the scored candidates
(``RFMVP_CACHE_TTL_MODULE_CHOICE``): robots are assigned, and each finishes with the
duration its module has now.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from robotframework_mvp import module
from robotframework_mvp.balancing import (
    MODULE_WINDOW,
    Candidate,
    LoadBalancer,
    ModuleStats,
    score_module,
    weighted_choice,
)
from robotframework_mvp.performance import PerformanceTracker

FAST_MS, SLOW_MS = 20.0, 2000.0
ROUND = 400  # robots per candidate refresh


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _fleet(names: Sequence[str], min_share: float = 0.05, seed: int = 7
           ) -> tuple[LoadBalancer, dict[str, ModuleStats], Clock]:
    modules = {}
    for name in names:
        @module(name, kinds=["ocr"], capacity=1000)
        async def process(robot: object, ctx: object) -> dict[str, object]:
            return {}
        modules[name] = process
    stats = {name: ModuleStats(health="healthy") for name in names}
    clock = Clock()
    balancer = LoadBalancer(modules, stats, PerformanceTracker(tracer=None),
                            lambda kind, candidates: None, refresh_seconds=1.0,
                            min_share=min_share, rng=random.Random(seed), clock=clock)
    return balancer, stats, clock


def _round(balancer: LoadBalancer, stats: dict[str, ModuleStats], clock: Clock,
           latency: dict[str, float], robots: int = ROUND) -> dict[str, float]:
    """One refresh interval: assign ``robots``, then record each one's outcome."""
    chosen = Counter(balancer.select("ocr") for _ in range(robots))
    for name, n in chosen.items():
        for _ in range(n):
            stats[name].record(True, latency[name])
    clock.now += 1.0  # the next select() rescoring: one candidate refresh later
    return {name: chosen[name] / robots for name in stats}


def _warm(balancer: LoadBalancer, stats: dict[str, ModuleStats], clock: Clock) -> None:
    for _ in range(3):
        _round(balancer, stats, clock, {name: FAST_MS for name in stats})


def test_two_equal_modules_share_the_work_evenly() -> None:
    balancer, stats, clock = _fleet(["a", "b"])
    _warm(balancer, stats, clock)
    share = _round(balancer, stats, clock, {"a": FAST_MS, "b": FAST_MS})
    assert 0.4 < share["b"] < 0.6


def test_the_share_moves_away_within_one_refresh_after_a_module_turns_slow() -> None:
    balancer, stats, clock = _fleet(["a", "b"])
    _warm(balancer, stats, clock)
    slow = {"a": FAST_MS, "b": SLOW_MS}
    # The round in which b turns slow still uses the candidates scored before it.
    turning = _round(balancer, stats, clock, slow)
    assert turning["b"] > 0.4
    # One refresh later, b's recorded slowness has moved most of the traffic to a.
    after = _round(balancer, stats, clock, slow)
    assert after["b"] < 0.1
    assert after["a"] > 0.9


def test_a_slow_module_keeps_a_minimum_share_and_is_never_starved() -> None:
    balancer, stats, clock = _fleet(["a", "b"], min_share=0.05)
    _warm(balancer, stats, clock)
    slow = {"a": FAST_MS, "b": 60_000.0}
    before = stats["b"].samples
    shares = [_round(balancer, stats, clock, slow)["b"] for _ in range(10)]
    # Its score is far below 5 % of a's, so the floor is what it gets: about 0.05 / 1.05.
    assert all(0.02 < share < 0.09 for share in shares[1:]), shares
    assert stats["b"].samples - before > 10 * 0.02 * ROUND  # robots in every round


def test_the_share_comes_back_after_the_module_recovers() -> None:
    balancer, stats, clock = _fleet(["a", "b"])
    _warm(balancer, stats, clock)
    for _ in range(3):
        _round(balancer, stats, clock, {"a": FAST_MS, "b": SLOW_MS})
    assert _round(balancer, stats, clock, {"a": FAST_MS, "b": SLOW_MS})["b"] < 0.1
    recovered = {"a": FAST_MS, "b": FAST_MS}
    shares = [_round(balancer, stats, clock, recovered)["b"] for _ in range(8)]
    # The latency EWMA forgets first (part of the share is back a refresh later); the
    # p95 follows once the slow samples have left b's window of MODULE_WINDOW samples,
    # which its minimum share refills within a few refreshes.
    assert shares[1] > 1.5 * shares[0], shares
    assert all(0.4 < share < 0.6 for share in shares[4:]), shares
    assert stats["b"].latency_p95_ms == FAST_MS


def test_a_burst_spreads_over_the_modules_instead_of_herding_onto_the_best() -> None:
    balancer, stats, clock = _fleet(["a", "b", "c"])
    _warm(balancer, stats, clock)
    stats["a"].record(True, 5.0)  # a is now slightly the best
    clock.now += 1.0
    burst = Counter(balancer.select("ocr") for _ in range(3000))  # all within one refresh
    assert set(burst) == {"a", "b", "c"}
    assert max(burst.values()) < 0.4 * 3000


def test_the_p95_lowers_the_score_of_a_module_with_a_slow_tail() -> None:
    steady, tail = ModuleStats(health="healthy"), ModuleStats(health="healthy")
    for i in range(MODULE_WINDOW):
        steady.record(True, 50.0)
        tail.record(True, 2000.0 if i % 10 == 0 else 30.0)  # one in ten is very slow
    assert tail.latency_p95_ms == 2000.0
    assert steady.latency_p95_ms == 50.0

    def score(st: ModuleStats) -> float:
        return score_module(health="healthy", circuit_state="closed",
                            success_rate=st.success_rate, latency_ewma_ms=st.latency_ewma_ms,
                            load=0, capacity=10, latency_p95_ms=st.latency_p95_ms)

    assert score(tail) < score(steady)


def test_the_module_window_is_bounded() -> None:
    stats = ModuleStats()
    for i in range(10 * MODULE_WINDOW):
        stats.record(i % 2 == 0, float(i))
    assert stats.window.window_count == MODULE_WINDOW
    assert stats.samples == 10 * MODULE_WINDOW


@pytest.mark.parametrize("min_share", [0.05, 0.2])
def test_min_share_floors_each_weight_at_a_share_of_the_best(min_share: float) -> None:
    def candidate(name: str, score: float) -> Candidate:
        return Candidate(name=name, score=score, load=0, capacity=1, health="healthy",
                         circuit_state="closed", success_rate=1.0, latency_ewma_ms=None)

    rng = random.Random(3)
    picks = Counter(weighted_choice([candidate("best", 1.0), candidate("bad", 1e-6)], rng,
                                    min_share) for _ in range(20_000))
    expected = min_share / (1 + min_share)
    assert picks["bad"] / 20_000 == pytest.approx(expected, rel=0.15)


def test_a_select_module_hook_still_overrides_the_strategy() -> None:
    balancer, stats, _ = _fleet(["a", "b"])
    balancer.select_hook = lambda kind, candidates: "b"
    stats["b"].record(True, 60_000.0)
    assert {balancer.select("ocr") for _ in range(50)} == {"b"}
