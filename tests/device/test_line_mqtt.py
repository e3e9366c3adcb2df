"""The line state from a plant MQTT topic, against real Mosquitto brokers standing in for a PLC
gateway's: each payload form, retained state, staleness, malformed payloads, a broker restart, a
password + TLS broker, and the updater's switch waiting on the plant topic."""

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import pytest

from device.engine.engine import Engine
from device.errors import ConfigError
from device.line import LineState
from device.line_mqtt import (
    DEFAULT_SOURCE,
    LineSignal,
    MalformedSignal,
    PlantLineListener,
    PlantSignalConfig,
    SignalState,
    parse_signal,
)
from device.updater import Updater
from fleet import broker_auth
from fleet.broker import find_mosquitto
from fleet.ca import FleetCA
from fleet.tuf_repository import TufRepository
from protocol.messages import UpdateState
from tests.device.test_updater import (
    MemoryFleet,
    assert_still_serving_v1,
    make_updater,
    new_fleet_tuf,
    offer_for,
    serve_v1,
)
from tests.plant_broker import PlantBroker

TOPIC = "plant/line-3/state"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def plant(tmp_path: Path) -> Iterator[PlantBroker]:
    find_mosquitto()
    broker = PlantBroker(tmp_path / "plant-broker")
    broker.start()
    yield broker
    broker.stop()


async def publish(broker: PlantBroker, payload: str | bytes, retain: bool = False, **client: object) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port, **client) as c:  # type: ignore[arg-type]
        await c.publish(TOPIC, payload, qos=1, retain=retain)


async def until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@asynccontextmanager
async def listening(config: PlantSignalConfig, line: LineState) -> AsyncIterator[PlantLineListener]:
    listener = PlantLineListener(config, line)
    task = asyncio.create_task(listener.run())
    try:
        yield listener
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def config_for(broker: PlantBroker, **overrides: object) -> PlantSignalConfig:
    fields: dict[str, object] = {
        "broker_url": broker.url,
        "topic": TOPIC,
        "reconnect_cap_s": 0.5,
        **overrides,
    }
    return PlantSignalConfig(**fields)  # type: ignore[arg-type]


def said(line: LineState, busy: bool, by: str) -> Callable[[], bool]:
    return lambda: line.get().busy is busy and line.get().by == by


# -- payloads -----------------------------------------------------------------------------------------
PLAIN = PlantSignalConfig(broker_url="mqtt://127.0.0.1:1883", topic=TOPIC)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b'{"busy": true, "by": "plc-3"}', LineSignal(True, "plc-3")),
        (b'{"busy": false}', LineSignal(False, None)),
        (b'{"busy": 1, "by": "mes"}', LineSignal(True, "mes")),
        (b"busy", LineSignal(True, None)),
        (b" IDLE\n", LineSignal(False, None)),
        (b"1", LineSignal(True, None)),
        (b"0", LineSignal(False, None)),
        (b"true", LineSignal(True, None)),
        (b"False", LineSignal(False, None)),
        (b'"busy"', LineSignal(True, None)),
    ],
)
def test_each_payload_form_reads_as_busy_or_idle(payload: bytes, expected: LineSignal) -> None:
    assert parse_signal(payload, PLAIN) == expected


def test_a_field_path_and_words_read_another_gateways_format() -> None:
    kepware = PlantSignalConfig(
        broker_url="mqtt://gw:1883",
        topic=TOPIC,
        busy_field="values.0.v",
        by_field="values.0.id",
        busy_values=frozenset({"RUNNING"}),
        idle_values=frozenset({"Stopped"}),
    )
    doc = {"timestamp": 1, "values": [{"id": "Line3.Running", "v": True}]}
    assert parse_signal(json.dumps(doc).encode(), kepware) == LineSignal(True, "Line3.Running")
    doc["values"][0]["v"] = "stopped"  # type: ignore[index]
    assert parse_signal(json.dumps(doc).encode(), kepware) == LineSignal(False, "Line3.Running")
    assert parse_signal(b"running", kepware) == LineSignal(True, None)
    with pytest.raises(MalformedSignal, match=r"without the field 'values\.0\.v'"):
        parse_signal(b'{"values": []}', kepware)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (b"", "empty payload"),
        (b"\xff\xfe", "not UTF-8"),
        (b"maybe", "neither a known word"),
        (b'{"state": 1}', "without the field 'busy'"),
        (b'{"busy": 2}', "means neither busy"),
        (b'{"busy": null}', "means neither busy"),
        (b'{"busy": true, "by": ""}', "'by' must be a name"),
        (b'{"busy": true, "by": 7}', "'by' must be a name"),
        (b"x" * (64 * 1024 + 1), "at most"),
    ],
)
def test_malformed_payloads_say_what_is_wrong(payload: bytes, why: str) -> None:
    with pytest.raises(MalformedSignal, match=why):
        parse_signal(payload, PLAIN)


@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        ({"topic": "plant/+/state"}, "without wildcards"),
        ({"topic": "plant/#"}, "without wildcards"),
        ({"broker_url": "tcp://gw:1883"}, "mqtts://host:port"),
        ({"busy_values": frozenset({"on", "1"}), "idle_values": frozenset({"1"})}, "both busy and idle"),
        ({"stale_after_s": 0}, "stale_after_s must be > 0"),
        ({"busy_field": "state..busy"}, "dotted path"),
        ({"ca_file": Path("/ca.pem")}, "needs an mqtts://"),
        ({"source": ""}, "1 to 64"),
    ],
)
def test_a_bad_config_is_refused_with_what_to_fix(overrides: dict[str, object], why: str) -> None:
    fields: dict[str, object] = {"broker_url": "mqtt://gw:1883", "topic": TOPIC, **overrides}
    with pytest.raises(ConfigError, match=why):
        PlantSignalConfig(**fields)  # type: ignore[arg-type]


# -- a real plant broker ------------------------------------------------------------------------------
def test_busy_and_idle_in_each_form_set_the_line(plant: PlantBroker, tmp_path: Path) -> None:
    line = LineState(tmp_path / "line-state.json")

    async def scenario() -> None:
        async with listening(config_for(plant), line) as listener:
            await until(lambda: listener.signal_state() is SignalState.WAITING, "the subscription")
            assert line.busy and "waiting for the plant signal" in line.get().reason, "busy until heard"
            for payload, busy, by in [
                ('{"busy": false, "by": "plc-3"}', False, "plc-3"),
                ('{"busy": true, "by": "plc-3"}', True, "plc-3"),
                ("idle", False, DEFAULT_SOURCE),
                ("1", True, DEFAULT_SOURCE),
                ("false", False, DEFAULT_SOURCE),
                ("true", True, DEFAULT_SOURCE),
                ("0", False, DEFAULT_SOURCE),
            ]:
                await publish(plant, payload)
                await until(said(line, busy, by), f"{payload} -> busy={busy} by {by}")
            assert listener.messages == 7 and listener.malformed == 0
            assert line.get().reason == f"plant topic {TOPIC}"
            assert listener.status()["signal"] == "live"

    asyncio.run(scenario())
    assert LineState(tmp_path / "line-state.json").get().by == DEFAULT_SOURCE, "kept on disk"


def test_the_retained_state_is_read_on_connect(plant: PlantBroker, tmp_path: Path) -> None:
    line = LineState(tmp_path / "line-state.json")

    async def scenario() -> None:
        await publish(plant, '{"busy": true, "by": "plc-3"}', retain=True)
        async with listening(config_for(plant), line):
            await until(said(line, True, "plc-3"), "the retained busy")
        await publish(plant, '{"busy": false, "by": "plc-3"}', retain=True)
        async with listening(config_for(plant), line):
            await until(said(line, False, "plc-3"), "the retained idle")

    asyncio.run(scenario())


def test_a_silent_signal_holds_the_line_busy_until_the_plant_speaks(
    plant: PlantBroker, tmp_path: Path
) -> None:
    line = LineState(tmp_path / "line-state.json")

    async def scenario() -> None:
        async with listening(config_for(plant, stale_after_s=0.6), line) as listener:
            await until(lambda: listener.connects == 1, "the connection")
            await publish(plant, "idle")
            await until(said(line, False, DEFAULT_SOURCE), "idle")
            went_idle = time.monotonic()
            await until(lambda: line.busy, "the stale hold", timeout=5)
            assert time.monotonic() - went_idle >= 0.6, "not before stale_after_s"
            assert listener.signal_state() is SignalState.STALE
            assert "silent for more than 0.6 s" in line.get().reason
            assert listener.status()["signal"] == "stale"
            line.set(False, "local-api")  # someone marks it idle while the signal is dead
            await until(lambda: line.busy, "the hold to be put back")
            await publish(plant, "idle")
            await until(said(line, False, DEFAULT_SOURCE), "idle again once the plant speaks")
            assert listener.signal_state() is SignalState.LIVE

    asyncio.run(scenario())


def test_malformed_payloads_are_counted_and_change_nothing(plant: PlantBroker, tmp_path: Path) -> None:
    line = LineState(tmp_path / "line-state.json")

    async def scenario() -> None:
        async with listening(config_for(plant, stale_after_s=1.0), line) as listener:
            await until(lambda: listener.connects == 1, "the connection")
            await publish(plant, '{"busy": false, "by": "plc-3"}')
            await until(said(line, False, "plc-3"), "idle")
            before = line.get()
            for garbage in ("maybe", '{"busy": 2}', b"\xff"):
                await publish(plant, garbage)
            await until(lambda: listener.malformed == 3, "three malformed payloads")
            assert line.get() == before and listener.messages == 1
            assert "means neither busy" in (listener.last_malformed or "") or "UTF-8" in (
                listener.last_malformed or ""
            )
            # Garbage is not a sign of life: a gateway sending only garbage goes stale.
            for _ in range(8):
                await publish(plant, "garbage")
                await asyncio.sleep(0.2)
            assert line.busy and listener.signal_state() is SignalState.STALE
            assert listener.status()["malformed"] == 11

    asyncio.run(scenario())


def test_a_broker_restart_holds_the_line_then_reconnects(plant: PlantBroker, tmp_path: Path) -> None:
    line = LineState(tmp_path / "line-state.json")

    async def scenario() -> None:
        async with listening(config_for(plant), line) as listener:
            await publish(plant, '{"busy": false, "by": "plc-3"}', retain=True)
            await until(said(line, False, "plc-3"), "idle")
            await asyncio.to_thread(plant.stop)
            await until(lambda: line.busy, "the hold while the broker is down")
            assert listener.signal_state() is SignalState.DISCONNECTED
            assert "unreachable" in line.get().reason
            await asyncio.sleep(1.0)  # a few failed reconnects
            assert line.busy and listener.status()["last_error"]
            await asyncio.to_thread(plant.start)
            await until(said(line, False, "plc-3"), "the retained idle after the reconnect")
            assert listener.connects == 2 and listener.status()["last_error"] is None

    asyncio.run(scenario())


def test_a_password_and_tls_plant_broker(tmp_path: Path) -> None:
    find_mosquitto()
    ca = FleetCA(tmp_path / "plant-ca")
    folder = tmp_path / "secure-plant"
    folder.mkdir()
    (folder / "passwd").write_text(
        broker_auth.password_file({"edge": broker_auth.hash_password("s3cret-pass")})
    )
    broker = PlantBroker(folder, folder / "passwd", ca.broker_tls())
    broker.start()
    (tmp_path / "creds").write_text("edge\ns3cret-pass\n")
    (tmp_path / "wrong").write_text("edge\nwrong\n")
    line = LineState(tmp_path / "line-state.json")
    good = config_for(broker, credentials_file=tmp_path / "creds", ca_file=ca.cert_path)
    assert good.broker_url.startswith("mqtts://")

    async def scenario() -> None:
        async with listening(
            config_for(broker, credentials_file=tmp_path / "wrong", ca_file=ca.cert_path), line
        ) as bad:
            await until(lambda: bad.last_error is not None, "the refusal")
            assert bad.connects == 0 and line.busy and "unreachable" in line.get().reason
        other_ca = FleetCA(tmp_path / "other-ca")
        async with listening(
            config_for(broker, credentials_file=tmp_path / "creds", ca_file=other_ca.cert_path), line
        ) as untrusted:
            await until(lambda: untrusted.last_error is not None, "the certificate refusal")
            assert untrusted.connects == 0
        async with listening(good, line) as listener:
            await until(lambda: listener.connects == 1, "the connection")
            tls = ssl.create_default_context(cafile=str(ca.cert_path))
            async with aiomqtt.Client(
                "127.0.0.1", broker.port, username="edge", password="s3cret-pass", tls_context=tls
            ) as client:
                await client.publish(TOPIC, '{"busy": false, "by": "plc-9"}', qos=1)
            await until(said(line, False, "plc-9"), "idle over TLS")

    try:
        asyncio.run(scenario())
    finally:
        broker.stop()
    with pytest.raises(ConfigError, match="cannot read the credentials file"):
        PlantLineListener(config_for(broker, credentials_file=tmp_path / "missing"), line)


def test_a_line_state_file_that_cannot_be_written_still_follows_the_plant(
    plant: PlantBroker, tmp_path: Path
) -> None:
    line = LineState(tmp_path / "no-such-folder" / "line-state.json")  # every save fails

    async def scenario() -> None:
        async with listening(config_for(plant), line) as listener:
            await until(lambda: listener.connects == 1, "the connection")
            await publish(plant, '{"busy": false, "by": "plc-3"}')
            await until(said(line, False, "plc-3"), "idle in memory")
            await publish(plant, '{"busy": true, "by": "plc-3"}')
            await until(said(line, True, "plc-3"), "busy in memory")
            # held at start, held while waiting for the first message, idle, busy
            assert listener.write_errors == 4 and listener.status()["write_errors"] == 4

    asyncio.run(scenario())


# -- the updater's switch gate ------------------------------------------------------------------------
@pytest.fixture
def fleet_tuf(tmp_path: Path, archives: dict[int, Path]) -> TufRepository:
    return new_fleet_tuf(tmp_path, archives)


@pytest.fixture
def serving_v1(engine: Engine, data_dir: Path) -> Engine:
    return serve_v1(engine, data_dir)


def test_an_update_waits_while_the_plant_topic_says_busy_and_switches_on_idle(
    plant: PlantBroker,
    serving_v1: Engine,
    data_dir: Path,
    archives: dict[int, Path],
    fleet_tuf: TufRepository,
) -> None:
    payload = archives[2].read_bytes()
    fleet = MemoryFleet(payload)
    line = LineState(data_dir / "line-state.json")
    updater: Updater = make_updater(data_dir, serving_v1, fleet, fleet_tuf)
    updater.line = line

    async def scenario() -> float:
        await publish(plant, '{"busy": true, "by": "plc-3"}', retain=True)
        async with listening(config_for(plant), line):
            await until(said(line, True, "plc-3"), "the plant's busy")
            update = asyncio.create_task(updater.handle_offer(offer_for(payload)))
            await until(
                lambda: updater.record is not None and updater.record.waiting_for is not None, "the wait", 60
            )
            await asyncio.sleep(1.0)  # production goes on: nothing switches
            assert_still_serving_v1(serving_v1, data_dir)
            journal = json.loads((data_dir / "update-journal.json").read_text())
            assert journal["waiting_for"] == {"waiting_for": "line idle"}
            await publish(plant, '{"busy": false, "by": "plc-3"}', retain=True)
            idle_at = time.time()
            await asyncio.wait_for(update, 30)
            return idle_at

    idle_at = asyncio.run(scenario())
    switched = next(s for s in fleet.statuses if s.state is UpdateState.PROBATION)
    assert idle_at <= switched.ts < idle_at + 2.0, "switched as soon as the plant said idle"
    assert fleet.states[-1] == "committed"
    assert serving_v1.get("surface-defect").manifest.version == 2
