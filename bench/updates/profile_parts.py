"""Where the fleet server's CPU goes in one rollout, from a py-spy profile taken with `--gil`.

    nice -n 5 .venv/bin/python bench/updates/bench_rollout.py --sizes 1000 --repeats 1 --modes delta \\
        --default-phases-at --out /tmp/profiled.json --profile /tmp/prof --profile-gil
    .venv/bin/python bench/updates/profile_parts.py /tmp/prof/n1000-delta-one-h5-0-fleet.txt \\
        --run /tmp/profiled.json --out bench/updates/fleet_profile.json

Each sample (the thread holding the GIL, 100 per second) is counted under the first part below whose
function is on its stack; report.py shows the shares.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

PARTS = (
    ("MQTT receive (paho read and decode, aiomqtt)", ("loop_read", "_packet_read", "MessagesIterator")),
    ("device reports: state, health, statuses (database thread)", ("DeviceReports._work",)),
    ("MQTT send (publish, paho write)", ("FleetWorker.publish", "loop_write", "_packet_write")),
    ("chunk answers (read, sha256, frame)", ("FleetService.chunk_for",)),
    ("metadata answers", ("FleetService.metadata_file",)),
    ("routing messages (decode, queue)", ("FleetWorker._handle",)),
    (
        "rollout POST, campaign tick, API",
        ("CampaignDriver", "offer_next", "start_update", "WorkerThread.run", "_worker"),
    ),
    ("delta builds", ("BackgroundBuilds._work",)),
    ("telemetry and receipts", ("IngestBatcher", "_receipt_loop")),
    ("event loop (select, callbacks)", ("select", "_run_once")),
)


def parts(profile: Path) -> dict[str, float]:
    counts: Counter[str] = Counter()
    for line in profile.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        part = next(
            (name for name, keys in PARTS if any(k in f for f in frames for k in keys)),
            "other",
        )
        counts[part] += int(n)
    total = sum(counts.values())
    return {name: count / total for name, count in counts.most_common()} | {"samples": total}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("profile", type=Path, help="py-spy raw output (bench_rollout.py --profile-gil)")
    parser.add_argument("--run", type=Path, help="the results file of the profiled run (its figures)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    out: dict[str, Any] = {"parts": parts(args.profile)}
    if args.run:
        run = json.loads(args.run.read_text())["runs"][-1]
        keep = ("when", "devices", "all_committed_s", "cpu_s", "loadavg_start", "loadavg_end", "fleet_code")
        out["run"] = {key: run.get(key) for key in keep}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
