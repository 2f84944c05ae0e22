"""A TCP fault-injection proxy for tests: put it between the code and a real server.

``FaultProxy`` listens on ``127.0.0.1:<free port>`` and forwards every connection to the
real server (PostgreSQL, Redis). Tests break the path, never the server, which other
test runs share:

- ``pause()``: new connections are accepted and closed at once, as if the server were
  down (``pause(hang=True)``: accepted and left hanging, as if it were unreachable);
- ``sever()``: every live connection is dropped (both ends closed);
- ``latency``: seconds added before each chunk is forwarded, both ways;
- ``resume()``: new connections are forwarded again.

It runs as a task of the test's own event loop::

    async with FaultProxy("127.0.0.1", 6379) as proxy:
        url = proxy.url("redis://127.0.0.1:6379/0")   # -> redis://127.0.0.1:<port>/0
        ...
        proxy.pause(); proxy.sever()                   # Redis "stops"
        proxy.resume()                                 # ... and comes back
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import TracebackType

import anyio
import anyio.abc
from anyio.abc import SocketAttribute, SocketStream

__all__ = ["FaultProxy"]

_CHUNK = 65536


class FaultProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.paused = False
        self.hang = False
        self.latency = 0.0
        #: connections forwarded, refused while paused, and severed
        self.accepted = 0
        self.refused = 0
        self.severed = 0
        self._live: set[anyio.CancelScope] = set()
        self._tg: anyio.abc.TaskGroup | None = None
        self._stack: contextlib.AsyncExitStack | None = None

    # -- faults ------------------------------------------------------------------------

    def pause(self, *, hang: bool = False) -> None:
        """Refuse new connections (close them at once, or leave them hanging)."""
        self.paused = True
        self.hang = hang

    def resume(self) -> None:
        self.paused = False
        self.hang = False

    def sever(self) -> int:
        """Drop every live connection; returns how many."""
        live = list(self._live)
        for scope in live:
            scope.cancel()
        self.severed += len(live)
        return len(live)

    def down(self) -> None:
        """The server "stops": refuse new connections and drop the live ones."""
        self.pause()
        self.sever()

    @property
    def live(self) -> int:
        return len(self._live)

    def url(self, url: str) -> str:
        """``url`` with its ``host:port`` replaced by the proxy's."""
        replaced, n = re.subn(r"@?(127\.0\.0\.1|localhost)(:\d+)?(?=[/?]|$)",
                              lambda m: ("@" if m.group(0).startswith("@") else "")
                              + f"127.0.0.1:{self.port}", url, count=1)
        if n != 1:
            raise ValueError("the URL does not name 127.0.0.1 or localhost")
        return replaced

    # -- running -----------------------------------------------------------------------

    async def __aenter__(self) -> FaultProxy:
        stack = contextlib.AsyncExitStack()
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        await stack.enter_async_context(listener)
        self.port = listener.extra(SocketAttribute.local_port)  # noqa: S610
        tg = await stack.enter_async_context(anyio.create_task_group())
        stack.callback(tg.cancel_scope.cancel)
        tg.start_soon(listener.serve, self._handle)
        self._tg, self._stack = tg, stack
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.sever()
        assert self._stack is not None
        await self._stack.aclose()

    async def _handle(self, client: SocketStream) -> None:
        async with client:
            if self.paused:
                self.refused += 1
                if self.hang:
                    with anyio.CancelScope() as scope:
                        self._live.add(scope)
                        try:
                            await anyio.sleep_forever()
                        finally:
                            self._live.discard(scope)
                return
            try:
                upstream = await anyio.connect_tcp(self.target_host, self.target_port)
            except OSError:
                return
            self.accepted += 1
            async with upstream:
                with anyio.CancelScope() as scope:
                    self._live.add(scope)
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(self._pump, client, upstream, tg.cancel_scope)
                            tg.start_soon(self._pump, upstream, client, tg.cancel_scope)
                    finally:
                        self._live.discard(scope)

    async def _pump(self, source: SocketStream, sink: SocketStream,
                    both: anyio.CancelScope) -> None:
        try:
            while True:
                chunk = await source.receive(_CHUNK)
                if self.latency:
                    await anyio.sleep(self.latency)
                await sink.send(chunk)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError,
                OSError):
            pass
        both.cancel()  # one side closed: close the other


@asynccontextmanager
async def fault_proxy(host: str, port: int) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(host, port) as proxy:
        yield proxy
