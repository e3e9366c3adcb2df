"""The device link on a real Mosquitto: malformed commands are reported, never fatal."""

import asyncio

import aiomqtt

from device.link import DeviceLink
from fleet import broker_auth
from protocol import topics
from protocol.messages import UpdateOffer, UpdateStatus, decode
from tests.conftest import Broker


def test_malformed_offer_is_reported_and_the_link_stays_up(mosquitto: Broker) -> None:
    offers: list[UpdateOffer] = []

    async def on_offer(offer: UpdateOffer) -> None:
        offers.append(offer)

    async def scenario() -> list[UpdateStatus]:
        link = DeviceLink("dev-a", mosquitto.url, mosquitto.passwords["dev-a"], on_offer, "test")
        task = asyncio.create_task(link.run())
        reports: list[UpdateStatus] = []
        async with aiomqtt.Client(
            "127.0.0.1",
            mosquitto.port,
            username=broker_auth.FLEET_USER,
            password=mosquitto.passwords[broker_auth.FLEET_USER],
            protocol=aiomqtt.ProtocolVersion.V5,
        ) as fleet:
            await fleet.subscribe(topics.all_devices(topics.UPDATE_STATUS), qos=1)
            await asyncio.wait_for(link.connected.wait(), 10)
            offer_topic = topics.device_topic("dev-a", topics.CMD_UPDATE)
            await fleet.publish(offer_topic, b"{this is not json", qos=1)
            await fleet.publish(offer_topic, b'{"update": {"metadata": {}}}', qos=1)
            async for message in fleet.messages:
                reports.append(decode(UpdateStatus, bytes(message.payload)))  # type: ignore[arg-type]
                if len(reports) == 2:
                    break
        assert link.connected.is_set() and not task.done()
        task.cancel()
        return reports

    reports = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert [r.state.value for r in reports] == ["failed", "failed"]
    assert "not valid JSON" in reports[0].reason
    assert "not a valid UpdateOffer" in reports[1].reason
    assert offers == []
