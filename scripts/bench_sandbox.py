"""Sandbox service overhead: latency of a trivial program through the real server
(HTTP + bubblewrap + interpreter start), one at a time and with ``--concurrency``
clients at once.

    .venv/bin/python scripts/bench_sandbox.py --runs 40 --concurrency 2

Latency is the client-side wall time of ``SandboxClient.run("print(1)")``, median and
90th percentile over ``--runs`` calls after two warm-up calls. Throughput is runs
finished per second with ``--concurrency`` threads sharing a server of that many slots.

    .venv/bin/python scripts/bench_sandbox.py --burst 16 --concurrency 2

``--burst N``: N plain HTTP clients (no retries) released at once with a 0.5 s program,
against a server that refuses when full (``--max-queue 0``) and one that queues
(``--max-queue N``). Prints, for each, the answers by HTTP status (every request must get
exactly one), the burst's wall time and the p50/p95/max latency of the served requests.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlpost.sandbox.client import SandboxClient  # noqa: E402
from rlpost.sandbox.server import start_local, stop_local  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--burst", type=int, default=0)
    args = parser.parse_args()
    if args.burst:
        for queue in (0, args.burst):
            plain_burst(args.burst, args.concurrency, queue)
        return
    proc, url = start_local(args=["--max-concurrency", str(args.concurrency)])
    try:
        client = SandboxClient(url, retries=20, backoff_s=0.05)
        for _ in range(2):
            client.run("print(1)")
        latencies = []
        for _ in range(args.runs):
            start = time.perf_counter()
            assert client.run("print(1)").status == "ok"
            latencies.append(time.perf_counter() - start)
        latencies.sort()
        p90 = latencies[int(0.9 * (len(latencies) - 1))]
        print(f"sequential: median {statistics.median(latencies) * 1e3:.0f} ms, p90 {p90 * 1e3:.0f} ms")

        per_thread = args.runs // args.concurrency
        work = lambda: [client.run("print(1)") for _ in range(per_thread)]  # noqa: E731
        threads = [threading.Thread(target=work) for _ in range(args.concurrency)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
        print(f"{args.concurrency} clients: {per_thread * args.concurrency / elapsed:.1f} runs/s, {client.retried} retries")
    finally:
        stop_local(proc)


def plain_burst(n: int, slots: int, queue: int) -> None:
    proc, url = start_local(args=["--max-concurrency", str(slots), "--max-queue", str(queue)])
    host, port = url.removeprefix("http://").split(":")
    answers: list[tuple[int, float]] = []
    barrier, lock = threading.Barrier(n), threading.Lock()
    body = json.dumps({"code": "import time\ntime.sleep(0.5)\nprint(1)", "timeout_s": 30})

    def one() -> None:
        conn = http.client.HTTPConnection(host, int(port), timeout=120)
        barrier.wait()
        start = time.perf_counter()
        conn.request("POST", "/run", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        status = response.status
        with lock:
            answers.append((status, time.perf_counter() - start))
        conn.close()

    try:
        threads = [threading.Thread(target=one) for _ in range(n)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - start
    finally:
        stop_local(proc)
    by_status = {code: sum(1 for s, _ in answers if s == code) for code in sorted({s for s, _ in answers})}
    served = sorted(t for s, t in answers if s == 200)
    pct = lambda q: served[int(q * (len(served) - 1))] if served else float("nan")  # noqa: E731
    print(f"burst of {n} on {slots} slots, --max-queue {queue}: {len(answers)}/{n} answered {by_status}, "
          f"{elapsed:.2f} s; served latency p50 {pct(0.5):.2f} s, p95 {pct(0.95):.2f} s, max {pct(1.0):.2f} s")


if __name__ == "__main__":
    main()
