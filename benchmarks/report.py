"""report.md and PNG plots from the harness's results."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

BASELINE = "mlflow-sqlite"
TITLES = {"hpo": "HPO sweep", "llm": "LLM run"}


def write(results: dict[str, Any], out: Path) -> None:
    by_pair: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for m in results["measurements"]:
        by_pair[(m["workload"], m["system"])].append(m)
    (out / "report.md").write_text(_markdown(results, by_pair))
    _throughput_plot(by_pair, out / "throughput.png")
    _latency_cdf(by_pair, out / "ack_latency_cdf.png")


def _markdown(results: dict[str, Any], by_pair: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    m = results["machine"]
    lines = [
        "# trackhouse benchmark report",
        "",
        f"Machine: {m['platform']}, {m['cpus']} CPUs, Python {m['python']}."
        f" Versions: {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.",
        f"Size `{results['args']['size']}`, {results['args']['repeats']} repeat(s); figures are median (min-max).",
        *_provenance(results.get("provenance")),
        "",
        "Every client and server process shares the same machine. `server CPU` counts every server process",
        "(for the Kafka path: gateway, broker and worker); `client CPU` counts the client processes.",
        "",
        f"Every point sent was stored exactly once: **{'yes' if results['all_stored_exactly_once'] else 'NO'}**",
        "(read back after each measurement: SQL on trackhouse's tables, the SQLite store for MLflow).",
        "",
    ]
    for workload in TITLES:
        pairs = {s: ms for (w, s), ms in by_pair.items() if w == workload}
        if not pairs:
            continue
        lines += [f"## {TITLES[workload]}", "", _shape(workload, pairs), ""]
        lines += [
            "| system | points/s | x stock MLflow (same repeat) | ack latency p50 / p99 ms | logging call p50 / p99 µs"
            " | runs created/s | server / client CPU s | stored exactly once |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for system, ms in pairs.items():
            lines.append(
                f"| {system} | {_spread([x['points_per_s'] for x in ms])} | {_ratio(ms, pairs.get(BASELINE))} |"
                f" {_med(ms, 'ack_ms', 'p50', '.1f')} / {_med(ms, 'ack_ms', 'p99', '.1f')} |"
                f" {_med(ms, 'call_us', 'p50', '.1f')} / {_med(ms, 'call_us', 'p99', '.1f')} |"
                f" {_created(ms)} |"
                f" {_cpu(ms)} |"
                f" {'yes' if all(x['stored_exactly_once'] for x in ms) else 'NO'} |"
            )
        lines.append("")
        if workload == "llm":
            lines += _rank_api(pairs)
    lines += [
        "Stock MLflow runs the same shapes scaled down: its rate is measured at that smaller size (see the shapes).",
        "Its logging call is a synchronous `log_batch`, so its call cost and acknowledgement latency are one thing.",
        "",
        "The read side (chart history, `search_runs`) and MLflow's REST `log-batch` against stock MLflow are measured",
        "by `python -m benchmarks.compat` (`make bench-compat`), not by this harness yet.",
        "",
        "Plots: `throughput.png` (points/s, log scale), `ack_latency_cdf.png` (acknowledgement latency).",
    ]
    return "\n".join(lines) + "\n"


def _rank_api(pairs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The rank API on the LLM run (one slow rank and one NaN rank injected): latency, and whether it found both."""
    rows = []
    for system, ms in pairs.items():
        found = [m["rank_api"] for m in ms if m.get("rank_api")]
        if not found:
            continue
        latency = {name: statistics.median(f["latency_ms"][name] for f in found) for name in found[0]["latency_ms"]}
        both = all(f["found_slow_rank"] and f["found_nan_rank"] for f in found)
        rows.append(
            f"| {system} | {latency['aggregate']:.1f} | {latency['stragglers']:.1f} | {latency['ranks']:.1f} |"
            f" {'yes' if both else 'NO'} |"
        )
    if not rows:
        return []
    return [
        "Rank API on this run (`/api/2.0/trackhouse/`, median of 10 calls each, ms), with rank 1 stepping three",
        "times slower and rank 2's loss turning to NaN at 70% of the steps:",
        "",
        "| system | metrics/aggregate | runs/stragglers | runs/ranks | found the slow rank and the NaN rank |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def _provenance(record: dict[str, Any] | None) -> list[str]:
    if not record:
        return []
    start, end = record["start"], record["end"]
    dirty = " with uncommitted changes" if start["uncommitted_changes"] else ""
    return [
        f"Measured {start['measured_at']} to {end['measured_at']} at commit `{start['commit'][:9]}`{dirty}."
        f" Load average (1 min) {start['load_average_1_5_15'][0]:.1f} at the start, "
        f"{end['load_average_1_5_15'][0]:.1f} at the end, on {start['cpus']} CPUs shared with any other work.",
    ]


def _shape(workload: str, pairs: dict[str, list[dict[str, Any]]]) -> str:
    shapes = []
    for system, ms in pairs.items():
        s = ms[0]["sizes"]
        if workload == "hpo":
            shape = f"{s['hpo_trials']} trials from {s['hpo_processes']} processes"
            shape += f" x {s['hpo_keys']} metrics x {s['hpo_steps']} steps"
        else:
            shape = f"{s['llm_ranks']} ranks x {s['llm_keys']} keys x {s['llm_steps']} steps into one run"
        shapes.append(f"{system}: {shape} = {ms[0]['points']:,} points")
        del system
    return "Shapes: " + "; ".join(shapes) + "."


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def _ratio(ms: list[dict[str, Any]], baseline: list[dict[str, Any]] | None) -> str:
    if not baseline or ms is baseline:
        return "1" if ms is baseline else "-"
    base = {b["repeat"]: b["points_per_s"] for b in baseline}
    ratios = [m["points_per_s"] / base[m["repeat"]] for m in ms if m["repeat"] in base]
    return f"{statistics.median(ratios):,.0f}x ({min(ratios):,.0f}-{max(ratios):,.0f})" if ratios else "-"


def _med(ms: list[dict[str, Any]], field: str, key: str, fmt: str) -> str:
    return format(statistics.median(m[field][key] for m in ms), fmt)


def _cpu(ms: list[dict[str, Any]]) -> str:
    server = statistics.median(x["server_cpu_s"] for x in ms)
    return f"{server:.1f} / {statistics.median(x['client_cpu_s'] for x in ms):.1f}"


def _created(ms: list[dict[str, Any]]) -> str:
    rates = [m["runs_created_per_s"] for m in ms if m["runs_created_per_s"]]
    return f"{statistics.median(rates):,.0f}" if rates else "-"


def _throughput_plot(by_pair: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    workloads = [w for w in TITLES if any(k[0] == w for k in by_pair)]
    systems = sorted({s for _, s in by_pair})
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / max(1, len(systems))
    for i, system in enumerate(systems):
        medians = [
            statistics.median(m["points_per_s"] for m in by_pair.get((w, system), [{"points_per_s": 0}]))
            for w in workloads
        ]
        xs = [j + i * width for j in range(len(workloads))]
        ax.bar(xs, medians, width, label=system)
    ax.set_xticks([j + width * (len(systems) - 1) / 2 for j in range(len(workloads))], [TITLES[w] for w in workloads])
    ax.set_yscale("log")
    ax.set_ylabel("points/s (median, log scale)")
    ax.set_title("Write throughput, acknowledged and stored")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _latency_cdf(by_pair: dict[tuple[str, str], list[dict[str, Any]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (workload, system), ms in sorted(by_pair.items()):
        samples = sorted(x for m in ms for x in m["ack_ms_samples"])
        if samples:
            ax.plot(
                samples, [(i + 1) / len(samples) for i in range(len(samples))], label=f"{TITLES[workload]}, {system}"
            )
    ax.set_xscale("log")
    ax.set_xlabel("acknowledgement latency, ms (log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Acknowledgement latency CDF")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
