"""Sandbox service overhead: latency of a trivial program through the real server
(HTTP + bubblewrap + interpreter start), one at a time and with ``--concurrency``
clients at once.

    .venv/bin/python scripts/bench_sandbox.py --runs 40 --concurrency 2

Latency is the client-side wall time of ``SandboxClient.run("print(1)")``, median and
90th percentile over ``--runs`` calls after two warm-up calls. Throughput is runs
finished per second with ``--concurrency`` threads sharing a server of that many slots.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
