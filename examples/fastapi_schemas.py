"""The FastAPI app's OpenAPI documentation: pydantic models and response tables.

The models are for the docs only: request bodies reach ``HttpApi`` as raw bytes and the core
validates them (so errors keep the contract's shape), and responses are built by the
core. Keep them in step with ``robotframework_mvp.models`` and ``http.py``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

Status = Literal["pending", "queued", "running", "succeeded", "failed", "cancelled", "timed_out"]


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(description="stable name clients switch on, e.g. validation_error")
    message: str = Field(description="what is wrong and what to change")
    path: str | None = Field(None, description="JSONPath of the bad input, e.g. $.payload.x")
    retry_after: float | None = Field(None, description="seconds to wait (429 only)")


class ErrorBody(BaseModel):
    error: ErrorDetail


class FollowUpSpec(BaseModel):
    """A chain's follow-up: strings such as "$parent.result.x" take the parent's values."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict, description="a payload template")


class RobotSpec(BaseModel):
    """One robot to create."""

    model_config = ConfigDict(extra="forbid")
    kind: str = Field(description="what to do; GET /api/v1/modules lists the kinds")
    payload: dict[str, Any] = Field(description="the module's input, a JSON object")
    priority: int = Field(0, ge=-1000, le=1000, description="higher runs first")
    idempotency_key: str | None = Field(
        None, description="the same key (per caller) returns the same robot")
    delay: float | None = Field(None, ge=0, description="seconds before it may start")
    run_at: datetime | None = Field(
        None, description="when it may start, with its UTC offset (not with delay)")
    on_success: FollowUpSpec | None = Field(None, description="robot to create if it succeeds")
    on_failure: FollowUpSpec | None = Field(
        None, description="robot to create if it fails or times out")


class SubmitRobot(RobotSpec):
    wait: float | None = Field(
        None, ge=0, description="seconds to wait for the robot to end; 200 if it did")


class SubmitBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    robots: list[RobotSpec] = Field(min_length=1, max_length=1000)


class RobotError(BaseModel):
    type: str
    message: str


class Robot(BaseModel):
    id: str
    kind: str
    payload: dict[str, Any]
    owner: str
    tenant: str
    status: Status
    module: str | None
    progress: float = Field(ge=0, le=100)
    progress_message: str | None
    attempts: int
    max_attempts: int
    priority: int
    idempotency_key: str | None
    result: dict[str, Any] | None
    error: RobotError | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    scheduled_at: datetime
    lease_expires_at: datetime | None
    parent_id: str | None = Field(None, description="the robot whose end created this one")
    parent_trigger: Literal["on_success", "on_failure"] | None = None
    schedule_id: str | None = Field(None, description="the schedule that fired this one")
    on_success: FollowUpSpec | None = None
    on_failure: FollowUpSpec | None = None


class RobotPage(BaseModel):
    items: list[Robot]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class RobotBatch(BaseModel):
    items: list[Robot]


class Execution(BaseModel):
    id: str
    robot_id: str
    module: str
    attempt: int
    status: Literal["running", "succeeded", "failed", "timed_out", "cancelled", "lost",
                    "released"]
    worker: str
    started_at: datetime
    finished_at: datetime | None
    duration_ms: float | None
    error: RobotError | None


class Executions(BaseModel):
    items: list[Execution]


class ModuleInfo(BaseModel):
    name: str
    kinds: list[str]
    health: str
    score: float
    circuit_state: Literal["closed", "open", "half_open"]
    load: int
    capacity: int
    success_rate: float
    latency_ewma_ms: float | None
    local: bool = Field(description="runs in this process")


class Modules(BaseModel):
    items: list[ModuleInfo]


class NewSchedule(BaseModel):
    """A cron schedule that fires robots."""

    model_config = ConfigDict(extra="forbid")
    kind: str
    payload: dict[str, Any] = Field(default_factory=dict)
    cron: str = Field(description="5 fields, or 6 with seconds first")
    timezone: str = Field("UTC", description="IANA name, e.g. Europe/Paris")
    misfire_policy: Literal["skip", "run_once", "run_all"] = "skip"
    misfire_limit: int = Field(100, ge=1, le=10000, description="most catch-ups of run_all")
    priority: int = Field(0, ge=-1000, le=1000)
    paused: bool = False


class Schedule(NewSchedule):
    id: str
    owner: str
    tenant: str
    last_due_at: datetime
    next_due_at: datetime
    created_at: datetime
    updated_at: datetime


class SchedulePage(BaseModel):
    items: list[Schedule]
    next_cursor: str | None = Field(description="pass as ?cursor= for the next page")


class Health(BaseModel):
    status: Literal["ok", "degraded", "down"]
    components: dict[str, dict[str, Any]]



# -- route documentation ------------------------------------------------------------------


def doc(model: Any, text: str) -> dict[str, Any]:
    """One documented response: ``responses={202: doc(Robot, "Queued")}``."""
    return {"model": model, "description": text}


def body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a JSON body that FastAPI itself does not parse."""
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    401: doc(ErrorBody, "No, a wrong or a malformed API key (see WWW-Authenticate)"),
    403: doc(ErrorBody, "The key lacks the scope this needs (robots:read, robots:write)"),
    422: doc(ErrorBody, "Invalid input; `error.path` points at it"),
    429: doc(ErrorBody, "Rate limited; see the Retry-After and RateLimit-* headers"),
    500: doc(ErrorBody, "Internal error (details only in the server log)"),
    503: doc(ErrorBody, "A backend (the store) is unavailable; retry later"),
}
_404 = {404: doc(ErrorBody, "No such robot (another tenant's robot is not found either)")}
_404S = {404: doc(ErrorBody, "No such schedule (nor another tenant's)")}
_409 = {409: doc(ErrorBody, "The robot's status does not allow this")}
_413 = {413: doc(ErrorBody, "The request body is over RFMVP_MAX_PAYLOAD_BYTES")}
_HEALTH = {200: doc(Health, "Up"), 503: doc(Health, "Down (the store is unreachable)")}

#: ``add_api_route`` keywords of each route, by route name (the HttpApi method's name).
ROUTES: dict[str, dict[str, Any]] = {
    "submit_robot": {
        "summary": "Submit a robot; with `wait`, block until it ends", "status_code": 202,
        "responses": {202: doc(Robot, "Queued"), 200: doc(Robot, "Ended within `wait`"),
                      **_413},
        "openapi_extra": body(SubmitRobot)},
    "submit_batch": {
        "summary": "Submit up to 1000 robots, all or none (errors name `$.robots[i]`)",
        "status_code": 202, "responses": {202: doc(RobotBatch, "All queued"), **_413},
        "openapi_extra": body(SubmitBatch)},
    "list_robots": {
        "summary": "The caller's robots, newest first (or by due time with ?order=due)",
        "responses": {200: doc(RobotPage, "One page; follow `next_cursor`")}},
    "get_robot": {"summary": "One robot", "responses": {200: doc(Robot, "The robot"), **_404}},
    "cancel_robot": {
        "summary": "Cancel a queued or running robot",
        "responses": {200: doc(Robot, "Cancelled"), **_404, **_409}},
    "retry_robot": {
        "summary": "Queue a failed or timed-out robot again", "status_code": 202,
        "responses": {202: doc(Robot, "Queued again"), **_404, **_409}},
    "list_executions": {
        "summary": "Every attempt of a robot",
        "responses": {200: doc(Executions, "The attempts"), **_404}},
    "list_modules": {
        "summary": "Modules: kinds, health, score, circuit state, load",
        "responses": {200: doc(Modules, "The modules")}},
    "add_schedule": {
        "summary": "Create a cron schedule", "status_code": 201,
        "responses": {201: doc(Schedule, "Created"), **_413},
        "openapi_extra": body(NewSchedule)},
    "list_schedules": {
        "summary": "The caller's schedules",
        "responses": {200: doc(SchedulePage, "One page; follow `next_cursor`")}},
    "get_schedule": {"summary": "One schedule",
                     "responses": {200: doc(Schedule, "The schedule"), **_404S}},
    "pause_schedule": {"summary": "Stop firing",
                       "responses": {200: doc(Schedule, "Paused"), **_404S}},
    "resume_schedule": {"summary": "Fire again from the next due time",
                        "responses": {200: doc(Schedule, "Resumed"), **_404S}},
    "remove_schedule": {"summary": "Delete a schedule (its robots stay)",
                        "responses": {200: doc(Schedule, "Deleted"), **_404S}},
    "health": {"summary": "Each component's status (no key needed)", "responses": _HEALTH},
    "ready": {"summary": "200 only when every component is ok", "responses": _HEALTH},
    "metrics": {"summary": "Prometheus text format", "responses": {
        200: {"description": "Prometheus metrics", "content": {"text/plain": {}}}}},
    "dashboard": {"summary": "The live dashboard page (HTML; no key needed, it holds no data)",
                  "responses": {200: {"description": "The page",
                                      "content": {"text/html": {}}}}},
    "dashboard_data": {"summary": "The dashboard's numbers (an admin key, unless "
                       "RFMVP_DASHBOARD_PUBLIC=true)",
                       "responses": {200: {"description": "Counts, latencies, modules, "
                                           "alerts and (for admins) recent failures"},
                                     **{s: ERRORS[s] for s in (401, 403, 429)}}},
}


def install_openapi(app: FastAPI) -> None:
    """Add the request models (referenced only from ``openapi_extra``) to the schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            _, defs = models_json_schema([(m, "validation") for m in (SubmitRobot, SubmitBatch,
                                                                  NewSchedule)],
                                         ref_template="#/components/schemas/{model}")
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs["$defs"])
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
