"""Memory and latency under hostile HTTP input, against `trackhouse serve` (issue 11).

    python -m benchmarks.network [--body-mb 1024] [--upload-mb 2048] [--slow 500] [--requests 300]

Each scenario runs on a freshly started server, so its peak RSS (VmHWM) is that scenario's own:
- body: one POST of --body-mb to runs/log-batch, streamed chunked (no length to refuse up front), so only the
  streaming cap (--max-body-bytes, default 32 MiB) stops it;
- upload: one artifact PUT of --upload-mb through the mlflow-artifacts proxy, generated on the fly (nothing of
  it is held in this process either), under --max-upload-bytes;
- slow: --requests normal calls (runs/get on a kept-alive connection) alone, then again while --slow
  connections trickle their request heads a byte at a time (reopened whenever the server cuts one off).
Writes benchmarks/reports/network-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.ingest import ROOT, ServerUnderTest

MIB = 1024 * 1024
CHUNK = MIB


def _rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _address(server: ServerUnderTest) -> tuple[str, int]:
    host, port = server.http.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _zeros(total: int) -> Iterator[bytes]:
    block = b"\0" * CHUNK
    sent = 0
    while sent < total:
        piece = block[: min(CHUNK, total - sent)]
        sent += len(piece)
        yield piece


def _json_call(server: ServerUnderTest, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    connection = http.client.HTTPConnection(*_address(server), timeout=600)
    try:
        connection.request(method, path, body=json.dumps(body) if body is not None else None)
        return json.loads(connection.getresponse().read() or b"{}")
    finally:
        connection.close()


def body_scenario(workdir: Path, body_mb: int) -> dict[str, Any]:
    server = ServerUnderTest(workdir / "body")
    try:
        idle = _rss_mb(server.process.pid, "VmRSS")
        connection = http.client.HTTPConnection(*_address(server), timeout=600)
        sent = 0

        def counted() -> Iterator[bytes]:
            nonlocal sent
            for chunk in _zeros(body_mb * MIB):
                sent += len(chunk)
                yield chunk

        started = time.perf_counter()
        with contextlib.suppress(OSError):  # the server answers and hangs up mid-body, as it should
            connection.request("POST", "/api/2.0/mlflow/runs/log-batch", body=counted(), encode_chunked=True)
        status = connection.getresponse().status
        seconds = time.perf_counter() - started
        connection.close()
        return {
            "body_mb": body_mb,
            "status": status,
            "client_sent_mb_before_hang_up": round(sent / MIB, 1),
            "seconds": round(seconds, 2),
            "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(_rss_mb(server.process.pid, "VmHWM"), 1),
        }
    finally:
        server.stop()


def upload_scenario(workdir: Path, upload_mb: int) -> dict[str, Any]:
    server = ServerUnderTest(workdir / "upload", "--max-upload-bytes", str((upload_mb + 1) * MIB))
    try:
        idle = _rss_mb(server.process.pid, "VmRSS")
        run = _json_call(server, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0"})["run"]["info"]
        path = f"/api/2.0/mlflow-artifacts/artifacts/0/{run['run_id']}/artifacts/big.bin"
        connection = http.client.HTTPConnection(*_address(server), timeout=3600)
        started = time.perf_counter()
        connection.request("PUT", path, body=_zeros(upload_mb * MIB), headers={"Content-Length": str(upload_mb * MIB)})
        status = connection.getresponse().status
        seconds = time.perf_counter() - started
        connection.close()
        stored = workdir / "upload" / "artifacts" / "0" / run["run_id"] / "artifacts" / "big.bin"
        size = stored.stat().st_size if stored.exists() else 0
        stored.unlink(missing_ok=True)
        return {
            "upload_mb": upload_mb,
            "status": status,
            "stored_mb": round(size / MIB, 1),
            "seconds": round(seconds, 2),
            "mb_per_s": round(upload_mb / seconds, 1),
            "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(_rss_mb(server.process.pid, "VmHWM"), 1),
        }
    finally:
        server.stop()


class _Tricklers:
    """`count` connections that each send a partial request head and then one byte per second, forever."""

    def __init__(self, address: tuple[str, int], count: int) -> None:
        self._address = address
        self._count = count
        self._loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self.open = 0
        self.cut_off = 0
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._main(),), daemon=True)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + 120
        while self.open < self._count and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)

    async def _main(self) -> None:
        tasks = [asyncio.create_task(self._one()) for _ in range(self._count)]
        await self._stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self) -> None:
        while not self._stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(*self._address)
            except OSError:
                await asyncio.sleep(0.5)
                continue
            self.open += 1
            try:
                writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                while True:
                    writer.write(b"X")
                    await writer.drain()
                    try:
                        await asyncio.wait_for(reader.read(65536), 1.0)
                        break  # an answer (408) or the end of the connection: the server cut it off
                    except TimeoutError:
                        continue
            except OSError:
                pass
            finally:
                self.open -= 1
                self.cut_off += 1
                writer.close()


def _latencies_ms(server: ServerUnderTest, run_id: str, count: int) -> list[float]:
    connection = http.client.HTTPConnection(*_address(server), timeout=120)
    samples = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request("GET", f"/api/2.0/mlflow/runs/get?run_id={run_id}")
            response = connection.getresponse()
            response.read()
            samples.append((time.perf_counter() - started) * 1000)
            if response.status != 200:
                raise RuntimeError(f"normal request failed: {response.status}")
    finally:
        connection.close()
    return samples


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered), 2),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 2),
        "requests": len(ordered),
    }


def slow_scenario(workdir: Path, slow: int, requests: int) -> dict[str, Any]:
    server = ServerUnderTest(workdir / "slow")
    try:
        idle = _rss_mb(server.process.pid, "VmRSS")
        run_id = _json_call(server, "POST", "/api/2.0/mlflow/runs/create", {"experiment_id": "0"})["run"]["info"][
            "run_id"
        ]
        _latencies_ms(server, run_id, 20)  # warm-up
        alone = _summary(_latencies_ms(server, run_id, requests))
        tricklers = _Tricklers(_address(server), slow)
        tricklers.start()
        try:
            opened = tricklers.open
            loaded = _summary(_latencies_ms(server, run_id, requests))
            during = _rss_mb(server.process.pid, "VmHWM")
            # Outlast the header deadline (10 s), so the server has cut off every trickler at least once.
            time.sleep(12)
            cut_off = tricklers.cut_off
        finally:
            tricklers.stop()
        return {
            "slow_connections": slow,
            "slow_connections_open_during_measurement": opened,
            "slow_connections_cut_off_by_the_header_deadline": cut_off,
            "normal_alone": alone,
            "normal_with_slow_clients": loaded,
            "idle_rss_mb": round(idle, 1),
            "peak_rss_mb": round(during, 1),
        }
    finally:
        server.stop()


def _markdown(results: dict[str, Any]) -> str:
    body, upload, slow = results["body"], results["upload"], results["slow"]
    alone, loaded = slow["normal_alone"], slow["normal_with_slow_clients"]
    return "\n".join(
        [
            f"# Network limits, {results['date']} (commit {results['commit']})",
            "",
            f"`{results['command']}` on {results['machine']}; the machine was shared with other work.",
            "",
            "| scenario | answer | idle RSS MB | peak RSS MB | notes |",
            "|---|---|---:|---:|---|",
            f"| {body['body_mb']} MB POST body, chunked | {body['status']} | {body['idle_rss_mb']} |"
            f" {body['peak_rss_mb']} | client had sent {body['client_sent_mb_before_hang_up']} MB when cut off |",
            f"| {upload['upload_mb']} MB artifact PUT | {upload['status']} | {upload['idle_rss_mb']} |"
            f" {upload['peak_rss_mb']} | stored {upload['stored_mb']} MB at {upload['mb_per_s']} MB/s |",
            f"| {slow['slow_connections']} slow connections + normal requests | 200 | {slow['idle_rss_mb']} |"
            f" {slow['peak_rss_mb']} | {slow['slow_connections_cut_off_by_the_header_deadline']} trickling heads"
            " cut off |",
            "",
            "| normal runs/get latency | median ms | p95 ms |",
            "|---|---:|---:|",
            f"| alone | {alone['median_ms']} | {alone['p95_ms']} |",
            f"| with {slow['slow_connections_open_during_measurement']} slow connections open"
            f" | {loaded['median_ms']} | {loaded['p95_ms']} |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--body-mb", type=int, default=1024)
    parser.add_argument("--upload-mb", type=int, default=2048)
    parser.add_argument("--slow", type=int, default=500)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit.stdout.strip(),
        "command": "python -m benchmarks.network"
        + f" --body-mb {args.body_mb} --upload-mb {args.upload_mb} --slow {args.slow} --requests {args.requests}",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    with tempfile.TemporaryDirectory(prefix="bench-network-") as tmp:
        workdir = Path(tmp)
        results["body"] = body_scenario(workdir, args.body_mb)
        print(json.dumps(results["body"]), flush=True)
        results["upload"] = upload_scenario(workdir, args.upload_mb)
        print(json.dumps(results["upload"]), flush=True)
        results["slow"] = slow_scenario(workdir, args.slow, args.requests)
        print(json.dumps(results["slow"]), flush=True)
    out = ROOT / "benchmarks" / "reports" / f"network-{results['date']}"
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(_markdown(results))
    print(_markdown(results))


if __name__ == "__main__":
    main()
