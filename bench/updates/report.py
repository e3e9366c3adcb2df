"""Write RESULTS.md from results.json (bench_rollout.py) and fleet_costs.json (fleet_costs.py).

    .venv/bin/python bench/updates/report.py

Every figure in the page is computed here from those files; the assumptions of the transfer-time
comparison are constants below, named in the page.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MB = 1_000_000
MIB = 1024 * 1024
WHATIF = " (what-if fleet)"
# The comparison with the seed's claim ("a field update cut from 2 hours to 8 minutes with deltas").
FIELD_MODEL_BYTES = 90 * MB
FIELD_DEVICES = 1000
LINKS_MBIT = (10, 100)
# Delta / new model file for a fine-tune where every weight moved (bench/delta/results.json): the sample
# CNN (real fine-tune) and a 16 MB synthetic model with weights perturbed at 1e-3.
MODEL_DELTA_RATIOS = {"sample CNN, full fine-tune": 0.7971, "16 MB synthetic, 1e-3 perturbation": 0.4998}

COMMANDS = [
    "# 2026-11-24 00:13-00:47, the fleet before issue #5's worker changes (rows 'before #5'):",
    "nice -n 10 .venv/bin/python bench/updates/bench_rollout.py --sizes 10 100 --repeats 3 3 "
    "--modes delta full --default-phases-at 100",
    "nice -n 10 .venv/bin/python bench/updates/bench_rollout.py --sizes 1000 --repeats 2 --modes delta "
    "--default-phases-at",
    "nice -n 10 .venv/bin/python bench/updates/bench_rollout.py --sizes 1000 --repeats 1 --modes delta "
    "--default-phases-at --whatif   # run twice",
    "nice -n 10 .venv/bin/python bench/updates/fleet_costs.py --devices 1000 "
    "--out bench/updates/fleet_costs.json",
    "nice -n 10 .venv/bin/python bench/updates/fleet_costs.py --devices 300 --whatif "
    "--out bench/updates/fleet_costs_whatif.json",
    "# from 2026-11-24 02:57, the fleet with them (concurrent answers, reports on one thread in "
    "batches, bounded concurrent offers, deltas built ahead):",
    "nice -n 5 .venv/bin/python bench/updates/bench_rollout.py --sizes 1000 --repeats 2 --modes delta "
    "--default-phases-at   # run twice",
    "nice -n 5 .venv/bin/python bench/updates/bench_rollout.py --sizes 100 --repeats 3 --modes delta full "
    "--default-phases-at 100",
    ".venv/bin/python bench/updates/report.py   # writes this page",
]


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def _span(values: list[float], fmt: str = "{:.1f}") -> str:
    if not values:
        return "—"
    text = fmt.format(_median(values))
    if len(values) > 1:
        text += f" ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text


Key = tuple[str, int, str, str, float, bool]


def _fleet(run: dict[str, Any]) -> str:
    """Which fleet a run measured: its first day and code hash (none: before issue #5)."""
    code = run.get("fleet_code")
    return f"{run['when'][:10]} {code}" if code else f"{run['when'][:10]} before #5"


def _groups(runs: list[dict[str, Any]]) -> dict[Key, list[dict[str, Any]]]:
    groups: dict[Key, list[dict[str, Any]]] = {}
    first: dict[str, str] = {}  # fleet code -> the earliest run's label, so a series keeps one label
    for run in sorted(runs, key=lambda r: r["when"]):
        label = first.setdefault(run.get("fleet_code", ""), _fleet(run))
        key = (
            label,
            run["devices"],
            run["mode"],
            run["phases"],
            run["health_interval_s"],
            run.get("whatif", False),
        )
        groups.setdefault(key, []).append(run)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][3], kv[0][5], kv[0][0])))


def _latest(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs of the fleet the newest run measured."""
    newest = max(runs, key=lambda r: r["when"]).get("fleet_code")
    return [r for r in runs if r.get("fleet_code") == newest]


def _ok(runs: list[dict[str, Any]], pick: Callable[[dict[str, Any]], float]) -> list[float]:
    return [pick(r) for r in runs if r["ok"]]


def rollout_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| devices | fleet measured | payload | phases | runs all committed | "
        "rollout start → all committed, s | per committed device offer → committed, s (median / p95) | "
        "payload bytes / device | "
        "all bytes / device | fleet CPU s | fleet RSS peak MiB | Mosquitto RSS peak MiB | "
        "simulator CPU s | load (1 min) at start |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, devices, mode, phases, _, whatif), group in _groups(runs).items():
        ok = [r for r in group if r["ok"]]
        done = _span(_ok(group, lambda r: r["all_committed_s"]))
        if len(ok) < len(group):
            failed = [r for r in group if not r["ok"]]
            ended = ", ".join(
                f"{r['outcomes'].get('committed', 0)}"
                + (f" (last at {r['last_commit_sent_s']:.0f} s)" if "last_commit_sent_s" in r else "")
                for r in failed
            )
            done += f"; {len(failed)} run(s) ended with {ended} of {devices} committed, the rest failed"
        with_devices = [r for r in group if "device_offer_to_commit_s" in r]
        per_device = (
            f"{_median(r['device_offer_to_commit_s']['median'] for r in with_devices):.1f} / "
            f"{_median(r['device_offer_to_commit_s']['p95'] for r in with_devices):.1f}"
            if with_devices
            else "—"
        )
        payload = _median(r["bytes_per_device"]["payload_bytes"] for r in with_devices) if with_devices else 0
        everything = (
            _median(
                r["bytes_per_device"]["frame_bytes"]
                + r["bytes_per_device"]["metadata_bytes"]
                + r["bytes_per_device"]["offer_bytes"]
                for r in with_devices
            )
            if with_devices
            else 0
        )
        lines.append(
            f"| {devices:,} | {label} | {'delta' if mode == 'delta' else 'whole package'}"
            f"{WHATIF if whatif else ''} | "
            f"{'one, 100%' if phases == 'one' else 'canary 1, 10%, all'} | {len(ok)}/{len(group)} | {done} | "
            f"{per_device} | {payload:,.0f} | {everything:,.0f} | "
            f"{_span([r['cpu_s']['fleet'] for r in group])} | "
            f"{_span([r['rss_peak_mib']['fleet'] for r in group], '{:.0f}')} | "
            f"{_span([r['rss_peak_mib']['mosquitto'] for r in group])} | "
            f"{_span([r['cpu_s']['sim'] for r in group])} | "
            f"{_span([r['loadavg_start'][0] for r in group])} |"
        )
    return lines


def stage_table(runs: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| devices | fleet measured | payload | phases | rollout POST s | TUF refresh s | download s | "
        "verify + statuses s | chunk retries | broker round trip ms (idle) | fleet CPU per s, idle devices |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (label, devices, mode, phases, _, whatif), group in _groups(runs).items():
        staged = [r for r in group if "device_stage_median_s" in r]

        def stage(name: str, staged: list[dict[str, Any]] = staged) -> str:
            return _span([r["device_stage_median_s"][name] for r in staged])

        lines.append(
            f"| {devices:,} | {label} | {mode}{WHATIF if whatif else ''} | {phases} | "
            f"{_span([r['post_rollout_s'] for r in group])} | "
            f"{stage('tuf_refresh')} | {stage('download')} | {stage('verify_and_report')} | "
            f"{_span([r['chunk_retries'] for r in group], '{:.0f}')} | "
            f"{_span([r['broker_round_trip_ms'] for r in group if 'broker_round_trip_ms' in r], '{:.2f}')} | "
            f"{_span([r['idle_cpu_per_s']['fleet'] for r in group], '{:.3f}')} |"
        )
    return lines


def costs_table(costs: dict[str, Any], whatif: dict[str, Any] | None) -> list[str]:
    lines = [
        "| message (per device in one rollout) | count | CPU ms median | wall ms median | CPU s total | "
        "status CPU ms median with what-if change 3 (fleet_costs_whatif.json) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, c in costs["costs"].items():
        # Change 3 alters the handling of statuses only; the other rows would repeat this one.
        other = f"{whatif['costs'][kind]['cpu_ms_median']:.2f}" if whatif and kind == "status" else "—"
        lines.append(
            f"| {kind} | {c['count']:,} | {c['cpu_ms_median']:.2f} | {c['wall_ms_median']:.2f} | "
            f"{c['cpu_s_total']:.1f} | {other} |"
        )
    post = costs["rollout_post"]
    lines.append(
        f"| rollout POST (campaign, {costs['devices']:,} offers, delta build) | 1 | "
        f"{post['cpu_s'] * 1000:.0f} | {post['wall_s'] * 1000:.0f} | {post['cpu_s']:.1f} | — |"
    )
    return lines


def field_comparison(runs: list[dict[str, Any]]) -> list[str]:
    runs = _latest(runs)
    delta = [r for r in runs if r["mode"] == "delta" and r["ok"]]
    full = [r for r in runs if r["mode"] == "full" and r["ok"]]
    delta_bytes = _median(r["bytes_per_device"]["payload_bytes"] for r in delta)
    full_bytes = _median(r["bytes_per_device"]["payload_bytes"] for r in full)
    ratio = delta_bytes / full_bytes
    served = [
        r["devices"] * r["bytes_per_device"]["frame_bytes"] / r["all_committed_s"]
        for r in runs
        if r["ok"] and r["devices"] >= 100 and r["phases"] == "one" and not r.get("whatif")
    ]
    rate = _median(served)
    fleet_bytes = FIELD_DEVICES * FIELD_MODEL_BYTES
    fine_tune = MODEL_DELTA_RATIOS["sample CNN, full fine-tune"]
    lines = [
        f"Measured here: the sample package v1 → v2 is {full_bytes:,.0f} bytes whole and {delta_bytes:,.0f} "
        f"as a delta, {ratio:.1%}. Most of that saving is the package's unchanged `golden.npz`; the "
        f"model file itself, fully fine-tuned, codes to {fine_tune:.1%} "
        "of its size (bench/delta).",
        "",
        f"Assumptions for the field case: one {FIELD_MODEL_BYTES / MB:.0f} MB model fine-tuned (every weight "
        f"moves), {FIELD_DEVICES:,} devices, the bytes leaving the fleet over one shared uplink. The seed's "
        f"'2 hours' is what {FIELD_DEVICES:,} x {FIELD_MODEL_BYTES / MB:.0f} MB = {fleet_bytes / 1e9:.0f} GB "
        f"takes at 100 Mbit/s ({fleet_bytes * 8 / 100e6 / 3600:.1f} h); '8 minutes' would need a delta of "
        f"{8 / 120:.1%} of the model, which a fine-tune of every weight does not give (a last-layer-only "
        "fine-tune or an unchanged graph could).",
        "",
        "| delta / model | source | per device at 10 Mbit/s | per device at 100 Mbit/s | "
        f"{FIELD_DEVICES:,} devices over one 100 Mbit/s uplink | "
        "same, at this fleet's measured serving rate |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    cases = {"whole model (no delta)": 1.0, **MODEL_DELTA_RATIOS}
    for source, r in cases.items():
        size = FIELD_MODEL_BYTES * r
        per_device = [size * 8 / (mbit * 1e6) for mbit in LINKS_MBIT]
        uplink_min = FIELD_DEVICES * size * 8 / 100e6 / 60
        ours_min = FIELD_DEVICES * size / rate / 60
        lines.append(
            f"| {r:.0%} | {source} | {per_device[0]:.0f} s | {per_device[1]:.1f} s | {uplink_min:.0f} min | "
            f"{ours_min:.0f} min |"
        )
    lines += [
        "",
        "'This fleet's measured serving rate' is N devices x the chunk bytes each received / the seconds "
        "from rollout start to all committed, in the one-phase runs of 100 and 1,000 devices of the newest "
        f"fleet measured: {rate / MB:.2f} MB/s ({rate * 8 / 1e6:.0f} Mbit/s), median, 64 KiB chunks, on "
        "this shared 2-core machine, with the simulated devices on the same two cores. It includes the TUF "
        "refreshes and statuses, as a field update would. "
        + (
            "At that rate a 100 Mbit/s uplink, not the fleet, sets the time of a fleet-wide update."
            if rate * 8 > 100e6
            else "At that rate the fleet, not a 100 Mbit/s uplink, sets the time of a fleet-wide update."
        ),
    ]
    return lines


def goals(runs: list[dict[str, Any]]) -> list[str]:
    latest = _latest(runs)
    big = [r for r in latest if r["devices"] >= 1000 and not r.get("whatif")]
    before = [r for r in runs if r["devices"] >= 1000 and not r.get("fleet_code") and not r.get("whatif")]
    whatif = [r for r in runs if r["devices"] >= 1000 and r.get("whatif")]
    broker_peak = max(r["rss_peak_mib"]["mosquitto"] for r in runs)
    restarts = [r for r in runs if len(r.get("broker_pids", [])) > 1]
    times = _ok(big, lambda r: r["all_committed_s"])
    within = sum(t <= 60 for t in times)
    met = "met" if big and len(times) == len(big) and _median(times) <= 60 else "not met"
    lines = [
        f"- 1,000 devices all committed within 60 s of `rollout start` (aim 20 s): **{met}** in the median "
        f"with the newest fleet ({_fleet(big[0]) if big else '—'}): {len(times)} of {len(big)} runs got "
        f"every device committed, in {_span(times)} s, {within} of them within 60 s and "
        f"{sum(t <= 20 for t in times)} within 20 s. The spread is the machine's: the slow runs used the "
        "same CPU seconds as the fast ones while other jobs took the cores (load at the end of each run in "
        "results.json).",
    ]
    if before:
        lines.append(
            f"- Before issue #5's worker changes: {sum(r['ok'] for r in before)} of {len(before)} runs got "
            "every device committed; the devices' TUF refreshes and chunk requests timed out while they "
            "waited for the fleet.",
        )
    if whatif:
        lines.append(
            f"- The same with whatif_fleet.py's three worker changes (now in the fleet): "
            f"{sum(r['ok'] for r in whatif)} of {len(whatif)} runs all committed, in "
            f"{_span(_ok(whatif, lambda r: r['all_committed_s']))} s.",
        )
    lines += [
        f"- Mosquitto under 256 MB throughout: **{'met' if broker_peak * MIB < 256 * MB else 'not met'}**, "
        f"peak {broker_peak:.1f} MiB over every run (each device has one 64 KiB chunk request in flight).",
        f"- Mosquitto died and was restarted by the fleet during enrollment in {len(restarts)} of "
        f"{len(runs)} runs (before the password file was replaced by a rename instead of rewritten).",
    ]
    return lines


def where_now(profile: dict[str, Any], latest: list[dict[str, Any]]) -> list[str]:
    """Where a 1,000-device rollout's time goes with the newest fleet, and what would cut it."""
    big = [r for r in latest if r["devices"] >= 1000 and r["ok"]]
    run = profile["run"]
    cpu = [sum(r["cpu_s"].values()) for r in big]
    cores = [sum(r["cpu_s"].values()) / r["all_committed_s"] for r in big]
    lines = [
        "## Where a 1,000-device rollout's time goes now",
        "",
        f"The rollout is bound by CPU: each run of the newest fleet used {_span(cpu)} CPU seconds (fleet, "
        f"Mosquitto and the simulators together), and got {_span(cores, '{:.2f}')} of the machine's 2 cores "
        "while other jobs ran; the fast runs got nearly both. On 2 idle cores that work takes "
        f"{_median(cpu) / 2:.0f} s at best, so 20 s needs less CPU per device, not more concurrency. About "
        "half of it is the simulators', which 1,000 real devices spend on their own CPUs. The fleet's "
        f"share, from a py-spy profile of one run ({run['when']}, {run['all_committed_s']:.1f} s, fleet "
        f"CPU {run['cpu_s']['fleet']:.1f} s; `profile_parts.py`, fleet_profile.json):",
        "",
        "| part of the fleet server | share of its CPU |",
        "|---|---:|",
    ]
    for name, share in profile["parts"].items():
        if name != "samples":
            lines.append(f"| {name} | {share:.1%} |")
    lines += [
        "",
        "MQTT in Python (paho's packet reading and writing, aiomqtt) is the largest part: some 80 packets "
        "per device (4 metadata and 10 chunk requests and their answers, 8 statuses, health, the offer, "
        "and a PUBACK for each QoS 1 message), about 0.1 ms of pure-Python packet handling each. "
        "What would cut it: bigger chunks (`fleet serve --chunk-size`: the demo's 64 KiB makes 10 "
        "round trips of a 600 KB delta; the default 256 KiB makes 3), more fleet worker processes "
        "behind the shared subscriptions (once cores are free), or an MQTT client with its packet "
        "handling in C.",
    ]
    return lines


def main() -> None:
    runs = json.loads((HERE / "results.json").read_text())["runs"]
    costs_path = HERE / "fleet_costs.json"
    costs = json.loads(costs_path.read_text()) if costs_path.exists() else None
    whatif_path = HERE / "fleet_costs_whatif.json"
    whatif_costs = json.loads(whatif_path.read_text()) if whatif_path.exists() else None
    when = sorted(r["when"] for r in runs)
    lines = [
        "# bench/updates: rollouts to 10, 100 and 1,000 simulated devices",
        "",
        "Commands, in this order (raw results: `results.json`, `fleet_costs.json`, `fleet_costs_whatif.json` "
        "here):",
        "",
        "```",
        *COMMANDS,
        "```",
        "",
        f"Measured {when[0]} to {when[-1]} on the shared 2-core development machine while other jobs ran "
        "(load averages in the tables), every process at nice 10 before issue #5's changes and at nice 5 "
        "after. Medians over the runs, (min-max) beside them. 'fleet measured' is the day and a hash of "
        "the fleet's code (bench_rollout.py `MEASURED`); the sample packages grew between the two series "
        "(the zoo's v1 and v2 gained files), so compare the bytes columns before the times.",
        "",
        "What runs: a real fleet server (`fleet serve`, SQLite, its managed Mosquitto 2.0.11, 64 KiB "
        "chunks, as `edgefleet demo` starts it), surface-defect v1 and v2 registered, N devices enrolled "
        "with `POST /api/devices`, and N simulated devices (simdevice.py: one real `DeviceLink` and one "
        "real python-tuf `TufClient` each, 500 per process) that send `state` and health every 5 s (the "
        "agent's default). The clock starts just before `POST /api/rollouts` and stops at the campaign's "
        "`finished` time in the fleet (when the fleet recorded the last `committed`). The simulator skips "
        "the journal, the slot write (unpack or delta apply), model load, golden vectors and inference, and "
        "the probation window; it refreshes TUF, holds the offer to the signed targets, downloads every "
        "chunk to disk and verifies the file against the signed target, and reports every state.",
        "",
        "## Goals",
        "",
        *goals(runs),
        "",
        "## Rollouts",
        "",
        *rollout_table(runs),
        "",
        "'all bytes / device' adds the chunk frames' headers, the TUF metadata files and the offer.",
        "",
        "## Where a device's time goes (medians of the per-run medians)",
        "",
        *stage_table(runs),
        "",
        "With the newest fleet the delta is built ahead of the rollout, as soon as devices report running "
        "v1 (about 1.5 s of CPU): the 'idle devices' figure of a delta run can include it; the whole-package "
        "runs, with no delta, show the idle cost alone.",
        "",
    ]
    profile_path = HERE / "fleet_profile.json"
    if profile_path.exists():
        lines += [*where_now(json.loads(profile_path.read_text()), _latest(runs)), ""]
    if costs:
        lines += [
            f"## The fleet's cost per message, without MQTT ({costs['devices']:,} devices, in-process, "
            f"{costs['when'][:10]}, before #5: one transaction per message)",
            "",
            *costs_table(costs, whatif_costs),
            "",
            "Fleet CPU per device for one rollout, without MQTT: "
            f"{costs['fleet_cpu_s_per_device_without_mqtt'] * 1000:.0f} ms.",
            "",
        ]
    lines += ["## Against the seed's '2 hours to 8 minutes'", "", *field_comparison(runs), ""]
    (HERE / "RESULTS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
