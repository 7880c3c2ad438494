"""Operator accounts and graded access (GB/T 34300 §7.2: 一级一权限、一机一帐号、一人一密码).

Every operator has an account of their own with an argon2 password hash, kept in the pool beside
the events it grants access to (tables ``operators`` and ``operator_tokens`` of the SQLite file
or of the PostgreSQL database that replicas share; aggregator/access/store.py). An account has a
level and a scope:

=============  ===========================================================================
level          sees
=============  ===========================================================================
admin          everything, including dead letters and out-of-area reports
county         events whose grid code starts with its 6-digit county code
street         … its 9-digit street code
community      … its 12-digit community code
department     events routed to its department (catalogue code), optionally within a prefix
=============  ===========================================================================

Logging in (``POST /api/v1/auth/token``) issues a random bearer token; only its SHA-256 is
stored, with an expiry. No account exists until an administrator provisions one with
``gateway accounts add``; only development mode (``CWG_DEV=1``) creates ``admin``/``admin`` for
the demo, and says so loudly.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import logging
import os
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import ClassVar, Final, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from aggregator.access.store import (
    AccountRecord,
    AccountStore,
    StrikeBook,
    StrikeKey,
    Strikes,
    open_account_store,
)
from aggregator.errors import AggregatorError

__all__ = [
    "DEV_ENV",
    "AccountError",
    "AuthError",
    "AuthStore",
    "IssuedToken",
    "Level",
    "LimiterPolicy",
    "LoginLimiter",
    "LoginThrottledError",
    "MemoryStrikeBook",
    "Operator",
    "PasswordChecker",
    "RefusalPause",
    "create_account",
    "main_accounts",
    "verify_login",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEV_ENV = "CWG_DEV"
MIN_PASSWORD_LENGTH = 10
USERNAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{1,63}")  # whole name: fullmatch
# The limiter's user key for every name that no account can have (not itself such a name).
_NOT_A_NAME: Final = "<not an account name>"


def is_account_name(username: str) -> bool:
    """Whether an account could have this name (the rule ``create_account`` enforces)."""
    return USERNAME_PATTERN.fullmatch(username) is not None


DEPARTMENT_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class AuthError(AggregatorError):
    """Credentials or a token were refused; the message is safe to show to the caller."""


class LoginThrottledError(AuthError):
    """A login refused before its password was checked: too many failures, or the password
    checker is busy. ``retry_after`` is in seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AccountError(AggregatorError):
    """An account could not be created or changed; the message says why."""


class Level(StrEnum):
    ADMIN = "admin"
    COUNTY = "county"  # 县级
    STREET = "street"  # 街道 / 片区
    COMMUNITY = "community"  # 社区
    DEPARTMENT = "department"  # 主管部门 (whistle events routed to it)


# Digits of the grid code each area level fixes (see aggregator.grids).
SCOPE_LENGTH = {Level.COUNTY: 6, Level.STREET: 9, Level.COMMUNITY: 12}


@dataclass(frozen=True, slots=True)
class Operator:
    """An authenticated operator and what they may see."""

    username: str
    level: Level
    scope_code: str
    department: str | None
    display_name: str
    disabled: bool = False

    @property
    def is_admin(self) -> bool:
        return self.level is Level.ADMIN

    def sees_grid(self, grid_code: str) -> bool:
        """Whether a grid (or any code below it) lies in this operator's area."""
        return grid_code.startswith(self.scope_code)

    def sees_event(self, grid_code: str, department: str) -> bool:
        if not self.sees_grid(grid_code):
            return False
        return self.level is not Level.DEPARTMENT or department == self.department

    def narrows(self, prefix: str) -> bool:
        """Whether a requested prefix overlaps this operator's area at all."""
        return prefix.startswith(self.scope_code) or self.scope_code.startswith(prefix)

    def event_filter(self, alias: str = "e") -> tuple[str, list[str]]:
        """A SQL condition (and its parameters) keeping only the events this operator sees."""
        clauses: list[str] = []
        params: list[str] = []
        if self.scope_code:
            clauses.append(f"substr({alias}.grid_code, 1, {len(self.scope_code)}) = ?")
            params.append(self.scope_code)
        if self.level is Level.DEPARTMENT:
            clauses.append(f"{alias}.department = ?")
            params.append(self.department or "")
        return (" AND ".join(clauses) or "1=1"), params


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime
    operator: Operator


def _token_hash(token: str) -> str:
    # Tokens are 256 random bits: a fast hash is enough to make a stolen table useless.
    return hashlib.sha256(token.encode()).hexdigest()


def _operator(record: AccountRecord) -> Operator:
    return Operator(
        username=record.username,
        level=Level(record.level),
        scope_code=record.scope_code,
        department=record.department,
        display_name=record.display_name,
        disabled=record.disabled,
    )


def check_scope(level: Level, scope_code: str, department: str | None) -> None:
    """Raise AccountError unless level, scope and department fit together."""
    if scope_code and (not scope_code.isascii() or not scope_code.isdigit()):
        raise AccountError(f"scope {scope_code!r} must be a grid code prefix (ASCII digits)")
    if level is Level.ADMIN:
        if scope_code or department:
            raise AccountError("an admin account has neither scope nor department")
    elif level is Level.DEPARTMENT:
        if not department or not DEPARTMENT_PATTERN.match(department):
            raise AccountError("a department account needs --department <catalogue code>")
        if scope_code and len(scope_code) not in SCOPE_LENGTH.values():
            raise AccountError(
                f"a department's scope must be a county, street or community code, "
                f"not {len(scope_code)} digits"
            )
    else:
        if department:
            raise AccountError(f"a {level.value} account has no department")
        want = SCOPE_LENGTH[level]
        if len(scope_code) != want:
            raise AccountError(
                f"a {level.value} account needs a {want}-digit {level.value} code as its scope, "
                f"got {scope_code!r}"
            )


class AuthStore:
    """Accounts, passwords and tokens of one pool: the pool file, or the PostgreSQL pool that
    every replica shares. Hashing and checking happen here; the rows are kept by an
    ``AccountStore`` (aggregator/access/store.py). Thread-safe."""

    def __init__(
        self,
        pool: Path | str | AccountStore,
        *,
        token_ttl: timedelta = timedelta(hours=12),
        hasher: PasswordHasher | None = None,
    ) -> None:
        """``pool`` is the pool target as ``Settings.pool_target`` gives it (an SQLite pool
        file, or a ``postgresql://`` URL), or an account store opened by the caller."""
        self.token_ttl = token_ttl
        self._hasher = hasher or PasswordHasher()
        self._store = open_account_store(pool) if isinstance(pool, Path | str) else pool
        # Verifying against this when the user is unknown keeps the answer time the same, so
        # timing does not reveal which usernames exist.
        self._dummy_hash = self._hasher.hash(secrets.token_hex(16))

    @property
    def target(self) -> str:
        """Where the accounts are, safe to print (a URL without its password)."""
        return self._store.target

    def close(self) -> None:
        self._store.close()

    # -- accounts -------------------------------------------------------------------------

    def create_account(
        self,
        username: str,
        level: Level | str,
        *,
        scope_code: str = "",
        department: str | None = None,
        display_name: str | None = None,
        password: str | None = None,
        allow_weak_password: bool = False,
    ) -> tuple[Operator, str]:
        """Add an account; returns it and its password (generated when none is given)."""
        level = Level(level)
        if not is_account_name(username):
            raise AccountError(
                f"username {username!r} must be 2-64 letters, digits or _.@- "
                "and start with a letter or digit"
            )
        check_scope(level, scope_code, department)
        if password is None:
            password = secrets.token_urlsafe(12)
        elif not allow_weak_password and (
            len(password) < MIN_PASSWORD_LENGTH or password.casefold() == username.casefold()
        ):
            raise AccountError(
                f"password refused: at least {MIN_PASSWORD_LENGTH} characters and not the "
                "username (omit it to have one generated)"
            )
        record = AccountRecord(
            username=username,
            level=level.value,
            scope_code=scope_code,
            department=department,
            display_name=display_name or username,
            password_hash=self._hasher.hash(password),
            disabled=False,
        )
        if not self._store.add(record, time.time()):
            raise AccountError(f"account {username!r} already exists")
        log.info("operator account %s created level=%s scope=%s", username, level, scope_code)
        return _operator(record), password

    def accounts(self) -> list[Operator]:
        return [_operator(r) for r in self._store.accounts()]

    def account(self, username: str) -> Operator | None:
        record = self._store.account(username)
        return None if record is None else _operator(record)

    def set_disabled(self, username: str, disabled: bool) -> None:
        """Disable (and log out everywhere) or re-enable an account."""
        if not self._store.set_disabled(username, disabled):
            raise AccountError(f"no account {username!r}")
        log.info("operator account %s %s", username, "disabled" if disabled else "enabled")

    def set_password(self, username: str, password: str | None = None) -> str:
        """Set a new password (generated when none is given) and end the account's sessions."""
        if password is None:
            password = secrets.token_urlsafe(12)
        elif len(password) < MIN_PASSWORD_LENGTH or password.casefold() == username.casefold():
            raise AccountError(f"password refused: at least {MIN_PASSWORD_LENGTH} characters")
        if not self._store.set_password_hash(username, self._hasher.hash(password), time.time()):
            raise AccountError(f"no account {username!r}")
        return password

    def ensure_dev_admin(self, dev: bool) -> str | None:
        """In development mode only (``Settings.dev``): create ``admin``/``admin`` if no
        account exists yet.

        Returns a line to print, or None when nothing was created."""
        if not dev or self._store.count():
            return None
        try:
            self.create_account(
                "admin",
                Level.ADMIN,
                display_name="Demo administrator",
                password="admin",  # noqa: S106 - development mode only, announced loudly
                allow_weak_password=True,
            )
        except AccountError:
            return None  # another replica made it a moment ago
        message = (
            f"{DEV_ENV}=1: created the demo account admin/admin. Never run like this in "
            "production: unset CWG_DEV and provision accounts with `gateway accounts add`."
        )
        log.warning("%s", message)
        return message

    # -- tokens ---------------------------------------------------------------------------

    def login(self, username: str, password: str) -> IssuedToken:
        # A name no account can have (a NUL, which PostgreSQL text cannot even hold) is an
        # unknown user without asking the store; the dummy hash still runs, as for any other.
        record = self._store.account(username) if is_account_name(username) else None
        stored = record.password_hash if record is not None else self._dummy_hash
        try:
            self._hasher.verify(stored, password)
            ok = record is not None
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if not ok or record is None:
            log.info("login refused for %r", username)
            raise AuthError("wrong username or password")
        if record.disabled:
            raise AuthError("this account is disabled")
        # Hashes made with older (cheaper) parameters are upgraded while the password is known.
        rehashed = self._hasher.hash(password) if self._hasher.check_needs_rehash(stored) else None
        token = secrets.token_urlsafe(32)
        now = time.time()
        expires = now + self.token_ttl.total_seconds()
        self._store.add_token(_token_hash(token), username, now, expires, rehashed)
        log.info("operator %s logged in", username)
        return IssuedToken(token, datetime.fromtimestamp(expires, UTC), _operator(record))

    def resolve(self, token: str) -> Operator:
        """The operator a bearer token belongs to; AuthError if unknown, expired or disabled.
        On PostgreSQL, an unreachable pool raises ``PoolUnavailableError`` instead."""
        if not token or len(token) > 256:
            raise AuthError("invalid token")
        found = self._store.token_account(_token_hash(token))
        if found is None:
            raise AuthError("invalid token")
        record, expires_at = found
        if expires_at < time.time():
            raise AuthError("token expired; log in again")
        if record.disabled:
            raise AuthError("this account is disabled")
        return _operator(record)

    def revoke(self, token: str) -> None:
        self._store.delete_token(_token_hash(token))

    def login_limiter(self, policy: LimiterPolicy | None = None) -> LoginLimiter:
        """The login limiter for this pool's accounts. On PostgreSQL its counts are in the pool
        (every replica's API counts into them, so a lockout holds on all); on SQLite, where
        one API process serves the pool, in this process's memory."""
        policy = policy or LimiterPolicy()
        book = self._store.strike_book(policy.forget_after_s)
        if book is None:
            return LoginLimiter(policy)
        return LoginLimiter(policy, clock=time.time, book=book)


# -- login throttling -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LimiterPolicy:
    """How many failed logins are free, and how the lockout after them grows."""

    free_failures_user: int = 5
    # Higher per address: an office behind one NAT (or a reverse proxy without forwarded
    # headers) holds many operators who each mistype now and then.
    free_failures_addr: int = 20
    base_lockout_s: float = 1.0
    max_lockout_s: float = 900.0
    # A key with no failure for this long (after its lockout) starts again from zero.
    forget_after_s: float = 900.0
    # Bounds memory under a spray of made-up user names or addresses; the oldest go first.
    max_entries: int = 100_000


class MemoryStrikeBook:
    """The limiter's counts in this process's memory, at most ``max_entries`` keys (the least
    recently used go first). A restart forgets them; other processes do not see them."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._keys: OrderedDict[StrikeKey, Strikes] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def shared(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self._keys)

    def change(
        self,
        keys: Sequence[StrikeKey],
        now: float,
        fn: Callable[[list[Strikes]], T],
        *,
        create: bool,
        write: bool = True,
    ) -> T:
        with self._lock:
            entries = []
            for key in keys:
                entry = self._keys.get(key)
                if entry is None:
                    entry = Strikes()
                    if create:
                        self._keys[key] = entry
                        while len(self._keys) > self.max_entries:
                            self._keys.popitem(last=False)
                elif create:
                    self._keys.move_to_end(key)
                # a read hands out copies: fn's changes are not kept
                entries.append(entry if write else Strikes(*_fields(entry)))
            return fn(entries)


def _fields(entry: Strikes) -> tuple[int, float, float]:
    return entry.failures, entry.locked_until, entry.last_failure


@dataclass
class LoginLimiter:
    """Failed logins per user name and per client address, with a lockout that doubles.

    Each attempt is counted as a failure when it is admitted (``admit``), before its password
    is checked, and taken back when it succeeds (``succeeded``): concurrent guesses cannot slip
    past the count while their hashes are being computed. Attempts refused during a lockout are
    not counted, so a person retrying does not lengthen their own lockout.

    The counts live in a ``StrikeBook``: by default this process's memory (a restart forgets
    them); ``AuthStore.login_limiter`` gives one whose counts are in the PostgreSQL pool, shared
    by every replica, with the wall clock (replicas' clocks are compared). With a shared book a
    refusal is remembered here for up to ``LOCAL_REFUSAL_S``: a flood of guesses at a locked
    user or address is refused without a round trip each, and a lockout cleared early on
    another replica (a right password admitted just before it) holds here that long at most."""

    LOCAL_REFUSAL_S: ClassVar[float] = 1.0

    policy: LimiterPolicy = field(default_factory=LimiterPolicy)
    clock: Callable[[], float] = time.monotonic
    book: StrikeBook | None = None

    def __post_init__(self) -> None:
        # not ``book or …``: a book with a length is falsy while empty
        self._book: StrikeBook = (
            self.book if self.book is not None else MemoryStrikeBook(self.policy.max_entries)
        )
        # shared book only: key -> (refuse here until, the lockout's end), least recent first
        self._refusals: OrderedDict[StrikeKey, tuple[float, float]] = OrderedDict()
        self._refusals_lock = threading.Lock()

    @property
    def shared(self) -> bool:
        """Whether the counts are shared with other processes (each call a round trip)."""
        return self._book.shared

    @property
    def strikes(self) -> StrikeBook:
        """Where the counts are kept."""
        return self._book

    def _lockout(self, failures: int, free: int) -> float:
        over = failures - free
        if over <= 0:
            return 0.0
        # 2 ** over overflows float arithmetic far past any sane count; cap the exponent.
        return min(self.policy.max_lockout_s, self.policy.base_lockout_s * 2.0 ** min(over - 1, 40))

    @staticmethod
    def _keys(username: str, address: str) -> list[StrikeKey]:
        # Names no account can have share one user key (a shared limiter stores it in the
        # pool, whose text cannot hold a NUL); the address key counts them as usual.
        user = username.casefold() if is_account_name(username) else _NOT_A_NAME
        return [("user", user), ("addr", address)]

    def _refused_here(self, keys: Sequence[StrikeKey], now: float) -> float:
        """The wait of a lockout refused here moments ago (0: ask the book)."""
        with self._refusals_lock:
            waits = [0.0]
            for key in keys:
                held = self._refusals.get(key)
                if held is not None:
                    if now < held[0]:
                        waits.append(held[1] - now)
                    else:
                        del self._refusals[key]
            return max(waits)

    def _remember_refusal(
        self, keys: Sequence[StrikeKey], entries: list[Strikes], now: float
    ) -> None:
        with self._refusals_lock:
            for key, entry in zip(keys, entries, strict=True):
                if entry.locked_until > now:
                    until = min(entry.locked_until, now + self.LOCAL_REFUSAL_S)
                    self._refusals[key] = (until, entry.locked_until)
                    self._refusals.move_to_end(key)
            while len(self._refusals) > self.policy.max_entries:
                self._refusals.popitem(last=False)

    def admit(self, username: str, address: str) -> None:
        """Let one attempt through (counted as a failure for now) or raise LoginThrottledError."""
        now = self.clock()
        frees = (self.policy.free_failures_user, self.policy.free_failures_addr)
        keys = self._keys(username, address)
        shared = self._book.shared
        if shared and (held := self._refused_here(keys, now)) > 0:
            raise LoginThrottledError(
                "too many failed logins: wait before trying again", retry_after=held
            )

        def step(entries: list[Strikes]) -> None:
            for entry in entries:
                if now > max(entry.locked_until, entry.last_failure) + self.policy.forget_after_s:
                    entry.failures, entry.locked_until = 0, 0.0
            wait = max(entry.locked_until - now for entry in entries)
            if wait > 0:
                if shared:
                    self._remember_refusal(keys, entries, now)
                raise LoginThrottledError(
                    "too many failed logins: wait before trying again", retry_after=wait
                )
            for entry, free in zip(entries, frees, strict=True):
                entry.failures += 1
                entry.last_failure = now
                lockout = self._lockout(entry.failures, free)
                if lockout:
                    entry.locked_until = now + lockout

        self._book.change(keys, now, step, create=True)

    def succeeded(self, username: str, address: str) -> None:
        """The admitted attempt had the right password: forget the user's failures and take
        this attempt back from the address's count."""

        def step(entries: list[Strikes]) -> None:
            user, addr = entries
            user.failures, user.locked_until, user.last_failure = 0, 0.0, 0.0
            addr.failures = max(0, addr.failures - 1)
            if addr.failures <= self.policy.free_failures_addr:
                addr.locked_until = 0.0

        keys = self._keys(username, address)
        with self._refusals_lock:
            self._refusals.pop(keys[0], None)
        self._book.change(keys, self.clock(), step, create=False)

    def withdraw(self, username: str, address: str) -> None:
        """Take back an admitted attempt whose password was never checked."""

        def step(entries: list[Strikes]) -> None:
            for entry in entries:
                entry.failures = max(0, entry.failures - 1)

        self._book.change(self._keys(username, address), self.clock(), step, create=False)

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until an attempt for this user and address would be admitted (0: now)."""
        now = self.clock()

        def wait(entries: list[Strikes]) -> float:
            return max([0.0] + [entry.locked_until - now for entry in entries])

        keys = self._keys(username, address)
        return self._book.change(keys, now, wait, create=False, write=False)


class PasswordChecker:
    """Runs logins (argon2 verification) on a small pool of its own threads, never on the
    event loop and never on the default executor the rest of the API shares.

    argon2-cffi releases the GIL while hashing, so the event loop and the other threads keep
    running; ``workers`` bounds the cores a login flood can take, and at most ``max_waiting``
    logins wait for a worker — beyond that a login is refused at once (LoginThrottledError) instead
    of queueing CPU work. The threads run at the lowest priority (``nice``)."""

    def __init__(self, workers: int = 1, max_waiting: int = 4, nice: int = 19) -> None:
        self._nice = nice
        self._pool = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="cwg-login", initializer=self._lower_priority
        )
        self._limit = workers + max_waiting
        self._busy = 0
        self._lock = threading.Lock()

    def _lower_priority(self) -> None:
        # Linux schedules threads one by one: a nice checker thread yields the cores to ingest
        # (and to the API's other requests) when they are short, and a login just takes longer.
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self._nice)
        except (AttributeError, OSError) as exc:
            log.debug("password checker stays at normal priority: %s", exc)

    async def run(
        self, fn: Callable[[str, str], IssuedToken], username: str, password: str
    ) -> IssuedToken:
        with self._lock:
            if self._busy >= self._limit:
                raise LoginThrottledError(
                    "too many logins at once: try again shortly", retry_after=1.0
                )
            self._busy += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, fn, username, password)
        finally:
            with self._lock:
                self._busy -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RefusalPause:
    """Holds back the answer to a refused login for its remaining lockout, at most
    ``max_delay_s``. A flooding client that waits for each answer (as HTTP clients do) then
    makes a few attempts a second instead of hundreds, and the server spends its cores on
    ingest rather than on answering 429s. At most ``max_held`` answers are held at once; the
    rest go out at once, so holding costs bounded memory."""

    def __init__(self, max_delay_s: float = 2.0, max_held: int = 256) -> None:
        self.max_delay_s = max_delay_s
        self.max_held = max_held
        self._held = 0

    async def pause(self, retry_after: float) -> float:
        """Wait (part of) ``retry_after``; returns the seconds waited."""
        delay = min(max(retry_after, 0.0), self.max_delay_s)
        # Only touched on the event loop: no lock needed.
        if delay <= 0 or self._held >= self.max_held:
            return 0.0
        self._held += 1
        try:
            await asyncio.sleep(delay)
        finally:
            self._held -= 1
        return delay


async def verify_login(
    store: AuthStore,
    limiter: LoginLimiter,
    checker: PasswordChecker,
    username: str,
    password: str,
    address: str,
) -> IssuedToken:
    """One login attempt: the limiter first (no hashing when it refuses), then the password on
    the checker's threads. Raises LoginThrottledError or AuthError."""
    if limiter.shared:
        # the counts are in the pool: a round trip, kept off the event loop
        await asyncio.to_thread(limiter.admit, username, address)
    else:
        limiter.admit(username, address)
    try:
        issued = await checker.run(store.login, username, password)
    except LoginThrottledError:
        # refused unchecked: not the caller's failure
        await _limiter_call(limiter, limiter.withdraw, username, address)
        raise
    await _limiter_call(limiter, limiter.succeeded, username, address)
    return issued


async def _limiter_call(
    limiter: LoginLimiter, fn: Callable[[str, str], None], username: str, address: str
) -> None:
    if limiter.shared:
        await asyncio.to_thread(fn, username, address)
    else:
        fn(username, address)


def create_account(
    pool: Path | str,
    username: str,
    level: Level | str,
    *,
    scope_code: str = "",
    department: str | None = None,
    display_name: str | None = None,
    password: str | None = None,
) -> tuple[Operator, str]:
    """Provision one operator account in a pool (file or ``postgresql://`` URL); returns it and
    its password."""
    store = AuthStore(pool)
    try:
        return store.create_account(
            username,
            level,
            scope_code=scope_code,
            department=department,
            display_name=display_name,
            password=password,
        )
    finally:
        store.close()


# -- CLI: gateway accounts add|list|disable|enable|passwd ------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gateway accounts",
        description="Operator accounts of the dashboard and API: one person, one account.",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="the aggregator's data directory, as given to `gateway run` (default: "
        "$CWG_DATA_DIR, else ./var)",
    )
    p.add_argument(
        "--pool",
        type=Path,
        default=None,
        help="SQLite pool file (default: $CWG_POOL_URL when set, which names the PostgreSQL "
        "pool and keeps its password out of process lists; else $CWG_POOL_PATH, else pool.db "
        "in the data directory)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    add = sub.add_parser("add", help="create an account; prints its password once")
    add.add_argument("username")
    add.add_argument("--level", required=True, choices=[lv.value for lv in Level])
    add.add_argument(
        "--scope", default="", help="grid code prefix: county 6, street 9 or community 12 digits"
    )
    add.add_argument("--department", default=None, help="department code from the catalogue")
    add.add_argument("--name", default=None, help="display name")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("list", help="list accounts")
    for name, text in (("disable", "disable an account and end its sessions"),
                       ("enable", "enable a disabled account"),
                       ("passwd", "set a new (generated) password")):  # fmt: skip
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("username")
    return p


def _default_pool(data_dir: Path | None) -> Path | str:
    """The pool every gateway command uses: CWG_POOL_URL, else CWG_POOL_PATH, else pool.db
    under the data directory (--data-dir, else CWG_DATA_DIR, else ./var)."""
    from aggregator.config import Settings

    return (Settings() if data_dir is None else Settings(data_dir=data_dir)).pool_target


def main_accounts(argv: Sequence[str] | None = None) -> int:
    """``gateway accounts …``; returns the exit status."""
    args = _parser().parse_args(argv)
    pool: Path | str = args.pool or _default_pool(args.data_dir)
    store = AuthStore(pool)
    # say which pool: an account made in another one is one the running gateway never sees
    print(f"pool: {store.target}", file=sys.stderr)
    try:
        if args.command == "add":
            password = None
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n") or getpass.getpass()
            operator, password = store.create_account(
                args.username,
                args.level,
                scope_code=args.scope,
                department=args.department,
                display_name=args.name,
                password=password,
            )
            print(f"created {operator.level.value} account {operator.username}")
            if not args.password_stdin:
                print(f"password (shown once): {password}")
        elif args.command == "list":
            print(f"{'username':<24} {'level':<11} {'scope':<14} {'department':<12} state")
            for op in store.accounts():
                state = "disabled" if op.disabled else "active"
                print(
                    f"{op.username:<24} {op.level.value:<11} {op.scope_code or '*':<14} "
                    f"{op.department or '-':<12} {state}"
                )
        elif args.command in ("disable", "enable"):
            store.set_disabled(args.username, args.command == "disable")
            print(f"{args.username} {args.command}d")
        elif args.command == "passwd":
            print(f"new password for {args.username} (shown once): "
                  f"{store.set_password(args.username)}")  # fmt: skip
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0
