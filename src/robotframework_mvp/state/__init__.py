"""Persistence: the StateManager over a StorageDriver (SQLite, PostgreSQL)."""

from .driver import Claim, Completion, StorageDriver
from .manager import StateManager

__all__ = ["Claim", "Completion", "StateManager", "StorageDriver"]
