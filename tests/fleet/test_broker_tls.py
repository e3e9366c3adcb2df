"""The managed Mosquitto as `fleet serve` runs it: TLS only, fleet-CA client certificates, the
certificate's CN as the user name, per-device ACLs and the CRL. Everything against the real broker."""

import asyncio
import contextlib
import datetime as dt
import signal
import socket
import ssl
from pathlib import Path

import aiomqtt

from fleet import broker_auth
from fleet.ca import FleetCA
from tests.conftest import TlsBroker

V5 = aiomqtt.ProtocolVersion.V5


def client(broker: TlsBroker, context: ssl.SSLContext | None, **kwargs: object) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        broker.port,
        protocol=V5,
        timeout=5,
        tls_context=context,
        **kwargs,  # type: ignore[arg-type]
    )


def refused(broker: TlsBroker, context: ssl.SSLContext | None, **kwargs: object) -> bool:
    """True when the broker does not let this client in (handshake or CONNECT refused)."""

    async def connect() -> None:
        async with client(broker, context, **kwargs):
            pass

    try:
        asyncio.run(asyncio.wait_for(connect(), 10))
    except aiomqtt.MqttError:
        return True
    return False


def test_config_has_no_plain_listener_and_no_passwords(mosquitto_tls: TlsBroker) -> None:
    config = mosquitto_tls.broker.config_path.read_text()
    assert mosquitto_tls.url.startswith("mqtts://")
    assert config.count("listener ") == 1
    for line in ("require_certificate true", "use_identity_as_username true", "crlfile ", "cafile "):
        assert line in config
    assert "password_file" not in config


def test_a_fleet_certificate_gets_in_over_tls_1_3(mosquitto_tls: TlsBroker) -> None:
    assert not refused(mosquitto_tls, mosquitto_tls.context("dev-a"))
    # The same handshake by hand, to see what was negotiated and which certificate the broker showed.
    context = mosquitto_tls.context("dev-a")
    with (
        socket.create_connection(("127.0.0.1", mosquitto_tls.port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.version() == "TLSv1.3"
        assert ("commonName", "edgefleet-broker") in tls.getpeercert()["subject"][1]  # type: ignore[index]


def test_plain_tcp_is_refused(mosquitto_tls: TlsBroker) -> None:
    assert refused(mosquitto_tls, None, username="dev-a", password="anything")
    assert refused(mosquitto_tls, None)


def test_tls_without_a_client_certificate_is_refused(mosquitto_tls: TlsBroker) -> None:
    context = ssl.create_default_context(cafile=str(mosquitto_tls.ca.cert_path))
    assert refused(mosquitto_tls, context, username=broker_auth.FLEET_USER, password="x")


def test_a_certificate_from_another_ca_is_refused(mosquitto_tls: TlsBroker, tmp_path: Path) -> None:
    other = FleetCA(tmp_path / "other-ca")
    cert, key = mosquitto_tls.client_files("dev-a", ca=other)
    context = ssl.create_default_context(cafile=str(mosquitto_tls.ca.cert_path))
    context.load_cert_chain(str(cert), str(key))
    assert refused(mosquitto_tls, context)


def test_an_expired_certificate_is_refused(mosquitto_tls: TlsBroker) -> None:
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    assert refused(mosquitto_tls, mosquitto_tls.context("dev-a", lifetime=dt.timedelta(days=1), now=long_ago))


def test_the_broker_is_checked_by_the_client(mosquitto_tls: TlsBroker, tmp_path: Path) -> None:
    """A device that trusts only its fleet's CA does not talk to a broker with another CA's cert."""
    other = FleetCA(tmp_path / "other-ca")
    cert, key = mosquitto_tls.client_files("dev-a")
    context = ssl.create_default_context(cafile=str(other.cert_path))
    context.load_cert_chain(str(cert), str(key))
    assert refused(mosquitto_tls, context)


def test_a_device_cannot_read_another_devices_topics(mosquitto_tls: TlsBroker) -> None:
    async def scenario() -> list[str]:
        received: list[str] = []
        fleet_ctx = mosquitto_tls.context(broker_auth.FLEET_USER)
        async with (
            client(mosquitto_tls, fleet_ctx) as fleet,
            client(mosquitto_tls, mosquitto_tls.context("dev-a")) as a,
        ):
            await a.subscribe("edgefleet/v1/dev-b/#", qos=1)
            await a.subscribe("edgefleet/v1/+/cmd/#", qos=1)
            await fleet.publish("edgefleet/v1/dev-b/cmd/update", b"for dev-b only", qos=1)
            await fleet.publish("edgefleet/v1/dev-a/cmd/update", b"marker", qos=1)
            async for message in a.messages:
                received.append(str(message.topic))
                if message.payload == b"marker":
                    break
        return received

    assert asyncio.run(asyncio.wait_for(scenario(), 15)) == ["edgefleet/v1/dev-a/cmd/update"]


def test_a_device_cannot_publish_as_another_device(mosquitto_tls: TlsBroker) -> None:
    """The user name a client sends is ignored: the certificate's CN is who it is."""

    async def scenario() -> list[bytes]:
        received: list[bytes] = []
        fleet_ctx = mosquitto_tls.context(broker_auth.FLEET_USER)
        a_ctx = mosquitto_tls.context("dev-a")
        async with (
            client(mosquitto_tls, fleet_ctx) as fleet,
            client(mosquitto_tls, a_ctx, username="dev-b") as a,
            client(mosquitto_tls, a_ctx, username=broker_auth.FLEET_USER) as a_as_fleet,
        ):
            await fleet.subscribe("edgefleet/v1/+/health", qos=1)
            await a.publish("edgefleet/v1/dev-b/health", b"forged", qos=1)
            await a_as_fleet.publish("edgefleet/v1/dev-b/health", b"forged as the fleet", qos=1)
            await a.publish("edgefleet/v1/dev-a/health", b"own", qos=1)
            async for message in fleet.messages:
                received.append(bytes(message.payload))  # type: ignore[arg-type]
                if message.payload == b"own":
                    break
        return received

    assert asyncio.run(asyncio.wait_for(scenario(), 15)) == [b"own"]


def test_a_revoked_certificate_is_refused_and_its_session_dropped(mosquitto_tls: TlsBroker) -> None:
    revoked_ctx = mosquitto_tls.context("dev-a")
    serial = mosquitto_tls.issued["dev-a"].serial
    kept_ctx = mosquitto_tls.context("dev-b")
    dropped = asyncio.Event()

    async def scenario() -> None:
        async with client(mosquitto_tls, revoked_ctx) as a:
            await a.subscribe("edgefleet/v1/dev-a/cmd/#", qos=1)
            assert mosquitto_tls.ca.revoke(serial)
            assert not mosquitto_tls.ca.revoke(serial)  # once is enough
            await asyncio.to_thread(mosquitto_tls.broker.reload)
            try:
                async for _ in a.messages:
                    pass
            except aiomqtt.MqttError:
                dropped.set()

    with contextlib.suppress(aiomqtt.MqttError):  # leaving the dropped client may fail too
        asyncio.run(asyncio.wait_for(scenario(), 20))
    assert dropped.is_set()
    assert refused(mosquitto_tls, revoked_ctx)
    assert not refused(mosquitto_tls, kept_ctx)
    assert serial in mosquitto_tls.ca.revoked_serials()


def test_a_sighup_alone_leaves_a_revoked_session_up(mosquitto_tls: TlsBroker) -> None:
    """Why `reload` restarts the broker when the CRL changed: a SIGHUP makes Mosquitto 2.0.11 refuse
    new handshakes of a revoked certificate but keeps the session that certificate already has."""
    context = mosquitto_tls.context("dev-a")
    serial = mosquitto_tls.issued["dev-a"].serial

    async def scenario() -> bool:
        async with client(mosquitto_tls, context) as a:
            mosquitto_tls.ca.revoke(serial)
            process = mosquitto_tls.broker._process
            assert process is not None
            process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            new_refused = await asyncio.to_thread(refused, mosquitto_tls, context)
            await a.publish("edgefleet/v1/dev-a/health", b"still here", qos=1, timeout=5)
            return new_refused

    assert asyncio.run(asyncio.wait_for(scenario(), 20))
