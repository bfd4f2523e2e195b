"""`trackhouse ranks RUN_ID`: the straggler table of a distributed run, and optionally a PNG of the band across
ranks with the stragglers' own curves over it. It calls the server's HTTP API (/api/2.0/trackhouse/), so it works
against any server it can reach, with MLflow's client variables for the address and credentials."""

from __future__ import annotations

import argparse
import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
#: Stragglers whose own curves are drawn over the band.
PLOTTED_STRAGGLERS = 8
PNG_SIZE_INCHES = (10.0, 5.0)
PNG_DPI = 100
_TIMEOUT_S = 60


class ApiError(Exception):
    pass


def add_ranks_command(commands: Any) -> None:
    parser = commands.add_parser(
        "ranks", help="a distributed run's stragglers (table), and its band across ranks (--png)"
    )
    parser.add_argument("run_id")
    parser.add_argument("--metric", help="the metric to measure ranks by and draw (default: all training metrics)")
    parser.add_argument("--png", type=Path, help="write the band across ranks of --metric, with stragglers, here")
    parser.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        help=f"the server's HTTP address [env MLFLOW_TRACKING_URI; default {DEFAULT_TRACKING_URI}]",
    )


def run_ranks_command(args: argparse.Namespace) -> int:
    if args.png is not None and not args.metric:
        print("trackhouse ranks: --png needs --metric (the metric to draw)", file=sys.stderr)
        return 2
    api = Api(args.tracking_uri)
    try:
        query = {"run_id": args.run_id, **({"metric_key": args.metric} if args.metric else {})}
        found = api.get("runs/stragglers", query)
        print(straggler_table(found))
        if args.png is not None:
            ranks = [s["rank"] for s in found["stragglers"][:PLOTTED_STRAGGLERS]]
            band = api.get("metrics/aggregate", {**query, "rank": ranks})
            write_png(band, args.png)
            print(f"wrote {args.png}")
    except ApiError as exc:
        print(f"trackhouse ranks: {exc}", file=sys.stderr)
        return 1
    return 0


class Api:
    def __init__(self, tracking_uri: str) -> None:
        if not tracking_uri.startswith(("http://", "https://")):
            raise SystemExit(f"trackhouse ranks: the tracking URI must be http(s)://, not {tracking_uri!r}")
        self._base = tracking_uri.rstrip("/") + "/api/2.0/trackhouse/"
        self._headers = _auth_headers()
        cert = os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH")
        self._ssl = ssl.create_default_context(cafile=cert) if cert else None

    def get(self, path: str, query: dict[str, Any]) -> dict[str, Any]:
        url = self._base + path + "?" + urllib.parse.urlencode(query, doseq=True)
        request = urllib.request.Request(url, headers=self._headers)
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S, context=self._ssl) as response:
                answer: dict[str, Any] = json.loads(response.read())
                return answer
        except urllib.error.HTTPError as exc:
            raise ApiError(f"{exc.code}: {_message(exc.read())}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"cannot reach {self._base}: {exc}") from None


def _auth_headers() -> dict[str, str]:
    """MLflow's client variables: a Bearer token, or Basic credentials."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:500]
    except (ValueError, AttributeError):
        return body[:200].decode(errors="replace")


def straggler_table(found: dict[str, Any]) -> str:
    rate = found.get("median_step_rate")
    lines = [
        f"run {found['run_id']}: {found['ranks']} ranks; median step {_num(found.get('median_step'))},"
        f" median step rate {_num(rate)} steps/s; {len(found['stragglers'])} straggler(s)"
    ]
    if not found["stragglers"]:
        return lines[0]
    header = ("rank", "node", "last step", "lag", "steps/s", "x median", "silent s", "reasons")
    rows = [
        (
            str(s["rank"]),
            s["node"] or "-",
            str(s["last_step"]),
            _num(s["lag_steps"]),
            _num(s["step_rate"]),
            _num(s["rate_ratio"]),
            f"{s['silent_ms'] / 1000:.1f}",
            "; ".join(s["reasons"]),
        )
        for s in found["stragglers"]
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]
    for row in (header, *rows):
        pairs = enumerate(zip(row[:-1], widths, strict=True))
        cells = [cell.ljust(width) if i == 1 else cell.rjust(width) for i, (cell, width) in pairs]
        lines.append("  ".join([*cells, row[-1]]))
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def write_png(band: dict[str, Any], path: Path) -> None:
    """The band across ranks (min to max, p50 and p95) with each straggler's curve over it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: a file only
        import matplotlib.pyplot as plt
    except ImportError:
        raise ApiError("--png needs matplotlib: pip install 'trackhouse[server]' (or pip install matplotlib)") from None
    buckets = [b for b in band["buckets"] if b["count"]]
    steps = [b["end_step"] for b in buckets]
    figure, axes = plt.subplots(figsize=PNG_SIZE_INCHES, dpi=PNG_DPI)
    try:
        axes.fill_between(
            steps, [b["min"] for b in buckets], [b["max"] for b in buckets], alpha=0.2, label="min..max across ranks"
        )
        axes.plot(steps, [b["p50"] for b in buckets], color="black", linewidth=1, label="median")
        axes.plot(steps, [b["p95"] for b in buckets], color="gray", linewidth=0.8, linestyle="--", label="p95")
        for curve in band.get("curves", []):
            node = f" ({curve['node']})" if curve["node"] else ""
            axes.plot(curve["steps"], curve["values"], linewidth=1, label=f"rank {curve['rank']}{node}")
        axes.set_xlabel("step")
        axes.set_ylabel(band["metric_key"])
        axes.set_title(f"{band['metric_key']} across ranks, run {band['run_id']}")
        axes.legend(loc="best", fontsize="small")
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
