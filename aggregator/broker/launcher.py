"""The embedded MQTT broker: Mosquitto started with a generated config, and device provisioning.

Everything the broker needs lives in one state directory::

    mosquitto.conf          generated from BrokerSettings on every start
    dynamic-security.json   accounts and their rights, generated from the device registry on
                            every start; while the broker runs its plugin owns (and rewrites) it
    dynsec-admin.password   the broker-admin account that provisions on the running broker
    dynsec-applied.json     which registry entries the running broker holds (for hot changes)
    tls/                    the development CA and server certificate (when generated)
    mosquitto.log           the broker's log (and whatever it prints before the log is open)
    data/                   persistence (mosquitto.db): queued messages and sessions
    broker.json             pid, host and ports of the broker this module started, while it runs

Why the dynamic-security plugin and not ``acl_file`` (both tried against Debian's 2.0.11):

* Mosquitto 2.0's ``acl_file`` check never refuses a SUBSCRIBE (subscriptions are checked only
  when a message is delivered). A device was *granted* ``$share/g/cwg/v1/devices/+/alert``; the
  broker then routed a share of the alerts to it, refused delivery on ACL grounds and dropped
  them. The plugin checks ``subscribeLiteral``/``subscribePattern`` rules when the client
  subscribes, with every right denied unless granted: a device may subscribe to its own
  feedback and status topics and to nothing else (``#``, ``$SYS/#`` and any ``$share/...`` get
  SUBACK 0x87 Not authorized).
* A plugin client may be bound to one client id. Every device is bound to its device id, so a
  device that connects with the aggregator's client id, or another device's, is refused at
  CONNACK (0x87) and cannot knock the owner off or wipe its session. ``use_username_as_clientid``
  would also stop that, but it applies to every client of a listener and would give all
  aggregator replicas (one account, distinct client ids) the same id.
* The aggregator role alone may subscribe to the device topics, plain or shared
  (``$share/<group>/...``), and publish feedback and events.

The registry stays the source of truth: the plugin's file is regenerated from it (the password
hashes are the same PBKDF2-SHA512 in both formats) on every start. The plugin does not re-read
its file on SIGHUP, so a device provisioned while the broker runs is added through the plugin's
control topic by the ``broker-admin`` account (loopback listener), and can connect at once.

Two listeners: the plain one binds to loopback by default (the aggregator on the same host);
devices use the TLS listener (``tls_port``), whose certificate comes from the operator's PKI
(``tls_certfile``/``tls_keyfile``/``tls_cafile``) or, in development, from a CA generated in
``tls/`` on first start (keys 0600). Provisioning hands a device that CA beside its credentials.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import resource
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from aggregator.broker.registry import (
    AccountRole,
    DeviceKind,
    DeviceLocation,
    DeviceRegistry,
    RegistryError,
    atomic_write,
    generate_password,
    mosquitto_password_hash,
)
from aggregator.errors import AggregatorError
from contract.topics import TopicError, Topics

__all__ = [
    "ADMIN_USERNAME",
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
    "ensure_tls_files",
    "free_port",
    "provision_account",
    "provision_device",
    "read_runtime",
    "render_config",
    "render_dynsec",
    "write_auth_files",
    "write_edge_config",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
INSTALL_HINT = "install it with: apt-get install -y mosquitto mosquitto-clients"
_READY_LINE = b" running\n"  # "mosquitto version X running"
_LOG_TAIL_LINES = 30
# Addresses that mean "every interface" when a listener binds to them.
_WILDCARDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - compared with, never bound here


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
    host: str = Field("127.0.0.1", description="address the plain listener binds to")
    port: int = Field(
        0, ge=0, le=65535, description="plain listener port; 0 picks a free one at start"
    )
    tls_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="TLS listener port for devices (8883 by convention); 0 picks a free one at "
        "start; None: no TLS listener",
    )
    tls_host: str = Field(
        "0.0.0.0",  # noqa: S104 - devices reach the TLS listener from the network
        description="address the TLS listener binds to",
    )
    tls_cafile: Path | None = Field(
        None,
        description="CA certificate handed to devices (operator PKI); with tls_certfile and "
        "tls_keyfile. Unset: a development CA is generated in <state_dir>/tls",
    )
    tls_certfile: Path | None = Field(None, description="server certificate (operator PKI)")
    tls_keyfile: Path | None = Field(None, description="server private key (operator PKI)")
    tls_server_names: tuple[str, ...] = Field(
        ("localhost", "127.0.0.1"),
        min_length=1,
        description="DNS names and IP addresses the generated server certificate is valid for "
        "(what devices put in their broker host)",
    )
    dynsec_plugin: Path = Field(
        default_factory=lambda: _default_plugin(),
        description="Mosquitto's dynamic-security plugin (accounts, subscribe ACLs, client-id "
        "binding)",
    )
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
        1,
        ge=0,
        description="seconds between saves of the in-memory state (sessions, subscriptions, "
        "queued messages; it is always saved on a clean stop). A killed broker loses what "
        "changed since the last save, so it is short: a save writes the whole state, which is "
        "small while the aggregator keeps up",
    )
    autosave_on_changes: bool = Field(
        False,
        description="count autosave_interval in changes (subscriptions, retained and queued "
        "messages) instead of seconds",
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

    @field_validator("tls_certfile", "tls_keyfile", "tls_cafile")
    @classmethod
    def _no_whitespace_in_pki(cls, value: Path | None) -> Path | None:
        if value is not None and any(c.isspace() for c in str(value)):
            raise ValueError(f"{value} contains whitespace, which mosquitto.conf forbids")
        return value

    @model_validator(mode="after")
    def _pki_complete(self) -> Self:
        given = [self.tls_cafile, self.tls_certfile, self.tls_keyfile]
        if any(given) and not all(given):
            raise ValueError("tls_cafile, tls_certfile and tls_keyfile are given together or not")
        return self

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
    def dynsec_file(self) -> Path:
        return self.state_dir / "dynamic-security.json"

    @property
    def admin_password_file(self) -> Path:
        return self.state_dir / "dynsec-admin.password"

    @property
    def applied_file(self) -> Path:
        return self.state_dir / "dynsec-applied.json"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def ca_file(self) -> Path:
        """The CA devices verify the broker with: the operator's, or the generated one."""
        return self.tls_cafile or self.tls_dir / "ca.crt"

    @property
    def server_cert_file(self) -> Path:
        return self.tls_certfile or self.tls_dir / "server.crt"

    @property
    def server_key_file(self) -> Path:
        return self.tls_keyfile or self.tls_dir / "server.key"

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


def _default_plugin() -> Path:
    """Where Debian/Ubuntu (any architecture) or a source build put the plugin."""
    for path in [
        *sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")),
        Path("/usr/lib/mosquitto_dynamic_security.so"),
        Path("/usr/local/lib/mosquitto_dynamic_security.so"),
    ]:
        if path.exists():
            return path
    return Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def render_config(settings: BrokerSettings) -> str:
    """The mosquitto.conf for ``settings``; the ports must already be chosen (not 0)."""
    if settings.port == 0 or settings.tls_port == 0:
        raise BrokerError("render_config needs concrete ports; choose them with free_port()")
    state = settings.state_dir.resolve()
    lines = [
        "# Generated from BrokerSettings by the broker launcher on every start; edits are lost.",
        # One security configuration for both listeners: the plugin's accounts and rights.
        "per_listener_settings false",
        "allow_anonymous false",
        f"plugin {settings.dynsec_plugin}",
        f"plugin_opt_config_file {state / settings.dynsec_file.name}",
        f"listener {settings.port} {settings.host}",
    ]
    if settings.tls_port is not None:
        lines += [
            f"listener {settings.tls_port} {settings.tls_host}",
            f"cafile {settings.ca_file.resolve()}",
            f"certfile {settings.server_cert_file.resolve()}",
            f"keyfile {settings.server_key_file.resolve()}",
            "tls_version tlsv1.2",  # the minimum: TLS 1.3 is negotiated when both sides have it
        ]
    lines += [
        # Started as root, mosquitto would switch to the 'mosquitto' user and could then not
        # write its own state directory; it runs as whoever launched it instead.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        f"persistence {'true' if settings.persistence else 'false'}",
        # Mosquitto 1.x joins this with the file name as-is and needs the trailing slash;
        # 2.0 adds its own, and the doubled slash is harmless.
        f"persistence_location {state / settings.persistence_dir.name}/",
        f"autosave_interval {settings.autosave_interval_s}",
        f"autosave_on_changes {'true' if settings.autosave_on_changes else 'false'}",
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


# --- accounts and rights (dynamic-security plugin) ------------------------------------------

ADMIN_USERNAME = "broker-admin"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
# Nothing is allowed unless a role grants it; unsubscribing cannot hurt anyone.
_DEFAULT_ACCESS = {
    "publishClientSend": False,
    "publishClientReceive": False,
    "subscribe": False,
    "unsubscribe": True,
}


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def _role_name(username: str) -> str:
    return f"account-{username}"


def _device_acls(topics: Topics, device_id: str) -> list[dict[str, Any]]:
    alert, tele = topics.alert(device_id), topics.telemetry(device_id)
    status, feedback = topics.status(device_id), topics.feedback(device_id)
    return [
        _acl("publishClientSend", alert),
        _acl("publishClientSend", tele),
        # The device publishes its status (and its Last Will) and reads back its own retained
        # status after a restart.
        _acl("publishClientSend", status),
        _acl("subscribeLiteral", status),
        _acl("publishClientReceive", status),
        # Literal: the exact feedback topic, never a filter or a $share/... form of it.
        _acl("subscribeLiteral", feedback),
        _acl("publishClientReceive", feedback),
    ]


def _account_acls(topics: Topics, role: AccountRole) -> list[dict[str, Any]]:
    devices = f"{topics.prefix}/v1/devices/+/#"
    if role is AccountRole.AGGREGATOR:
        return [
            _acl("subscribePattern", devices),
            # The replicas' shared subscription; no other role may join any share group of
            # the device topics.
            _acl("subscribePattern", f"$share/+/{devices}"),
            _acl("publishClientReceive", devices),
            _acl("publishClientSend", f"{topics.prefix}/v1/devices/+/feedback"),
            _acl("publishClientSend", topics.events),
        ]
    status = f"{topics.prefix}/v1/devices/+/status"
    return [  # integrator: the events topic and device status ("to all")
        _acl("subscribePattern", topics.events),
        _acl("subscribePattern", f"$share/+/{topics.events}"),
        _acl("publishClientReceive", topics.events),
        _acl("subscribePattern", status),
        _acl("publishClientReceive", status),
    ]


def _admin_acls() -> list[dict[str, Any]]:
    control = "$CONTROL/dynamic-security/#"
    return [
        _acl("publishClientSend", control),
        _acl("subscribePattern", control),
        _acl("publishClientReceive", control),
    ]


def _hash_fields(password_hash: str) -> dict[str, Any] | None:
    """The plugin's form of a registry hash; None for one it cannot check (``$6$``)."""
    parts = password_hash.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return None
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One account as the plugin should hold it."""

    username: str
    password_hash: str
    clientid: str | None
    acls: tuple[tuple[str, str], ...]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "hash": self.password_hash,
            "clientid": self.clientid,
            "acls": [list(a) for a in self.acls],
        }


def _wanted(registry: DeviceRegistry, topics: Topics) -> dict[str, tuple[_Wanted, list[Any]]]:
    out: dict[str, tuple[_Wanted, list[Any]]] = {}
    for account in registry.accounts:
        acls = _account_acls(topics, account.role)
        # Service accounts are not bound to a client id: aggregator replicas share the
        # account under distinct ids. Devices cannot take those ids (they are bound).
        out[account.username] = (
            _Wanted(account.username, account.password_hash, None, _acl_key(acls)),
            acls,
        )
    for device in registry.devices:
        acls = _device_acls(topics, device.device_id)
        out[device.device_id] = (
            _Wanted(device.device_id, device.password_hash, device.device_id, _acl_key(acls)),
            acls,
        )
    return out


def _acl_key(acls: list[dict[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple((a["acltype"], a["topic"]) for a in acls)


def render_dynsec(
    registry: DeviceRegistry, prefix: str = "cwg", *, admin_password: str
) -> dict[str, Any]:
    """The plugin's configuration: one role per account, every device bound to its id."""
    topics = Topics(prefix)
    clients: list[dict[str, Any]] = []
    roles: list[dict[str, Any]] = []
    admin_hash = _hash_fields(mosquitto_password_hash(admin_password))
    assert admin_hash is not None
    clients.append(
        {
            "username": ADMIN_USERNAME,
            "textName": "provisions accounts on the running broker",
            **admin_hash,
            "roles": [{"rolename": _role_name(ADMIN_USERNAME)}],
        }
    )
    roles.append({"rolename": _role_name(ADMIN_USERNAME), "acls": _admin_acls()})
    for want, acls in _wanted(registry, topics).values():
        fields = _hash_fields(want.password_hash)
        if fields is None:
            logger.warning(
                "account %s has a $6$ password hash, which the broker cannot check: "
                "issue it a new password",
                want.username,
            )
            continue
        client: dict[str, Any] = {
            "username": want.username,
            **fields,
            "roles": [{"rolename": _role_name(want.username)}],
        }
        if want.clientid is not None:
            client["clientid"] = want.clientid
        clients.append(client)
        roles.append({"rolename": _role_name(want.username), "acls": acls})
    return {
        "defaultACLAccess": dict(_DEFAULT_ACCESS),
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def write_auth_files(settings: BrokerSettings, registry: DeviceRegistry) -> None:
    """Write the plugin's configuration (for the next start) and the record of what it holds.

    The admin password is kept while the file exists: a running broker still knows it."""
    _prepare_state_dir(settings)
    admin_password = _admin_password(settings)
    config = render_dynsec(registry, settings.topic_prefix, admin_password=admin_password)
    atomic_write(settings.dynsec_file, json.dumps(config, indent=1) + "\n", mode=0o600)
    applied = {u: w.fingerprint() for u, (w, _) in _wanted(registry, settings.topics).items()}
    atomic_write(settings.applied_file, json.dumps(applied) + "\n", mode=0o600)


def _admin_password(settings: BrokerSettings) -> str:
    try:
        password = settings.admin_password_file.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        password = ""
    if not password:
        password = generate_password()
        atomic_write(settings.admin_password_file, password + "\n", mode=0o600)
    return password


# --- TLS ------------------------------------------------------------------------------------


def ensure_tls_files(settings: BrokerSettings) -> None:
    """Check the operator's PKI files, or make the development CA and server certificate.

    The CA is made once and kept (devices hold it); the server certificate is made again when
    ``tls_server_names`` no longer matches it or it is within 30 days of expiry."""
    if settings.tls_certfile is not None:
        for path in (settings.ca_file, settings.server_cert_file, settings.server_key_file):
            if not path.is_file():
                raise BrokerError(f"TLS file {path} does not exist")
        return
    from aggregator.broker import devca  # the cryptography package is needed only here

    settings.tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    devca.ensure(
        settings.tls_dir / "ca.crt",
        settings.tls_dir / "ca.key",
        settings.tls_dir / "server.crt",
        settings.tls_dir / "server.key",
        settings.tls_server_names,
    )


def _prepare_state_dir(settings: BrokerSettings) -> None:
    settings.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.persistence_dir.mkdir(mode=0o700, exist_ok=True)


# --- helpers -------------------------------------------------------------------------------


def raise_fd_limit(wanted: int | None = None) -> int:
    """Raise this process's soft limit on open files to ``wanted`` (default: the hard limit),
    never above the hard limit and never lowering it; returns the soft limit now.

    Children inherit it. Mosquitto holds one descriptor per client connection, and the usual
    soft limit of 1,024 would refuse a city fleet's 1,021st device."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if wanted is None else wanted
    if hard != resource.RLIM_INFINITY:
        target = min(target, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit to %s: %s", target, exc)
            return soft
        return target
    return soft


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
    tls_port: int | None = Field(None, ge=1, le=65535)
    ca_file: Path | None = Field(None, description="the CA devices verify the TLS listener with")
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


class _Control:
    """A connection to the dynamic-security plugin's control topic as ``broker-admin``."""

    def __init__(self, host: str, port: int, password: str, timeout_s: float) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._timeout_s = timeout_s
        self._responses: list[bytes] = []
        self._cond = threading.Condition()
        self._ready = False
        self._refused: str | None = None
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            protocol=mqtt.MQTTv5,
            client_id=f"{ADMIN_USERNAME}-{uuid.uuid4().hex[:8]}",
        )
        self._client.username_pw_set(ADMIN_USERNAME, password)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        # Loopback: the address the plain listener binds to, or 127.0.0.1 for a wildcard.
        self._host = "127.0.0.1" if host in _WILDCARDS else host
        self._port = port

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            with self._cond:
                self._refused = str(reason)
                self._cond.notify_all()
            return
        client.subscribe(f"{CONTROL_TOPIC}/response", qos=1)

    def _on_subscribe(self, _c: Any, _u: Any, _mid: int, reasons: Any, _p: Any) -> None:
        with self._cond:
            if reasons[0].is_failure:
                self._refused = f"control topic subscription refused: {reasons[0]}"
            self._ready = True
            self._cond.notify_all()

    def _on_message(self, _c: Any, _u: Any, message: Any) -> None:
        with self._cond:
            self._responses.append(message.payload)
            self._cond.notify_all()

    def __enter__(self) -> Self:
        try:
            self._client.connect(self._host, self._port, keepalive=30)
        except OSError as exc:
            raise BrokerError(
                f"cannot reach the broker at {self._host}:{self._port}: {exc}"
            ) from exc
        self._client.loop_start()
        self._wait(lambda: self._ready or self._refused is not None, "a connection")
        if self._refused is not None:
            self.__exit__(None, None, None)
            raise BrokerError(f"the broker refused its admin account: {self._refused}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _wait(self, done: Any, what: str) -> None:
        deadline = time.monotonic() + self._timeout_s
        with self._cond:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BrokerError(f"no {what} from the broker within {self._timeout_s:.0f} s")
                self._cond.wait(remaining)

    def run(self, commands: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send the commands as one message; the plugin's responses, in order."""
        if not commands:
            return []
        with self._cond:
            self._responses.clear()
        self._client.publish(CONTROL_TOPIC, json.dumps({"commands": commands}), qos=1)
        self._wait(lambda: bool(self._responses), "answer to the provisioning commands")
        with self._cond:
            payload = self._responses.pop(0)
        answer = json.loads(payload)
        responses: list[dict[str, Any]] = answer.get("responses", [])
        return responses


def _read_applied(settings: BrokerSettings) -> dict[str, Any]:
    try:
        data = json.loads(settings.applied_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _apply_live(
    settings: BrokerSettings,
    registry: DeviceRegistry,
    runtime: BrokerRuntime,
    passwords: dict[str, str],
) -> None:
    """Bring the running broker's accounts in line with ``registry``.

    The plugin takes passwords in plaintext only, so an account that is new, or whose password
    changed, needs its plaintext in ``passwords``; removals need nothing. What cannot be
    applied is named in the error, and is loaded by the next start."""
    applied = _read_applied(settings)
    wanted = _wanted(registry, settings.topics)
    commands: list[dict[str, Any]] = []
    done: dict[str, Any] = dict(applied)
    missing: list[str] = []
    for username in sorted(applied.keys() - wanted.keys()):
        commands += [
            {"command": "deleteClient", "username": username},
            {"command": "deleteRole", "rolename": _role_name(username)},
        ]
        done.pop(username)
    for username, (want, acls) in wanted.items():
        old = applied.get(username)
        fingerprint = want.fingerprint()
        if old == fingerprint:
            continue
        password = passwords.get(username)
        if password is None:
            missing.append(username)
            continue
        if old is not None:
            commands += [
                {"command": "deleteClient", "username": username},
                {"command": "deleteRole", "rolename": _role_name(username)},
            ]
        client: dict[str, Any] = {
            "command": "createClient",
            "username": username,
            "password": password,
            "roles": [{"rolename": _role_name(username)}],
        }
        if want.clientid is not None:
            client["clientid"] = want.clientid
        commands += [
            {"command": "createRole", "rolename": _role_name(username), "acls": acls},
            client,
        ]
        done[username] = fingerprint
    if commands:
        with _Control(
            runtime.host, runtime.port, _admin_password(settings), settings.start_timeout_s
        ) as control:
            responses = control.run(commands)
        errors = [
            f"{r.get('command')}: {r['error']}"
            for r in responses
            # Deleting what is already gone is the outcome we want.
            if r.get("error") and not str(r["error"]).endswith("not found")
        ]
        if errors:
            raise BrokerError("the broker refused account changes: " + "; ".join(errors))
        atomic_write(settings.applied_file, json.dumps(done) + "\n", mode=0o600)
        logger.info("broker pid %s: %s account commands applied", runtime.pid, len(commands))
    if missing:
        raise BrokerError(
            f"the running broker cannot take {', '.join(sorted(missing))} without the "
            "plaintext password (the registry holds hashes only); restart the broker to load "
            "them from the registry"
        )


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
    def tls_port(self) -> int | None:
        """The TLS listener port, once chosen; None without a TLS listener."""
        if self.settings.tls_port == 0:
            raise BrokerError("the port is chosen at start(); the broker has not started yet")
        return self.settings.tls_port

    @property
    def ca_file(self) -> Path:
        """The CA file devices verify the TLS listener with."""
        return self.settings.ca_file

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
        chosen = self.settings.port == 0 or self.settings.tls_port == 0
        attempts = 3 if chosen else 1
        if self.settings.tls_port is not None:
            ensure_tls_files(self.settings)
        for attempt in range(1, attempts + 1):
            settings = self.settings
            if settings.port == 0:
                settings = settings.model_copy(update={"port": free_port(self.host)})
            if settings.tls_port == 0:
                settings = settings.model_copy(update={"tls_port": free_port(self.host)})
            try:
                self._launch(exe, settings)
            except BrokerStartError as exc:
                if chosen and attempt < attempts and "in use" in str(exc):
                    logger.warning("port %s was taken; trying another", settings.port)
                    continue
                raise
            self.settings = settings  # from now on the port is fixed: restarts keep it
            return

    def _launch(self, exe: str, s: BrokerSettings) -> None:
        atomic_write(s.conf_file, render_config(s), mode=0o600)
        self._write_auth_from_registry(s)
        self._log_offset = _log_size(s.log_file)
        # Output before the log file is open (config errors, warnings) goes to the same file,
        # which only the owner reads: it names every client and account that connects.
        s.log_file.touch(mode=0o600)
        s.log_file.chmod(0o600)
        raise_fd_limit()  # inherited by mosquitto: one descriptor per connected device
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
            pid=proc.pid,
            host=s.host,
            port=s.port,
            tls_port=s.tls_port,
            ca_file=s.ca_file.resolve() if s.tls_port else None,
            conf_file=s.conf_file.resolve(),
        )
        atomic_write(s.runtime_file, runtime.model_dump_json() + "\n", mode=0o600)
        logger.info(
            "mosquitto pid %s serving %s:%s, TLS %s (%s devices)",
            proc.pid,
            s.host,
            s.port,
            f"{s.tls_host}:{s.tls_port}" if s.tls_port else "off",
            len(self.registry.devices),
        )

    def _write_auth_from_registry(self, settings: BrokerSettings) -> None:
        """Re-read the registry file (if any) and write the plugin's accounts from it, under
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

    def reload(
        self, registry: DeviceRegistry | None = None, *, passwords: dict[str, str] | None = None
    ) -> None:
        """Bring the running broker's accounts in line with the registry.

        Without ``registry`` the registry file is re-read. New accounts and changed passwords
        need their plaintext in ``passwords`` (the plugin hashes them itself); a removed
        account is disconnected. Nothing runs: only the files for the next start are written.
        """
        if registry is None:
            path = self.registry.path
            if path.exists():
                with _registry_lock(path):
                    registry = DeviceRegistry.load(path)
            else:
                registry = self.registry
        self.registry = registry
        if self._proc is None or not self.running:
            write_auth_files(self.settings, registry)
            return
        runtime = BrokerRuntime(
            pid=self._proc.pid,
            host=self.settings.host,
            port=self.settings.port,
            tls_port=self.settings.tls_port,
            conf_file=self.settings.conf_file.resolve(),
        )
        # Under the registry lock: another process provisioning on this broker also updates
        # the record of what the broker holds.
        with _registry_lock(registry.path):
            _apply_live(self.settings, registry, runtime, passwords or {})


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
    ca_file: Path | None = Field(
        None,
        description="CA certificate to verify the broker with (TLS, host name checked against "
        "host); None: plain MQTT, for the loopback listener only",
    )


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
    settings: BrokerSettings,
    runtime: BrokerRuntime | None,
    host: str | None,
    port: int | None,
    ca_file: Path | None = None,
) -> BrokerEndpoint:
    """Where the account connects: the TLS listener when there is one and ``ca_file`` is
    given, otherwise the plain one."""
    tls_port = runtime.tls_port if runtime else settings.tls_port
    if ca_file is not None and tls_port:
        tls_host = runtime.host if runtime else settings.host
        if settings.tls_host not in _WILDCARDS:
            tls_host = settings.tls_host
        return BrokerEndpoint(host=host or tls_host, port=port or tls_port, ca_file=ca_file)
    port = port or (runtime.port if runtime else settings.port)
    if not port:
        raise BrokerError(
            "the broker port is unknown: start the broker first, set BrokerSettings.port, "
            "or pass broker_port"
        )
    return BrokerEndpoint(host=host or (runtime.host if runtime else settings.host), port=port)


def _apply(
    settings: BrokerSettings,
    registry: DeviceRegistry,
    runtime: BrokerRuntime | None,
    passwords: dict[str, str],
) -> None:
    if runtime is None:
        write_auth_files(settings, registry)
    else:
        _apply_live(settings, registry, runtime, passwords)


def _hand_out_ca(
    settings: BrokerSettings, runtime: BrokerRuntime | None, out_dir: Path, name: str
) -> Path | None:
    """Copy the broker's CA beside a device's credentials; None without a TLS listener."""
    if runtime is not None:
        if runtime.tls_port is None or runtime.ca_file is None:
            return None
        ca_file = runtime.ca_file  # the running broker's, operator PKI or generated
    else:
        if settings.tls_port is None:
            return None
        ensure_tls_files(settings)
        ca_file = settings.ca_file
    target = (Path(out_dir) / f"{name}.ca.crt").absolute()
    atomic_write(target, ca_file.read_text(encoding="ascii"), mode=0o644)
    return target


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

    The broker's accounts are regenerated and, if a broker started by this module runs on
    ``settings.state_dir``, the device is added to it through the plugin's control topic: it
    can connect at once. With a TLS listener the device gets the CA as
    ``out_dir/<device_id>.ca.crt`` and its config points at the TLS port.
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
        ca_file = _hand_out_ca(settings, runtime, out_dir, device.device_id)
        creds = DeviceCredentials(
            device_id=device.device_id,
            kind=device.kind,
            username=device.username,
            password=SecretStr(password),
            broker=_endpoint(settings, runtime, broker_host, broker_port, ca_file),
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
        _apply(settings, registry, runtime, {device.device_id: password})
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
        _apply(settings, registry, runtime, {account.username: password})
    logger.info("provisioned %s account %s", account.role, username)
    return creds


def write_edge_config(
    template: Path,
    creds: DeviceCredentials,
    out_dir: Path,
    *,
    location: DeviceLocation | None = None,
    description: str | None = None,
) -> Path:
    """An edge-agent config for a provisioned device, from a template of the same kind.

    The template brings what provisioning cannot know (video or sensor sources, zones, rules,
    outbox); identity, credentials, broker and (when given) position come from provisioning.
    The password goes to ``out_dir/<device_id>.password`` (0600) and the config names that
    file, so the config holds no secret. Relative CSV paths are made absolute, since the
    config no longer sits beside them. Returns the config's path, ``<device_id>.edge.yaml``.
    """
    try:
        data = yaml.safe_load(Path(template).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BrokerError(f"edge config template {template} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise BrokerError(f"edge config template {template} is not a mapping")
    base = Path(template).resolve().parent
    out_dir = Path(out_dir)
    secret = (out_dir / f"{creds.device_id}.password").absolute()
    atomic_write(secret, creds.password.get_secret_value() + "\n", mode=0o600)
    device = dict(data.get("device") or {})
    device.update(device_id=creds.device_id, kind=creds.kind.value)
    if description is not None:
        device["description"] = description
    data["device"] = device
    data["credentials"] = {"username": creds.username, "password_file": str(secret)}
    broker = {k: v for k, v in dict(data.get("broker") or {}).items() if k != "tls"}
    broker.update(host=creds.broker.host, port=creds.broker.port, topic_prefix=creds.topic_prefix)
    if creds.broker.ca_file is not None:
        broker["tls"] = {"ca_file": str(creds.broker.ca_file)}
    data["broker"] = broker
    if location is not None:
        geo = dict(data.get("geo") or {})
        geo.update(lat=location.lat, lon=location.lon)
        if location.floor is not None:
            geo["floor"] = location.floor
        data["geo"] = geo
    for sensor in data.get("sensors") or []:
        source = sensor.get("source") if isinstance(sensor, dict) else None
        path = source.get("path") if isinstance(source, dict) else None
        if isinstance(source, dict) and isinstance(path, str) and not Path(path).is_absolute():
            source["path"] = str(base / path)
    target = out_dir / f"{creds.device_id}.edge.yaml"
    text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
    atomic_write(target, text, mode=0o644)
    return target
