"""The bench's no-op module as a plugin for ``rfmvp worker`` subprocesses (bench/scale.py).

``RFMVP_PLUGINS=noop_plugin`` with ``bench/`` on ``PYTHONPATH``. The module's capacity is
``RFMVP_BENCH_CAPACITY`` (default 10). With ``RFMVP_BENCH_WAKE_ON_FINISH=1`` it also wakes
the worker when a robot ends while the worker was full (see ``_support.WakeOnFinish``).
"""

from __future__ import annotations

import os
from typing import Any

from robotframework_mvp import ModuleContext, Robot, hookimpl, module

_state: dict[str, Any] = {"orchestrator": None}
_WAKE = os.environ.get("RFMVP_BENCH_WAKE_ON_FINISH") == "1"


@module("noop", kinds=["noop"], capacity=int(os.environ.get("RFMVP_BENCH_CAPACITY", "10")))
async def noop(robot: Robot, ctx: ModuleContext) -> None:
    """Does nothing."""


@hookimpl
def on_startup(orchestrator: Any) -> None:
    _state["orchestrator"] = orchestrator


@hookimpl
def on_robot_finished(robot: Robot) -> None:
    orch = _state["orchestrator"]
    if not _WAKE or orch is None:
        return
    worker = orch.worker
    if len(worker.running) >= worker.concurrency or any(
        st.load >= worker.modules[name].capacity for name, st in worker.stats.items()
    ):
        worker.wake()
