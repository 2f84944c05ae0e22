"""Cache backends (memory, Redis) behind one CacheManager."""

from .backend import CacheBackend, RateDecision
from .manager import CacheManager
from .memory import MemoryBackend

__all__ = ["CacheBackend", "CacheManager", "MemoryBackend", "RateDecision"]
