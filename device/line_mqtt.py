"""The line state from a plant MQTT topic: a PLC gateway says busy or idle, the updater waits.

The plant's broker is usually not the fleet's: a PLC gateway's own Mosquitto on the line network. The
listener subscribes to one topic and maps each payload to busy/idle (`parse_signal`), then sets the
device's `LineState`, which the updater's switch gate reads (device/switch_gate.py).

Fail safe: the line counts as busy whenever the plant signal cannot be trusted - before the first
message after a (re)connect, while the plant broker is unreachable, and when the topic has been
silent for longer than `stale_after_s` (the gateway must publish at least that often; a retained
message counts as heard when it arrives). While the signal is not live the listener keeps the line
busy, also against a `PUT /api/line` that marks it idle: a switch waits rather than trust a dead
signal. Malformed payloads are counted and logged and never change the state.
"""

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiomqtt

from device.errors import ConfigError, DeviceError
from device.line import MAX_SETTER_CHARS, LineState
from device.link import parse_broker_url
from protocol.backoff import backoff_delay

log = logging.getLogger(__name__)

DEFAULT_BUSY_VALUES = frozenset({"busy", "1", "true"})
DEFAULT_IDLE_VALUES = frozenset({"idle", "0", "false"})
DEFAULT_SOURCE = "plant-mqtt"
MAX_PAYLOAD_BYTES = 64 * 1024  # a line signal is a word or a small JSON document
MAX_TICK_S = 1.0  # staleness is noticed within this (or a quarter of stale_after_s, if shorter)
LOGGED_MALFORMED = 10  # then one in LOG_MALFORMED_EVERY, so a gateway sending garbage cannot flood the log
LOG_MALFORMED_EVERY = 100


class MalformedSignal(DeviceError):
    """A plant payload that says neither busy nor idle; the message says what was expected."""


class SignalState(StrEnum):
    LIVE = "live"  # heard within stale_after_s on the current connection: the plant decides
    WAITING = "waiting"  # connected, nothing heard since: busy
    STALE = "stale"  # connected, silent for longer than stale_after_s: busy
    DISCONNECTED = "disconnected"  # the plant broker is unreachable: busy


@dataclass(frozen=True)
class LineSignal:
    busy: bool
    by: str | None  # who the payload says set it ("plc-3"); None: the listener's `source`


@dataclass(frozen=True)
class PlantSignalConfig:
    """Where the plant signal comes from and how its payloads read.

    `busy_field`/`by_field` are dotted paths into a JSON payload (`values.0.v` reads
    `{"values": [{"v": 1}]}`); plain payloads (`busy`, `idle`, `1`, `0`, `true`, `false` and whatever
    `busy_values`/`idle_values` add) need no path. Values compare case-insensitively.
    """

    broker_url: str  # mqtt://host:port, or mqtts://host:port checked against `ca_file`
    topic: str
    credentials_file: Path | None = None  # first line the user name, second the password
    ca_file: Path | None = None  # mqtts: the plant broker's CA; None: the system's trust store
    busy_field: str = "busy"
    by_field: str | None = "by"
    busy_values: frozenset[str] = DEFAULT_BUSY_VALUES
    idle_values: frozenset[str] = DEFAULT_IDLE_VALUES
    stale_after_s: float | None = 60.0  # None: a plant that publishes only on change (retained)
    source: str = DEFAULT_SOURCE  # the `by` of states the listener sets itself
    client_id: str | None = None  # default: edgefleet-line-<random>; set it when the plant ACL needs one
    reconnect_base_s: float = 0.5
    reconnect_cap_s: float = 30.0
    host: str = field(init=False, default="")
    port: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        try:
            host, port = parse_broker_url(self.broker_url)
        except ValueError as e:
            raise ConfigError(f"plant signal: {e}") from None
        object.__setattr__(self, "host", host)
        object.__setattr__(self, "port", port)
        if not self.topic or "+" in self.topic or "#" in self.topic or "\0" in self.topic:
            raise ConfigError(
                f"plant signal topic {self.topic!r}: name one topic without wildcards (+ #), "
                "e.g. plant/line-3/state"
            )
        busy = frozenset(v.strip().lower() for v in self.busy_values)
        idle = frozenset(v.strip().lower() for v in self.idle_values)
        if not busy or not idle or "" in busy | idle:
            raise ConfigError(
                "plant signal: busy_values and idle_values each need at least one non-empty word"
            )
        if busy & idle:
            raise ConfigError(f"plant signal: {sorted(busy & idle)} cannot mean both busy and idle")
        object.__setattr__(self, "busy_values", busy)
        object.__setattr__(self, "idle_values", idle)
        for name, path in (("busy_field", self.busy_field), ("by_field", self.by_field)):
            if path is not None and (not path or "" in path.split(".")):
                raise ConfigError(f"plant signal: {name} {path!r} must be a dotted path like state.busy")
        if self.stale_after_s is not None and self.stale_after_s <= 0:
            raise ConfigError("plant signal: stale_after_s must be > 0 (or None for change-only publishers)")
        if not 0 < len(self.source) <= MAX_SETTER_CHARS:
            raise ConfigError(f"plant signal: source must have 1 to {MAX_SETTER_CHARS} characters")
        if self.broker_url.startswith("mqtt:") and self.ca_file is not None:
            raise ConfigError("plant signal: a CA file needs an mqtts:// broker URL")

    def tls_context(self) -> ssl.SSLContext | None:
        if not self.broker_url.startswith("mqtts:"):
            return None
        try:
            context = ssl.create_default_context(
                ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file) if self.ca_file else None
            )
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"plant signal: cannot load the CA file {self.ca_file}: {e}") from e
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context

    def credentials(self) -> tuple[str | None, str | None]:
        """(user, password) from `credentials_file`, read at every connect so a new password is used."""
        if self.credentials_file is None:
            return None, None
        try:
            lines = self.credentials_file.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(
                f"plant signal: cannot read the credentials file {self.credentials_file}: {e}"
            ) from e
        if len(lines) < 2 or not lines[0].strip():
            raise ConfigError(
                f"plant signal: {self.credentials_file} must hold the user name on its first line "
                "and the password on its second"
            )
        return lines[0].strip(), lines[1]


# -- payloads -----------------------------------------------------------------------------------------
def _preview(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _field(doc: Any, path: str) -> Any:
    """The value at a dotted path; KeyError when it is not there."""
    node = doc
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(path)
    return node


def _word_busy(word: str, config: PlantSignalConfig) -> bool | None:
    word = word.strip().lower()
    if word in config.busy_values:
        return True
    if word in config.idle_values:
        return False
    return None


def _value_busy(value: Any, config: PlantSignalConfig) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and float(value).is_integer():
        value = str(int(value))
    if isinstance(value, str) and (busy := _word_busy(value, config)) is not None:
        return busy
    raise MalformedSignal(
        f"{_preview(json.dumps(value))} at {config.busy_field!r} means neither busy "
        f"({', '.join(sorted(config.busy_values))}) nor idle ({', '.join(sorted(config.idle_values))})"
    )


def parse_signal(payload: bytes, config: PlantSignalConfig) -> LineSignal:
    """Busy or idle from one plant payload: a plain word, a JSON scalar, or a JSON document read at
    `busy_field` (and `by_field` for who set it). MalformedSignal says what is wrong."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise MalformedSignal(
            f"payload of {len(payload)} bytes; a line signal has at most {MAX_PAYLOAD_BYTES}"
        )
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise MalformedSignal("payload is not UTF-8 text") from None
    if not text:
        raise MalformedSignal("empty payload")
    if (busy := _word_busy(text, config)) is not None:
        return LineSignal(busy, None)
    try:
        doc = json.loads(text)
    except ValueError:
        raise MalformedSignal(
            f"{_preview(text)!r} is neither a known word "
            f"({', '.join(sorted(config.busy_values | config.idle_values))}) nor JSON"
        ) from None
    if not isinstance(doc, dict | list):
        return LineSignal(_value_busy(doc, config), None)
    try:
        value = _field(doc, config.busy_field)
    except KeyError:
        raise MalformedSignal(f"JSON without the field {config.busy_field!r}: {_preview(text)}") from None
    by = None
    if config.by_field is not None:
        with contextlib.suppress(KeyError):
            by = _field(doc, config.by_field)
        if by is not None and not (isinstance(by, str) and 0 < len(by) <= MAX_SETTER_CHARS):
            raise MalformedSignal(f"{config.by_field!r} must be a name of 1 to {MAX_SETTER_CHARS} characters")
    return LineSignal(_value_busy(value, config), by)


# -- the listener -------------------------------------------------------------------------------------
class PlantLineListener:
    """Keeps `line` in step with the plant topic; `run()` until cancelled, `status()` for the API."""

    def __init__(
        self, config: PlantSignalConfig, line: LineState, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self.line = line
        self.clock = clock
        self._tls = config.tls_context()  # a bad CA file fails at start, not at the first connect
        config.credentials()  # likewise an unreadable credentials file
        self._connected = False
        self._heard_at: float | None = None  # monotonic, on the current connection only
        self._last_signal_at: float | None = None  # epoch seconds, for the status
        self._hold_reason: str | None = None  # why the listener holds the line busy now
        self._lock = asyncio.Lock()  # one decision and write at a time: a message or the watchdog
        self._changed = asyncio.Event()  # connection changed: the watchdog re-decides at once
        self.messages = 0
        self.malformed = 0
        self.last_malformed: str | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.write_errors = 0

    # -- state -------------------------------------------------------------------------------------
    def signal_state(self) -> SignalState:
        if not self._connected:
            return SignalState.DISCONNECTED
        if self._heard_at is None:
            return SignalState.WAITING
        stale_after = self.config.stale_after_s
        if stale_after is not None and self.clock() - self._heard_at > stale_after:
            return SignalState.STALE
        return SignalState.LIVE

    def _reason(self, state: SignalState) -> str:
        c = self.config
        if state is SignalState.DISCONNECTED:
            return f"plant broker {c.host}:{c.port} unreachable"
        if state is SignalState.WAITING:
            return f"waiting for the plant signal on {c.topic}"
        return f"plant signal on {c.topic} silent for more than {c.stale_after_s:g} s"

    def status(self) -> dict[str, Any]:
        c = self.config
        return {
            "broker": f"{c.broker_url.split(':', 1)[0]}://{c.host}:{c.port}",
            "topic": c.topic,
            "connected": self._connected,
            "signal": self.signal_state().value,
            "last_signal_age_s": (
                None if self._last_signal_at is None else round(time.time() - self._last_signal_at, 1)
            ),
            "stale_after_s": c.stale_after_s,
            "messages": self.messages,
            "malformed": self.malformed,
            "last_malformed": self.last_malformed,
            "connects": self.connects,
            "last_error": self.last_error,
            "write_errors": self.write_errors,
        }

    async def _write(self, busy: bool, by: str, reason: str) -> None:
        """Set the line unless it already says exactly this: heartbeats must not rewrite the file."""
        now = self.line.get()
        if (now.busy, now.by, now.reason) != (busy, by, reason):
            try:
                await asyncio.to_thread(self.line.set, busy, by, reason)
            except OSError as e:  # LineState keeps the new state in memory; only the file is behind
                self.write_errors += 1
                log.error(
                    "line state not saved (%s): check the data dir (space, permissions); "
                    "it holds in memory until a restart",
                    e,
                )

    def hold_now(self) -> None:
        """Mark the line busy until the plant is heard, synchronously: call it before the updater
        recovers a journaled switch, so a restart never switches on the last state read before it."""
        reason = self._reason(self.signal_state())
        self._hold_reason = reason
        now = self.line.get()
        if (now.busy, now.by, now.reason) != (True, self.config.source, reason):
            try:
                self.line.set(True, self.config.source, reason)
            except OSError as e:  # held in memory all the same
                self.write_errors += 1
                log.error("line state not saved (%s): check the data dir (space, permissions)", e)

    async def _evaluate(self) -> None:
        async with self._lock:
            state = self.signal_state()
            if state is SignalState.LIVE:
                return
            reason = self._reason(state)
            # On a change of reason record it; after that only undo an idle set by someone else.
            if reason != self._hold_reason or not self.line.busy:
                if reason != self._hold_reason:
                    log.warning("line held busy: %s", reason)
                self._hold_reason = reason
                await self._write(True, self.config.source, reason)

    async def _on_message(self, payload: bytes) -> None:
        try:
            signal = parse_signal(payload, self.config)
        except MalformedSignal as e:
            self.malformed += 1
            self.last_malformed = str(e)
            if self.malformed <= LOGGED_MALFORMED or self.malformed % LOG_MALFORMED_EVERY == 0:
                log.warning("ignored plant payload #%d on %s: %s", self.malformed, self.config.topic, e)
            return
        async with self._lock:
            self.messages += 1
            self._heard_at = self.clock()
            self._last_signal_at = time.time()
            self._hold_reason = None
            await self._write(
                signal.busy, signal.by or self.config.source, f"plant topic {self.config.topic}"
            )

    # -- tasks -------------------------------------------------------------------------------------
    async def run(self) -> None:
        """Listen until cancelled. The line is held busy from the first instant until the plant speaks."""
        self.hold_now()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._connection_loop(), name="plant-line-mqtt")
            tasks.create_task(self._watchdog(), name="plant-line-watchdog")

    async def _watchdog(self) -> None:
        stale_after = self.config.stale_after_s
        tick = MAX_TICK_S if stale_after is None else min(MAX_TICK_S, stale_after / 4)
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), tick)
            self._changed.clear()
            await self._evaluate()

    async def _connection_loop(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except (aiomqtt.MqttError, ConfigError) as e:
                self.last_error = str(e)
                log.warning("plant broker %s: %s; reconnecting", self.config.broker_url, e)
            if self._connected:
                attempt = 0  # a session that connected starts the backoff over
            self._connected = False
            self._heard_at = None
            self._changed.set()
            await asyncio.sleep(
                backoff_delay(attempt, self.config.reconnect_base_s, self.config.reconnect_cap_s)
            )
            attempt += 1

    async def _session(self) -> None:
        user, password = self.config.credentials()
        async with aiomqtt.Client(
            self.config.host,
            self.config.port,
            username=user,
            password=password,
            identifier=self.config.client_id,
            # 3.1.1: the oldest gateway brokers speak it; nothing here needs MQTT 5.
            protocol=aiomqtt.ProtocolVersion.V311,
            tls_context=self._tls,
            clean_session=True,  # the retained message gives the state; nothing queued is wanted
            keepalive=15,
            timeout=10,
        ) as client:
            await client.subscribe(self.config.topic, qos=1)
            self._connected = True
            self.connects += 1
            self.last_error = None
            self._changed.set()
            log.info("listening for the line state on %s %s", self.config.broker_url, self.config.topic)
            async for message in client.messages:
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    await self._on_message(bytes(payload))
                else:
                    await self._on_message(str(payload).encode())
