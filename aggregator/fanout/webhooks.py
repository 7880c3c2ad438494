"""Outbound webhook delivery: the outbox's rows POSTed to subscribers, signed the Standard
Webhooks way (https://www.standardwebhooks.com).

Every request carries

    webhook-id:        msg_…   the same on every retry: the receiver's idempotency key
    webhook-timestamp: 1733480000   UNIX seconds of this attempt
    webhook-signature: v1,<base64 HMAC-SHA256 of "{webhook-id}.{webhook-timestamp}.{body}">

with the key the base64 after ``whsec_`` in the subscription's secret. For a grace period after
the secret was rotated the header holds two signatures, space-separated as the specification
allows (new key first, then the old one), so a receiver verifies with either.

A 2xx answer is delivered. ``410 Gone`` disables the subscription (the reason and time are
recorded; its deliveries wait until an administrator enables it again). Anything else (another
status, a redirect, which is never followed, a refused connection, a timeout, a destination
that is not allowed: aggregator/fanout/destinations.py) is tried again after the next delay of
the schedule (with jitter, so many failed deliveries do not return at once); a ``429`` or
``503`` with ``Retry-After`` waits at least that long (up to ``retry_after_max_s``). After the
last delay the delivery is dead: the API lists it, and an administrator may send it again.

A case's deliveries to one subscriber go in order (the outbox hands out only the first pending
one), so a receiver that was down gets the steps of each case in the order they were taken
once it is back.

The worker is threads in the aggregator service's process (``Service`` starts and stops it):
delivery is waiting on sockets (httpx releases the GIL), each claim or mark a short
transaction, so it costs ingest almost nothing; it runs whether or not the operator API process
is up. Several replicas run one each on a PostgreSQL pool: the outbox's ``SKIP LOCKED`` claims
and leases keep them from posting one delivery twice at once.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import logging
import random
import sqlite3
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import httpx
import psycopg
import psycopg_pool

from aggregator.errors import AggregatorError
from aggregator.fanout.destinations import AllowList, RefusedDestinationError, check_destination
from aggregator.fanout.metrics import WebhookMetrics
from aggregator.pool.outbox import SECRET_PREFIX, Claim, Outbox

__all__ = [
    "WebhookWorker",
    "WorkerOptions",
    "parse_retry_after",
    "retry_delay",
    "sign",
    "signatures",
]

log = logging.getLogger(__name__)

USER_AGENT: Final = "cwg-webhooks/1"
# what the pool raises when it cannot answer (SQLite busy or gone, PostgreSQL down)
_POOL_FAULTS: Final = (
    sqlite3.Error,
    psycopg.Error,
    psycopg_pool.PoolTimeout,
    psycopg_pool.PoolClosed,
    AggregatorError,
)


def _key(secret: str) -> bytes:
    if not secret.startswith(SECRET_PREFIX):
        raise AggregatorError("a webhook secret starts with whsec_")
    return base64.b64decode(secret[len(SECRET_PREFIX) :])


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """The ``webhook-signature`` header value: ``v1,`` and the base64 HMAC-SHA256 of
    ``{msg_id}.{timestamp}.{body}`` under the secret's key."""
    mac = hmac.new(_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signatures(claim: Claim, timestamp: int) -> str:
    """The header value for one attempt: the current key's signature, and during a
    rotation's grace period the previous key's after it, space-separated."""
    header = sign(claim.secret, claim.webhook_id, timestamp, claim.payload)
    if claim.previous_secret:
        header += " " + sign(claim.previous_secret, claim.webhook_id, timestamp, claim.payload)
    return header


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta seconds or an HTTP-date
    (RFC 9110 10.2.3); None when absent or unreadable. A date in the past is 0."""
    if not value:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # an HTTP-date is GMT; a zone-less one is read as such
        return None
    return max(0.0, when.timestamp() - now)


def retry_delay(
    attempts: int, schedule: Sequence[float], jitter: float, rnd: random.Random
) -> float | None:
    """The wait before the next try after ``attempts`` failed tries; None: give up (dead).
    Jitter lengthens each delay by up to that fraction."""
    if attempts > len(schedule):
        return None
    return float(schedule[attempts - 1]) * (1.0 + jitter * rnd.random())


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    schedule_s: tuple[float, ...]
    timeout_s: float = 10.0
    workers: int = 2
    poll_s: float = 1.0
    jitter: float = 0.2
    batch: int = 16
    retention_days: float = 30.0  # finished deliveries kept this long, then deleted
    prune_every_s: float = 3600.0
    retry_after_max_s: float = 3600.0  # a receiver's Retry-After is honoured up to this
    # destinations allowed although not public (CWG_WEBHOOKS__ALLOW_NETWORKS)
    allow_networks: tuple[str, ...] = ()
    pending_every_s: float = 5.0  # how often the pending gauge is counted
    ca_file: Path | None = None  # CAs for https receivers instead of the system's


class WebhookWorker:
    """Threads that claim due deliveries, post them and mark the outcome."""

    def __init__(
        self,
        target: Path | str,
        options: WorkerOptions,
        metrics: WebhookMetrics | None = None,
    ) -> None:
        self.options = options
        self.metrics = metrics or WebhookMetrics()
        self._allow = AllowList.parse(options.allow_networks)
        self.outbox = Outbox(target, pooled=True, max_connections=options.workers + 1)
        # http, and https to an address: one client. https to a name: a client per name,
        # because httpx pools connections by the URL's address and port, and two names on one
        # address would otherwise share a connection whose certificate was checked for the
        # first name only. As many as there are such subscriptions' host names.
        self._client = self._new_client()
        self._named: dict[str, httpx.Client] = {}
        self._named_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._rnd = random.Random()
        self._prune_lock = threading.Lock()
        self._next_prune = time.monotonic() + 60.0  # not at start: replicas start together
        self._count_lock = threading.Lock()
        self._next_count = 0.0

    def _new_client(self) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if self.options.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(self.options.ca_file))
        return httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(self.options.timeout_s),
            follow_redirects=False,  # a redirect is not a delivery, and could leak the body
            headers={"user-agent": USER_AGENT, "content-type": "application/json"},
            trust_env=False,  # a proxy from the environment is not the subscriber's
        )

    def _client_for(self, server_name: str | None) -> httpx.Client:
        if server_name is None:
            return self._client
        with self._named_lock:
            client = self._named.get(server_name)
            if client is None:
                client = self._named[server_name] = self._new_client()
            return client

    def start(self) -> None:
        for n in range(max(1, self.options.workers)):
            t = threading.Thread(target=self._run, name=f"cwg-webhooks-{n}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info(
            "webhook delivery workers=%s retries=%s timeout_s=%s",
            len(self._threads),
            len(self.options.schedule_s),
            self.options.timeout_s,
        )

    def stop(self, timeout: float = 15.0) -> None:
        """Stop claiming; a post in flight finishes (bounded by the timeout) and is marked."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._threads.clear()
        self._client.close()
        with self._named_lock:
            for client in self._named.values():
                client.close()
            self._named.clear()
        self.outbox.close()

    def __enter__(self) -> WebhookWorker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the loop ------------------------------------------------------------------------------

    def _run(self) -> None:
        # the lease outlives the post: a worker never loses a row while it is still posting it
        lease_s = self.options.timeout_s * 2 + 5.0
        while not self._stop.is_set():
            try:
                claims = self.outbox.claim(self.options.batch, lease_s)
            except _POOL_FAULTS as exc:  # the pool unreachable: wait, then try again
                log.warning("webhook outbox unreachable: %s", type(exc).__name__)
                self._stop.wait(max(self.options.poll_s, 1.0))
                continue
            self._maybe_count()
            if not claims:
                self._maybe_prune()
                self._stop.wait(self.options.poll_s)
                continue
            for claim in claims:
                if self._stop.is_set():
                    break  # its lease runs out; this or another replica's worker retries it
                self.deliver(claim)

    def _maybe_count(self) -> None:
        # one thread at a time, every few seconds: a count over the pending rows' index
        if time.monotonic() < self._next_count or not self._count_lock.acquire(blocking=False):
            return
        try:
            self._next_count = time.monotonic() + self.options.pending_every_s
            self.metrics.pending.set(self.outbox.pending_count())
        except _POOL_FAULTS as exc:
            log.warning("webhook pending count failed: %s", type(exc).__name__)
        finally:
            self._count_lock.release()

    def _maybe_prune(self) -> None:
        # one idle worker at a time, once per period; on several replicas each prunes (the
        # deletes are bounded and idempotent)
        if time.monotonic() < self._next_prune or not self._prune_lock.acquire(blocking=False):
            return
        try:
            self._next_prune = time.monotonic() + self.options.prune_every_s
            gone = self.outbox.prune(time.time() - self.options.retention_days * 86400)
            if gone:
                log.info("webhook deliveries pruned=%s", gone)
        except _POOL_FAULTS as exc:
            log.warning("webhook prune failed: %s", type(exc).__name__)
        finally:
            self._prune_lock.release()

    def deliver(self, claim: Claim) -> bool:
        """Post one claimed delivery and record the outcome; True when it was delivered."""
        stamp = int(time.time())
        headers = {
            "webhook-id": claim.webhook_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signatures(claim, stamp),
        }
        status: int | None = None
        retry_after: float | None = None
        started = time.monotonic()
        try:
            # checked again at every attempt (what the name resolves to may have changed since
            # the subscription was made), and posted to the very address that passed
            target = check_destination(claim.url, self._allow)
            headers["host"] = target.host_header
            extensions = {"sni_hostname": target.server_name} if target.server_name else None
            response = self._client_for(target.server_name).post(
                target.url,
                content=claim.payload.encode(),
                headers=headers,
                extensions=extensions,
            )
            status = response.status_code
            error = None if 200 <= status < 300 else f"HTTP {status}"
            if status in (429, 503):
                retry_after = parse_retry_after(response.headers.get("retry-after"), time.time())
        except RefusedDestinationError as exc:
            # the reason names the host and the kind of address, never the path or query
            error = "destination refused"
            log.warning(
                "webhook %s to subscription %s not sent: %s",
                claim.webhook_id,
                claim.subscription_id,
                exc,
            )
        except httpx.HTTPError as exc:
            # the exception's name says what failed; its text may quote the URL (which may hold
            # a receiver's token), so it is not kept
            error = type(exc).__name__
        self.metrics.attempt_seconds.observe(time.monotonic() - started)
        try:
            if error is None:
                self.outbox.mark_delivered(claim, status)
                self.metrics.deliveries.labels("delivered").inc()
                return True
            if status == 410:
                if self.outbox.mark_gone(claim, status, error):
                    self.metrics.deliveries.labels("gone").inc()
                    log.warning(
                        "webhook subscription %s disabled: its receiver answered 410 Gone",
                        claim.subscription_id,
                    )
                return False
            attempts = claim.attempts + 1
            delay = retry_delay(attempts, self.options.schedule_s, self.options.jitter, self._rnd)
            if delay is None:
                self.outbox.mark_dead(claim, error, status)
                self.metrics.deliveries.labels("dead").inc()
                log.warning(
                    "webhook %s to subscription %s dead after %s attempts: %s",
                    claim.webhook_id,
                    claim.subscription_id,
                    attempts,
                    error,
                )
            else:
                if retry_after is not None:
                    # the receiver said when: not earlier, though never sooner than the
                    # schedule's delay, and not later than the cap
                    delay = max(delay, min(retry_after, self.options.retry_after_max_s))
                self.outbox.mark_retry(claim, error, status, time.time() + delay)
                self.metrics.deliveries.labels("failed").inc()
                log.info(
                    "webhook %s to subscription %s failed (%s), attempt %s; next in %.0f s",
                    claim.webhook_id,
                    claim.subscription_id,
                    error,
                    attempts,
                    delay,
                )
        except _POOL_FAULTS as exc:  # the pool went away: the lease runs out, the row is retried
            log.warning("webhook %s not marked: %s", claim.webhook_id, type(exc).__name__)
        return False
