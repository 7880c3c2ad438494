"""The embedded MQTT broker: Mosquitto started with a generated config, and device provisioning.

Everything the broker needs lives in one state directory::

    mosquitto.conf   generated from BrokerSettings on every start
    passwd           Mosquitto password file, generated from the device registry
    acl              access control list, generated from the device registry
    mosquitto.log    the broker's log (and whatever it prints before the log is open)
    data/            persistence (mosquitto.db): queued messages and sessions survive restarts
    broker.json      pid, host and port of the broker this module started, while it runs

Access control is written as one explicit ``user`` block per account rather than ``pattern``
lines with ``%u``: Mosquitto applies pattern lines to *every* user, so the service accounts
would also gain device rights under ``devices/aggregator/...``. Explicit blocks give each
device exactly its own four topics and nothing else, and the file reads as an audit list.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from aggregator.errors import AggregatorError
from aggregator.registry import (
    AccountRole,
    DeviceKind,
    DeviceLocation,
    DeviceRegistry,
    RegistryError,
    atomic_write,
)
from contract.topics import TopicError, Topics

__all__ = [
    "INSTALL_HINT",
    "AccountCredentials",
    "BrokerEndpoint",
    "BrokerError",
    "BrokerNotInstalledError",
    "BrokerRuntime",
    "BrokerSettings",
    "BrokerStartError",
    "DeviceCredentials",
    "DeviceTopics",
    "MosquittoBroker",
    "free_port",
    "provision_account",
    "provision_device",
    "read_runtime",
    "render_acl",
    "render_config",
    "render_password_file",
    "write_auth_files",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
INSTALL_HINT = "install it with: apt-get install -y mosquitto mosquitto-clients"
_READY_LINE = b" running\n"  # "mosquitto version X running"
_RELOAD_LINE = b"Reloading config."
_LOG_TAIL_LINES = 30


class BrokerError(AggregatorError):
    """The broker could not be configured, started, stopped or reloaded."""


class BrokerNotInstalledError(BrokerError):
    """The ``mosquitto`` executable is not on PATH."""


class BrokerStartError(BrokerError):
    """Mosquitto exited or did not accept connections in time; the message has its log tail."""


class BrokerSettings(BaseModel):
    """How the embedded Mosquitto is configured. Paths are derived from ``state_dir``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    state_dir: Path = Field(description="config, password file, ACL, log and persistence live here")
    host: str = Field("127.0.0.1", description="address the listener binds to")
    port: int = Field(0, ge=0, le=65535, description="listener port; 0 picks a free one at start")
    topic_prefix: str = Field("cwg", description="the contract's topic prefix")
    max_queued_messages: int = Field(
        1_000_000,
        ge=0,
        description="QoS 1 messages queued per client beyond those in flight. Mosquitto's default "
        "of 1000 silently drops alerts for a slow or absent aggregator",
    )
    max_inflight_messages: int = Field(
        1000,
        ge=0,
        description="unacknowledged QoS 1 messages per client when the client does not announce "
        "an MQTT 5 Receive Maximum (Mosquitto's default is 20)",
    )
    message_size_limit: int = Field(
        4 * MiB,
        ge=1024,
        description="largest payload the broker forwards. Kept above the aggregator's own limit so "
        "that oversized alerts reach the aggregator and are dead-lettered with a reason instead "
        "of vanishing in the broker. Beyond it Mosquitto 2.0.11 answers a QoS 1 publish with "
        "PUBACK 0x95, which paho 2.x cannot parse and answers by reconnecting: devices must cap "
        "their own payloads (the edge agent drops the snapshot of an oversized alert)",
    )
    max_packet_size: int = Field(
        4 * MiB + 64 * 1024,
        ge=2048,
        description="largest MQTT packet; a client sending a larger one is disconnected. Must "
        "leave room above message_size_limit for topic and properties",
    )
    persistence: bool = Field(True, description="keep sessions and queued messages on disk")
    autosave_interval_s: int = Field(
        60,
        ge=0,
        description="seconds between saves of the in-memory state (it is always saved on a clean "
        "stop); a killed broker loses what arrived since the last save",
    )
    persistent_client_expiration: str | None = Field(
        "14d",
        pattern=r"^[1-9][0-9]*[hdwmy]$",
        description="drop sessions of clients away longer than this (h d w m y); None keeps them",
    )
    connection_messages: bool = Field(True, description="log every connect and disconnect")
    executable: str = Field("mosquitto", description="the mosquitto binary, name or path")
    start_timeout_s: float = Field(10.0, gt=0, le=120, description="bound on start-up")
    stop_timeout_s: float = Field(10.0, gt=0, le=120, description="SIGTERM grace before SIGKILL")

    @field_validator("state_dir")
    @classmethod
    def _no_whitespace(cls, value: Path) -> Path:
        # mosquitto.conf values end at the first blank: a path with one cannot be written.
        if any(c.isspace() for c in str(value)):
            raise ValueError(f"state_dir {value} contains whitespace, which mosquitto.conf forbids")
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, value: str) -> str:
        try:
            Topics(value)
        except TopicError as exc:
            raise ValueError(str(exc)) from exc
        return value

    @field_validator("max_packet_size")
    @classmethod
    def _room_for_headers(cls, value: int, info: ValidationInfo) -> int:
        limit = info.data.get("message_size_limit")
        if limit is not None and value < limit + 1024:
            raise ValueError(
                f"max_packet_size ({value}) must exceed message_size_limit ({limit}) by at least "
                "1024 bytes, or large payloads disconnect the device instead of being refused"
            )
        return value

    @property
    def conf_file(self) -> Path:
        return self.state_dir / "mosquitto.conf"

    @property
    def password_file(self) -> Path:
        return self.state_dir / "passwd"

    @property
    def acl_file(self) -> Path:
        return self.state_dir / "acl"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "mosquitto.log"

    @property
    def persistence_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def runtime_file(self) -> Path:
        return self.state_dir / "broker.json"

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


# --- generated files ---------------------------------------------------------------------


def render_config(settings: BrokerSettings) -> str:
    """The mosquitto.conf for ``settings``; the port must already be chosen (not 0)."""
    if settings.port == 0:
        raise BrokerError("render_config needs a concrete port; choose one with free_port()")
    state = settings.state_dir.resolve()
    lines = [
        "# Generated from BrokerSettings by aggregator.broker on every start; edits are lost.",
        "per_listener_settings false",
        f"listener {settings.port} {settings.host}",
        "allow_anonymous false",
        f"password_file {state / settings.password_file.name}",
        f"acl_file {state / settings.acl_file.name}",
        # Started as root, mosquitto would switch to the 'mosquitto' user and could then not
        # write its own state directory; it runs as whoever launched it instead.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"persistence {'true' if settings.persistence else 'false'}",
        # Mosquitto 1.x joins this with the file name as-is and needs the trailing slash;
        # 2.0 adds its own, and the doubled slash is harmless.
        f"persistence_location {state / settings.persistence_dir.name}/",
        f"autosave_interval {settings.autosave_interval_s}",
    ]
    if settings.persistent_client_expiration:
        lines.append(f"persistent_client_expiration {settings.persistent_client_expiration}")
    lines += [
        f"max_queued_messages {settings.max_queued_messages}",
        f"max_inflight_messages {settings.max_inflight_messages}",
        # message_size_limit (not only max_packet_size): an oversized QoS 1 alert is refused
        # with a PUBACK rather than the broker closing the connection. Mosquitto 2.0.11 uses
        # reason 0x95 there, which paho 2.x treats as malformed and reconnects on, so the edge
        # agent keeps its payloads under its own limit; the aggregator's lower limit means
        # every payload the broker forwards can still be dead-lettered with a reason.
        f"message_size_limit {settings.message_size_limit}",
        f"max_packet_size {settings.max_packet_size}",
        "set_tcp_nodelay true",
        f"log_dest file {state / settings.log_file.name}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        # The launcher waits for the "running" line, logged at information level.
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        f"connection_messages {'true' if settings.connection_messages else 'false'}",
    ]
    return "\n".join(lines) + "\n"


def render_acl(registry: DeviceRegistry, prefix: str = "cwg") -> str:
    """The ACL: each device its own topics, the service accounts what their role allows."""
    topics = Topics(prefix)
    devices = f"{prefix}/v1/devices"
    out = [
        "# Generated from the device registry by aggregator.broker; edits are lost.",
        "# Anonymous clients are refused (allow_anonymous false): no anonymous section.",
    ]
    for account in registry.accounts:
        out += ["", f"user {account.username}"]
        if account.role is AccountRole.AGGREGATOR:
            out += [
                f"topic read {devices}/+/#",
                # Delivery is checked against the real topic; this line covers brokers that also
                # check the filter of a shared subscription ($share/<group>/...) literally.
                f"topic read $share/+/{devices}/+/#",
                f"topic write {devices}/+/feedback",
                f"topic write {topics.events}",
            ]
        elif account.role is AccountRole.INTEGRATOR:
            out += [
                f"topic read {topics.events}",
                f"topic read $share/+/{topics.events}",
                # Device status is published "to all" (retained online/offline).
                f"topic read {devices}/+/status",
            ]
    for device in registry.devices:
        d = device.device_id
        out += [
            "",
            f"user {d}",
            f"topic write {topics.alert(d)}",
            f"topic write {topics.telemetry(d)}",
            # readwrite: the device publishes its status (and its Last Will) and reads back its
            # own retained status after a restart.
            f"topic readwrite {topics.status(d)}",
            f"topic read {topics.feedback(d)}",
        ]
    return "\n".join(out) + "\n"


def render_password_file(registry: DeviceRegistry) -> str:
    return "".join(f"{user}:{pw_hash}\n" for user, pw_hash in registry.password_entries())


def write_auth_files(settings: BrokerSettings, registry: DeviceRegistry) -> None:
    """Write the password file and the ACL; each is replaced atomically (the broker may reload)."""
    _prepare_state_dir(settings)
    atomic_write(settings.password_file, render_password_file(registry), mode=0o600)
    atomic_write(settings.acl_file, render_acl(registry, settings.topic_prefix), mode=0o600)


def _prepare_state_dir(settings: BrokerSettings) -> None:
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.persistence_dir.mkdir(mode=0o700, exist_ok=True)


# --- helpers -------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _find_executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BrokerNotInstalledError(f"'{name}' was not found on PATH; {INSTALL_HINT}")
    return path


def _log_size(log_file: Path) -> int:
    try:
        return log_file.stat().st_size
    except FileNotFoundError:
        return 0


def _log_since(log_file: Path, offset: int) -> bytes:
    try:
        with log_file.open("rb") as fh:
            fh.seek(offset)
            return fh.read()
    except FileNotFoundError:
        return b""


def _log_tail(log_file: Path, offset: int = 0) -> str:
    lines = _log_since(log_file, offset).decode(errors="replace").splitlines()
    return "\n".join(lines[-_LOG_TAIL_LINES:]) or "(the log is empty)"


class BrokerRuntime(BaseModel):
    """What ``broker.json`` records about a broker this module started."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pid: int = Field(gt=0)
    host: str
    port: int = Field(ge=1, le=65535)
    conf_file: Path


def _is_our_broker(runtime: BrokerRuntime) -> bool:
    """Whether ``runtime.pid`` is still the mosquitto started with ``runtime.conf_file``."""
    try:
        os.kill(runtime.pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    cmdline = Path(f"/proc/{runtime.pid}/cmdline")
    if not cmdline.parent.exists():
        return True  # no procfs (macOS): the pid being alive is all we can check
    try:
        args = cmdline.read_bytes().split(b"\0")
    except OSError:
        return False
    # A reused pid, or a zombie (empty cmdline), is not our broker.
    return str(runtime.conf_file).encode() in args


def read_runtime(state_dir: Path) -> BrokerRuntime | None:
    """The broker running on ``state_dir`` if this module started one and it still runs."""
    path = state_dir / "broker.json"
    try:
        runtime = BrokerRuntime.model_validate_json(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValidationError:
        logger.warning("ignoring unreadable runtime file %s", path)
        return None
    return runtime if _is_our_broker(runtime) else None


def _signal_reload(pid: int, log_file: Path, timeout_s: float) -> None:
    """SIGHUP the broker and wait until it has reloaded password file and ACL.

    Mosquitto logs "Reloading config." and reloads in the same turn of its single-threaded
    loop, so a client that connects after the line appears is checked against the new files.
    """
    offset = _log_size(log_file)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while _RELOAD_LINE not in _log_since(log_file, offset):
        if time.monotonic() > deadline:
            raise BrokerError(
                f"mosquitto (pid {pid}) did not log a reload within {timeout_s:.0f} s; log tail:\n"
                f"{_log_tail(log_file, offset)}"
            )
        time.sleep(0.01)
    logger.info("broker pid %s reloaded its password file and ACL", pid)


# --- the broker ----------------------------------------------------------------------------


class MosquittoBroker:
    """A Mosquitto subprocess with a generated config; a context manager.

    The registry *file* is the source of truth: ``start()`` and ``reload()`` re-read it when
    it exists, so devices provisioned by another process are never dropped.
    """

    def __init__(self, settings: BrokerSettings, registry: DeviceRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    # -- where it is
    @property
    def host(self) -> str:
        return self.settings.host

    @property
    def port(self) -> int:
        """The listener port (``settings.port``, or the one chosen by the first start)."""
        if self.settings.port == 0:
            raise BrokerError("the port is chosen at start(); the broker has not started yet")
        return self.settings.port

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def topics(self) -> Topics:
        return self.settings.topics

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self) -> str:
        """The last lines mosquitto logged since the latest start."""
        return _log_tail(self.settings.log_file, self._log_offset)

    # -- life cycle
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

    def start(self) -> None:
        """Write config, password file and ACL, start mosquitto, wait until it serves."""
        if self.running:
            raise BrokerError(f"the broker is already running (pid {self.pid})")
        exe = _find_executable(self.settings.executable)
        _prepare_state_dir(self.settings)
        other = read_runtime(self.settings.state_dir)
        if other is not None:
            raise BrokerError(
                f"another broker (pid {other.pid}, port {other.port}) already runs on "
                f"{self.settings.state_dir}"
            )
        # A port we chose ourselves may be taken between free_port() and mosquitto's bind:
        # choose again. A port the caller fixed, or one clients already know (a restart), stays.
        attempts = 3 if self.settings.port == 0 else 1
        for attempt in range(1, attempts + 1):
            settings = self.settings
            if settings.port == 0:
                settings = settings.model_copy(update={"port": free_port(self.host)})
            try:
                self._launch(exe, settings)
            except BrokerStartError as exc:
                if self.settings.port == 0 and attempt < attempts and "in use" in str(exc):
                    logger.warning("port %s was taken; trying another", settings.port)
                    continue
                raise
            self.settings = settings  # from now on the port is fixed: restarts keep it
            return

    def _launch(self, exe: str, s: BrokerSettings) -> None:
        atomic_write(s.conf_file, render_config(s), mode=0o600)
        self._write_auth_from_registry(s)
        self._log_offset = _log_size(s.log_file)
        # Output before the log file is open (config errors, warnings) goes to the same file.
        with s.log_file.open("ab") as out:
            self._proc = subprocess.Popen(
                [exe, "-c", str(s.conf_file.resolve())],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a Ctrl-C here does not reach it
            )
        proc = self._proc
        deadline = time.monotonic() + s.start_timeout_s
        # Ready means: the listener accepts, and the "running" line is logged, which mosquitto
        # writes only after installing its signal handlers (an early SIGHUP would kill it).
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                raise BrokerStartError(
                    f"mosquitto exited with status {code} while starting on {s.host}:{s.port}; "
                    f"log tail:\n{_log_tail(s.log_file, self._log_offset)}"
                )
            if _READY_LINE in _log_since(s.log_file, self._log_offset) and _port_open(
                s.host, s.port
            ):
                break
            if time.monotonic() > deadline:
                self._terminate(proc)
                self._proc = None
                tail = _log_tail(s.log_file, self._log_offset)
                raise BrokerStartError(
                    f"mosquitto did not accept connections on {s.host}:{s.port} within "
                    f"{s.start_timeout_s:.0f} s; log tail:\n{tail}"
                )
            time.sleep(0.01)
        runtime = BrokerRuntime(
            pid=proc.pid, host=s.host, port=s.port, conf_file=s.conf_file.resolve()
        )
        atomic_write(s.runtime_file, runtime.model_dump_json() + "\n", mode=0o600)
        logger.info(
            "mosquitto pid %s serving %s:%s (%s devices)",
            proc.pid,
            s.host,
            s.port,
            len(self.registry.devices),
        )

    def _write_auth_from_registry(self, settings: BrokerSettings) -> None:
        """Re-read the registry file (if any) and write password file and ACL from it, under
        the registry lock so that a concurrent provisioning is not overwritten."""
        path = self.registry.path
        if not path.exists():
            write_auth_files(settings, self.registry)
            return
        with _registry_lock(path):
            self.registry = DeviceRegistry.load(path)
            write_auth_files(settings, self.registry)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to this pid only; mosquitto saves its state on the way
            try:
                proc.wait(self.settings.stop_timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("mosquitto pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        """SIGTERM (state is saved), wait, then SIGKILL if needed. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._terminate(proc)
        self.settings.runtime_file.unlink(missing_ok=True)
        logger.info("mosquitto pid %s stopped (status %s)", proc.pid, proc.returncode)

    def kill(self) -> None:
        """SIGKILL, as a crash would: state since the last autosave is lost."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self.settings.runtime_file.unlink(missing_ok=True)
        logger.info("mosquitto pid %s killed", proc.pid)

    def restart(self) -> None:
        """Stop cleanly and start again on the same port and state directory."""
        self.stop()
        self.start()

    def reload(self, registry: DeviceRegistry | None = None) -> None:
        """Regenerate password file and ACL and make the running broker load them (SIGHUP).

        Without ``registry`` the registry file is re-read. Mosquitto re-checks connected
        clients: one whose account was removed or whose password changed is disconnected.
        """
        if registry is not None:
            self.registry = registry
            write_auth_files(self.settings, registry)
        else:
            self._write_auth_from_registry(self.settings)
        if self._proc is not None and self.running:
            _signal_reload(self._proc.pid, self.settings.log_file, self.settings.start_timeout_s)


# --- provisioning --------------------------------------------------------------------------


class _Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_yaml(self) -> str:
        data = self.model_dump(mode="json")
        password = getattr(self, "password", None)
        if isinstance(password, SecretStr):
            data["password"] = password.get_secret_value()
        return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

    def write(self, path: Path) -> None:
        """Write the YAML readable by its owner only (it holds a password)."""
        atomic_write(path, self.to_yaml(), mode=0o600)

    @classmethod
    def load(cls, path: Path) -> Self:
        try:
            return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (OSError, yaml.YAMLError, ValidationError) as exc:
            raise BrokerError(f"credentials file {path} is unreadable or invalid: {exc}") from exc


class BrokerEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field(description="broker host name or address as the device reaches it")
    port: int = Field(ge=1, le=65535)


class DeviceTopics(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    alert: str
    telemetry: str
    status: str
    feedback: str

    @classmethod
    def for_device(cls, topics: Topics, device_id: str) -> DeviceTopics:
        return cls(
            alert=topics.alert(device_id),
            telemetry=topics.telemetry(device_id),
            status=topics.status(device_id),
            feedback=topics.feedback(device_id),
        )


class DeviceCredentials(_Credentials):
    """The connection config handed to one device at provisioning time."""

    device_id: str
    kind: DeviceKind
    username: str
    password: SecretStr
    broker: BrokerEndpoint
    topic_prefix: str
    topics: DeviceTopics


class AccountCredentials(_Credentials):
    """The connection config of a service account (aggregator, integrator)."""

    username: str
    role: AccountRole
    password: SecretStr
    broker: BrokerEndpoint
    topic_prefix: str


@contextlib.contextmanager
def _registry_lock(registry_path: Path) -> Iterator[None]:
    """Serialise read-modify-write of the registry between processes."""
    registry_path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = registry_path.with_name(registry_path.name + ".lock")
    with lock_path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _endpoint(
    settings: BrokerSettings, runtime: BrokerRuntime | None, host: str | None, port: int | None
) -> BrokerEndpoint:
    port = port or (runtime.port if runtime else settings.port)
    if not port:
        raise BrokerError(
            "the broker port is unknown: start the broker first, set BrokerSettings.port, "
            "or pass broker_port"
        )
    return BrokerEndpoint(host=host or (runtime.host if runtime else settings.host), port=port)


def _apply(
    settings: BrokerSettings, registry: DeviceRegistry, runtime: BrokerRuntime | None
) -> None:
    write_auth_files(settings, registry)
    if runtime is not None:
        _signal_reload(runtime.pid, settings.log_file, settings.start_timeout_s)


def provision_device(
    registry_path: Path,
    device_id: str,
    kind: DeviceKind | str,
    *,
    settings: BrokerSettings,
    out_dir: Path,
    name: str | None = None,
    location: DeviceLocation | None = None,
    grid_code: str | None = None,
    broker_host: str | None = None,
    broker_port: int | None = None,
) -> DeviceCredentials:
    """Register a device, write its connection config to ``out_dir/<device_id>.yaml`` (0600).

    The password file and ACL are regenerated and, if a broker started by this module runs on
    ``settings.state_dir``, it reloads them (SIGHUP): the device can connect at once.
    ``broker_host``/``broker_port`` override the address written for the device (for example
    a public name instead of the bind address).
    """
    registry_path = Path(registry_path)
    with _registry_lock(registry_path):
        registry = DeviceRegistry.load(registry_path, missing_ok=True)
        device, password = registry.add_device(
            device_id, kind, name, location=location, grid_code=grid_code
        )
        runtime = read_runtime(settings.state_dir)
        creds = DeviceCredentials(
            device_id=device.device_id,
            kind=device.kind,
            username=device.username,
            password=SecretStr(password),
            broker=_endpoint(settings, runtime, broker_host, broker_port),
            topic_prefix=settings.topic_prefix,
            topics=DeviceTopics.for_device(settings.topics, device.device_id),
        )
        out_path = Path(out_dir) / f"{device.device_id}.yaml"
        # The config is written before the registry is saved: a failure leaves no registered
        # device whose password nobody knows.
        creds.write(out_path)
        try:
            registry.save()
        except (OSError, RegistryError):
            out_path.unlink(missing_ok=True)
            raise
        _apply(settings, registry, runtime)
    logger.info("provisioned device %s; config in %s", device.device_id, out_path)
    return creds


def provision_account(
    registry_path: Path,
    username: str,
    role: AccountRole | str,
    *,
    settings: BrokerSettings,
    out_dir: Path,
    broker_host: str | None = None,
    broker_port: int | None = None,
) -> AccountCredentials:
    """Register a service account; writes ``out_dir/<username>.yaml`` and, for settings that
    read a bare secret file (``CWG_MQTT__PASSWORD_FILE``), ``out_dir/<username>.password``."""
    registry_path = Path(registry_path)
    with _registry_lock(registry_path):
        registry = DeviceRegistry.load(registry_path, missing_ok=True)
        account, password = registry.add_account(username, role)
        runtime = read_runtime(settings.state_dir)
        creds = AccountCredentials(
            username=account.username,
            role=account.role,
            password=SecretStr(password),
            broker=_endpoint(settings, runtime, broker_host, broker_port),
            topic_prefix=settings.topic_prefix,
        )
        out_dir = Path(out_dir)
        creds.write(out_dir / f"{username}.yaml")
        atomic_write(out_dir / f"{username}.password", password + "\n", mode=0o600)
        registry.save()
        _apply(settings, registry, runtime)
    logger.info("provisioned %s account %s", account.role, username)
    return creds
