"""The managed Mosquitto with the fleet's generated password file and ACL, tested for real."""

import asyncio

import aiomqtt
import pytest

from fleet import broker_auth
from tests.conftest import Broker

V5 = aiomqtt.ProtocolVersion.V5


def client(broker: Broker, user: str | None, password: str | None = None) -> aiomqtt.Client:
    pw = password if password is not None else broker.passwords.get(user or "")
    return aiomqtt.Client("127.0.0.1", broker.port, username=user, password=pw, protocol=V5, timeout=5)


def test_hash_matches_mosquitto_format() -> None:
    hashed = broker_auth.hash_password(
        "secret123", salt=b"\x95b%\n\x00\xd1\xe9\x0f\x97\x9b\x93\x15", iterations=101
    )
    # Produced by `mosquitto_passwd -b` for the same password and salt.
    assert hashed.endswith(
        "p+Iu9v6IZLsWXp6JKj95YVB6LFDHxARm+UG0u4Z9IE8PI1Ev/AZDc7GGpW8UISBpOsA3zDp7rmgCFb11JFwtzw=="
    )
    assert broker_auth.check_password("secret123", hashed)
    assert not broker_auth.check_password("wrong", hashed)


@pytest.mark.parametrize(("user", "password"), [(None, None), ("dev-a", "wrong"), ("stranger", "x")])
def test_unauthenticated_clients_are_refused(
    mosquitto: Broker, user: str | None, password: str | None
) -> None:
    async def connect() -> None:
        async with client(mosquitto, user, password):
            pass

    with pytest.raises(aiomqtt.MqttError):
        asyncio.run(connect())


def test_a_device_cannot_read_another_devices_topics(mosquitto: Broker) -> None:
    async def scenario() -> list[str]:
        received: list[str] = []
        async with client(mosquitto, broker_auth.FLEET_USER) as fleet, client(mosquitto, "dev-a") as a:
            await a.subscribe("edgefleet/v1/dev-b/#", qos=1)
            await a.subscribe("edgefleet/v1/dev-a/cmd/#", qos=1)
            await fleet.publish("edgefleet/v1/dev-b/cmd/update", b"for dev-b only", qos=1)
            await fleet.publish("edgefleet/v1/dev-a/cmd/update", b"marker", qos=1)
            async for message in a.messages:
                received.append(str(message.topic))
                if message.payload == b"marker":
                    break
        return received

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == ["edgefleet/v1/dev-a/cmd/update"]


def test_a_device_cannot_publish_as_another_device(mosquitto: Broker) -> None:
    async def scenario() -> list[bytes]:
        received: list[bytes] = []
        async with client(mosquitto, broker_auth.FLEET_USER) as fleet, client(mosquitto, "dev-a") as a:
            await fleet.subscribe("edgefleet/v1/+/health", qos=1)
            await a.publish("edgefleet/v1/dev-b/health", b"forged", qos=1)
            await a.publish("edgefleet/v1/dev-a/health", b"own", qos=1)
            async for message in fleet.messages:
                received.append(bytes(message.payload))  # type: ignore[arg-type]
                if message.payload == b"own":
                    break
        return received

    assert asyncio.run(asyncio.wait_for(scenario(), 10)) == [b"own"]
