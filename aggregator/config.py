"""Aggregator settings: pydantic-settings, from ``CWG_*`` environment variables and CLI flags.

Unknown keys are refused; every field says what it is. Secrets come from the environment
(``CWG_MQTT__PASSWORD``) or a file (``CWG_MQTT__PASSWORD_FILE``), never from a default.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contract.catalogue import CATALOGUE_PATH


class MqttSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="broker host")
    port: int = Field(1883, ge=1, le=65535, description="broker port")
    username: str = Field("aggregator", description="the aggregator's broker account")
    password: SecretStr | None = Field(None, description="its password (prefer password_file)")
    password_file: Path | None = Field(None, description="file holding the password")
    client_id: str = Field(
        "cwg-aggregator-1",
        description="MQTT client id; keep it stable: the broker queues for this session",
    )
    topic_prefix: str = Field("cwg", description="the contract's topic prefix")
    share_group: str | None = Field(
        None,
        description="shared-subscription group ($share/<group>/…) for several replicas; "
        "leave unset for a single aggregator",
    )
    session_expiry_s: int = Field(
        7 * 86400, ge=60, description="how long the broker keeps our session while we are away"
    )
    receive_maximum: int = Field(
        4000,
        ge=1,
        le=65535,
        description="MQTT 5 Receive Maximum: unacknowledged alerts the broker may send us",
    )
    keepalive_s: int = Field(30, ge=5, le=3600)
    reconnect_min_s: float = Field(
        0.25, gt=0, le=60, description="first reconnect delay; doubles per failed attempt"
    )
    reconnect_max_s: float = Field(
        2.0,
        gt=0,
        le=600,
        description="largest reconnect delay (each wait is randomized within its lower half "
        "to its full value); small, so ingest resumes within seconds of the broker's return",
    )
    feedback_qos: int = Field(1, ge=0, le=1, description="QoS of feedback to devices")
    feedback_batching: bool = Field(
        True,
        description="one feedback-batch/v1 message per device and committed batch when the "
        "batch holds more than one outcome for that device (false: one feedback/v1 per alert, "
        "for devices that read only feedback/v1)",
    )
    outgoing_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=64 * 1024,
        description="feedback and notices (topic + payload bytes) the MQTT I/O loop holds for "
        "the broker; beyond it the pool writer waits while the broker is connected "
        "(back-pressure), and the oldest are dropped only while it is unreachable",
    )
    tls_ca: Path | None = Field(None, description="CA file; enables TLS")
    io_process: bool = Field(
        True,
        description="run MQTT I/O in a child process, so that it and the pool writer each have "
        "a core (false: a thread of the aggregator process)",
    )

    def secret(self) -> str | None:
        if self.password_file is not None:
            return self.password_file.read_text(encoding="utf-8").strip()
        return self.password.get_secret_value() if self.password else None


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_messages: int = Field(1000, ge=1, le=20000, description="messages per transaction")
    linger_ms: float = Field(
        20, ge=0, le=5000, description="how long a batch waits to fill before it commits"
    )
    min_messages: int = Field(
        400,
        ge=1,
        le=20000,
        description="a batch holding this many stops lingering and commits with what has "
        "queued: under load no time is spent waiting, and the linger only gathers a trickle "
        "(as Kafka's fetch.min.bytes); at or above max_messages, every batch lingers",
    )


class NoticeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    update_interval_ms: float = Field(
        1000,
        ge=0,
        le=60_000,
        description="an event's `updated` notices are coalesced to at most one per interval, "
        "carrying its latest state (`created` goes at once); 0: one per batch that touches it",
    )


class AccessSettings(BaseModel):
    """Operator access to the API: login throttling and the metrics token."""

    model_config = ConfigDict(extra="forbid")

    metrics_token: SecretStr | None = Field(
        None,
        description="bearer token that may read /metrics (an admin operator's token may too); "
        "unset: only admin tokens",
    )
    token_ttl_s: float = Field(
        12 * 3600, gt=0, le=30 * 86_400, description="lifetime of an operator's API token"
    )
    login_free_failures_user: int = Field(
        5, ge=1, le=1000, description="failed logins per user name before the lockout starts"
    )
    login_free_failures_addr: int = Field(
        20, ge=1, le=10_000, description="failed logins per client address before its lockout"
    )
    login_lockout_base_s: float = Field(
        1.0, gt=0, le=3600, description="first lockout; each further failure doubles it"
    )
    login_lockout_max_s: float = Field(900.0, gt=0, le=86_400, description="longest lockout")
    login_workers: int = Field(
        1,
        ge=1,
        le=4,
        description="threads that check passwords (argon2): the cores a login flood can take",
    )
    login_max_waiting: int = Field(
        4, ge=0, le=1000, description="logins that may wait for a checker; more are refused (429)"
    )
    login_refusal_delay_s: float = Field(
        2.0,
        ge=0,
        le=30,
        description="a refused login (429) is answered after its remaining lockout, at most this "
        "long: a client that waits for its answers then tries once per delay, not hundreds of "
        "times a second (0: answer at once)",
    )
    login_refusal_max_delayed: int = Field(
        256,
        ge=0,
        le=100_000,
        description="refused logins held back at once; more are answered at once",
    )


class DeadLetterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keep_bytes: int = Field(
        64 * 1024,
        ge=0,
        description="a rejected payload keeps this many leading bytes; its full size and "
        "sha256 are kept whatever its length",
    )
    retention_days: float = Field(
        30,
        gt=0,
        description="dead letters and out-of-area rows older than this are deleted",
    )
    prune_every_s: float = Field(
        600, ge=1, description="how often the pool writer deletes expired rows (between batches)"
    )


class RetentionSettings(BaseModel):
    """Retention of raw alerts (``gateway retention``, aggregator/pool/retention.py)."""

    model_config = ConfigDict(extra="forbid")

    alert_days: int | None = Field(
        None,
        ge=1,
        le=36500,
        description="the service (once a day) and `gateway retention` (its default "
        "--keep-days) remove raw alerts, dead "
        "letters and out-of-area rows received more than this many days ago; events, cases, "
        "audit chains, supervision items and snapshots are never removed. Unset: keep every "
        "alert",
    )
    first_run_after_s: float = Field(
        3600.0,
        ge=0,
        le=86400,
        description="the service's first daily run waits this long after it starts (replicas "
        "restarting together do not all prune at once; on PostgreSQL one job runs at a time)",
    )


class HttpSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    certfile: Path | None = Field(
        None, description="PEM certificate (chain) for HTTPS; with keyfile, the API serves HTTPS"
    )
    keyfile: Path | None = Field(None, description="PEM private key of certfile")
    nice: int = Field(
        10,
        ge=0,
        le=19,
        description="niceness added to the operator API's process, so that ingest goes first "
        "when the cores are short (operators' pages and streams slow down instead; 0: equal)",
    )
    stream_stall_s: float = Field(
        10,
        gt=0,
        le=600,
        description="a live-stream client with messages waiting that has taken none for this "
        "long is dropped (a client that keeps reading never is)",
    )

    trusted_proxies: list[str] = Field(
        ["127.0.0.1", "::1"],
        max_length=256,
        description="addresses or networks (CIDR) of reverse proxies whose X-Forwarded-For and "
        "X-Forwarded-Proto are believed (JSON list); the login limiter counts failures per "
        "client address, so only a proxy you run may name it. []: no proxy, every client is "
        "its own connection's address",
    )

    @field_validator("trusted_proxies")
    @classmethod
    def _addresses(cls, value: list[str]) -> list[str]:
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                # "*" and host names included: trusting any client would let it pick the
                # address the login limiter counts against
                raise ValueError(
                    f"http.trusted_proxies: {entry!r} is not an address or a network"
                ) from None
        return [entry.strip() for entry in value]

    @model_validator(mode="after")
    def _both_or_neither(self) -> HttpSettings:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("http.certfile and http.keyfile go together: set both or neither")
        return self


class WebhookSettings(BaseModel):
    """Outbound webhooks (aggregator/fanout/webhooks.py); subscriptions are made in the API."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        True, description="run the delivery worker in this service (subscriptions still queue)"
    )
    schedule_s: list[float] = Field(
        [5, 30, 120, 600, 1800, 3600, 7200, 14400, 28800, 28800],
        min_length=1,
        max_length=100,
        description="delays before each retry of a failed delivery, in seconds (JSON list); "
        "after the last one the delivery is dead. The default retries 10 times over ~24 h",
    )
    timeout_s: float = Field(10.0, gt=0, le=120, description="HTTP timeout of one attempt")
    workers: int = Field(2, ge=1, le=64, description="delivery threads in this service")
    poll_s: float = Field(
        1.0, gt=0, le=60, description="how often an idle worker looks for due deliveries"
    )
    jitter: float = Field(
        0.2, ge=0, le=1, description="each retry delay is lengthened by up to this fraction"
    )
    retention_days: float = Field(
        30.0, gt=0, le=3650, description="delivered and dead deliveries are kept this long"
    )
    rotation_grace_s: float = Field(
        86400.0,
        ge=0,
        le=30 * 86400,
        description="after a secret rotation, deliveries are signed with the old and the new "
        "key for this long, then with the new one only",
    )
    retry_after_max_s: float = Field(
        3600.0,
        gt=0,
        le=86400,
        description="a receiver's Retry-After (on 429/503) is honoured up to this many seconds",
    )
    allow_networks: list[str] = Field(
        [],
        max_length=256,
        description="destinations allowed although not public (JSON list of CIDRs, addresses "
        "or host names); by default loopback, private, link-local, shared, reserved and "
        "unspecified addresses are refused, at subscription and at every delivery",
    )
    ca_file: Path | None = Field(
        None,
        description="PEM file of the CAs that https receivers' certificates are checked "
        "against, instead of the system's (a city's own CA); unset: the system's",
    )

    @field_validator("schedule_s")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if any(d <= 0 for d in value):
            raise ValueError("retry delays are positive seconds")
        return value

    @field_validator("allow_networks")
    @classmethod
    def _networks_or_hosts(cls, value: list[str]) -> list[str]:
        # the same rule as aggregator/fanout/destinations.parse_allow_entry, which uses them
        import re

        host = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9-]{1,63})(\.[A-Za-z0-9-]{1,63})*\.?$")
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                if not host.match(entry.strip()):
                    raise ValueError(f"not a network, address or host name: {entry!r}") from None
        return value


class SupervisionSettings(BaseModel):
    """Supervision (督办): the timer that raises reminders, overdue items and escalations
    (aggregator/pool/supervision.py; the rules in aggregator/cases/supervise.py). Every replica
    may run it: each case is claimed with a row lock, each item raised once."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="run the supervision timer in this service")
    interval_s: float = Field(15.0, gt=0, le=3600, description="how often the timer looks")
    reminder_lead_s: float = Field(
        1800.0, gt=0, description="a reminder (催办) comes this long before a deadline …"
    )
    reminder_fraction: float = Field(
        0.25, gt=0, lt=1, description="… or this share of the stage's span before it, if shorter"
    )
    street_after_s: float = Field(
        3600.0,
        ge=0,
        description="an overdue case unmoved this long after its deadline escalates to the street",
    )
    county_after_s: float = Field(
        14400.0, ge=0, description="… and this long after it to the county"
    )

    @model_validator(mode="after")
    def _street_first(self) -> SupervisionSettings:
        if self.county_after_s < self.street_after_s:
            raise ValueError("supervision.county_after_s comes after street_after_s")
        return self


POOL_URL_SCHEMES = ("postgresql", "postgres")


def redact_pool_url(url: str) -> str:
    """``url`` as logs and messages may show it: ``scheme://user@host:port/db``, without the
    password and without the query string (which may hold one too)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<pool url>"
    # everything before the last @ is user:password (a password may hold an unencoded /)
    userinfo, at, after = rest.rpartition("@")
    user = userinfo.split(":", 1)[0] if at else ""
    where = after.split("?", 1)[0]
    hosts, _, dbname = where.partition("/")
    return f"{scheme}://{user + '@' if user else ''}{hosts}/{dbname}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="CWG_",
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        # a refused value is not echoed: CWG_POOL_URL and the tokens may hold passwords
        hide_input_in_errors=True,
    )

    data_dir: Path = Field(Path("var"), description="pool, snapshots and broker state live here")
    pool_path: Path | None = Field(None, description="SQLite pool file (default data_dir/pool.db)")
    pool_url: SecretStr | None = Field(
        None,
        description="PostgreSQL pool (postgresql://user:password@host:port/db): set, it replaces "
        "the SQLite pool file and snapshots go to the pool's table, so replicas on several "
        "machines share it; from the environment (CWG_POOL_URL), so the password stays out of "
        "process lists",
    )
    snapshot_dir: Path | None = Field(None, description="default data_dir/snapshots")
    grid_file: Path | None = Field(None, description="GeoJSON grids (default: the Longgang sample)")
    catalogue_file: Path = Field(CATALOGUE_PATH, description="warning catalogue YAML")
    holiday_file: Path | None = Field(
        None,
        description="YAML of statutory holidays and adjusted working days for years the "
        "chinese-calendar package does not know yet (case deadlines in working days)",
    )
    whistle_lists: Path | None = Field(
        None,
        description="YAML of each community's whistle-able items and whistle operator "
        "(Longgang 7.3.2); unset: every Appendix A item may be whistled to any department",
    )
    evidence_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="largest evidence photo (JPEG or PNG) an operator may upload",
    )
    max_payload_bytes: int = Field(
        1024 * 1024, ge=1024, description="larger alerts are rejected (payload_too_large)"
    )
    max_clock_skew_s: float = Field(
        300, ge=0, description="observed_at further ahead of our clock is rejected"
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    notices: NoticeSettings = Field(default_factory=NoticeSettings)
    dead_letters: DeadLetterSettings = Field(default_factory=DeadLetterSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    access: AccessSettings = Field(default_factory=AccessSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    supervision: SupervisionSettings = Field(default_factory=SupervisionSettings)
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="loopback port of the ingest process's Prometheus metrics (0: any free "
        "port; the operator API's /metrics shows them either way)",
    )
    dev: bool = Field(
        False,
        description="development mode (CWG_DEV=1): with no operator account yet, the API "
        "creates admin/admin; never in production",
    )
    test_clock_file: Path | None = Field(
        None,
        description="tests and simulations only: a file holding the seconds the case clock "
        "(steps, deadlines, overdue, supervision) runs ahead of the system clock, moved by "
        "the simulators (aggregator/clock.py); unset in production",
    )
    # Time series (InfluxDB v2 write API); the names match the gateway's earlier variables.
    tsdb_url: str | None = Field(
        None, description="time-series write API base URL (InfluxDB 2.x/3.x, VictoriaMetrics)"
    )
    tsdb_org: str = Field("cwg", min_length=1, description="time-series organisation")
    tsdb_bucket: str = Field("cwg", min_length=1, description="time-series bucket or database")
    tsdb_token: SecretStr | None = Field(None, description="time-series API token")

    @field_validator("pool_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        scheme, sep, rest = value.get_secret_value().partition("://")
        if not sep or scheme.lower() not in POOL_URL_SCHEMES or not rest:
            raise ValueError(
                "pool_url must be a PostgreSQL URL, postgresql://user:password@host:port/db "
                "(unset it to use the SQLite pool file)"
            )
        # The scheme is case-insensitive here and in reader.is_pool_url, but libpq matches it
        # exactly: an upper-case one would be parsed as key=value text (and its error quotes
        # the password). Every part gets the URL from here, lower-cased once.
        return SecretStr(f"{scheme.lower()}://{rest}")

    @model_validator(mode="after")
    def _defaults_under_data_dir(self) -> Settings:
        if self.pool_path is None:
            self.pool_path = self.data_dir / "pool.db"
        if self.snapshot_dir is None:
            self.snapshot_dir = self.data_dir / "snapshots"
        if self.mqtt.receive_maximum < self.batch.max_messages:
            raise ValueError(
                f"mqtt.receive_maximum ({self.mqtt.receive_maximum}) must be at least "
                f"batch.max_messages ({self.batch.max_messages}): otherwise a batch can never fill"
            )
        return self

    @property
    def pool(self) -> Path:
        assert self.pool_path is not None
        return self.pool_path

    @property
    def pool_target(self) -> Path | str:
        """The pool every part opens: the PostgreSQL URL when ``pool_url`` is set, else the
        SQLite file. Holds the password: never log it (``pool_label``)."""
        return self.pool_url.get_secret_value() if self.pool_url is not None else self.pool

    @property
    def pool_label(self) -> str:
        """The pool as logs and messages name it (no password)."""
        if self.pool_url is not None:
            return redact_pool_url(self.pool_url.get_secret_value())
        return str(self.pool)

    @property
    def snapshots(self) -> Path:
        assert self.snapshot_dir is not None
        return self.snapshot_dir
