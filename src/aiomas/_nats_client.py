"""The one adapter between aiomas and a NATS client library (nats-py).

:mod:`aiomas.nats` needs little of a NATS client: publish (without waiting),
subscribe with a callback, request with a time bound, the server's largest
payload, and to hear when the link to the server broke.  :class:`NatsPyClient`
gives exactly that on top of nats-py; another library can take its place by
offering the same methods (see :class:`aiomas.nats.MessagingClient`).

nats-py is imported only when a client is made, so ``import aiomas`` never
needs it (``pip install 'aiomas[nats]'`` installs it).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiomas.nats import NatsConfig

__all__ = ["NatsPyClient"]

logger = logging.getLogger("aiomas.nats")

MessageCallback = Callable[[bytes, str], None]
"""Called with the payload and the reply subject (``''`` for none)."""


def _import_nats() -> Any:
    try:
        import nats
    except ImportError as exc:  # pragma: no cover (the dev extra has it)
        raise ImportError(
            "NATS support needs nats-py: pip install 'aiomas[nats]'"
        ) from exc
    return nats


def _first_error(nats: Any, config: NatsConfig, errors: list[Exception]) -> OSError:
    """The error to raise when no server of *config* took us, from what
    nats-py reported on the way."""
    servers = list(config.servers)
    for exc in reversed(errors):
        if isinstance(exc, nats.errors.AuthorizationError) or (
            "authorization violation" in str(exc).lower()
        ):
            return PermissionError(
                f"The NATS servers {servers} refused our credentials ({exc})"
            )
        if isinstance(exc, ssl.SSLError):
            return ConnectionRefusedError(
                f"TLS to the NATS servers {servers} failed: {exc}"
            )
    last = f" (last error: {errors[-1]})" if errors else ""
    return ConnectionRefusedError(f"No NATS server of {servers} could be reached{last}")


class NatsPyClient:
    """A connection to a NATS system through nats-py.

    Don't instantiate it yourself: use :meth:`connect`.
    """

    def __init__(self, nc: Any, errors: Any) -> None:
        self._nc = nc
        self._errors = errors
        # Messages published without waiting, in order, and the task that
        # hands them to nats-py (whose publish() is a coroutine).
        self._outgoing: deque[tuple[str, bytes, str]] = deque()
        self._wake = asyncio.Event()
        self._writer = asyncio.ensure_future(self._write_loop())
        # What to call when nats-py dropped messages of a subscription, by
        # the id() of the subscription object.
        self._overflow: dict[int, Callable[[], None]] = {}
        # Flow control: bytes queued here, and whether writers were told to
        # wait (the NATS socket is slower than they are).
        self._queued = 0
        self.closing = False
        """Whether :meth:`close` or :meth:`abort` was called."""
        self.paused = False
        """Whether more than :attr:`high_water` bytes wait to be sent."""
        self.pending_bytes_limit = 128 * 2**20
        """What nats-py may hold for one subscription that we did not read
        yet; beyond it, it drops messages (and the connection ends)."""
        self.high_water = 4 * 2**20
        self.low_water = 2**20
        self.on_pressure: Callable[[bool], None] | None = None
        """Called with ``True`` when :attr:`paused` starts, ``False`` when
        it ends."""
        self.on_disconnect: Callable[[], None] | None = None
        """Called when the link to the server broke (nats-py reconnects)."""
        self.on_reconnect: Callable[[], None] | None = None
        """Called when the link is back (maybe to another server), with our
        subscriptions restored."""
        self.on_close: Callable[[], None] | None = None
        """Called when the client has given up for good (or was closed)."""

    @classmethod
    async def connect(cls, config: NatsConfig) -> NatsPyClient:
        """Connect to the servers of *config*.

        Raises:
            ConnectionRefusedError: if no server could be reached (or TLS
                to it failed).
            PermissionError: if the servers refused our credentials.
            ImportError: if nats-py is not installed.
        """
        nats = _import_nats()
        holder: list[NatsPyClient] = []
        # What went wrong while we connect for the first time (not logged:
        # raised, if no server takes us).
        first_errors: list[Exception] = []

        attempt: asyncio.Future[Any] | None = None

        async def error_cb(exc: Exception) -> None:
            if not holder:
                first_errors.append(exc)
                if isinstance(exc, ssl.SSLError) and attempt is not None:
                    # nats-py hangs after a failed TLS handshake: give up.
                    attempt.cancel()
                return
            if isinstance(exc, nats.errors.SlowConsumerError):
                holder[0].slow_consumer(exc.sub)
                return
            logger.warning("NATS: %s", exc or type(exc).__name__)

        async def disconnected_cb() -> None:
            # (nats-py calls it when we close, too.)
            if holder and not holder[0].closing and holder[0].on_disconnect:
                holder[0].on_disconnect()

        async def reconnected_cb() -> None:
            if holder and holder[0].on_reconnect is not None:
                holder[0].on_reconnect()

        async def closed_cb() -> None:
            if holder and holder[0].on_close is not None:
                holder[0].on_close()

        options: dict[str, Any] = {
            "servers": list(config.servers),
            "name": config.name,
            "error_cb": error_cb,
            "disconnected_cb": disconnected_cb,
            "reconnected_cb": reconnected_cb,
            "closed_cb": closed_cb,
            "connect_timeout": config.connect_timeout,
            "reconnect_time_wait": config.reconnect_time_wait,
            # The first connect tries each server once; reconnects later try
            # as often as configured (set below).
            "max_reconnect_attempts": 1,
        }
        if config.tls is not None:
            options["tls"] = config.tls
        if config.tls_hostname is not None:
            options["tls_hostname"] = config.tls_hostname
        if config.user is not None:
            options["user"] = config.user
            options["password"] = config.password
        if config.token is not None:
            options["token"] = config.token
        if config.creds is not None:
            options["user_credentials"] = config.creds
        if config.nkey is not None:
            options["nkeys_seed"] = config.nkey
        # Each server is tried twice at most; the bound is for safety.
        bound = (
            2
            * len(config.servers)
            * (config.connect_timeout + config.reconnect_time_wait)
        )
        attempt = asyncio.ensure_future(nats.connect(**options))
        try:
            nc = await asyncio.wait_for(attempt, bound)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # Our caller gave up.
            raise _first_error(nats, config, first_errors) from None
        except TimeoutError as exc:
            raise _first_error(nats, config, first_errors) from exc
        except nats.errors.NoServersError as exc:
            raise _first_error(nats, config, first_errors) from exc
        except nats.errors.Error as exc:
            raise _first_error(nats, config, [*first_errors, exc]) from exc
        nc.options["max_reconnect_attempts"] = config.max_reconnect_attempts
        client = cls(nc, nats.errors)
        holder.append(client)
        return client

    @property
    def max_payload(self) -> int:
        """The largest message payload the server takes (bytes)."""
        value: int = self._nc.max_payload
        return value

    @property
    def is_connected(self) -> bool:
        """Whether the link to a server is up right now."""
        return bool(self._nc.is_connected)

    @property
    def connected_url(self) -> str | None:
        """The server we are connected to, e.g. ``'nats://127.0.0.1:4222'``."""
        url = self._nc.connected_url
        return None if url is None else f"{url.scheme}://{url.hostname}:{url.port}"

    def new_inbox(self) -> str:
        """A subject nobody else uses."""
        inbox: str = self._nc.new_inbox()
        return inbox

    @property
    def queued(self) -> int:
        """The bytes published but not handed to nats-py yet."""
        return self._queued

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Send a message soon, after every message published before it."""
        self._outgoing.append((subject, data, reply))
        self._queued += len(data)
        self._wake.set()
        if not self.paused and self._queued > self.high_water:
            self.paused = True
            if self.on_pressure is not None:
                self.on_pressure(True)

    async def subscribe(
        self,
        subject: str,
        callback: MessageCallback,
        overflow: Callable[[], None] | None = None,
    ) -> Callable[[], Awaitable[None]]:
        """Call *callback* for every message on *subject* (*overflow* if the
        client had to drop some because we did not keep up).

        Returns:
            What unsubscribes (idempotent).
        """

        async def on_message(msg: Any) -> None:
            callback(msg.data, msg.reply)

        # Flush what we published before, so that the server takes the
        # subscription after it (the order of a connect request's steps).
        await self._drain_outgoing()
        sub = await self._nc.subscribe(
            subject, cb=on_message, pending_bytes_limit=self.pending_bytes_limit
        )
        # nats-py's SlowConsumerError names the subscription object (.sub).
        sid = id(sub)
        if overflow is not None:
            self._overflow[sid] = overflow
        done = False

        async def unsubscribe() -> None:
            nonlocal done
            if done:
                return
            done = True
            self._overflow.pop(sid, None)
            if self._nc.is_closed:
                return
            try:
                await sub.unsubscribe()
            except self._errors.Error as exc:
                logger.debug("NATS: unsubscribing from %s failed: %s", subject, exc)

        return unsubscribe

    async def flush(self, timeout: float = 2.0) -> None:  # noqa: ASYNC109
        """Wait until the server has taken everything sent so far (e.g. a
        subscription, before others are told about it).

        (nats-py's flush() writes its PING past the commands still queued, so
        a message to ourselves, queued after them, is what tells.)

        Raises:
            TimeoutError: if the server does not confirm within *timeout*.
        """
        probe = self.new_inbox()
        arrived = asyncio.get_running_loop().create_future()

        def received(data: bytes, reply: str) -> None:
            if not arrived.done():
                arrived.set_result(None)

        unsubscribe = await self.subscribe(probe, received)
        try:
            self.publish(probe, b"")
            await asyncio.wait_for(arrived, timeout)
        except TimeoutError:
            raise TimeoutError("The NATS server did not answer in time") from None
        finally:
            await unsubscribe()

    def slow_consumer(self, sub: object) -> None:
        """nats-py dropped messages of the subscription *sub* (the object
        its ``subscribe()`` returned): tell its *overflow* callback."""
        overflow = self._overflow.pop(id(sub), None)
        if overflow is not None:
            overflow()

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:  # noqa: ASYNC109
        """Send *data* to *subject* and return the first answer.

        Raises:
            ConnectionRefusedError: if nobody subscribes to *subject*.
            TimeoutError: if no answer came within *timeout* seconds.
            ConnectionResetError: if the client is closed.
            ConnectionError: if the request cannot be made now (e.g. the
                client reconnects, or the server refuses *subject*).
        """
        await self._drain_outgoing()
        errors = self._errors
        try:
            msg = await self._nc.request(subject, data, timeout=timeout)
        except errors.NoRespondersError:
            raise ConnectionRefusedError(f"Nobody serves {subject!r}") from None
        except errors.TimeoutError:
            raise TimeoutError(
                f"No answer from {subject!r} within {timeout:.3g} s"
            ) from None
        except (errors.ConnectionClosedError, errors.ConnectionDrainingError) as exc:
            raise ConnectionResetError("The NATS connection is closed") from exc
        except errors.Error as exc:
            # (A subject the server refuses, the link reconnecting, a full
            # outgoing buffer ...: this request cannot be made now.)
            raise ConnectionError(f"NATS request to {subject!r}: {exc}") from exc
        data_: bytes = msg.data
        return data_

    async def gather(self, subject: str, data: bytes, wait: float) -> list[bytes]:
        """Send *data* to *subject* and collect the (non-empty) answers that
        arrive within *wait* seconds."""
        inbox = self.new_inbox()
        answers: list[bytes] = []

        def answered(data: bytes, reply: str) -> None:
            if data:  # (Not the server's empty "no responders" status.)
                answers.append(data)

        unsubscribe = await self.subscribe(inbox, answered)
        try:
            self.publish(subject, data, inbox)
            await asyncio.sleep(wait)
        finally:
            await unsubscribe()
        return answers

    async def close(self) -> None:
        """Send what is still queued, then close the connection."""
        self.closing = True
        try:
            await self._drain_outgoing()
            if self._nc.is_connected:
                try:
                    await self._nc.flush(timeout=1)
                except self._errors.Error as exc:
                    logger.debug("NATS: flush before closing failed: %s", exc)
        finally:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
            if not self._nc.is_closed:
                await self._nc.close()

    async def abort(self) -> None:
        """Close the connection at once, dropping what is queued (as a
        process that dies does)."""
        self._outgoing.clear()
        self._queued = 0
        self._writer.cancel()
        await asyncio.gather(self._writer, return_exceptions=True)
        if not self._nc.is_closed:
            # Cut the socket first: nats-py's close() would flush.
            transport = getattr(self._nc, "_transport", None)
            if transport is not None:
                transport.close()
            await self._nc.close()

    async def _drain_outgoing(self) -> None:
        outgoing = self._outgoing
        errors = self._errors
        while outgoing:
            subject, data, reply = outgoing.popleft()
            try:
                await self._nc.publish(subject, data, reply=reply)
            except errors.Error as exc:
                # A closed connection: its sessions are ending already.
                logger.debug("NATS: publishing to %s failed: %s", subject, exc)
            self._queued -= len(data)
            if self.paused and self._queued <= self.low_water:
                self.paused = False
                if self.on_pressure is not None:
                    self.on_pressure(False)

    async def _write_loop(self) -> None:
        wake = self._wake
        while True:
            await wake.wait()
            wake.clear()
            await self._drain_outgoing()
