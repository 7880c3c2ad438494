"""The broker launcher, the device registry and provisioning, against a real Mosquitto."""

from __future__ import annotations

import base64
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from aggregator.broker.launcher import (
    INSTALL_HINT,
    BrokerError,
    BrokerNotInstalledError,
    BrokerSettings,
    BrokerStartError,
    DeviceCredentials,
    MosquittoBroker,
    free_port,
    provision_device,
    read_runtime,
    render_config,
    render_dynsec,
)
from aggregator.broker.registry import (
    AccountRole,
    DeviceKind,
    DeviceLocation,
    DeviceRegistry,
    DuplicateAccountError,
    RegistryError,
    UnknownAccountError,
    mosquitto_password_hash,
    verify_mosquitto_password,
)
from contract import AlertV1, DeviceChannel, Location, Topics

if TYPE_CHECKING:
    from tests.conftest import BrokerFactory, BrokerHandle

NOT_AUTHORIZED = 0x87
# Mosquitto 2.0.11 refuses a login with 0x87 (Not authorized); 0x86 (Bad user name or
# password) is the other answer MQTT 5 allows.
REFUSED_LOGIN = {0x86, 0x87}


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _alert(device_id: str, seq: int) -> AlertV1:
    return AlertV1(
        alert_id=f"{device_id}:{seq}",
        device_id=device_id,
        seq=seq,
        type="smoke_fire",
        confidence=0.9,
        observed_at=datetime(2026, 11, 23, 14, 0, tzinfo=UTC),
        location=Location(lat=22.72, lon=114.25),
    )


# --- the launcher -------------------------------------------------------------------------


def test_starts_on_a_free_port_and_refuses_anonymous_and_wrong_passwords(
    broker: BrokerHandle,
) -> None:
    assert broker.port != 0
    assert _port_open(broker.host, broker.port)
    assert broker.broker.url == f"mqtt://127.0.0.1:{broker.port}"

    assert broker.connect_reason(None, None).value in REFUSED_LOGIN
    assert broker.connect_reason("cam-001", "wrong-password").value in REFUSED_LOGIN
    assert broker.connect_reason("cam-001", broker.password("cam-002")).value in REFUSED_LOGIN
    assert broker.connect_reason("nobody", "whatever").value in REFUSED_LOGIN
    # The password file is written with hashes computed in Python: the real broker accepts them.
    assert broker.connect_reason("cam-001", broker.password("cam-001")).value == 0
    assert broker.connect_reason("aggregator", broker.password("aggregator")).value == 0


@pytest.mark.parametrize("share_group", [None, "aggregators"])
def test_device_alert_reaches_the_aggregator(broker: BrokerHandle, share_group: str | None) -> None:
    aggregator = broker.client("aggregator")
    reasons = aggregator.subscribe(broker.topics.device_filter(DeviceChannel.ALERT, share_group))
    assert not reasons[0].is_failure

    camera = broker.client("cam-001")
    alert = _alert("cam-001", 1)
    assert not camera.publish(broker.topics.alert("cam-001"), alert.to_json()).is_failure

    (message,) = aggregator.expect(1)
    assert message.topic == "cwg/v1/devices/cam-001/alert"
    assert AlertV1.model_validate_json(message.payload) == alert


OtherTopic = Callable[[Topics], str]


@pytest.mark.parametrize(
    "forged_topic",
    [
        pytest.param(lambda t: t.alert("cam-002"), id="other-alert"),
        pytest.param(lambda t: t.telemetry("cam-002"), id="other-telemetry"),
        pytest.param(lambda t: t.status("cam-002"), id="other-status"),
        pytest.param(lambda t: t.feedback("cam-001"), id="own-feedback"),
        pytest.param(lambda t: t.events, id="events"),
    ],
)
def test_device_cannot_publish_as_another_device_or_as_the_aggregator(
    broker: BrokerHandle, forged_topic: OtherTopic
) -> None:
    aggregator = broker.client("aggregator")
    # Everything of every device (the aggregator's rights stop there: "cwg/#" is refused).
    assert not aggregator.subscribe("cwg/v1/devices/+/#")[0].is_failure
    camera = broker.client("cam-001")

    reason = camera.publish(forged_topic(broker.topics), b"forged")
    assert reason.value == NOT_AUTHORIZED, reason

    # The device stays connected; its own alert goes through and is the first thing the
    # aggregator sees: the forged message was dropped, not merely delayed.
    assert not camera.publish(broker.topics.alert("cam-001"), b"genuine").is_failure
    (first,) = aggregator.expect(1)
    assert (first.topic, first.payload) == ("cwg/v1/devices/cam-001/alert", b"genuine")
    aggregator.expect_nothing(0.3)


def test_device_cannot_read_another_devices_feedback(broker: BrokerHandle) -> None:
    spy = broker.client("cam-001")
    for flt in (
        "cwg/v1/devices/cam-002/feedback",
        "cwg/v1/devices/+/feedback",
        "#",
        "$share/g/cwg/v1/devices/cam-001/feedback",
    ):
        # Refused when subscribing, not only filtered on delivery.
        assert spy.subscribe(flt)[0].value == NOT_AUTHORIZED, flt
    assert not spy.subscribe(broker.topics.feedback("cam-001"))[0].is_failure
    owner = broker.client("cam-002")
    owner.subscribe(broker.topics.feedback("cam-002"))
    aggregator = broker.client("aggregator")

    assert not aggregator.publish(broker.topics.feedback("cam-002"), b"for cam-002").is_failure
    assert owner.expect(1)[0].payload == b"for cam-002"

    assert not aggregator.publish(broker.topics.feedback("cam-001"), b"for cam-001").is_failure
    received = spy.expect(1)
    assert [(m.topic, m.payload) for m in received] == [
        ("cwg/v1/devices/cam-001/feedback", b"for cam-001")
    ]


def test_integrator_reads_events_and_status_but_not_alerts(broker: BrokerHandle) -> None:
    integrator = broker.client("integrator")
    for refused in ("cwg/#", "cwg/v1/devices/+/alert", "$share/cwg/cwg/v1/devices/+/alert"):
        assert integrator.subscribe(refused)[0].value == NOT_AUTHORIZED, refused
    for granted in ("cwg/v1/events", "cwg/v1/devices/+/status"):
        assert not integrator.subscribe(granted)[0].is_failure, granted
    camera = broker.client("cam-001")
    aggregator = broker.client("aggregator")

    assert not camera.publish(broker.topics.alert("cam-001"), b"alert").is_failure
    assert not aggregator.publish(broker.topics.events, b"event").is_failure
    assert not camera.publish(broker.topics.status("cam-001"), b"online").is_failure

    received = integrator.expect(2)
    assert sorted((m.topic, m.payload) for m in received) == [
        ("cwg/v1/devices/cam-001/status", b"online"),
        ("cwg/v1/events", b"event"),
    ]
    integrator.expect_nothing(0.3)
    assert integrator.publish(broker.topics.events, b"forged").value == NOT_AUTHORIZED


def test_provisioning_while_running_then_connecting_with_the_new_credentials(
    broker: BrokerHandle,
) -> None:
    assert broker.connect_reason("cam-new", "anything").value in REFUSED_LOGIN
    aggregator = broker.client("aggregator")
    aggregator.subscribe(broker.topics.device_filter(DeviceChannel.ALERT))
    pid_before = broker.broker.pid

    creds = broker.add_device("cam-new", DeviceKind.CAMERA)

    # The config handed to the device: owner-only, complete, and readable back.
    path = broker.creds_dir / "cam-new.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = DeviceCredentials.load(path)
    assert loaded == creds
    assert loaded.broker.port == broker.port
    assert loaded.topics.alert == "cwg/v1/devices/cam-new/alert"
    plaintext = creds.password.get_secret_value()
    assert yaml.safe_load(path.read_text())["password"] == plaintext
    # Only the hash is kept on the gateway side.
    assert plaintext not in broker.registry_path.read_text()
    assert plaintext not in broker.settings.dynsec_file.read_text()

    # Same process (a reload, not a restart), and the new device works at once.
    assert broker.broker.pid == pid_before
    device = broker.new_client(creds.username, creds.password.get_secret_value())
    assert device.connect().value == 0
    assert not device.publish(creds.topics.alert, b"hello").is_failure
    assert aggregator.expect(1)[0].topic == "cwg/v1/devices/cam-new/alert"
    assert device.publish(broker.topics.alert("cam-001"), b"forged").value == NOT_AUTHORIZED


def test_removed_device_is_disconnected_and_refused_after_reload(broker: BrokerHandle) -> None:
    camera = broker.client("cam-002")
    other = broker.client("cam-001")
    broker.remove_device("cam-002")

    # Mosquitto re-checks connected clients on reload: the removed device is dropped at once.
    assert camera.disconnected.wait(5)
    assert broker.connect_reason("cam-002", broker.password("cam-002")).value in REFUSED_LOGIN
    assert other.paho.is_connected()
    assert not other.publish(broker.topics.alert("cam-001"), b"still here").is_failure


def test_generated_config_raises_queue_limit_and_persists(broker: BrokerHandle) -> None:
    written = broker.settings.conf_file.read_text()
    assert written == render_config(broker.settings)
    lines = set(written.splitlines())
    assert "max_queued_messages 1000000" in lines
    assert "persistence true" in lines
    assert f"persistence_location {broker.settings.persistence_dir.resolve()}/" in lines
    assert "allow_anonymous false" in lines
    assert "set_tcp_nodelay true" in lines
    assert f"listener {broker.port} 127.0.0.1" in lines
    assert "message_size_limit 4194304" in lines
    assert "autosave_interval 1" in lines
    for private in ("mosquitto.conf", "dynamic-security.json", "dynsec-admin.password"):
        assert stat.S_IMODE((broker.settings.state_dir / private).stat().st_mode) == 0o600


def test_rights_give_each_device_only_its_own_topics_and_bind_its_client_id() -> None:
    registry = DeviceRegistry(Path("unused.yaml"))
    registry.add_account("aggregator", AccountRole.AGGREGATOR)
    registry.add_device("cam-001", DeviceKind.CAMERA)
    config = render_dynsec(registry, "city", admin_password="admin-secret")
    # Everything is denied unless a role grants it (unsubscribing cannot hurt anyone).
    assert config["defaultACLAccess"] == {
        "publishClientSend": False,
        "publishClientReceive": False,
        "subscribe": False,
        "unsubscribe": True,
    }
    clients = {c["username"]: c for c in config["clients"]}
    assert clients["cam-001"]["clientid"] == "cam-001"
    assert "clientid" not in clients["aggregator"]  # replicas share it under distinct ids
    roles = {r["rolename"]: r["acls"] for r in config["roles"]}
    acls = [(a["acltype"], a["topic"]) for a in roles["account-cam-001"]]
    assert acls == [
        ("publishClientSend", "city/v1/devices/cam-001/alert"),
        ("publishClientSend", "city/v1/devices/cam-001/telemetry"),
        ("publishClientSend", "city/v1/devices/cam-001/status"),
        ("subscribeLiteral", "city/v1/devices/cam-001/status"),
        ("publishClientReceive", "city/v1/devices/cam-001/status"),
        ("subscribeLiteral", "city/v1/devices/cam-001/feedback"),
        ("publishClientReceive", "city/v1/devices/cam-001/feedback"),
    ]
    # The same PBKDF2 hash as the registry's, never the plaintext.
    salt = registry.device("cam-001").password_hash.split("$")[3]
    assert clients["cam-001"]["salt"] == salt
    assert "admin-secret" not in str(config)


@pytest.mark.parametrize("restart", [False, True], ids=["reconnect", "broker-restart"])
def test_queued_alerts_reach_a_persistent_session_after_reconnect(
    broker: BrokerHandle, restart: bool
) -> None:
    # More than Mosquitto's default max_queued_messages (1000), which would drop the rest.
    count = 1500
    session = {"client_id": "aggregator-persistent", "clean_start": False, "session_expiry_s": 3600}
    aggregator = broker.client("aggregator", **session)
    aggregator.subscribe(broker.topics.device_filter(DeviceChannel.ALERT))
    aggregator.disconnect()

    camera = broker.client("cam-001")
    payloads = [b"alert-%05d" % i for i in range(count)]
    reasons = camera.publish_many(broker.topics.alert("cam-001"), payloads)
    assert not any(r.is_failure for r in reasons)
    camera.disconnect()

    port = broker.port
    if restart:
        broker.restart()
        assert broker.port == port

    back = broker.client("aggregator", **session)
    assert back.session_present
    received = back.expect(count, timeout=20)
    assert [m.payload for m in received] == payloads
    back.expect_nothing(0.3)


def test_provisioning_offline_then_starting_the_broker(tmp_path: Path) -> None:
    registry_path = tmp_path / "registry.yaml"
    settings = BrokerSettings(state_dir=tmp_path / "state")
    with pytest.raises(BrokerError, match="port is unknown"):
        provision_device(registry_path, "cam-100", "camera", settings=settings, out_dir=tmp_path)
    assert DeviceRegistry.load(registry_path, missing_ok=True).devices == ()

    creds = provision_device(
        registry_path,
        "cam-100",
        "camera",
        settings=settings,
        out_dir=tmp_path / "devices",
        name="East gate",
        grid_code="440307001001",
        broker_host="gateway.example",
        broker_port=8883,
    )
    assert (creds.broker.host, creds.broker.port) == ("gateway.example", 8883)
    assert DeviceRegistry.load(registry_path).device("cam-100").name == "East gate"
    assert '"cam-100"' in settings.dynsec_file.read_text()

    with MosquittoBroker(settings, DeviceRegistry(registry_path)) as broker:
        login = ["-i", "cam-100", "-u", "cam-100", "-P", creds.password.get_secret_value()]
        target = ["-h", broker.host, "-p", str(broker.port), "-t", creds.topics.alert]
        reason = subprocess.run(
            ["mosquitto_pub", *target, *login, "-m", "x"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        assert reason.returncode == 0, reason.stderr
    assert read_runtime(settings.state_dir) is None


def test_kill_then_start_again_on_the_same_port_and_state(broker: BrokerHandle) -> None:
    port, pid = broker.port, broker.broker.pid
    assert pid is not None
    runtime = read_runtime(broker.settings.state_dir)
    assert runtime is not None
    assert (runtime.pid, runtime.port) == (pid, port)

    broker.kill()
    assert not _port_open(broker.host, port)
    assert read_runtime(broker.settings.state_dir) is None

    broker.start()
    assert broker.port == port
    assert broker.broker.pid != pid
    camera = broker.client("cam-001")
    assert not camera.publish(broker.topics.alert("cam-001"), b"after crash").is_failure


def test_payloads_over_the_aggregator_limit_pass_and_oversized_ones_are_refused(
    broker: BrokerHandle,
) -> None:
    aggregator = broker.client("aggregator")
    aggregator.subscribe(broker.topics.device_filter(DeviceChannel.ALERT))
    camera = broker.client("cam-001")
    topic = broker.topics.alert("cam-001")

    # Above the aggregator's own 1 MiB limit but within the broker's: delivered, so that the
    # aggregator can dead-letter it with a reason.
    big = b"x" * (1024 * 1024 + 1)
    assert not camera.publish(topic, big).is_failure
    assert aggregator.expect(1)[0].payload == big

    # Beyond message_size_limit the broker answers the QoS 1 publish with a failing PUBACK
    # (0x95) and keeps the connection. mosquitto_pub shows it; paho-mqtt 2.2 cannot parse that
    # PUBACK reason and drops the connection instead, so publishers must cap payloads first.
    oversized = broker.creds_dir.parent / "oversized.bin"
    oversized.write_bytes(b"x" * (broker.settings.message_size_limit + 1))
    login = ["-i", "cam-001", "-u", "cam-001", "-P", broker.password("cam-001")]
    command = ["mosquitto_pub", "-d", "-V", "mqttv5", "-q", "1", "-h", broker.host]
    command += ["-p", str(broker.port), *login, "-t", topic, "-f", str(oversized)]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert "received PUBACK (Mid: 1, RC:149)" in result.stdout, result.stdout + result.stderr
    assert "sending DISCONNECT" in result.stdout  # the client, not the broker, ended it
    aggregator.expect_nothing(0.5)


def test_start_failure_reports_the_log_tail(tmp_path: Path, broker: BrokerHandle) -> None:
    registry = DeviceRegistry(tmp_path / "other.yaml")
    settings = BrokerSettings(state_dir=tmp_path / "other", port=broker.port, start_timeout_s=5)
    with pytest.raises(BrokerStartError, match="Address already in use"):
        MosquittoBroker(settings, registry).start()
    assert read_runtime(settings.state_dir) is None


def test_missing_mosquitto_says_how_to_install_it(tmp_path: Path) -> None:
    settings = BrokerSettings(state_dir=tmp_path / "s", executable="mosquitto-not-installed")
    with pytest.raises(BrokerNotInstalledError) as info:
        MosquittoBroker(settings, DeviceRegistry(tmp_path / "r.yaml")).start()
    assert INSTALL_HINT in str(info.value)


def test_second_broker_on_the_same_state_dir_is_refused(broker: BrokerHandle) -> None:
    twin = MosquittoBroker(broker.settings, DeviceRegistry(broker.registry_path))
    with pytest.raises(BrokerError, match="already runs"):
        twin.start()


def test_settings_refuse_unknown_keys_and_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        BrokerSettings(state_dir=tmp_path, max_queue=5)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="prefix"):
        BrokerSettings(state_dir=tmp_path, topic_prefix="cwg/#")
    with pytest.raises(ValueError, match="max_packet_size"):
        BrokerSettings(state_dir=tmp_path, message_size_limit=4096, max_packet_size=4096)
    assert 0 < free_port() < 65536


# --- the registry -------------------------------------------------------------------------


def test_python_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    pw_file = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(pw_file), "alice", "s3cret"],
        check=True,
        capture_output=True,
    )
    reference = pw_file.read_text().strip().split(":", 1)[1]
    assert reference.startswith("$7$101$")
    assert verify_mosquitto_password("s3cret", reference)
    assert not verify_mosquitto_password("s3cret!", reference)
    # Same salt, same hash: the Python implementation is the broker's.
    salt = base64.b64decode(reference.split("$")[3])
    assert mosquitto_password_hash("s3cret", salt=salt) == reference


def test_registry_round_trip_keeps_only_hashes(tmp_path: Path) -> None:
    path = tmp_path / "registry.yaml"
    registry = DeviceRegistry.load(path, missing_ok=True)
    _, agg_password = registry.add_account("aggregator", AccountRole.AGGREGATOR)
    device, password = registry.add_device(
        "cam-001",
        "camera",
        "North gate camera",
        location=DeviceLocation(lat=22.72, lon=114.25),
        grid_code="440307001001",
    )
    registry.save()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert password not in text
    assert agg_password not in text

    loaded = DeviceRegistry.load(path)
    assert loaded.devices == (device,)
    assert loaded.device("cam-001").location == DeviceLocation(lat=22.72, lon=114.25)
    assert verify_mosquitto_password(password, loaded.device("cam-001").password_hash)
    assert loaded.account("aggregator").role is AccountRole.AGGREGATOR

    loaded.remove_device("cam-001")
    loaded.save()
    assert DeviceRegistry.load(path).devices == ()


def test_registry_refuses_duplicates_reserved_names_and_bad_ids(tmp_path: Path) -> None:
    registry = DeviceRegistry(tmp_path / "r.yaml")
    registry.add_account("aggregator", AccountRole.AGGREGATOR)
    registry.add_device("cam-001", DeviceKind.CAMERA)
    with pytest.raises(DuplicateAccountError):
        registry.add_device("cam-001", DeviceKind.SENSOR)
    with pytest.raises(DuplicateAccountError):
        registry.add_account("cam-001", AccountRole.INTEGRATOR)
    with pytest.raises(RegistryError, match="reserved"):
        registry.add_device("integrator", DeviceKind.CAMERA)
    for bad in ("cam/1", "cam+", "#", "", "-cam"):
        with pytest.raises(RegistryError):
            registry.add_device(bad, DeviceKind.CAMERA)
    with pytest.raises(RegistryError):
        registry.add_device("cam-009", "drone")
    with pytest.raises(UnknownAccountError):
        registry.remove_device("cam-404")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"colour": "red"}, "Extra inputs are not permitted"),
        ({"password_hash": "plaintext"}, "plaintext is refused"),
        ({"kind": "drone"}, "kind"),
    ],
)
def test_registry_file_with_bad_entries_is_refused(
    tmp_path: Path, entry: dict[str, str], message: str
) -> None:
    device = {
        "device_id": "cam-001",
        "kind": "camera",
        "name": "cam",
        "created_at": "2026-11-23T14:00:00Z",
        "password_hash": mosquitto_password_hash("x"),
    } | entry
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "devices": [device]}))
    with pytest.raises(RegistryError, match=message):
        DeviceRegistry.load(path)


def test_broker_factory_takes_custom_devices_and_settings(broker_factory: BrokerFactory) -> None:
    handle = broker_factory(devices=[("hub-9", "hub")], topic_prefix="city")
    hub = handle.client("hub-9")
    assert not hub.publish("city/v1/devices/hub-9/telemetry", b"{}").is_failure
    assert hub.publish("cwg/v1/devices/hub-9/telemetry", b"{}").value == NOT_AUTHORIZED


def test_a_broker_killed_soon_after_start_keeps_the_session_and_queued_alerts(
    broker: BrokerHandle,
) -> None:
    """Autosave every second: a SIGKILL a few seconds into the broker's life loses neither the
    aggregator's session (its subscription) nor the alerts queued for it. With Mosquitto's
    30-minute default (or the 60 s this project had), both were gone."""
    broker.kill()
    broker.start()  # a fresh life: nothing saved since this start yet
    session = {"client_id": "aggregator-durable", "clean_start": False, "session_expiry_s": 3600}
    aggregator = broker.client("aggregator", **session)
    aggregator.subscribe(broker.topics.device_filter(DeviceChannel.ALERT))
    aggregator.disconnect()
    camera = broker.client("cam-001")
    payloads = [b"queued-%03d" % i for i in range(200)]
    assert not any(
        r.is_failure for r in camera.publish_many(broker.topics.alert("cam-001"), payloads)
    )
    camera.disconnect()

    time.sleep(2.5)  # autosave runs every second
    broker.kill()
    broker.start()

    back = broker.client("aggregator", **session)
    assert back.session_present, "the aggregator's session was lost"
    assert [m.payload for m in back.expect(len(payloads), timeout=10)] == payloads
