"""Summarize a py-spy ``--format raw`` profile: where the samples of each thread go.

    py-spy record -r 500 -f raw --threads -o prof.txt -- python bench/run.py ...
    python bench/profile_summary.py prof.txt [--top 25] [--match robotframework_mvp]

Prints, per thread kind (event loop, AnyIO worker threads, others), the share of samples
by *self* time (leaf frame) and by *inclusive* time for frames whose file matches
``--match`` (default: the package), so the hot spots read as ``file:line function``.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter, defaultdict

_FRAME = re.compile(r"^(?P<func>.*) \((?P<loc>[^()]*)\)$")


def _thread_kind(head: str) -> str:
    if "MainThread" in head:
        return "event loop (MainThread)"
    if "AnyIO worker thread" in head:
        return "AnyIO worker threads"
    return "other threads"


def summarize(path: str, top: int, match: str, idle: bool) -> str:
    self_by: dict[str, Counter[str]] = defaultdict(Counter)
    incl_by: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, count_text = line.rpartition(" ")
            count = int(count_text)
            frames = stack.split(";")
            kind = _thread_kind(frames[0])
            frames = frames[1:]
            leaf = frames[-1] if frames else "?"
            if not idle and any(x in leaf for x in ("epoll.poll", "select (selectors",
                                                    "_wait_for_tstate_lock", "wait (threading")):
                continue
            totals[kind] += count
            self_by[kind][leaf] += count
            seen = set()
            for frame in frames:
                m = _FRAME.match(frame)
                if m and match in m.group("loc") and frame not in seen:
                    seen.add(frame)
                    incl_by[kind][frame] += count
    out = []
    grand = sum(totals.values()) or 1
    for kind in sorted(totals, key=lambda k: -totals[k]):
        total = totals[kind]
        out.append(f"== {kind}: {total} samples ({100 * total / grand:.1f}% of busy samples)")
        out.append("  -- self (leaf frames)")
        for frame, n in self_by[kind].most_common(top):
            out.append(f"  {100 * n / total:5.1f}%  {frame}")
        out.append(f"  -- inclusive, frames in files matching {match!r}")
        for frame, n in incl_by[kind].most_common(top):
            out.append(f"  {100 * n / total:5.1f}%  {frame}")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("profile")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--match", default="robotframework_mvp")
    p.add_argument("--idle", action="store_true", help="keep samples idle in epoll/locks")
    args = p.parse_args()
    print(summarize(args.profile, args.top, args.match, args.idle))


if __name__ == "__main__":
    main()
