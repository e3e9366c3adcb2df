"""Time the whole demo: wall time and per-device update time (offered -> committed), medians over runs.

    .venv/bin/python bench/demo/bench_demo.py --runs 3

Update times count from the device's `offered`: `switched` when the new model passed its golden vectors and
serves, `committed` after the probation window (3 s in the demo).
"""

import argparse
import json
import statistics
import time
from pathlib import Path

from edgefleet.demo import run_demo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("demo-run"))
    parser.add_argument("--out", type=Path, default=Path("bench/demo/results.json"))
    args = parser.parse_args()
    runs = []
    for i in range(args.runs):
        start = time.monotonic()
        result = run_demo(args.workdir)
        total = time.monotonic() - start
        runs.append(
            {
                "run": i,
                "until_summary_s": result["wall_s"],
                "with_shutdown_s": total,
                "switched_s": [float(row["switched s"]) for row in result["devices"]],
                "committed_s": [float(row["committed s"]) for row in result["devices"]],
            }
        )
    summary = {
        "runs": runs,
        "median_until_summary_s": statistics.median(r["until_summary_s"] for r in runs),
        "median_with_shutdown_s": statistics.median(r["with_shutdown_s"] for r in runs),
        "median_switched_s": statistics.median(u for r in runs for u in r["switched_s"]),
        "max_switched_s": max(u for r in runs for u in r["switched_s"]),
        "median_committed_s": statistics.median(u for r in runs for u in r["committed_s"]),
        "max_committed_s": max(u for r in runs for u in r["committed_s"]),
    }
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
