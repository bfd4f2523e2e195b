"""Compressed HTTP answers (compat.compression): the UI's largest answers plain, gzip and zstd, over loopback and
over a link throttled with `tc`, side by side in one run.

    python -m benchmarks.uimix --full --data-dir DIR --skip-stock --repeats 1   # loads DIR once (or reuse one)
    python -m benchmarks.compression --data-dir DIR [--rates 100 1000] [--repeats 5] [--history-points 2000000]

A copy of DIR (chDB opens a directory in one process only) is served by `trackhouse serve --http-compression on`,
so the loopback client gets compressed answers when it asks for them; a long `loss` series of --history-points is
logged into it through the gRPC client. Each call is fetched with Accept-Encoding identity, gzip and zstd in turn
(alternating, so load on the shared machine falls on all alike), timed until the whole answer has arrived and been
decoded, as urllib3 or a browser would; every decoded answer must equal the plain one byte for byte:
- the wide experiment's runs/search page of 50 runs (the UI's runs table; 22 MB at 1,000 runs x 5,000 keys);
- a 25,000-point get-history page (the UI's metric page);
- the unpaged get-history of the whole series (half the repeats: it is 166 MB plain at 2M points).
Each of the two pages is also compressed whole in this process at gzip 1, 6, 9 and zstd 1, 3, 6 (time and ratio).
Then the same calls over a link of each of --rates Mbit/s, shaped on `lo` for the server's port only: an HTB class
with a u32 filter on the source port (other loopback traffic takes HTB's unshaped direct queue), removed afterwards.
This kernel has no netem, so the link has bandwidth but no added latency. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import requests
from backports import zstd

from benchmarks import uimix
from benchmarks.ingest import ServerUnderTest, save_results
from benchmarks.provenance import provenance
from trackhouse import Client

CODINGS = ("identity", "gzip", "zstd")
LONG_RUN = "c" * 32
PAGE = 25_000


def _gzip(body: bytes, level: int) -> bytes:
    """As the server compresses (zlib, gzip framing); gzip.compress with an mtime is 2-3x slower (GzipFile)."""
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(body) + compressor.flush()


LEVELS: dict[str, Callable[[bytes], bytes]] = {
    **{f"gzip-{level}": partial(_gzip, level=level) for level in (1, 6, 9)},
    **{f"zstd-{level}": partial(zstd.compress, level=level) for level in (1, 3, 6)},
}


def fetch(session: requests.Session, base: str, call: uimix.Call, coding: str) -> tuple[float, int, bytes]:
    """Seconds until the answer has arrived and been decoded, the bytes on the wire, and the decoded answer."""
    headers = {"Accept-Encoding": coding}
    started = time.perf_counter()
    if call.method == "GET":
        answer = session.get(base + call.path, params=call.params, headers=headers, stream=True)
    else:
        answer = session.post(base + call.path, json=call.body, headers=headers, stream=True)
    with answer:
        raw = answer.raw.read(decode_content=False)
        sent = answer.headers.get("content-encoding")
        body = gzip.decompress(raw) if sent == "gzip" else zstd.decompress(raw) if sent == "zstd" else raw
    elapsed = time.perf_counter() - started
    if answer.status_code != 200 or sent != (None if coding == "identity" else coding):
        raise RuntimeError(f"{call.name} ({coding}): {answer.status_code}, content-encoding {sent}")
    return elapsed, len(raw), body


def levels(session: requests.Session, base: str, calls: list[uimix.Call]) -> dict[str, Any]:
    """Per call, each level's time to compress the plain answer whole in this process (median of 3) and ratio:
    what the server's defaults (level 1 of each) were chosen by."""
    results: dict[str, Any] = {}
    for call in calls:
        body = fetch(session, base, call, "identity")[2]
        row: dict[str, Any] = {"bytes": len(body)}
        for name, compress in LEVELS.items():
            samples = []
            for _ in range(3):
                started = time.perf_counter()
                size = len(compress(body))
                samples.append((time.perf_counter() - started) * 1000)
            row[name] = {"median_ms": statistics.median(samples), "ratio": len(body) / size}
        results[call.name] = row
        print(f"  {call.name:32} " + "  ".join(f"{k} {v['median_ms']:6.1f} ms {v['ratio']:4.1f}x"
                                               for k, v in row.items() if k != "bytes"), flush=True)  # fmt: skip
    return results


def measure(base: str, calls: list[uimix.Call], repeats: int) -> dict[str, Any]:
    session = requests.Session()
    results: dict[str, Any] = {}
    for call in calls:
        samples: dict[str, list[float]] = {c: [] for c in CODINGS}
        wire: dict[str, int] = {}
        plain = b""
        for i in range(repeats + 1):  # the first round warms the caches and checks the answers
            for coding in CODINGS:
                took, wire[coding], body = fetch(session, base, call, coding)
                if coding == "identity":
                    plain = body
                assert body == plain, f"{call.name}: the {coding} answer decodes to other bytes"
                if i:
                    samples[coding].append(took * 1000)
        row = {
            c: {"median_ms": statistics.median(s), "min_ms": min(s), "max_ms": max(s), "wire_bytes": wire[c]}
            for c, s in samples.items()
        }
        for c in CODINGS[1:]:
            row[c]["ratio"] = len(plain) / wire[c]
            row[c]["speedup_vs_identity"] = row["identity"]["median_ms"] / row[c]["median_ms"]
        results[call.name] = {"bytes": len(plain), **row}
        cells = "  ".join(f"{c} {row[c]['median_ms']:8.1f} ms {wire[c]:>11,} B" for c in CODINGS)
        print(f"  {call.name:32} {cells}", flush=True)
    return results


@contextmanager
def throttled(port: int, rate_mbit: int) -> Iterator[None]:
    """Answers from `port` on lo limited to `rate_mbit`; nothing else shaped. Always removed on the way out."""
    shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], check=True, capture_output=True, text=True).stdout
    if not shown.startswith("qdisc noqueue"):
        raise RuntimeError(f"lo already has a qdisc (someone else is shaping it): {shown.strip()}")
    rate = f"{rate_mbit}mbit"
    commands = [
        # default 0: unclassified packets take HTB's direct queue, which is not shaped.
        "tc qdisc add dev lo root handle 1: htb default 0",
        # lo sends up to 64 KiB per packet (GSO): a burst of a few packets keeps the rate accurate.
        f"tc class add dev lo parent 1: classid 1:10 htb rate {rate} ceil {rate} burst 256k cburst 256k quantum 65536",
        f"tc filter add dev lo parent 1: protocol ip prio 1 u32 match ip sport {port} 0xffff flowid 1:10",
    ]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # so that `finally` runs on kill too
    try:
        for command in commands:
            subprocess.run(command.split(), check=True)
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=False)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def log_history(target: str, points: int) -> None:
    with Client(target) as client:
        run = client.start_run(experiment="history", run_id=LONG_RUN)
        run.log_series("loss", np.arange(points), np.cumsum(np.random.default_rng(4).standard_normal(points)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="a store benchmarks.uimix loaded (not changed)")
    parser.add_argument("--wide-runs", type=int, default=1_000, help="runs of the store's wide experiment")
    parser.add_argument("--wide-keys", type=int, default=5_000, help="keys per wide run")
    parser.add_argument("--history-points", type=int, default=2_000_000, help="points of the long series")
    parser.add_argument("--rates", type=int, nargs="*", default=[100, 1000], help="throttled links' Mbit/s")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    started = provenance()
    names = argparse.Namespace(runs=1, wide_runs=args.wide_runs, wide_keys=args.wide_keys)
    wide = uimix.trackhouse_scenarios(names)["wide"]
    search = next(c for c in uimix.calls(wide) if c.name == "runs/search (table, 50)")
    history = {"run_id": LONG_RUN, "metric_key": "loss"}
    page = uimix.Call("get-history (25,000 page)", "metric", "GET", f"{uimix.UI}/metrics/get-history",
                      {**history, "max_results": PAGE})  # fmt: skip
    whole = uimix.Call("get-history (unpaged)", "metric", "GET", f"{uimix.UI}/metrics/get-history", history)
    results: dict[str, Any] = {"args": {**vars(args), "data_dir": str(args.data_dir)}}
    with tempfile.TemporaryDirectory(prefix="compression-") as tmp:
        copy = Path(tmp) / "data"
        shutil.copytree(args.data_dir, copy, symlinks=True)  # chDB links its metadata
        server = ServerUnderTest(copy, "--http-compression", "on")
        try:
            log_history(server.target, args.history_points)
            print("compression levels, whole answers in this process (median of 3)", flush=True)
            results["levels"] = levels(requests.Session(), server.http, [search, page])
            port = int(server.http.rsplit(":", 1)[1])
            for rate in [0, *args.rates]:
                link = f"{rate} Mbit/s" if rate else "loopback"
                print(f"{link} ({args.repeats} repeats, medians; lo shaped for port {port} only)", flush=True)
                with throttled(port, rate) if rate else contextlib.nullcontext():
                    found = measure(server.http, [search, page], args.repeats)
                    found.update(measure(server.http, [whole], max(1, args.repeats // 2)))
                for coding, row in found[whole.name].items():
                    if coding in CODINGS:
                        row["points_per_s"] = args.history_points / row["median_ms"] * 1000
                results[link] = found
        finally:
            server.stop()
    out = save_results("compression", results, started)
    print(f"results in {out}")


if __name__ == "__main__":
    main()
