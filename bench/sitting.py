"""One sitting: our benchmark interleaved with pgqueuer's, then judged against issue #8.

    python bench/sitting.py                       # 3 rounds, then the HTTP benchmark
    python bench/sitting.py --rounds 5 --no-http
    python bench/sitting.py --anchors ../shared/anchors --anchor-python PATH

This machine's speed moves by a third or more from one minute to the next
(docs/performance.md). A sitting that runs the anchors first and ours afterwards can
compare a fast minute with a slow one. So each round runs pgqueuer, then ``bench/run.py``
on postgresql+redis, then on sqlite+memory, and one more pgqueuer run closes the last
round: each of our runs sits between two pgqueuer runs. Then one run on each store whose
robots report progress (``--progress``: the ``state.update_progress`` step), one on
postgresql+redis with a rate limit that admits everything (what the limiter costs when it
is consulted, as deployed; shown, not judged), and ``bench/http_load.py`` twice
(sqlite+memory), once with the worker off, once on postgresql+redis, and once more there
as an API process is deployed (worker off, a stored key, the limiter consulted; shown,
not judged).

pgqueuer is run from the anchors directory (``shared/anchors``, outside this repository)
with the virtualenv that its ``run.sh`` creates. Without them, only our runs are made.

Prints every run's JSON line as it comes (stderr), then one JSON line (stdout): the runs,
and for each target of issue #8 the figures measured and in how many runs it was met.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _support as bs

ROOT = Path(__file__).resolve().parents[1]
PG = ["--storage", "postgresql://postgres@127.0.0.1:5432/test",
      "--cache", "redis://127.0.0.1:6379/0"]
WORKLOAD = ["-n", "5000", "-c", "10", "--latency-samples", "300"]
#: issue #8's targets on bench/run.py: (store, field, "min" or "max", bound)
RUN_TARGETS = [
    ("postgresql", "process_per_s", "min", 6000.0),
    ("postgresql", "lat_p50_ms", "max", 1.5),
    ("postgresql", "lat_p99_ms", "max", 4.0),
    ("postgresql", "enqueue_per_s", "min", 25000.0),
    ("sqlite", "process_per_s", "min", 8000.0),
    ("sqlite", "lat_p50_ms", "max", 0.6),
]
#: a rate limit that admits everything: the limiter is consulted as in a deployment
ADMIT_ALL = "1000000000/second"
#: what issue #8 says pgqueuer does on its reference machine: the speed its targets assume
PGQUEUER_REFERENCE = {"process_per_s": 5000.0, "lat_p50_ms": 1.8}
#: each step's p50 at least 10x below the low end of the seed's budget (ms)
STEP_TARGETS = {"security.validate": 0.5, "balancer.select": 1.0, "state.create_robot": 2.0,
                "state.start_execution": 0.5, "state.update_progress": 1.0,
                "state.complete_robot": 1.0}


def last_json(text: str) -> dict[str, Any] | None:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                found: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            return found
    return None


def run(cmd: list[str], cwd: Path, label: str) -> dict[str, Any] | None:
    ticks = bs.machine_cpu_ticks()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    steal = bs.steal_pct(ticks, bs.machine_cpu_ticks())
    result = last_json(done.stdout)
    if result is None:
        print(f"{label}: no result (exit {done.returncode}): {done.stderr.strip()[-400:]}",
              file=sys.stderr)
        return None
    result["label"] = label
    result.setdefault("machine_steal_pct", steal)  # the anchors and http_load: measured here
    print(json.dumps(result), file=sys.stderr, flush=True)
    return result


def pgqueuer(args: argparse.Namespace, label: str) -> dict[str, Any] | None:
    if args.anchor_python is None:
        return None
    return run([args.anchor_python, "bench_pgqueuer.py", "5000", "10", "300"],
               Path(args.anchors), label)


def ours(store: str, label: str, *, progress: bool = False, rate_limited: bool = False
         ) -> dict[str, Any] | None:
    # sqlite: run.py's own scratch file, in the temp directory
    where = PG if store == "postgresql" else ["--cache", "memory://"]
    extra = ["--progress"] if progress else []
    if rate_limited:
        extra += ["--rate-limit", ADMIT_ALL]
    return run([sys.executable, "bench/run.py", *where, *WORKLOAD, *extra, "--json-only"],
               ROOT, label)


def meets(value: float, kind: str, bound: float) -> bool:
    """Whether ``value`` meets a ``"min"`` or ``"max"`` target of ``bound``."""
    return value >= bound if kind == "min" else value <= bound


def sign(kind: str) -> str:
    return ">=" if kind == "min" else "<="


def bracketing(label: str, anchors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The pgqueuer runs just before and after our run of round N (``"... N"``)."""
    round_ = label.rsplit(" ", 1)[-1]
    if not round_.isdigit():
        return []
    wanted = {f"pgqueuer {round_}", f"pgqueuer {int(round_) + 1}"}
    return [a for a in anchors if a.get("label") in wanted]


def judge_against_pgqueuer(runs: list[dict[str, Any]], anchors: list[dict[str, Any]]
                           ) -> dict[str, Any]:
    """The targets that issue #8 sets beside a pgqueuer figure, as ratios to pgqueuer.

    The issue puts pgqueuer at 5,000/s and 1.8 ms on its reference machine, so
    ``process_per_s >= 6000`` means 1.2x pgqueuer's rate and ``lat_p50_ms <= 1.5`` means
    0.83x its p50. Each of our runs is compared with the mean of the two pgqueuer runs
    around it, made in the same minutes: a verdict that holds on a slower machine too.
    """
    verdicts: dict[str, Any] = {}
    for store, field, kind, bound in RUN_TARGETS:
        reference = PGQUEUER_REFERENCE.get(field)
        if reference is None:
            continue
        wanted = bound / reference
        ratios = []
        for r in runs:
            around = [a[field] for a in bracketing(r["label"], anchors) if a.get(field)]
            if r.get("storage") == store and around:
                ratios.append(round(r[field] / (sum(around) / len(around)), 2))
        if ratios:
            met = sum(1 for v in ratios if meets(v, kind, wanted))
            verdicts[f"{store} {field} {sign(kind)} {wanted:.2f}x pgqueuer's (same minutes)"] = {
                "measured": ratios, "met": f"{met} of {len(ratios)}"}
    return verdicts


def judge(runs: list[dict[str, Any]], http: list[dict[str, Any]],
          progress: list[dict[str, Any]], anchors: list[dict[str, Any]] | None = None,
          shown: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """For each target: the figures measured, and in how many runs it was met.

    ``state.update_progress`` is judged on the runs whose robots report progress
    (``progress``), every other target on the plain runs. With pgqueuer's runs
    (``anchors``), the targets the issue relates to pgqueuer are also judged as ratios.
    Runs only ``shown`` are judged on nothing but their exactly-once check."""
    verdicts: dict[str, Any] = {}
    for store, field, kind, bound in RUN_TARGETS:
        values = [r[field] for r in runs if r.get("storage") == store]
        met = sum(1 for v in values if meets(v, kind, bound))
        verdicts[f"{store} {field} {sign(kind)} {bound:g}"] = {
            "measured": values, "met": f"{met} of {len(values)}"}
    for store in ("postgresql", "sqlite"):
        for step, bound in STEP_TARGETS.items():
            source = progress if step == "state.update_progress" else runs
            values = [r["step_p50_ms"][step] for r in source if r.get("storage") == store
                      and r.get("step_p50_ms", {}).get(step) is not None]
            if values:
                met = sum(1 for v in values if v <= bound)
                verdicts[f"{store} step {step} p50 <= {bound:g} ms"] = {
                    "measured": values, "met": f"{met} of {len(values)}"}
    # as shipped: the example server with its worker on
    served = [h for h in http if h.get("label") in ("http sqlite 1", "http sqlite 2")]
    met = sum(1 for h in served if h["requests_per_s"] >= 2000 and h["p99_ms"] <= 20)
    verdicts["http sqlite >= 2000 req/s with p99 <= 20 ms"] = {
        "measured": [(h["requests_per_s"], h["p99_ms"]) for h in served],
        "met": f"{met} of {len(served)}"}
    verdicts.update(judge_against_pgqueuer(runs, anchors or []))
    verdicts["every run verified"] = all(r.get("verified")
                                         for r in runs + http + progress + (shown or []))
    return verdicts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--anchors", default=str(ROOT.parent / "shared" / "anchors"),
                   help="the anchors directory (bench_pgqueuer.py)")
    default_python = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) \
        / "rfmvp-anchors" / "venv" / "bin" / "python"
    p.add_argument("--anchor-python", default=str(default_python),
                   help="the python of the anchors' virtualenv (run.sh creates it)")
    p.add_argument("--no-http", dest="http", action="store_false")
    args = p.parse_args(argv)
    if not (Path(args.anchors) / "bench_pgqueuer.py").exists() \
            or not Path(args.anchor_python).exists():
        print("pgqueuer not found (run shared/anchors/run.sh once to create its "
              "virtualenv); measuring ours only", file=sys.stderr)
        args.anchor_python = None

    started = time.strftime("%H:%M:%S", time.gmtime())
    anchors: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for i in range(1, args.rounds + 1):
        for result in (pgqueuer(args, f"pgqueuer {i}"),
                       ours("postgresql", f"postgresql+redis {i}"),
                       ours("sqlite", f"sqlite+memory {i}")):
            if result is not None:
                (anchors if result["label"].startswith("pgqueuer") else runs).append(result)
    closing = pgqueuer(args, f"pgqueuer {args.rounds + 1}")
    if closing is not None:
        anchors.append(closing)
    # Robots that report progress once, for the one step the plain no-op never takes.
    progress = [r for r in (ours("postgresql", "postgresql+redis, progress", progress=True),
                            ours("sqlite", "sqlite+memory, progress", progress=True))
                if r is not None]
    # What the rate limiter costs on Redis, which the plain runs do not consult: shown,
    # not judged (pgqueuer, the reference, limits nothing).
    limited = ours("postgresql", "postgresql+redis, rate limit", rate_limited=True)
    http: list[dict[str, Any]] = []
    if args.http:
        load = [sys.executable, "bench/http_load.py", "--json-only"]
        # The last: an API process as deployed (a stored key, the limiter consulted),
        # shown and not judged.
        deployed = ["--no-worker", "--stored-key", "--rate-limit", ADMIT_ALL]
        for label, extra in (("http sqlite 1", []), ("http sqlite 2", []),
                             ("http sqlite, worker off", ["--no-worker"]),
                             ("http postgresql", PG),
                             ("http postgresql, as deployed", [*PG, *deployed])):
            result = run([*load, *extra], ROOT, label)
            if result is not None:
                http.append(result)
    print(json.dumps({"started": started, "ended": time.strftime("%H:%M:%S", time.gmtime()),
                      "pgqueuer": [{k: a.get(k) for k in ("label", "process_per_s",
                                                           "lat_p50_ms", "lat_p99_ms",
                                                           "machine_steal_pct")}
                                   for a in anchors],
                      "rate_limited": None if limited is None else {
                          k: limited.get(k) for k in ("process_per_s", "lat_p50_ms",
                                                      "lat_p99_ms", "enqueue_per_s")},
                      "targets": judge(runs, http, progress, anchors,
                                       shown=[limited] if limited else [])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
