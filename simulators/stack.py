"""A whole gateway on one machine, for tests and benchmarks: a real Mosquitto on a free
loopback port and the real aggregator, both under one temporary directory.

``GatewayStack`` is a context manager. It also provisions devices in bulk (one registry write and
one broker reload for many devices) and hands out their credentials, so simulated devices
connect exactly as real ones do: with their own username, password and ACL.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Protocol, Self

from argon2 import PasswordHasher
from pydantic import SecretStr

from aggregator.access.auth import Level
from aggregator.broker.launcher import (
    BrokerEndpoint,
    BrokerError,
    BrokerSettings,
    DeviceCredentials,
    DeviceTopics,
    MosquittoBroker,
    provision_device,
)
from aggregator.broker.registry import (
    AccountRole,
    DeviceKind,
    DeviceLocation,
    DeviceRegistry,
    RegistryError,
)
from aggregator.clock import OffsetFileClock
from aggregator.config import BatchSettings, MqttSettings, NoticeSettings, Settings
from aggregator.service import Aggregator, Service, build_aggregator
from contract import Topics
from simulators.desk import Account, Desk
from simulators.errors import StackError

__all__ = [
    "AccountSecret",
    "CredentialsDir",
    "DeviceSpec",
    "GatewayStack",
    "Provisioner",
    "StackOptions",
]

log = logging.getLogger(__name__)

AGGREGATOR_USER = "aggregator"
INTEGRATOR_USER = "integrator"
# Operator accounts of a test stack log in often; the library's default argon2 cost (~0.5 s a
# hash on two shared cores) would dominate a scenario, and these passwords guard nothing.
_STACK_HASHER = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
# Between two tests' clock origins, beyond twice the longest merge window: room for a
# scenario's simulated span and for the real time the tests between them take.
ORIGIN_MARGIN_S = 86400.0


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """A device to provision: id, kind and (optionally) where it is installed."""

    device_id: str
    kind: DeviceKind
    lat: float | None = None
    lon: float | None = None


@dataclass(frozen=True, slots=True)
class AccountSecret:
    """A service account's broker login (the integrator account reads the events topic)."""

    username: str
    password: str
    host: str
    port: int


class Provisioner(Protocol):
    """Hands out device credentials; where they come from is the implementation's business."""

    @property
    def topics(self) -> Topics: ...

    def provision(self, specs: Sequence[DeviceSpec]) -> dict[str, DeviceCredentials]: ...


@dataclass(frozen=True, slots=True)
class StackOptions:
    """The aggregator knobs a test or benchmark turns; the rest keeps the service defaults."""

    topic_prefix: str = "cwg"
    batch_max_messages: int = 1000
    batch_linger_ms: float = 20
    batch_min_messages: int = 400
    receive_maximum: int = 4000
    feedback_qos: int = 1
    feedback_batching: bool = True
    notice_update_interval_ms: float = 1000
    max_clock_skew_s: float = 300
    max_payload_bytes: int = 1024 * 1024
    grid_file: Path | None = None
    # Devices connect to the broker's TLS listener (verified against the stack's generated CA),
    # as real ones do; the aggregator uses the loopback plain listener. False: devices plain.
    device_tls: bool = True
    # A PostgreSQL pool (postgresql://…, an empty or migrated database) instead of the SQLite
    # file under the stack's root.
    pool_url: str | None = None
    # Also the operator API and dashboard (the whole Service, its API in a child process) on a
    # free loopback port, for operator and department steps; costs a process start (~2 s).
    api: bool = False


class GatewayStack:
    """Mosquitto + aggregator under ``root`` (a fresh temporary directory by default)."""

    def __init__(self, root: Path | None = None, options: StackOptions | None = None) -> None:
        self.options = options or StackOptions()
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="cwg-stack-"))
        # model_validate: the aggregator's models give defaults positionally, which mypy
        # (without the pydantic plugin) reads as required arguments.
        tls: dict[str, object] = (
            {"tls_port": 0, "tls_host": "127.0.0.1"} if self.options.device_tls else {}
        )
        self.broker_settings = BrokerSettings.model_validate(
            {"state_dir": self.root / "broker", "topic_prefix": self.options.topic_prefix, **tls}
        )
        self.registry_path = self.root / "registry.yaml"
        self.registry = DeviceRegistry(self.registry_path)
        self.broker: MosquittoBroker | None = None
        self.aggregator: Aggregator | None = None
        self.service: Service | None = None
        # The case clock the gateway reads (Settings.test_clock_file): scenarios move it.
        self.clock = OffsetFileClock(self.root / "clock")
        self.integrator: AccountSecret | None = None
        self._credentials: dict[str, DeviceCredentials] = {}
        self._aggregator_password = ""
        self._lock = threading.Lock()
        self._origins = 0

    # -- where it is -----------------------------------------------------------------------
    @property
    def topics(self) -> Topics:
        return Topics(self.options.topic_prefix)

    @property
    def host(self) -> str:
        return self.broker_settings.host

    @property
    def port(self) -> int:
        if self.broker is None:
            raise StackError("the stack is not started")
        return self.broker.port

    @property
    def device_endpoint(self) -> BrokerEndpoint:
        """Where devices connect: the TLS listener with the stack's CA, or the plain one."""
        if self.broker is None:
            raise StackError("the stack is not started")
        if self.broker.tls_port is not None:
            return BrokerEndpoint(
                host=self.host, port=self.broker.tls_port, ca_file=self.broker.ca_file
            )
        return BrokerEndpoint(host=self.host, port=self.broker.port)

    @property
    def pool_path(self) -> Path:
        if self.aggregator is None:
            raise StackError("the stack is not started")
        return self.aggregator.settings.pool

    @property
    def pool_target(self) -> Path | str:
        """The pool the aggregator writes: its SQLite file, or the PostgreSQL URL (which may
        hold a password: never print it)."""
        if self.aggregator is None:
            raise StackError("the stack is not started")
        return self.aggregator.settings.pool_target

    def claim_origin(self) -> float:
        """A clock origin of its own for one test, as seconds before now: each claim lies
        further back than the last by twice the catalogue's longest merge window and a day, so
        alerts observed around two claimed origins never fall into each other's windows."""
        if self.aggregator is None:
            raise StackError("the stack is not started")
        longest = max(
            (t.merge_window_s for t in self.aggregator.catalogue.types.values()), default=0.0
        )
        with self._lock:
            self._origins += 1
            slot = self._origins
        return slot * (2 * longest + ORIGIN_MARGIN_S)

    # -- life cycle ------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, connect_timeout_s: float = 15.0, *, aggregator: bool = True) -> None:
        """Start the broker, then (unless ``aggregator`` is false) the aggregator; return once
        the aggregator is subscribed."""
        try:
            self._start_broker()
            if aggregator:
                self.start_aggregator(connect_timeout_s)
        except BaseException:
            self.stop()  # never leave a broker behind when the aggregator fails to come up
            raise

    def _start_broker(self) -> None:
        _, self._aggregator_password = self.registry.add_account(
            AGGREGATOR_USER, AccountRole.AGGREGATOR
        )
        _, int_password = self.registry.add_account(INTEGRATOR_USER, AccountRole.INTEGRATOR)
        self.registry.save()
        self.broker = MosquittoBroker(self.broker_settings, self.registry)
        try:
            self.broker.start()
        except BrokerError as exc:
            raise StackError(f"mosquitto did not start: {exc}") from exc
        self.integrator = AccountSecret(INTEGRATOR_USER, int_password, self.host, self.port)

    def start_aggregator(self, connect_timeout_s: float = 15.0) -> None:
        """Start the aggregator on the running broker (``start(aggregator=False)`` first)."""
        if self.broker is None:
            raise StackError("start the broker first: GatewayStack.start(aggregator=False)")
        if self.aggregator is not None:
            return
        opts = self.options
        settings = Settings.model_validate(
            {
                "data_dir": self.root / "data",
                "grid_file": opts.grid_file,
                "max_clock_skew_s": opts.max_clock_skew_s,
                "max_payload_bytes": opts.max_payload_bytes,
                "pool_url": opts.pool_url,
                "test_clock_file": self.clock.path,
                "mqtt": MqttSettings.model_validate(
                    {
                        "host": self.host,
                        "port": self.port,
                        "username": AGGREGATOR_USER,
                        "password": SecretStr(self._aggregator_password),
                        "client_id": f"cwg-aggregator-{self.port}",
                        "topic_prefix": opts.topic_prefix,
                        "receive_maximum": opts.receive_maximum,
                        "feedback_qos": opts.feedback_qos,
                        "feedback_batching": opts.feedback_batching,
                    }
                ),
                "batch": BatchSettings.model_validate(
                    {
                        "max_messages": opts.batch_max_messages,
                        "linger_ms": opts.batch_linger_ms,
                        "min_messages": opts.batch_min_messages,
                    }
                ),
                "notices": NoticeSettings.model_validate(
                    {"update_interval_ms": opts.notice_update_interval_ms}
                ),
            }
        )
        if opts.api:
            self.service = Service(
                settings, port=0, log_level="warning", password_hasher=_STACK_HASHER
            )
            self.aggregator = self.service.aggregator
            self.service.start()
        else:
            self.aggregator = build_aggregator(settings)
            self.aggregator.start()
        if not self.aggregator.ingest.wait_connected(connect_timeout_s):
            raise StackError(
                f"the aggregator did not connect within {connect_timeout_s:.0f} s; broker log:\n"
                f"{self.broker.log_tail()}"
            )
        # The subscription is sent right after CONNACK; give the broker a moment to register it
        # so that the first alert of a test is not published before anyone listens.
        time.sleep(0.1)
        log.info("gateway stack up: broker %s:%s pool %s", self.host, self.port, self.pool_path)

    def stop(self) -> None:
        """Stop the aggregator (it commits what it holds), then the broker. Idempotent."""
        if self.service is not None:
            self.service.stop()  # the API process first, then ingest
            self.service = None
            self.aggregator = None
        if self.aggregator is not None:
            self.aggregator.stop()
            self.aggregator = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    # -- the operator side (StackOptions.api) ------------------------------------------------
    @property
    def api_url(self) -> str:
        if self.service is None:
            raise StackError("this stack runs no operator API: StackOptions(api=True)")
        return self.service.url

    def add_operator(
        self,
        username: str,
        level: Level | str,
        *,
        scope_code: str = "",
        department: str | None = None,
    ) -> Account:
        """An operator account (community, street, county, department, admin) on the stack's
        pool; returns its login."""
        if self.service is None:
            raise StackError("this stack runs no operator API: StackOptions(api=True)")
        op, password = self.service.auth.create_account(
            username, level, scope_code=scope_code, department=department
        )
        return Account(op.username, password, str(op.level), op.scope_code, op.department)

    def desk(self, account: Account) -> Desk:
        """``account`` logged in to the stack's API."""
        return Desk(self.api_url, account)

    def add_account(self, username: str, role: AccountRole) -> AccountSecret:
        """One more service account (a benchmark's bare counting subscriber, say)."""
        with self._lock:
            _, password = self.registry.add_account(username, role)
            self._reload({username: password})
        return AccountSecret(username, password, self.host, self.port)

    # -- provisioning ----------------------------------------------------------------------
    def provision(self, specs: Sequence[DeviceSpec]) -> dict[str, DeviceCredentials]:
        """Credentials for every spec; new devices are registered with one broker reload."""
        with self._lock:
            # Re-read the file: devices provisioned into it by others (the gateway CLI, a
            # simulator pointed at this stack from outside) must survive our save.
            if self.registry_path.exists():
                self.registry = DeviceRegistry.load(self.registry_path)
            fresh = [s for s in specs if s.device_id not in self._credentials]
            passwords: dict[str, str] = {}
            for spec in fresh:
                location = (
                    DeviceLocation(lat=spec.lat, lon=spec.lon)
                    if spec.lat is not None and spec.lon is not None
                    else None
                )
                try:
                    device, password = self.registry.add_device(
                        spec.device_id, spec.kind, location=location
                    )
                except RegistryError as exc:
                    raise StackError(f"cannot provision {spec.device_id!r}: {exc}") from exc
                passwords[spec.device_id] = password
                self._credentials[spec.device_id] = DeviceCredentials(
                    device_id=device.device_id,
                    kind=device.kind,
                    username=device.username,
                    password=SecretStr(password),
                    broker=self.device_endpoint,
                    topic_prefix=self.options.topic_prefix,
                    topics=DeviceTopics.for_device(self.topics, device.device_id),
                )
            if fresh:
                self._reload(passwords)
            return {s.device_id: self._credentials[s.device_id] for s in specs}

    def _reload(self, passwords: dict[str, str]) -> None:
        """Save the registry and add the new accounts to the running broker (the plugin
        takes plaintext passwords, hashing them itself)."""
        self.registry.save()
        if self.broker is None:
            raise StackError("the stack is not started")
        try:
            self.broker.reload(self.registry, passwords=passwords)
        except BrokerError as exc:
            raise StackError(f"the broker did not reload its accounts: {exc}") from exc


class CredentialsDir:
    """Device credentials for a stack someone else runs.

    Reads ``<dir>/<device_id>.yaml`` files as written by ``gateway devices add`` (the
    aggregator's ``provision_device``). With ``registry`` and ``broker_state`` given, a device
    without a file is provisioned on the spot, which reloads that broker's password file.
    """

    def __init__(
        self,
        directory: Path,
        *,
        topic_prefix: str = "cwg",
        registry: Path | None = None,
        broker_state: Path | None = None,
        broker_host: str | None = None,
        broker_port: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self._topics = Topics(topic_prefix)
        self.registry = registry
        self.broker_settings = (
            BrokerSettings.model_validate({"state_dir": broker_state, "topic_prefix": topic_prefix})
            if broker_state is not None
            else None
        )
        self.broker_host = broker_host
        self.broker_port = broker_port

    @property
    def topics(self) -> Topics:
        return self._topics

    def provision(self, specs: Sequence[DeviceSpec]) -> dict[str, DeviceCredentials]:
        out: dict[str, DeviceCredentials] = {}
        for spec in specs:
            path = self.directory / f"{spec.device_id}.yaml"
            if path.exists():
                try:
                    creds = DeviceCredentials.load(path)
                except BrokerError as exc:
                    raise StackError(str(exc)) from exc
            elif self.registry is not None and self.broker_settings is not None:
                location = (
                    DeviceLocation(lat=spec.lat, lon=spec.lon)
                    if spec.lat is not None and spec.lon is not None
                    else None
                )
                try:
                    creds = provision_device(
                        self.registry,
                        spec.device_id,
                        spec.kind,
                        settings=self.broker_settings,
                        out_dir=self.directory,
                        location=location,
                        broker_host=self.broker_host,
                        broker_port=self.broker_port,
                    )
                except (BrokerError, RegistryError) as exc:
                    raise StackError(f"cannot provision {spec.device_id!r}: {exc}") from exc
            else:
                raise StackError(
                    f"no credentials for device {spec.device_id!r}: expected {path} "
                    "(provision it with the gateway CLI, or pass --registry and --broker-state "
                    "so the simulator provisions it)"
                )
            if self.broker_host or self.broker_port:
                creds = creds.model_copy(
                    update={
                        "broker": BrokerEndpoint(
                            host=self.broker_host or creds.broker.host,
                            port=self.broker_port or creds.broker.port,
                            ca_file=creds.broker.ca_file,  # TLS stays on with its CA
                        )
                    }
                )
            out[spec.device_id] = creds
        return out


def device_specs(items: Iterable[tuple[str, str, float | None, float | None]]) -> list[DeviceSpec]:
    """Specs from ``(device_id, kind, lat, lon)`` tuples."""
    return [DeviceSpec(d, DeviceKind(k), lat, lon) for d, k, lat, lon in items]
