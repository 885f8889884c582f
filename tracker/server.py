"""The API's HTTP server: uvicorn on a socket bound by us, so a taken port is one clear line."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

from tracker import api, config, startup

#: how long the API may take to finish its open requests once the drain is over
HTTP_SHUTDOWN_DEADLINE = 5


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class ApiServer:
    """Serves ``app`` on [server].host and .port with the connection bounds of tracker.api."""

    def __init__(self, app: FastAPI, settings: config.ServerSettings) -> None:
        self.app = app
        self.settings = settings
        self._server: _Server | None = None

    def _uvicorn(self) -> _Server:
        settings = self.settings
        return _Server(
            uvicorn.Config(
                self.app,
                host=settings.host,
                port=settings.port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=HTTP_SHUTDOWN_DEADLINE,
                # Idle, silent and half-sent connections are closed, and their number capped.
                http=api.bounded_protocol(
                    header_timeout=settings.header_timeout,
                    max_connections=api.connection_cap(settings.max_connections),
                ),
                timeout_keep_alive=api.KEEP_ALIVE_TIMEOUT,
                backlog=api.ACCEPT_BACKLOG,
            )
        )

    async def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Listen and serve; ``stack`` lets open requests finish and closes the listener.

        Raises StartupError (LISTEN) when the address cannot be bound or uvicorn fails to start.
        """
        self._server = server = self._uvicorn()
        host, port = self.settings.host, self.settings.port
        sock = startup.listen(host, port)
        serving = asyncio.create_task(server.serve(sockets=[sock]), name="api")
        while not server.started:
            if serving.done():
                # uvicorn ends a failed start with SystemExit; retrieved here, so asyncio has
                # no "exception was never retrieved" traceback to print.
                with contextlib.suppress(BaseException):
                    await serving
                sock.close()
                raise startup.StartupError(
                    f"the API could not start on {host}:{port}", startup.ExitCode.LISTEN
                )
            await asyncio.sleep(0.01)
        stack.push_async_callback(self._stop, server, serving)

    @staticmethod
    async def _stop(server: _Server, serving: asyncio.Task[None]) -> None:
        server.should_exit = True
        await serving

    @property
    def port(self) -> int:
        """The port the API listens on (useful when the config says 0)."""
        if self._server is None or not self._server.servers:
            raise RuntimeError("the API is not listening yet")
        port: int = self._server.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        """The base URL of the API, e.g. http://127.0.0.1:8686."""
        host = self.settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"
