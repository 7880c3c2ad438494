"""The device registry: which devices and service accounts may talk to the broker.

One YAML file lists every device (id, kind, name, optional location and grid code) and the
service accounts (the aggregator, integrators). Each entry carries the Mosquitto password hash
of its account, never the password itself: the plaintext exists only in the connection config
handed to the device when it is provisioned (``aggregator.broker.launcher.provision_device``).

Hashes use Mosquitto 2.0's ``$7$`` format (PBKDF2-HMAC-SHA512), computed here with hashlib so
that a fleet of thousands of devices does not spawn thousands of ``mosquitto_passwd`` processes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from aggregator.errors import AggregatorError
from contract.messages import DEVICE_ID_PATTERN

__all__ = [
    "RESERVED_USERNAMES",
    "AccountRole",
    "Device",
    "DeviceKind",
    "DeviceLocation",
    "DeviceRegistry",
    "DuplicateAccountError",
    "RegistryError",
    "RegistryFile",
    "ServiceAccount",
    "UnknownAccountError",
    "atomic_write",
    "generate_password",
    "mosquitto_password_hash",
    "verify_mosquitto_password",
]

logger = logging.getLogger(__name__)

# Mosquitto 2.0's mosquitto_passwd defaults: 12 random salt bytes, 101 PBKDF2 iterations.
# Generated passwords carry 192 bits of entropy, so a higher iteration count would only slow
# down every connect (the broker hashes on each CONNECT) without making guessing feasible.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
_HASH_7 = re.compile(
    r"^\$7\$(?P<it>[1-9][0-9]*)\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)$"
)
_HASH_6 = re.compile(r"^\$6\$(?P<salt>[A-Za-z0-9+/=]+)\$(?P<hash>[A-Za-z0-9+/=]+)$")

# Service-account names a device id may never take, whether or not the account exists yet: a
# device called "aggregator" would otherwise inherit the aggregator's broker permissions.
# "broker-admin" is the broker's own provisioning account (launcher.ADMIN_USERNAME).
RESERVED_USERNAMES = frozenset({"aggregator", "integrator", "admin", "root", "broker-admin"})


class RegistryError(AggregatorError):
    """The registry file is missing, malformed, or an operation on it is refused."""


class DuplicateAccountError(RegistryError):
    """A device id or account name that is already taken."""


class UnknownAccountError(RegistryError):
    """A device id or account name that the registry does not hold."""


def generate_password() -> str:
    """A fresh random password: 32 URL-safe characters (192 bits)."""
    return secrets.token_urlsafe(24)


def mosquitto_password_hash(
    password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS
) -> str:
    """The password in Mosquitto 2.0's ``$7$<iterations>$<salt b64>$<hash b64>`` format."""
    if not password:
        raise ValueError("empty password")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_mosquitto_password(password: str, password_hash: str) -> bool:
    """Whether ``password`` matches a Mosquitto ``$7$`` (PBKDF2) or ``$6$`` (SHA-512) hash."""
    try:
        if m := _HASH_7.match(password_hash):
            salt = base64.b64decode(m["salt"], validate=True)
            expected = base64.b64decode(m["hash"], validate=True)
            actual = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(m["it"]))
        elif m := _HASH_6.match(password_hash):
            salt = base64.b64decode(m["salt"], validate=True)
            expected = base64.b64decode(m["hash"], validate=True)
            actual = hashlib.sha512(password.encode() + salt).digest()
        else:
            return False
    except binascii.Error:
        return False
    return hmac.compare_digest(actual, expected)


def _check_hash(value: str) -> str:
    m = _HASH_7.match(value) or _HASH_6.match(value)
    if m is None:
        raise ValueError("not a Mosquitto password hash ($7$... or $6$...); plaintext is refused")
    try:
        base64.b64decode(m["salt"], validate=True)
        base64.b64decode(m["hash"], validate=True)
    except binascii.Error as exc:
        raise ValueError(f"password hash is not valid base64: {exc}") from exc
    return value


def _utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


PasswordHash = Annotated[
    str, AfterValidator(_check_hash), Field(description="Mosquitto password hash, never plaintext")
]
CreatedAt = Annotated[AwareDatetime, AfterValidator(_utc)]
Username = Annotated[
    str,
    Field(
        pattern=DEVICE_ID_PATTERN,
        description="broker username; same alphabet as device ids (no '+', '#' or '/')",
    ),
]


class DeviceKind(StrEnum):
    CAMERA = "camera"
    SENSOR = "sensor"
    HUB = "hub"


class AccountRole(StrEnum):
    """What a service account may do on the broker (see ``launcher.render_acl``)."""

    AGGREGATOR = "aggregator"
    INTEGRATOR = "integrator"


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceLocation(_Entry):
    lat: float = Field(ge=-90, le=90, description="WGS-84 latitude, degrees")
    lon: float = Field(ge=-180, le=180, description="WGS-84 longitude, degrees")
    floor: int | None = Field(default=None, ge=-10, le=200, description="building floor")


class Device(_Entry):
    device_id: str = Field(pattern=DEVICE_ID_PATTERN, description="device id; also its username")
    kind: DeviceKind
    name: str = Field(min_length=1, max_length=128, description="human-readable name")
    location: DeviceLocation | None = Field(default=None, description="where it is installed")
    grid_code: str | None = Field(
        default=None, pattern=r"^\S{1,64}$", description="management grid (网格) it belongs to"
    )
    created_at: CreatedAt = Field(default_factory=_utcnow, description="when it was added, UTC")
    password_hash: PasswordHash

    @property
    def username(self) -> str:
        return self.device_id


class ServiceAccount(_Entry):
    username: Username
    role: AccountRole
    created_at: CreatedAt = Field(default_factory=_utcnow, description="when it was added, UTC")
    password_hash: PasswordHash


class RegistryFile(_Entry):
    """The registry as stored on disk."""

    version: Literal[1] = 1
    accounts: list[ServiceAccount] = Field(default_factory=list)
    devices: list[Device] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_are_unique(self) -> Self:
        seen: set[str] = set()
        for name in [a.username for a in self.accounts] + [d.device_id for d in self.devices]:
            if name in seen:
                raise ValueError(f"username {name!r} appears more than once")
            seen.add(name)
        for device in self.devices:
            if device.device_id in RESERVED_USERNAMES:
                raise ValueError(f"device id {device.device_id!r} is reserved for service accounts")
        return self


class DeviceRegistry:
    """The registry file loaded in memory; ``save()`` writes it back atomically."""

    def __init__(self, path: Path, content: RegistryFile | None = None) -> None:
        self.path = Path(path)
        content = content or RegistryFile()
        self._accounts: dict[str, ServiceAccount] = {a.username: a for a in content.accounts}
        self._devices: dict[str, Device] = {d.device_id: d for d in content.devices}

    @classmethod
    def load(cls, path: Path | str, *, missing_ok: bool = False) -> DeviceRegistry:
        """Read and validate the file; with ``missing_ok`` an absent file is an empty registry."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            if missing_ok:
                return cls(path)
            raise RegistryError(f"registry file {path} does not exist") from exc
        try:
            raw: Any = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RegistryError(f"registry file {path} is not valid YAML: {exc}") from exc
        try:
            content = RegistryFile.model_validate({} if raw is None else raw)
        except ValidationError as exc:
            raise RegistryError(f"registry file {path} is invalid:\n{exc}") from exc
        return cls(path, content)

    def to_file(self) -> RegistryFile:
        return RegistryFile(
            accounts=list(self._accounts.values()), devices=list(self._devices.values())
        )

    def save(self) -> None:
        """Write the registry atomically (temp file + rename), readable by its owner only."""
        data = self.to_file().model_dump(mode="json", exclude_none=True)
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
        atomic_write(self.path, text, mode=0o600)
        logger.debug("saved registry %s: %s devices", self.path, len(self._devices))

    @property
    def devices(self) -> tuple[Device, ...]:
        return tuple(self._devices.values())

    @property
    def accounts(self) -> tuple[ServiceAccount, ...]:
        return tuple(self._accounts.values())

    def device(self, device_id: str) -> Device:
        try:
            return self._devices[device_id]
        except KeyError:
            raise UnknownAccountError(f"no device {device_id!r} in the registry") from None

    def account(self, username: str) -> ServiceAccount:
        try:
            return self._accounts[username]
        except KeyError:
            raise UnknownAccountError(f"no service account {username!r} in the registry") from None

    def __contains__(self, username: object) -> bool:
        return username in self._devices or username in self._accounts

    def add_device(
        self,
        device_id: str,
        kind: DeviceKind | str,
        name: str | None = None,
        *,
        location: DeviceLocation | None = None,
        grid_code: str | None = None,
        password: str | None = None,
    ) -> tuple[Device, str]:
        """Register a device; returns it and its plaintext password (generated unless given)."""
        if device_id in self:
            raise DuplicateAccountError(f"{device_id!r} is already registered")
        if device_id in RESERVED_USERNAMES:
            raise RegistryError(f"device id {device_id!r} is reserved for service accounts")
        password = password or generate_password()
        try:
            device = Device(
                device_id=device_id,
                kind=DeviceKind(kind),
                name=name or device_id,
                location=location,
                grid_code=grid_code,
                password_hash=mosquitto_password_hash(password),
            )
        except (ValidationError, ValueError) as exc:
            raise RegistryError(f"device {device_id!r} refused: {exc}") from exc
        self._devices[device_id] = device
        logger.info("registered %s device %s", device.kind, device_id)
        return device, password

    def remove_device(self, device_id: str) -> Device:
        device = self.device(device_id)
        del self._devices[device_id]
        logger.info("removed device %s", device_id)
        return device

    def add_account(
        self, username: str, role: AccountRole | str, *, password: str | None = None
    ) -> tuple[ServiceAccount, str]:
        """Register a service account; returns it and its plaintext password."""
        if username in self:
            raise DuplicateAccountError(f"{username!r} is already registered")
        if username == "broker-admin":
            raise RegistryError("'broker-admin' is the broker's own account")
        password = password or generate_password()
        try:
            account = ServiceAccount(
                username=username,
                role=AccountRole(role),
                password_hash=mosquitto_password_hash(password),
            )
        except (ValidationError, ValueError) as exc:
            raise RegistryError(f"account {username!r} refused: {exc}") from exc
        self._accounts[username] = account
        logger.info("registered %s account %s", account.role, username)
        return account, password

    def remove_account(self, username: str) -> ServiceAccount:
        account = self.account(username)
        del self._accounts[username]
        return account

    def set_password(self, username: str, password: str | None = None) -> str:
        """Replace the password of a device or account; returns the new plaintext."""
        password = password or generate_password()
        new_hash = mosquitto_password_hash(password)
        if username in self._devices:
            self._devices[username] = self._devices[username].model_copy(
                update={"password_hash": new_hash}
            )
        elif username in self._accounts:
            self._accounts[username] = self._accounts[username].model_copy(
                update={"password_hash": new_hash}
            )
        else:
            raise UnknownAccountError(f"no device or account {username!r} in the registry")
        return password

    def password_entries(self) -> list[tuple[str, str]]:
        """``(username, hash)`` for every account and device, accounts first."""
        return [(a.username, a.password_hash) for a in self._accounts.values()] + [
            (d.device_id, d.password_hash) for d in self._devices.values()
        ]


def atomic_write(path: Path, text: str, *, mode: int) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
