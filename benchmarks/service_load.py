"""Load test of the reporting service on the loopback address.

Starts ``mammorg serve`` on a bundle (default: the demo's, ``demo_out/bundle``) in a subprocess,
measures one request alone (the reference: the median of 10 after 5 warm-up requests; again
after the load, to show the spread between runs of this machine), then sends N requests from C concurrent clients with
the views of one exam, and reports p50/p95 latency, throughput, errors, the service's resident
memory after the first 20 requests and at the end, and where the time went (the service's
``Server-Timing``: upload, preprocessing, queue, model), for all requests and the slowest 5%.
Prints one JSON object.

Usage: python benchmarks/service_load.py [--bundle demo_out/bundle] [--exam FOLDER] [--requests 200] [--clients 4]
       [--batch-wait S] [--workers N]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from mammorg.app.workers import default_workers

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (the model workers)."""
    total = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            total += int(line.split()[1]) / 1024
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            total += _rss_mib(int(child))
    return total


def _exam(bundle: Path, exam: str | None) -> Path:
    if exam:
        return Path(exam)
    images = bundle.parent / "synth" / "images"
    if not images.is_dir():
        raise SystemExit(f"{images}: no synthetic exams beside the bundle; pass --exam FOLDER")
    return sorted(images.iterdir())[-1]


def _timing(header: str) -> dict[str, float]:
    """``Server-Timing`` (``read;dur=1.2, ..., batch;desc="2"``) as seconds and the batch size."""
    out = {}
    for part in header.split(","):
        name, _, value = part.strip().partition(";")
        if value.startswith("dur="):
            out[name] = float(value[4:]) / 1000
        elif value.startswith("desc="):
            out[name] = float(value[5:].strip('"'))
    return out


def _breakdown(latencies: list[float], timings: list[dict[str, float]], p95: float) -> dict:
    """Mean seconds of each part (the service's ``Server-Timing``; ``outside``: the client, the
    connection and the answer's encoding) for all requests and for those at or above the p95,
    with the batch sizes those slowest requests ran in."""
    parts = ("read", "prepare", "queue", "model")
    timed = [(lat, t) for lat, t in zip(latencies, timings) if t]  # answered requests
    rows = [
        {
            **{k: t.get(k, 0.0) for k in parts},
            "outside": lat - sum(t.get(k, 0.0) for k in parts),
            "batch": t.get("batch"),
        }
        for lat, t in timed
    ]
    slow = [r for r, (lat, _) in zip(rows, timed) if lat >= p95]

    def means(group: list[dict]) -> dict[str, float]:
        return {k: round(float(np.mean([r[k] for r in group])), 3) for k in (*parts, "outside")} if group else {}

    return {
        "all": means(rows),
        "slowest_5pct": means(slow),
        "slowest_batches": dict(Counter(str(int(r["batch"])) for r in slow if r["batch"] is not None)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default="demo_out/bundle")
    ap.add_argument("--exam", default=None, help="a folder with the DICOM views of one exam")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch-wait", type=float, default=None, help="the service's --batch-wait (default: its own)")
    ap.add_argument("--workers", type=int, default=None, help="the service's --workers (default: its own)")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "metadata.json").exists():
        raise SystemExit(f"{bundle}: no bundle (run 'make demo' first, or pass --bundle)")
    files = [
        ("files", (p.name, p.read_bytes(), "application/dicom")) for p in sorted(_exam(bundle, args.exam).iterdir())
    ]
    port = _free_port()
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (the service's log: read once it stops, then closed)
    server = subprocess.Popen(
        [sys.executable, "-m", "mammorg", "serve", "--bundle", str(bundle), "--port", str(port)]
        + ([] if args.batch_wait is None else ["--batch-wait", str(args.batch_wait)])
        + ([] if args.workers is None else ["--workers", str(args.workers)]),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("the service did not start")

        local = threading.local()  # one connection per client, kept alive (as a workstation keeps it)

        def one(_: int) -> tuple[float, int, dict[str, float]]:
            if not hasattr(local, "client"):
                local.client = httpx.Client(timeout=120)
            t0 = time.perf_counter()
            try:
                answer = local.client.post(f"{url}/report", files=files)
                status, timing = answer.status_code, _timing(answer.headers.get("server-timing", ""))
            except httpx.HTTPError:
                status, timing = -1, {}
            return time.perf_counter() - t0, status, timing

        for _ in range(5):  # warm-up (the first requests run slower while the model settles)
            one(0)
        single = float(np.median([one(0)[0] for _ in range(10)]))
        memory_start = None
        latencies, statuses, timings = [], [], []
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for i, (latency, status, timing) in enumerate(pool.map(one, range(args.requests))):
                latencies.append(latency)
                statuses.append(status)
                timings.append(timing)
                if i + 1 == 20:
                    memory_start = _rss_mib(server.pid)
        wall = time.perf_counter() - t0
        memory_end = _rss_mib(server.pid)
        single_after = float(np.median([one(0)[0] for _ in range(10)]))  # alone again, after the load
    finally:
        server.terminate()
        server.wait(timeout=30)
    log.seek(0)
    sizes = Counter(int(m.group(1)) for m in re.finditer(r"batch of (\d+) exam", log.read()))
    log.close()
    p50, p95 = (float(np.percentile(latencies, q)) for q in (50, 95))
    print(
        json.dumps(
            {
                "benchmark": "service_load",
                "requests": args.requests,
                "clients": args.clients,
                "workers": default_workers() if args.workers is None else args.workers,
                "errors": sum(s != 200 for s in statuses),
                "single_request_s": round(single, 3),
                "single_request_after_s": round(single_after, 3),
                "p50_s": round(p50, 3),
                "p95_s": round(p95, 3),
                "ratio_p95_vs_single": round(p95 / single, 2),
                "throughput_rps": round(args.requests / wall, 2),
                "rss_mib_after_20": None if memory_start is None else round(memory_start, 1),
                "rss_mib_end": round(memory_end, 1),
                "batch_sizes": {str(k): sizes[k] for k in sorted(sizes)},
                "rss_growth": None if memory_start is None else round(memory_end / memory_start - 1, 3),
                "where_the_time_went": _breakdown(latencies, timings, p95),
            }
        )
    )


if __name__ == "__main__":
    main()
