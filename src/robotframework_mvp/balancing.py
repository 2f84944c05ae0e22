"""LoadBalancer: which module runs a new robot of a given kind.

Candidates are the modules registered in this process (with live statistics) plus the
modules other processes recorded in the store. Each gets a score from health, circuit
state, success rate, latency (EWMA and p95 over a fixed window) and free capacity; the
``select_module`` hook picks one (the built-in picks at random weighted by score, with a
floor of ``min_share`` of the best candidate's weight, so a slow module still sees a
little traffic and can prove it recovered, and no single module takes a thundering herd).
Scored candidates are reused for ``refresh_seconds``: a module that turns slow loses its
share at the next refresh after its slow runs are recorded.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence

import attrs

from .errors import ValidationError
from .models import ModuleRecord, utcnow
from .modules import Module
from .performance import OperationMetrics, PerformanceTracker

__all__ = ["Candidate", "LoadBalancer", "ModuleStats", "score_module", "weighted_choice"]

#: samples of a module's recent durations kept for its p95 (fixed memory: 9 bytes each)
MODULE_WINDOW = 100


@attrs.frozen
class Candidate:
    name: str
    score: float
    load: int
    capacity: int
    health: str
    circuit_state: str
    success_rate: float
    latency_ewma_ms: float | None
    latency_p95_ms: float | None = None


@attrs.define
class ModuleStats:
    """Live statistics of a module in this process.

    ``success_rate`` and ``latency_ewma_ms`` are EWMAs (``alpha``) of every attempt;
    ``window`` keeps the last ``MODULE_WINDOW`` durations (and failures) for
    ``latency_p95_ms`` and for anomaly detection (operation ``module.process:<name>``).
    """

    success_rate: float = 1.0
    latency_ewma_ms: float | None = None
    load: int = 0
    health: str = "unknown"
    circuit_state: str = "closed"
    alpha: float = 0.1
    window: OperationMetrics = attrs.field(
        factory=lambda: OperationMetrics("module.process", MODULE_WINDOW), repr=False,
        eq=False)

    def record(self, ok: bool, duration_ms: float) -> None:
        self.success_rate += self.alpha * ((1.0 if ok else 0.0) - self.success_rate)
        if self.latency_ewma_ms is None:
            self.latency_ewma_ms = duration_ms
        else:
            self.latency_ewma_ms += self.alpha * (duration_ms - self.latency_ewma_ms)
        self.window.record(duration_ms, error=not ok)

    @property
    def samples(self) -> int:
        """Attempts recorded in this process since it started."""
        return self.window.count

    @property
    def latency_p95_ms(self) -> float | None:
        """p95 of the last ``MODULE_WINDOW`` durations (None before the first)."""
        return self.window.stats().p95_ms if self.window.count else None


_HEALTH_WEIGHT = {"healthy": 1.0, "unknown": 0.8, "degraded": 0.3, "unhealthy": 0.0}


def score_module(
    *, health: str, circuit_state: str, success_rate: float, latency_ewma_ms: float | None,
    load: int, capacity: int, latency_p95_ms: float | None = None,
) -> float:
    """A score in [0, 1]; 0 means "do not send work here".

    The product of five weights: health, circuit (half-open 0.2), success rate (at least
    0.05), free capacity (at least 0.05) and latency ``1 / (1 + L / 100 ms)``, where L is
    the mean of the latency EWMA and the p95 when both are known (a module with a slow
    tail scores lower than one with the same average), else whichever is known.
    """
    if circuit_state == "open":
        return 0.0
    health_w = _HEALTH_WEIGHT.get(health, 0.5)
    known = [v for v in (latency_ewma_ms, latency_p95_ms) if v is not None]
    latency = sum(known) / len(known) if known else 0.0
    latency_w = 1.0 / (1.0 + latency / 100.0)
    capacity_w = max(0.05, 1.0 - load / max(capacity, 1))
    success_w = 0.05 + 0.95 * max(0.0, min(1.0, success_rate))
    half_open_w = 0.2 if circuit_state == "half_open" else 1.0
    return round(health_w * latency_w * capacity_w * success_w * half_open_w, 6)


def weighted_choice(
    candidates: Sequence[Candidate], rng: random.Random | None = None, min_share: float = 0.0,
) -> str:
    """Pick a candidate with probability proportional to its score (uniform if all 0).

    ``min_share`` (0-1) floors every weight at that fraction of the best score, so a
    module that scores far lower still gets some traffic and can show it recovered.
    """
    weights = [c.score for c in candidates]
    best = max(weights, default=0.0)
    if best <= 0:
        weights = [1.0] * len(candidates)
    elif min_share > 0:
        weights = [max(w, min_share * best) for w in weights]
    return (rng or random).choices(candidates, weights=weights, k=1)[0].name


class LoadBalancer:
    def __init__(
        self,
        local_modules: Mapping[str, Module],
        stats: Mapping[str, ModuleStats],
        tracker: PerformanceTracker,
        select_hook: Callable[[str, Sequence[Candidate]], str | None],
        refresh_seconds: float = 1.0,
        stale_after: float = float("inf"),
        *,
        min_share: float = 0.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        circuit_state: Callable[[str], str | None] | None = None,
    ) -> None:
        self.local_modules = local_modules
        self.stats = stats
        self.tracker = tracker
        self.select_hook = select_hook
        self.refresh_seconds = refresh_seconds
        self.stale_after = stale_after
        #: floor of every available candidate's weight, as a share of the best one's
        self.min_share = min_share
        self.rng = rng
        self.clock = clock
        #: a module's live circuit state (the per-module breakers, shared through Redis),
        #: which wins over ModuleStats.circuit_state and the stored records when not None
        self.circuit_state = circuit_state
        self._remote: dict[str, ModuleRecord] = {}
        self._remote_loaded_at = float("-inf")
        self._candidates: dict[str, tuple[float, list[Candidate]]] = {}

    def set_remote_records(self, records: Sequence[ModuleRecord]) -> None:
        """Module records from the store (other processes' modules)."""
        # A record no live process has refreshed for a long time belongs to a module that
        # is gone: sending it robots would leave them queued forever.
        now = utcnow()
        self._remote = {
            r.name: r for r in records
            if r.name not in self.local_modules and (
                r.updated_at is None
                or (now - r.updated_at).total_seconds() <= self.stale_after)
        }
        self._remote_loaded_at = self.clock()
        self._candidates.clear()

    def invalidate(self) -> None:
        """Drop the scored candidates now (a circuit changed): the next robot rescores."""
        self._candidates.clear()

    def remote_names(self) -> set[str]:
        """Modules of other processes that are candidates (fresh records)."""
        return set(self._remote)

    @property
    def remote_stale(self) -> bool:
        return self.clock() - self._remote_loaded_at > self.refresh_seconds

    def max_attempts(self, module: str) -> int | None:
        """The retry budget a remote module recorded (local modules are asked directly)."""
        record = self._remote.get(module)
        return None if record is None else record.max_attempts

    def known_kinds(self) -> set[str]:
        kinds = {k for m in self.local_modules.values() for k in m.kinds}
        kinds.update(k for r in self._remote.values() for k in r.kinds)
        return kinds

    def candidates(self, kind: str) -> list[Candidate]:
        """Every module for ``kind`` with its current score (cached for a moment)."""
        now = self.clock()
        cached = self._candidates.get(kind)
        if cached is not None and now - cached[0] < self.refresh_seconds:
            return cached[1]
        found: list[Candidate] = []
        for module in self.local_modules.values():
            if kind not in module.kinds:
                continue
            st = self.stats[module.name]
            p95 = st.latency_p95_ms
            circuit = (self.circuit_state and self.circuit_state(module.name)) \
                or st.circuit_state
            found.append(Candidate(
                name=module.name,
                score=score_module(
                    health=st.health, circuit_state=circuit,
                    success_rate=st.success_rate, latency_ewma_ms=st.latency_ewma_ms,
                    load=st.load, capacity=module.capacity, latency_p95_ms=p95,
                ),
                load=st.load, capacity=module.capacity, health=st.health,
                circuit_state=circuit, success_rate=st.success_rate,
                latency_ewma_ms=st.latency_ewma_ms, latency_p95_ms=p95,
            ))
        for record in self._remote.values():
            if kind not in record.kinds:
                continue
            circuit = (self.circuit_state and self.circuit_state(record.name)) \
                or record.circuit_state
            found.append(Candidate(
                name=record.name, score=0.0 if circuit == "open" else record.score,
                load=record.load, capacity=record.capacity, health=record.health,
                circuit_state=circuit, success_rate=record.success_rate,
                latency_ewma_ms=record.latency_ewma_ms,
            ))
        self._candidates[kind] = (now, found)
        return found

    def select(self, kind: str) -> str:
        """The module for a new robot of ``kind``.

        Modules with an open circuit or failing health are skipped while any other is
        available; when none is, the best of them is still chosen so the robot waits
        queued for it to recover instead of failing.
        """
        with self.tracker.measure("balancer.select"):
            candidates = self.candidates(kind)
            if not candidates:
                known = ", ".join(sorted(self.known_kinds())[:20]) or "none registered"
                raise ValidationError(
                    f"unknown kind {kind[:64]!r}; known kinds: {known}", path="$.kind"
                )
            available = [
                c for c in candidates if c.circuit_state != "open" and c.health != "unhealthy"
            ]
            if not available:
                return max(candidates, key=lambda c: (c.score, c.name)).name
            if len(available) == 1:
                return available[0].name
            chosen = self.select_hook(kind, available)
            names = {c.name for c in available}
            return chosen if chosen in names else self.choose(available)

    def alternative(self, kind: str, exclude: set[str]) -> str | None:
        """Another module for ``kind``, outside ``exclude``, that can take work now
        (circuit not open, not unhealthy), chosen as ``select`` would; None if none."""
        available = [
            c for c in self.candidates(kind)
            if c.name not in exclude and c.circuit_state != "open" and c.health != "unhealthy"
        ]
        if not available:
            return None
        if len(available) == 1:
            return available[0].name
        chosen = self.select_hook(kind, available)
        names = {c.name for c in available}
        return chosen if chosen in names else self.choose(available)

    def choose(self, available: Sequence[Candidate]) -> str:
        """The built-in strategy: weighted by score, every weight floored at ``min_share``."""
        return weighted_choice(available, self.rng, self.min_share)
