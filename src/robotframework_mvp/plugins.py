"""Building an orchestrator's PluginManager: built-ins, entry points, ``RFMVP_PLUGINS``.

Each orchestrator builds its own manager when it starts; nothing is registered at
import time, so two orchestrators in one process never see each other's plugins.
Built-in behaviour is registered as plugins on the same hooks third parties use, marked
``trylast`` so any plugin can override it.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

import pluggy

from . import hookspecs
from .balancing import Candidate
from .cache.backend import CacheBackend
from .cache.memory import MemoryBackend
from .config import Settings
from .errors import ConfigError
from .hookspecs import PROJECT_NAME, hookimpl
from .modules import Module
from .state.driver import StorageDriver
from .state.sqlite import SQLiteDriver

__all__ = [
    "BuiltinPlugin",
    "await_me_maybe",
    "build_plugin_manager",
    "call_first_result",
    "call_observers",
    "collect_modules",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


async def await_me_maybe(value: Any) -> Any:
    """A hook may return a value or an awaitable; give the value either way."""
    if inspect.isawaitable(value):
        return await value
    return value


async def call_first_result(hook: pluggy.HookCaller, **kwargs: Any) -> Any:
    """Call a ``firstresult`` hook whose implementations may be async.

    pluggy would stop at the first non-None *return value*, and a coroutine object is
    never None; here each implementation's value is awaited before deciding, in the
    order pluggy itself would call them.
    """
    for impl in reversed(hook.get_hookimpls()):
        value = await await_me_maybe(impl.function(*[kwargs[a] for a in impl.argnames]))
        if value is not None:
            return value
    return None


async def call_observers(hook: pluggy.HookCaller, **kwargs: Any) -> None:
    """Call every implementation of an observe hook; one failing never stops the others."""
    for impl in reversed(hook.get_hookimpls()):
        try:
            await await_me_maybe(impl.function(*[kwargs[a] for a in impl.argnames]))
        except Exception:
            log.exception("the %s hook of plugin %r failed", hook.name, impl.plugin_name)


class BuiltinPlugin:
    """The default drivers, caches and module selection, as a plugin."""

    @hookimpl(trylast=True)
    def storage_driver(self, url: str, settings: Settings) -> StorageDriver | None:
        scheme = urlsplit(url).scheme
        if scheme == "sqlite":
            return SQLiteDriver(url, timeout=settings.storage.timeout)
        if scheme in ("postgresql", "postgres"):
            try:
                from .state.postgres import PostgresDriver
            except ImportError as exc:
                raise ConfigError(
                    "RFMVP_STORAGE_URL is a postgresql:// URL but psycopg is not installed; "
                    "install robotframework-mvp[postgres]"
                ) from exc
            driver: StorageDriver = PostgresDriver(url, settings.storage)
            return driver
        return None

    @hookimpl(trylast=True)
    def cache_backend(self, url: str, settings: Settings) -> CacheBackend | None:
        scheme = urlsplit(url).scheme
        if scheme == "memory":
            return MemoryBackend(max_entries=settings.cache.max_entries)
        if scheme in ("redis", "rediss", "unix"):
            try:
                from .cache.redis import RedisBackend
            except ImportError as exc:
                raise ConfigError(
                    "RFMVP_CACHE_URL is a redis:// URL but redis is not installed; "
                    "install robotframework-mvp[redis]"
                ) from exc
            return RedisBackend(url)
        return None

    @hookimpl(trylast=True)
    def select_module(self, kind: str, candidates: Sequence[Candidate]) -> str | None:
        # Defer: the LoadBalancer's own strategy (weighted by score, with a minimum share
        # per module, RFMVP_BALANCER_MIN_SHARE) decides when no plugin does.
        return None


def build_plugin_manager(
    settings: Settings, plugins: Iterable[object] = ()
) -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    pm.register(BuiltinPlugin(), name="rfmvp.builtin")
    pm.load_setuptools_entrypoints(PROJECT_NAME)
    for dotted in settings.plugins:
        try:
            plugin = importlib.import_module(dotted)
        except ImportError as exc:
            raise ConfigError(
                f"RFMVP_PLUGINS names {dotted!r}, which cannot be imported: {exc}"
            ) from exc
        if not pm.is_registered(plugin):
            pm.register(plugin, name=dotted)
    for extra in plugins:
        if not pm.is_registered(extra):
            pm.register(extra)
    # A misspelled hook name would otherwise be ignored silently.
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"a plugin implements a hook that does not exist: {exc}") from exc
    return pm


def collect_modules(pm: pluggy.PluginManager, settings: Settings,
                    extra: Iterable[Module] = ()) -> dict[str, Module]:
    """Every module: ``@module`` objects on registered plugins, the hook, and ``extra``."""
    found: list[Module] = list(extra)
    for plugin in pm.get_plugins():
        if isinstance(plugin, Module):
            found.append(plugin)
            continue
        for name in dir(plugin):
            if name.startswith("__"):
                continue
            attribute = getattr(plugin, name, None)
            if isinstance(attribute, Module):
                found.append(attribute)
    for contributed in pm.hook.register_modules(settings=settings):
        found.extend(contributed or ())
    modules: dict[str, Module] = {}
    for mod in found:
        existing = modules.get(mod.name)
        if existing is not None and existing is not mod:
            raise ConfigError(f"two different modules are named {mod.name!r}; rename one")
        modules[mod.name] = mod
    return modules
