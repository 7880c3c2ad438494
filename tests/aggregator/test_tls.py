"""The devices' TLS listener on a real broker: nothing travels in clear, the generated CA works
end to end, and a client that does not trust that CA (or expects another name) is refused."""

from __future__ import annotations

import socket
import ssl
import stat
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from aggregator.broker import devca
from aggregator.broker.launcher import DeviceCredentials, write_edge_config
from aggregator.broker.registry import DeviceLocation
from aggregator.config import MqttSettings
from aggregator.service import build_aggregator
from contract import DeviceChannel, Outcome

from .conftest import GRIDS, aggregator_settings, grid_in_community, interior, make_alert

if TYPE_CHECKING:
    from tests.conftest import BrokerFactory, BrokerHandle

# MQTT 5 CONNECT of cam-001 with a password, as a device without TLS would send it.
SECRET = b"not-the-real-password-but-plaintext"


def _connect_packet(client_id: bytes, username: bytes, password: bytes) -> bytes:
    def s(b: bytes) -> bytes:
        return len(b).to_bytes(2, "big") + b

    variable = s(b"MQTT") + bytes([5, 0xC2]) + (30).to_bytes(2, "big") + b"\x00"
    payload = s(client_id) + s(username) + s(password)
    body = variable + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


@pytest.fixture
def tls_broker(broker_factory: BrokerFactory) -> BrokerHandle:
    # Loopback in tests; a real gateway binds the TLS listener to the network.
    return broker_factory(tls_port=0, tls_host="127.0.0.1")


def test_plain_mqtt_to_the_device_port_is_refused(tls_broker: BrokerHandle) -> None:
    with socket.create_connection((tls_broker.host, tls_broker.tls_port), timeout=5) as sock:
        sock.sendall(_connect_packet(b"cam-001", b"cam-001", SECRET))
        sock.settimeout(5)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    # Never a CONNACK (0x20): the listener speaks TLS only, and closes the connection (or
    # answers with a TLS alert record, 0x15).
    assert not answer.startswith(b"\x20"), answer
    assert answer == b"" or answer[0] == 0x15, answer
    # The plain listener is on loopback only, by default.
    conf = tls_broker.settings.conf_file.read_text().splitlines()
    assert f"listener {tls_broker.port} 127.0.0.1" in conf
    assert tls_broker.settings.host == "127.0.0.1"


def test_generated_ca_and_keys_are_private_and_name_localhost(tls_broker: BrokerHandle) -> None:
    tls = tls_broker.settings.tls_dir
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((tls / key).stat().st_mode) == 0o600
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    assert devca.san_names(tls / "server.crt") == {"localhost", "127.0.0.1"}


def test_tls_end_to_end_device_to_aggregator_and_feedback_back(
    tls_broker: BrokerHandle, tmp_path: Path
) -> None:
    # The aggregator too connects with verified TLS when pointed at the TLS port.
    settings = aggregator_settings(tls_broker, tmp_path / "agg")
    mqtt = settings.mqtt.model_dump()
    mqtt.update(port=tls_broker.tls_port, tls_ca=tls_broker.ca_file)
    settings = settings.model_copy(update={"mqtt": MqttSettings.model_validate(mqtt)})
    agg = build_aggregator(settings, grids=GRIDS)
    agg.start()
    try:
        assert agg.ingest.wait_connected(10)
        time.sleep(0.2)

        # Provisioning hands the device the CA and the TLS port.
        creds = tls_broker.add_device("cam-tls")
        path = tls_broker.creds_dir / "cam-tls.yaml"
        loaded = DeviceCredentials.load(path)
        assert loaded.broker.port == tls_broker.tls_port
        assert loaded.broker.ca_file == tls_broker.creds_dir.absolute() / "cam-tls.ca.crt"
        assert loaded.broker.ca_file.read_bytes() == tls_broker.ca_file.read_bytes()

        device = tls_broker.new_client(
            "cam-tls", creds.password.get_secret_value(), tls=True, ca_file=loaded.broker.ca_file
        )
        assert device.connect().value == 0
        assert not device.subscribe(creds.topics.feedback)[0].is_failure
        lat, lon = interior(grid_in_community(0))
        alert = make_alert("cam-tls", lat, lon)
        assert not device.publish(creds.topics.alert, alert.to_json()).is_failure
        (outcome,) = device.expect_feedback(1, timeout=10)
        assert outcome.alert_id == alert.alert_id
        assert outcome.outcome in (Outcome.ACCEPTED, Outcome.MERGED)
    finally:
        agg.stop()


def test_a_client_with_another_ca_fails_verification(
    tls_broker: BrokerHandle, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    devca.ensure(
        other / "ca.crt",
        other / "ca.key",
        other / "server.crt",
        other / "server.key",
        ["localhost"],
    )
    client = tls_broker.new_client("cam-001", tls=True, ca_file=other / "ca.crt")
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect()
    # The right CA, for contrast: the same client settings connect.
    good = tls_broker.new_client("cam-002", tls=True)
    assert good.connect().value == 0


def test_a_name_missing_from_the_certificate_fails_verification(
    tls_broker: BrokerHandle,
) -> None:
    ctx = ssl.create_default_context(cafile=str(tls_broker.ca_file))
    address = (tls_broker.host, tls_broker.tls_port)
    wrong = f"gateway-{uuid.uuid4().hex[:6]}.example"
    with (
        socket.create_connection(address, timeout=5) as sock,
        pytest.raises(ssl.SSLCertVerificationError, match="mismatch"),
    ):
        ctx.wrap_socket(sock, server_hostname=wrong)
    with (
        socket.create_connection(address, timeout=5) as sock,
        ctx.wrap_socket(sock, server_hostname="localhost") as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_device_topics_work_unchanged_over_tls(tls_broker: BrokerHandle) -> None:
    aggregator = tls_broker.client("aggregator", tls=True)
    assert not aggregator.subscribe(tls_broker.topics.device_filter(DeviceChannel.ALERT))[
        0
    ].is_failure
    camera = tls_broker.client("cam-001", tls=True)
    assert not camera.publish(tls_broker.topics.alert("cam-001"), b"over tls").is_failure
    assert aggregator.expect(1)[0].payload == b"over tls"


def test_provisioning_writes_an_edge_agent_config_that_validates_and_connects(
    tls_broker: BrokerHandle,
) -> None:
    from edge.config import load_config

    template = Path(__file__).parents[2] / "firmware-configs" / "sensor-gas-01.yaml"
    creds = tls_broker.add_device("sensor-tls", "sensor")
    path = write_edge_config(
        template,
        creds,
        tls_broker.creds_dir,
        location=DeviceLocation(lat=22.72, lon=114.25),
        description="kitchen gas, provisioned",
    )
    config = load_config(path)  # what `edge-agent validate` checks
    assert config.device.device_id == "sensor-tls"
    assert (config.geo.lat, config.geo.lon) == (22.72, 114.25)
    assert config.broker.port == tls_broker.tls_port
    assert config.broker.tls is not None
    assert Path(config.broker.tls.ca_file).read_bytes() == tls_broker.ca_file.read_bytes()
    assert config.credentials.password() == creds.password.get_secret_value()
    # No secret in the config itself; the password file is the owner's only.
    assert creds.password.get_secret_value() not in path.read_text()
    secret = Path(str(config.credentials.password_file))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert Path(config.sensors[0].source.path).is_file()

    client = tls_broker.new_client(
        config.credentials.username,
        config.credentials.password(),
        tls=True,
        ca_file=Path(config.broker.tls.ca_file),
    )
    assert client.connect().value == 0
