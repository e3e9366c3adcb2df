"""Soak: SIGKILL a device agent at N random instants of an update and count how each one ended.

Every point is a fresh device on one real fleet (broker, server, agents as processes): provisioned on
v1, offered v2, killed `kill_after_s` after the offer, restarted on the same data dir (and again if
it exits by itself, as its service manager would). A point converges when the agent serves the
version the fleet's final state implies, from the slot `current` points at.

    .venv/bin/python bench/updates/soak.py               # 200 points, 4 at a time
    .venv/bin/python bench/updates/soak.py -n 20 -p 3 --json /tmp/soak.json
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # for tests.e2e.killpoints, the scenario CI runs 20 times

from edgefleet.demo import FleetProcess, package_archives  # noqa: E402
from tests.e2e.killpoints import KillPoint, run_points, seeded_points  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--points", type=int, default=200, help="kill points (default 200)")
    parser.add_argument("-p", "--parallel", type=int, default=4, help="devices at once (default 4)")
    parser.add_argument("--seed", type=int, default=2024)
    parser.add_argument("--max-kill-s", type=float, default=3.0, help="latest kill, seconds after the offer")
    parser.add_argument("--json", type=Path, help="also write every point's outcome here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway on a problem)")
    args = parser.parse_args()
    if args.points < 1 or args.parallel < 1:
        parser.error("--points and --parallel must be at least 1")

    work = Path(tempfile.mkdtemp(prefix="edgefleet-soak-"))
    archives = package_archives(work / "packages")
    fleet = FleetProcess(work / "fleet")
    started = time.monotonic()
    states: Counter[str] = Counter()
    problems: list[KillPoint] = []

    def progress(point: KillPoint) -> None:
        states[point.state or "error"] += 1
        if point.problem:
            problems.append(point)
        done = sum(states.values())
        print(
            f"[{done}/{args.points}] kill at {point.kill_after_s:.2f}s: {point.state or 'ERROR'}"
            f"{' (' + point.reason + ')' if point.reason else ''}"
            f"{' restarts=' + str(point.restarts) if point.restarts else ''}"
            f"{' NOT CONVERGED: ' + point.problem.splitlines()[0] if point.problem else ''}",
            flush=True,
        )

    try:
        client = fleet.start()
        for archive in archives.values():
            client.push_model(archive)
        points = seeded_points(args.points, args.seed, high_s=args.max_kill_s)
        done = run_points(fleet, archives, work / "devices", points, args.parallel, progress)
    finally:
        fleet.stop()
    wall_s = time.monotonic() - started
    converged = len(done) - len(problems)
    print()
    print(f"{len(done)} kill points in {wall_s:.0f} s, {args.parallel} at a time")
    for state in ("committed", "failed", "rolled_back", "error"):
        print(f"  {state:<12} {states.get(state, 0)}")
    print(f"  converged    {converged} of {len(done)}")
    if args.json:
        rows = [{**vars(p), "problem": p.problem} for p in done]
        args.json.write_text(json.dumps({"wall_s": wall_s, "points": rows}, indent=2) + "\n")
    if problems or args.keep:
        print(f"logs and data dirs kept in {work}")
        return 1 if problems else 0
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
