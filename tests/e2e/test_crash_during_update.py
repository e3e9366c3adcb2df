"""The agent killed with SIGKILL at random instants of an update: it restarts serving a complete model,
and the device's and the fleet's views agree.

20 seeded kill points, spread from the offer to probation, each a fresh device on one shared fleet,
run a few at a time. bench/updates/soak.py runs hundreds the same way and counts the outcomes.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from edgefleet.demo import FleetProcess
from tests.e2e.killpoints import KillPoint, run_points, seeded_points

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
POINTS = seeded_points(20, seed=7)
PARALLEL = 3  # devices at once: enough to keep CI short, few enough for a 2-core runner


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, archives: dict[int, Path]) -> Iterator[FleetProcess]:
    fleet = FleetProcess(tmp_path_factory.mktemp("crash") / "fleet")
    client = fleet.start()
    for archive in archives.values():
        client.push_model(archive)
    yield fleet
    fleet.stop()


@pytest.fixture(scope="module")
def outcomes(
    fleet: FleetProcess, archives: dict[int, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[int, KillPoint]:
    work = tmp_path_factory.mktemp("devices")
    fresh = [KillPoint(p.index, p.kill_after_s) for p in POINTS]
    return {p.index: p for p in run_points(fleet, archives, work, fresh, PARALLEL)}


@pytest.mark.parametrize("point", POINTS, ids=lambda p: f"kill-at-{p.kill_after_s:.2f}s")
def test_sigkill_mid_update_converges(outcomes: dict[int, KillPoint], point: KillPoint) -> None:
    outcome = outcomes[point.index]
    print(f"killed at {outcome.kill_after_s:.2f}s: update {outcome.state} ({outcome.reason})")
    assert outcome.problem == "", outcome


def test_the_kill_points_reach_more_than_one_outcome(outcomes: dict[int, KillPoint]) -> None:
    """A spread that only ever hit one phase would test less than it claims.

    Since downloads resume after a restart, a kill while downloading also ends committed; on a fast,
    idle machine every seeded point can land there. That is reported, not failed: the convergence
    of each point is what the tests above assert.
    """
    states = {p.state for p in outcomes.values()}
    if len(states) < 2:
        pytest.skip(f"every kill point ended {states} on this run; the spread was not exercised")
