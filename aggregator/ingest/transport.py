"""How the ingest worker talks MQTT: through an ``IoLoop`` in a child process, or on a thread.

Both give the worker the same operations: ``take`` a micro-batch of received messages, ``ack``
messages once their batch is committed, ``publish`` feedback and notices, and the connection
state. The I/O loop (``aggregator/ingest/mqtt.py``) runs at the other end of a socket pair.
``ProcessTransport`` (the default) hosts it in a child process, so MQTT I/O and the pool writer
each have a core of their own instead of sharing one interpreter lock; ``ThreadTransport`` hosts
it on a thread of the aggregator.

Crash semantics are the same either way: a message is acknowledged only when the worker says
its batch is committed. If the parent dies, the child sees the channel close and exits at once
without acknowledging anything; if the child dies, the parent's unacknowledged messages are
redelivered to the next session (same client id), and the pool's alert_id key absorbs them.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

from aggregator.config import BatchSettings, MqttSettings
from aggregator.ingest.assemble import Inbound, Prevalidator
from aggregator.ingest.mqtt import ChannelClosedError, FrameChannel, Outgoing, child_main, serve

log = logging.getLogger(__name__)

__all__ = ["Outgoing", "ProcessTransport", "ThreadTransport", "Transport", "make_transport"]


class Transport(Protocol):
    def start(self) -> None: ...
    def take(self, timeout: float) -> list[Inbound]: ...
    def ack(self, messages: Sequence[Inbound]) -> None: ...
    def publish(self, messages: Sequence[Outgoing]) -> None: ...
    def connected(self) -> bool: ...
    def wait_connected(self, timeout: float) -> bool: ...
    def depth(self) -> int: ...
    def stop(self) -> None: ...


class _Relay(ABC):
    """The worker's end of the channel to an ``IoLoop``; subclasses say where the loop runs."""

    # A message's generation is (incarnation << 32) | connection generation in the loop, so an
    # acknowledgement never reaches a loop (or a connection) that did not receive the message.
    _SHIFT = 32

    def __init__(
        self,
        settings: MqttSettings,
        batching: BatchSettings,
        prevalidator: Prevalidator | None = None,
    ) -> None:
        self.settings = settings
        self.batching = batching
        self.prevalidator = prevalidator
        self._send_lock = threading.Lock()
        self._connected = threading.Event()
        self._carry: list[Inbound] = []
        self._incarnation = 0
        self._stopping = False
        self._channel: FrameChannel | None = None

    # -- where the loop runs

    @abstractmethod
    def _host(self) -> socket.socket:
        """Start a loop; return our end of its channel."""

    @abstractmethod
    def _host_end(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the loop to end, then end it."""

    def _host_exitcode(self) -> int | None:
        return None

    # -- lifecycle

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        with self._send_lock:
            self._channel = FrameChannel(self._host(), blocking=True)
            self._incarnation += 1
            self._connected.clear()

    def _respawn(self) -> None:
        if self._stopping:
            return
        log.error(
            "the MQTT I/O loop ended (exit code %s); starting a new one: unacknowledged messages "
            "are redelivered to it and the pool absorbs any it already holds",
            self._host_exitcode(),
        )
        self._host_end(0.0)
        if self._channel is not None:
            self._channel.close()
        self._carry = []  # the old loop's messages: redelivered to the new session
        time.sleep(0.5)  # no tight loop if the loop keeps failing at start
        self._spawn()

    def stop(self) -> None:
        self._stopping = True
        if self._channel is None:
            return
        self._send(("stop",))
        self._host_end(10.0)
        self._channel.close()

    # -- the worker's side

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            assert self._channel is not None
            try:
                self._channel.send(message)
            except ChannelClosedError as exc:
                # The loop is gone: its messages were never acknowledged and the broker sends
                # them to the next one, which take() starts (unless we are stopping).
                if not self._stopping:
                    log.warning("MQTT I/O loop unreachable (%s); it is restarted", exc)

    def take(self, timeout: float) -> list[Inbound]:
        """Up to ``max_messages``: the first within ``timeout``, the rest within the linger;
        once ``min_messages`` are in, only what has already arrived."""
        limit = self.batching.max_messages
        enough = self.batching.min_messages
        batch, self._carry = self._carry, []
        deadline = time.monotonic() + timeout
        linger_until: float | None = None
        while len(batch) < limit:
            now = time.monotonic()
            if batch and linger_until is None:
                linger_until = now + self.batching.linger_ms / 1000
            if len(batch) >= enough:
                wait = 0.0  # a backlog: drain the channel, wait for nothing more
            else:
                wait = (linger_until if linger_until is not None else deadline) - now
            channel = self._channel
            assert channel is not None
            readable, _, _ = select.select([channel], [], [], max(0.0, wait))
            if not readable:
                break
            try:
                frames = channel.receive()
            except ChannelClosedError:
                self._respawn()
                return []  # from the dead loop: unacknowledgeable, redelivered to the next
            tag = self._incarnation << self._SHIFT
            for kind, *body in frames:
                if kind == "rows":
                    batch.extend(
                        Inbound(t, p, r, mid, qos, tag | gen, pre)
                        for t, p, r, mid, qos, gen, pre in body[0]
                    )
                elif kind == "state":
                    (self._connected.set if body[0] else self._connected.clear)()
        if len(batch) > limit:
            batch, self._carry = batch[:limit], batch[limit:]
        return batch

    def ack(self, messages: Sequence[Inbound]) -> None:
        mine = self._incarnation
        mask = (1 << self._SHIFT) - 1
        rows = [
            (m.mid, m.qos, m.generation & mask)
            for m in messages
            if m.qos > 0 and m.generation >> self._SHIFT == mine
        ]
        if rows:
            self._send(("ack", rows))

    def publish(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            self._send(("publish", list(messages)))

    def connected(self) -> bool:
        return self._connected.is_set()

    def wait_connected(self, timeout: float) -> bool:
        # The state arrives on the channel, which the ingest worker reads in take().
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(0.02, remaining))
        return True

    def depth(self) -> int:
        return len(self._carry)


class ProcessTransport(_Relay):
    """The I/O loop in a child process (``cwg-mqtt-<client id>``)."""

    _ctx = multiprocessing.get_context("spawn")
    _process: Any = None

    def _host(self) -> socket.socket:
        # A duplex Pipe is a socket pair on POSIX, and the child's end passes to a spawned child.
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        config = {
            "mqtt": self.settings.model_dump(mode="json", exclude={"password", "password_file"}),
            "batch": self.batching.model_dump(mode="json"),
        }
        process = self._ctx.Process(
            target=child_main,
            args=(
                child_conn,
                config,
                self.settings.secret(),
                logging.getLogger().level,
                self.prevalidator,
            ),
            name=f"cwg-mqtt-{self.settings.client_id}",
            daemon=True,
        )
        process.start()
        child_conn.close()  # the child's end lives in the child now
        self._process = process
        mine = socket.socket(fileno=os.dup(parent_conn.fileno()))
        parent_conn.close()
        return mine

    def _host_exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode

    def _host_end(self, timeout: float) -> None:
        process = self._process
        if process is None:
            return
        process.join(timeout)
        if process.is_alive():
            (process.terminate if timeout else process.kill)()
            process.join(5)
        if not process.is_alive():
            # Its two pipe ends (the sentinel and the spawn pipe) are otherwise closed only
            # whenever the Process object is collected: a pair per restart of the loop or service
            process.close()
            self._process = None


class ThreadTransport(_Relay):
    """The I/O loop on a thread of this process (``mqtt.io_process = false``)."""

    _thread: threading.Thread | None = None

    def _host(self) -> socket.socket:
        mine, theirs = socket.socketpair()
        self._thread = threading.Thread(
            target=serve,
            args=(self.settings, self.batching, theirs, self.prevalidator),
            name="cwg-mqtt-io",
            daemon=True,
        )
        self._thread.start()
        return mine

    def _host_end(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


def make_transport(
    settings: MqttSettings, batching: BatchSettings, prevalidator: Prevalidator | None = None
) -> Transport:
    """The transport ``settings.io_process`` asks for; with a ``prevalidator``, alerts are
    validated in the I/O loop, next to the network, instead of by the pool writer."""
    if settings.io_process:
        return ProcessTransport(settings, batching, prevalidator)
    return ThreadTransport(settings, batching, prevalidator)
