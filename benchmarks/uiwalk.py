"""The MLflow UI's single-metric page for a long series, walked in headless Chromium: how long the user waits, and
how much of that wait is the server's.

    python -m benchmarks.uiwalk [--points 2000000] [--repeats 3]

Loads one run whose `loss` has --points steps through the real sink, starts
`trackhouse serve`, and opens the page the runs table's metric links open, each time in a fresh browser context
(nothing cached). For each walk it records, from the navigation:
- `chart_ms`: until the chart's trace spans the first to the last step (what the user waits for);
- `history_ms`: until the last of the page's get-history pages has arrived (it fetches the whole series);
- every API call the page made: its path, bytes, and its time from request start to the last byte, from
  Chromium's own resource timing;
- `server_busy_ms`: the union of those calls' intervals, i.e. the part of the wait in which some answer was still
  coming; `history_server_ms`, the get-history pages' own. The rest is the browser's: loading the UI's bundle,
  parsing each page's JSON before it asks for the next, React, and plotting.
Needs Debian's chromium (`make test` installs it) and Playwright.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, Request, sync_playwright

from benchmarks.history import load_all
from benchmarks.ingest import ServerUnderTest, save_results
from benchmarks.provenance import provenance

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
#: Without them Chromium keeps dialling Google's hosts, which this network refuses (tests/test_compat_ui.py uses them).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
RUN_ID = "long"
HISTORY_PAGE = 25_000  # the page size MLflow's UI asks get-history for
EXPERIMENT_ID = "300"  # benchmarks.history.load_all's
#: The last step any chart trace reaches (plotly keeps x as the steps).
LAST_PLOTTED = "() => Math.max(-1, ...[...document.querySelectorAll('.js-plotly-plot')].flatMap(gd => (gd.data || [])"
LAST_PLOTTED += ".map(t => { const x = Array.from(t.x || []); return x.length ? x[x.length - 1] : -1; })))"


def metric_page_url(base: str) -> str:
    """The URL the runs table's metric links open (Routes.getMetricPageRoute in the UI's bundle)."""
    return (
        f'{base}/#/metric?runs=["{RUN_ID}"]&metric="loss"&experiments=["{EXPERIMENT_ID}"]&plot_metric_keys=["loss"]'
        "&plot_layout={}&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=false"
        "&deselected_curves=[]&last_linear_y_axis_range=[]"
    )


def walk(page: Page, base: str, points: int) -> dict[str, Any]:
    """One walk. MLflow 3's page plots the sampled series (get-history-bulk-interval, 320 points) and meanwhile pages
    through the whole history with get-history, 25,000 points a page, one page after another."""
    calls: list[tuple[float, Request]] = []

    def finished(request: Request) -> None:
        if "-api/" in request.url or "/graphql" in request.url:
            calls.append((time.perf_counter(), request))

    page.on("requestfinished", finished)
    began = time.perf_counter()
    page.goto(metric_page_url(base), wait_until="commit")
    page.wait_for_function(f"({LAST_PLOTTED})() === {points - 1}", timeout=600_000, polling=50)
    chart_ms = (time.perf_counter() - began) * 1000
    pages = -(-points // HISTORY_PAGE)
    deadline = time.monotonic() + 600
    while sum("/get-history?" in r.url for _, r in calls) < pages:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the page fetched fewer than {pages} history pages in 600 s")
        page.wait_for_timeout(50)  # lets Playwright deliver the events
    history_ms = (max(t for t, r in calls if "/get-history?" in r.url) - began) * 1000
    # Resource timing is relative to each request's start (startTime, epoch ms).
    spans = [(r.timing["startTime"], r.timing["startTime"] + r.timing["responseEnd"], r) for _, r in calls]
    origin = min(s for s, _, _ in spans)
    return {
        "chart_ms": chart_ms,
        "history_ms": history_ms,
        "history_pages": pages,
        "server_busy_ms": _union_ms([(s, e) for s, e, _ in spans]),
        "history_server_ms": sum(e - s for s, e, r in spans if "/get-history?" in r.url),
        "calls": [
            {
                "path": r.url.split("?")[0].removeprefix(base),
                "start_ms": s - origin,
                "ms": e - s,
                "bytes": r.sizes()["responseBodySize"],
            }
            for s, e, r in sorted(spans, key=lambda x: x[0])
        ],
    }


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=2_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    started = provenance()
    results: dict[str, Any] = {"args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="trackhouse-uiwalk-") as tmp:
        data = Path(tmp) / "data"
        results["load_seconds"] = load_all(data, {RUN_ID: args.points})
        server = ServerUnderTest(data)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
                try:
                    walks = []
                    for _ in range(args.repeats):
                        context = browser.new_context(viewport={"width": 1400, "height": 900})
                        try:
                            walks.append(walk(context.new_page(), server.http, args.points))
                        finally:
                            context.close()
                finally:
                    browser.close()
        finally:
            server.stop()
    results["walks"] = walks
    for name in ("chart_ms", "history_ms", "server_busy_ms", "history_server_ms"):
        results[f"median_{name}"] = statistics.median(w[name] for w in walks)
    out = save_results("uiwalk", results, started)
    chart, history = results["median_chart_ms"], results["median_history_ms"]
    busy, history_server = results["median_server_busy_ms"], results["median_history_server_ms"]
    print(f"single-metric page, {args.points:,} points, median of {len(walks)} walks:")
    print(f"  chart drawn (sampled, first to last step) after {chart:,.0f} ms")
    print(f"  whole history in ({walks[0]['history_pages']} get-history pages) after {history:,.0f} ms")
    print(f"  an API answer was arriving for {busy:,.0f} ms of it ({busy / history:.0%});")
    print(f"  the history pages took {history_server:,.0f} ms from request to last byte, together")
    print(f"results in {out}")


if __name__ == "__main__":
    main()
