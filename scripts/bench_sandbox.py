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

    .venv/bin/python scripts/bench_sandbox.py --load --clients 16 --requests 20 --concurrency 2

``--load``: ``--clients`` threads x ``--requests`` each through one ``SandboxClient``
(with its retries and fleet spreading), against one server and against two (each with
``--concurrency`` slots), first with normal programs only, then with every
``--hostile-every``-th request hostile (an endless loop, a memory bomb, a fork bomb, an
output flood, in turn). Prints per run: throughput, p50/p95/p99 latency of the normal
programs, their success rate (status ``ok`` and the right output), and whether every
request got exactly one answer with the status its kind must get (loop and fork bomb
``timeout``, memory bomb ``memory``, flood ``error``).
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
    parser.add_argument("--load", action="store_true")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--hostile-every", type=int, default=4)
    parser.add_argument("--servers", default="1,2", help="server counts to run, e.g. 1,2")
    args = parser.parse_args()
    if args.load:
        for servers in map(int, args.servers.split(",")):
            for hostile_every in (0, args.hostile_every):
                load(servers, args.concurrency, args.clients, args.requests, hostile_every)
        return
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
        elapsed = run_threads([work] * args.concurrency)
        print(f"{args.concurrency} clients: {per_thread * args.concurrency / elapsed:.1f} runs/s, {client.retried} retries")
    finally:
        stop_local(proc)


def run_threads(targets) -> float:
    """Run each of ``targets`` in a thread of its own, all at once; the seconds until the last ends."""
    threads = [threading.Thread(target=t) for t in targets]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


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
        elapsed = run_threads([one] * n)
    finally:
        stop_local(proc)
    by_status = {code: sum(1 for s, _ in answers if s == code) for code in sorted({s for s, _ in answers})}
    served = sorted(t for s, t in answers if s == 200)
    pct = lambda q: served[int(q * (len(served) - 1))] if served else float("nan")  # noqa: E731
    print(f"burst of {n} on {slots} slots, --max-queue {queue}: {len(answers)}/{n} answered {by_status}, "
          f"{elapsed:.2f} s; served latency p50 {pct(0.5):.2f} s, p95 {pct(0.95):.2f} s, max {pct(1.0):.2f} s")


# kind -> (program, request options, the status it must get)
NORMAL = ("print(sum(range(1000)))", {}, "ok")
HOSTILE = {
    "loop": ("while True:\n    pass", {"timeout_s": 2.0}, "timeout"),
    "memory": ("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))", {"memory_mb": 64}, "memory"),
    "fork": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
             {"timeout_s": 2.0}, "timeout"),
    "flood": ("while True:\n    print('x' * 10000)", {"timeout_s": 10.0}, "error"),
}


def load(servers: int, slots: int, clients: int, requests: int, hostile_every: int) -> None:
    """``clients`` threads x ``requests`` through one fleet client; see the module docstring."""
    # Each server on this host its own uid range (docs/sandbox.md): with one range, a fork
    # bomb on one server exhausts RLIMIT_NPROC of the uid the other server's slot uses too.
    procs = [start_local(args=["--max-concurrency", str(slots), "--max-queue", str(clients),
                               "--base-uid", str(61000 + 1000 * i)]) for i in range(servers)]
    client = SandboxClient([url for _, url in procs], retries=10, backoff_s=0.1)
    kinds = list(HOSTILE)
    records: list[tuple[str, str, float]] = []  # (kind, what happened, latency s)
    first_wrong: list[str] = []  # what a normal program that failed said (its stderr's tail)
    lock = threading.Lock()

    def work(c: int) -> None:
        for r in range(requests):
            i = c * requests + r
            hostile = hostile_every and i % hostile_every == hostile_every - 1
            kind = kinds[(i // hostile_every) % len(kinds)] if hostile else "normal"
            code, options, expected = HOSTILE[kind] if hostile else NORMAL
            start = time.perf_counter()
            try:
                result = client.run(code, **options)
                right = result.status == expected and (hostile or result.stdout == "499500\n")
                outcome = "right" if right else f"wrong:{result.status}"
                if not right and not hostile:
                    with lock:
                        first_wrong.append(f"{result.status}: {result.stderr[-300:]!r}")
            except Exception as e:  # noqa: BLE001 - a SandboxError is an answer too, a wrong one
                outcome = f"raised:{type(e).__name__}"
            with lock:
                records.append((kind, outcome, time.perf_counter() - start))

    try:
        elapsed = run_threads([lambda c=c: work(c) for c in range(clients)])
    finally:
        for proc, _ in procs:
            stop_local(proc)
    normal = sorted(t for k, _, t in records if k == "normal")
    pct = lambda q: normal[int(q * (len(normal) - 1))] if normal else float("nan")  # noqa: E731
    ok = sum(1 for k, o, _ in records if k == "normal" and o == "right")
    wrong = {}
    for kind, outcome, _ in records:
        if outcome != "right":
            wrong[f"{kind}:{outcome}"] = wrong.get(f"{kind}:{outcome}", 0) + 1
    mix = f"1 in {hostile_every} hostile" if hostile_every else "normal only"
    print(f"{servers} server(s) x {slots} slots, {clients} clients x {requests} requests, {mix}: "
          f"{len(records)}/{clients * requests} answered in {elapsed:.1f} s ({len(records) / elapsed:.1f} req/s); "
          f"normal: {ok}/{len(normal)} ok, p50 {pct(0.5):.2f} s, p95 {pct(0.95):.2f} s, p99 {pct(0.99):.2f} s; "
          f"wrong answers {wrong or 'none'}; client retries {client.retried}, ejections {client.fleet.ejections}")
    if first_wrong:
        print(f"    first failed normal program: {first_wrong[0]}")


if __name__ == "__main__":
    main()
