"""`edgefleet fleet model push`: the archive streamed to a real fleet API (uvicorn on a socket, SQLite,
the fleet's TUF repository) with its progress: a bar on a terminal (a real pty), one line elsewhere."""

import fcntl
import hashlib
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.progress import ByteProgress, format_bytes
from fleet.api import create_app
from fleet.client import FleetApiError, FleetClient
from fleet.db import open_database
from fleet.service import FleetService
from fleet.store import FleetDataDir
from tests.asgi_server import serving

TOKEN = "operator-push-token"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def fleet_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    data = FleetDataDir(tmp_path_factory.mktemp("fleet-push") / "fleet")
    data.make_dirs()
    service = FleetService(data, open_database(data.database), "mqtt://127.0.0.1:1883", chunk_size=4096)

    async def publish(topic: str, payload: bytes, qos: int) -> None:  # no broker: registering sends nothing
        raise AssertionError(f"nothing is published when a model is registered ({topic})")

    service.publish = publish
    with serving(create_app(service, TOKEN)) as url:
        yield url


def cli(*args: str, stderr: int = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    """The installed command as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "edgefleet", *args], stdout=subprocess.PIPE, stderr=stderr, timeout=60
    )


# -- the client ---------------------------------------------------------------------------------------
def test_push_model_streams_the_archive_and_reports_each_block(
    fleet_url: str, archives: dict[int, Path]
) -> None:
    archive = archives[2]
    size = archive.stat().st_size
    seen: list[tuple[int, int]] = []
    client = FleetClient(fleet_url, TOKEN)
    try:
        model = client.push_model(
            archive, progress=lambda sent, total: seen.append((sent, total)), block_size=65536
        )
        listed = client.models()
    finally:
        client.close()
    sent = [s for s, _ in seen]
    assert {t for _, t in seen} == {size}
    assert sent == sorted(set(sent)), "strictly increasing"
    assert sent[-1] == size and len(sent) == -(-size // 65536)
    steps = [b - a for a, b in zip([0, *sent], sent, strict=False)]
    assert sum(steps) == size and max(steps) == 65536
    assert model["version"] == 2 and model["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    assert any(m["name"] == model["name"] and m["version"] == 2 for m in listed)


def test_push_model_says_what_is_wrong(fleet_url: str, tmp_path: Path, archives: dict[int, Path]) -> None:
    client = FleetClient(fleet_url, TOKEN)
    try:
        with pytest.raises(FleetApiError, match="cannot read the package archive"):
            client.push_model(tmp_path / "missing.tar")
        garbage = tmp_path / "garbage.tar"
        garbage.write_bytes(os.urandom(200_000))
        seen: list[int] = []
        with pytest.raises(FleetApiError, match="not a valid model package"):
            client.push_model(garbage, progress=lambda sent, _: seen.append(sent))
        assert seen[-1] == 200_000, "every byte went before the fleet refused it"
    finally:
        client.close()
    wrong = FleetClient(fleet_url, "not-the-token")
    try:
        with pytest.raises(FleetApiError, match="401"):
            wrong.push_model(archives[1])
    finally:
        wrong.close()


# -- the command --------------------------------------------------------------------------------------
SUMMARY = re.compile(
    r"^pushing v1\.tar: [\d.]+ MiB in [\d.]+ s \([\d.]+ (KiB|MiB|GiB)/s\)(, answered [\d.]+ s later)?$"
)


def test_without_a_terminal_the_command_writes_one_summary_line(
    fleet_url: str, archives: dict[int, Path]
) -> None:
    done = cli("fleet", "model", "push", str(archives[1]), "--server", fleet_url, "--token", TOKEN)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["version"] == 1
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and SUMMARY.match(lines[0]), lines
    assert b"\r" not in done.stderr


def test_on_a_terminal_the_command_draws_a_bar(fleet_url: str, archives: dict[int, Path]) -> None:
    """stderr is a real pseudo-terminal 60 columns wide, as in an operator's shell."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 60, 0, 0))
    try:
        done = cli(
            "fleet",
            "model",
            "push",
            str(archives[1]),
            "--server",
            fleet_url,
            "--token",
            TOKEN,
            stderr=secondary,
        )
    finally:
        os.close(secondary)
    screen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: every writer is gone
            break
        if not chunk:
            break
        screen += chunk
    os.close(primary)
    assert done.returncode == 0, screen.decode(errors="replace")
    assert json.loads(done.stdout)["version"] == 1
    text = screen.decode().replace("\r\n", "\n")
    draws = [d for line in text.split("\n") for d in line.split("\r") if d.strip()]
    final = draws[-1].rstrip()
    size = format_bytes(archives[1].stat().st_size)
    assert final.startswith("pushing v1.tar [") and f"100% {size}/{size}" in final, draws
    bar = final.split("[", 1)[1].split("]", 1)[0]
    assert len(bar) >= 8 and set(bar) == {"#"}, "a full bar"
    assert all(len(d) <= 59 for d in draws), "fits the terminal's 60 columns"
    assert text.endswith("\n"), "the prompt comes back on a fresh line"


def test_the_old_name_still_works_and_errors_are_plain(
    fleet_url: str, archives: dict[int, Path], tmp_path: Path
) -> None:
    again = cli("fleet", "model-push", str(archives[1]), "--server", fleet_url, "--token", TOKEN)
    assert again.returncode == 0, again.stderr.decode()
    assert json.loads(again.stdout)["version"] == 1, "the same bytes again: the registered version"
    missing = cli(
        "fleet", "model", "push", str(tmp_path / "nope.tar"), "--server", fleet_url, "--token", TOKEN
    )
    assert missing.returncode == 1 and b"is not a file" in missing.stderr
    refused = cli("fleet", "model", "push", str(archives[1]), "--server", fleet_url, "--token", "wrong")
    assert refused.returncode == 1 and b"error: POST /api/models -> 401" in refused.stderr
    assert b"Traceback" not in refused.stderr and refused.stdout == b""
    lines = refused.stderr.decode().splitlines()
    assert re.fullmatch(r"pushing v1\.tar: all [\d.]+ MiB sent in [\d.]+ s, then it failed", lines[0]), lines


# -- the bar ------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_bar_redraws_at_most_ten_times_a_second_and_ends_full() -> None:
    clock, out = Clock(), io.StringIO()
    total = 10 * 1024 * 1024
    with ByteProgress(
        "pushing x.tar", total, out, live=True, waiting_note="the fleet verifies it", clock=clock
    ) as bar:
        for i in range(1, 101):
            clock.now += 0.01  # 100 blocks in one second
            bar.update(i * total // 100, total)
        assert (
            out.getvalue().split("\r")[-1].rstrip().endswith("100% 10.0 MiB/10.0 MiB - the fleet verifies it")
        )
        clock.now += 2.0  # the fleet verifies
    draws = [d for d in out.getvalue().split("\r") if d]
    assert 10 <= len(draws) <= 13, len(draws)  # every 0.1 s, the full bar, and the final one
    assert draws[-1].rstrip() == "pushing x.tar [" + "#" * 29 + "] 100% 10.0 MiB/10.0 MiB 10.0 MiB/s"
    assert out.getvalue().endswith("\n") and "verifies" not in draws[-1]
    assert bar.summary() == "pushing x.tar: 10.0 MiB in 1.0 s (10.0 MiB/s), answered 2.0 s later"


def test_without_a_terminal_only_the_summary_is_written_and_a_failure_says_where() -> None:
    clock, out = Clock(), io.StringIO()
    with pytest.raises(RuntimeError), ByteProgress("pushing x.tar", 4096, out, clock=clock) as bar:
        clock.now += 0.5
        bar.update(1024, 4096)
        raise RuntimeError("connection reset")
    assert not bar.live, "a StringIO is no terminal"
    assert out.getvalue() == "pushing x.tar: stopped at 25% (1.0 KiB of 4.0 KiB) after 0.5 s\n"


def test_a_narrow_terminal_shortens_the_label_not_the_figures() -> None:
    clock = Clock()
    bar = ByteProgress(
        "pushing a-very-long-package-name-v12.tar", 2048, io.StringIO(), live=False, clock=clock
    )
    clock.now += 1.0
    bar.update(1024, 2048)
    wide, narrow = bar.line(columns=120), bar.line(columns=50)
    assert wide.startswith("pushing a-very-long-package-name-v12.tar [") and len(wide) <= 119
    assert narrow == "....tar [####....]  50% 1.0 KiB/2.0 KiB 1.0 KiB/s" and len(narrow) == 49
