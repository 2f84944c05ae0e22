"""robotframework-mvp: run automation robots reliably.

The public API: build ``Settings`` (or ``Settings.from_env()``), write modules with
``@module``, and run robots through an ``Orchestrator``::

    async with Orchestrator(Settings.from_env()) as orch:
        robot = await orch.process_robot("echo", {"hello": "world"}, api_key=key)
"""

from .config import (
    BackgroundConfig,
    CacheConfig,
    PerformanceConfig,
    RateLimit,
    ResilienceConfig,
    SecurityConfig,
    Settings,
    StaticKey,
    StorageConfig,
    WorkerConfig,
)
from .errors import (
    AuthenticationError,
    ConfigError,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermanentError,
    PermissionDeniedError,
    RateLimitedError,
    RobotFrameworkError,
    ServiceUnavailableError,
    ValidationError,
)
from .hookspecs import hookimpl
from .models import (
    ErrorInfo,
    Execution,
    ExecutionStatus,
    FollowUp,
    MisfirePolicy,
    Principal,
    Robot,
    RobotStatus,
    Schedule,
)
from .modules import Module, ModuleContext, module
from .orchestrator import Orchestrator, Page
from .scheduling import SchedulePage
from .security.validator import SubmitRequest

__version__ = "0.1.0"

__all__ = [
    "AuthenticationError",
    "BackgroundConfig",
    "CacheConfig",
    "ConfigError",
    "ConflictError",
    "ErrorInfo",
    "Execution",
    "ExecutionStatus",
    "FollowUp",
    "MisfirePolicy",
    "Module",
    "ModuleContext",
    "NotFoundError",
    "Orchestrator",
    "Page",
    "PayloadTooLargeError",
    "PerformanceConfig",
    "PermanentError",
    "PermissionDeniedError",
    "Principal",
    "RateLimit",
    "RateLimitedError",
    "ResilienceConfig",
    "Robot",
    "RobotFrameworkError",
    "RobotStatus",
    "Schedule",
    "SchedulePage",
    "SecurityConfig",
    "ServiceUnavailableError",
    "Settings",
    "StaticKey",
    "StorageConfig",
    "SubmitRequest",
    "ValidationError",
    "WorkerConfig",
    "__version__",
    "hookimpl",
    "module",
]
