"""Agent containers in subprocesses.

A process that runs :func:`start` has a container whose first agent (id ``0``) is
a :class:`Manager`.  A master process connects to the manager and asks it to
:meth:`~Manager.spawn` agents in that container, to :meth:`~Manager.set_time` of
its :class:`~aiomas.clocks.ExternalClock` and finally to :meth:`~Manager.stop`.

``python -m aiomas.subproc HOST:PORT`` is such a process (see ``--help``); it
prints the manager's address as its first line on stdout.  :class:`ContainerProcess`
starts one from a master process and reads that address.

Warning:
    A manager creates whatever its callers name, so only let trusted peers reach
    it (bind to a private address, use TLS).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any

from aiomas import tracing, util
from aiomas.agent import Agent, Container
from aiomas.channel import Address
from aiomas.clocks import ExternalClock
from aiomas.rpc import expose

__all__ = ["ContainerProcess", "Manager", "serve", "start"]

logger = logging.getLogger(__name__)

# How long ContainerProcess.start() waits for the child to print its address.
_READY_TIMEOUT = 30.0


class Manager(Agent):
    """An agent that starts other agents in its container and sets its clock.

    Args:
        container: The container to manage.
    """

    def __init__(self, container: Container) -> None:
        super().__init__(container)
        self.stop_received: asyncio.Future[None] = util.get_loop().create_future()
        """Done when :meth:`stop` has been called."""

    @expose
    async def spawn(
        self, qualname: str, *args: Any, **kwargs: Any
    ) -> tuple[Agent, str]:
        """Create an agent in this container; return it (the caller receives a
        proxy) and its address.

        Args:
            qualname: ``'module:Class'`` of the agent class (or of a factory
                function or coroutine function), see
                :func:`aiomas.util.obj_from_str`.  It is called with the
                container, *args* and *kwargs*.

        Raises:
            TypeError: if the factory does not return an agent of this container.
        """
        factory = util.obj_from_str(qualname)
        agent = factory(self.container, *args, **kwargs)
        if inspect.isawaitable(agent):
            agent = await agent
        if not isinstance(agent, Agent) or agent.container is not self.container:
            raise TypeError(
                f"{qualname} returned {agent!r}, not an agent of {self.container!r}"
            )
        logger.info("Spawned %s", agent, extra={"agent": agent.addr})
        return agent, agent.addr

    @expose
    def set_time(self, time: float) -> None:
        """Set the time of the container's :class:`~aiomas.clocks.ExternalClock`.

        Raises:
            TypeError: if the container has another kind of clock.
            ValueError: if *time* lies before the clock's current time.
        """
        clock = self.container.clock
        if not isinstance(clock, ExternalClock):
            raise TypeError(
                f"The container's clock is a {type(clock).__name__}; only an "
                "ExternalClock can be set"
            )
        clock.set_time(time)

    @expose
    def stop(self) -> None:
        """Set :attr:`stop_received`, so that :func:`start` shuts the container
        down and returns."""
        if not self.stop_received.done():
            self.stop_received.set_result(None)


async def start(addr: Address, **container_kwargs: Any) -> None:
    """Run a container with a :class:`Manager` agent until the manager is stopped.

    Args:
        addr: The container's address (see :meth:`Container.create`).
        **container_kwargs: Passed to :meth:`Container.create`.

    The container is shut down when :meth:`Manager.stop` is called or when this
    coroutine is cancelled (e.g. by :class:`KeyboardInterrupt` under
    :func:`asyncio.run`).
    """
    await serve(addr, container_kwargs)


async def serve(
    addr: Address,
    container_kwargs: dict[str, Any],
    on_ready: Callable[[Manager], None] | None = None,
) -> None:
    """Like :func:`start`, and call *on_ready* with the manager once the
    container listens."""
    container = await Container.create(addr, as_coro=True, **container_kwargs)
    try:
        manager = Manager(container)
        if on_ready is not None:
            on_ready(manager)
        await manager.stop_received
    finally:
        await container.shutdown(as_coro=True)


class ContainerProcess:
    """A ``python -m aiomas.subproc`` process started by :meth:`start`.

    The child's output goes to this process' stdout and stderr.
    """

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        manager_addr: str,
        forwarder: asyncio.Task[None],
    ) -> None:
        self.process = process
        """The :class:`asyncio.subprocess.Process`."""
        self.manager_addr = manager_addr
        """The address of the child's :class:`Manager`, e.g.
        ``'tcp://127.0.0.1:43211/0'``."""
        self._forwarder = forwarder

    def __repr__(self) -> str:
        return f"ContainerProcess(pid={self.process.pid}, {self.manager_addr!r})"

    @classmethod
    async def start(
        cls, *args: str, ready_timeout: float = _READY_TIMEOUT, **kwargs: Any
    ) -> ContainerProcess:
        """Start ``python -m aiomas.subproc *args`` and wait until it listens.

        Args:
            *args: Command line arguments, e.g. ``'127.0.0.1:0'`` and options.
            ready_timeout: Seconds to wait for the child to report its address.
            **kwargs: Passed to :func:`asyncio.create_subprocess_exec`, e.g.
                ``cwd`` or ``env`` (so that the child can import your agents).

        Raises:
            RuntimeError: if the child exits (e.g. bad arguments) or does not
                report its address within *ready_timeout* seconds.
        """
        if "env" in kwargs or tracing.active() is not None:
            # Our trace directory is the child's too.
            kwargs["env"] = tracing.child_environment(kwargs.get("env"))
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "aiomas.subproc",
            *args,
            stdout=asyncio.subprocess.PIPE,
            **kwargs,
        )
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), ready_timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise RuntimeError(
                "The container process did not report its address within "
                f"{ready_timeout}s"
            ) from None
        except BaseException:  # e.g. we were cancelled: leave no orphan behind
            process.kill()
            await asyncio.shield(process.wait())
            raise
        if not line:
            code = await process.wait()
            raise RuntimeError(
                f"The container process exited with code {code} before it listened"
            )
        forwarder = asyncio.ensure_future(_forward(process.stdout))
        return cls(process, line.decode().strip(), forwarder)

    async def wait(self) -> int:
        """Wait until the process has exited; return its exit code."""
        code = await self.process.wait()
        await self._forwarder
        return code

    async def kill(self) -> int:
        """Kill the process (SIGKILL) and wait for it; return its exit code."""
        if self.process.returncode is None:
            self.process.kill()
        return await self.wait()

    async def wait_or_kill(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        """Wait up to *timeout* seconds for the process to exit (e.g. after
        ``Manager.stop()``), then kill it; return its exit code.  For
        ``finally`` blocks: no process is left behind, whatever happened."""
        try:
            return await asyncio.wait_for(self.wait(), timeout)
        except TimeoutError:
            return await self.kill()


async def _forward(stream: asyncio.StreamReader) -> None:
    while line := await stream.readline():
        sys.stdout.write(line.decode(errors="replace"))
        sys.stdout.flush()
