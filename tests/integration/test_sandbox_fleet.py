"""The sandbox as a fleet service, with real servers (bubblewrap) on loopback: a burst of
plain HTTP clients queues instead of being refused, a burst beyond the queue gets 429
for the excess only, the token is required, /metrics parses, and the client survives one
of two servers being killed mid-burst. Every request gets exactly one answer.

Skipped, with the reason, only where `bwrap` is not installed (`.ci/run` installs it)."""

import http.client
import json
import os
import shutil
import threading
import time
from urllib.parse import urlsplit

import pytest

from rlpost.sandbox.client import SandboxClient
from rlpost.sandbox.server import start_local, stop_local

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed: apt-get install bubblewrap"),
]

TOKEN = "fleet-test-token-5d2e"
SLOTS, QUEUE = 2, 4
# Slot uids of their own, apart from test_sandbox.py's server (61000+) and each other.
BASE_UID_A, BASE_UID_B = 61100, 61200


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ, RLPOST_SANDBOX_TOKEN=TOKEN)
    proc, url = start_local(env=env, args=["--max-concurrency", str(SLOTS), "--max-queue", str(QUEUE),
                                           "--max-queue-wait-s", "30", "--base-uid", str(BASE_UID_A)])
    yield url
    stop_local(proc)
    assert proc.returncode == 0


def request(url, method, path, body=None, token=TOKEN):
    """One plain HTTP request, no retries: ``(status, headers, decoded body)``."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
        r = conn.getresponse()
        data = r.read().decode()
        return r.status, dict(r.getheaders()), data
    finally:
        conn.close()


def burst(url, n, code, timeout_s=20.0):
    """``n`` plain clients released at once; returns their answers in no particular order."""
    answers, lock = [], threading.Lock()
    barrier = threading.Barrier(n)

    def one():
        barrier.wait()
        answer = request(url, "POST", "/run", {"code": code, "timeout_s": timeout_s})
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return answers


def health(url):
    return json.loads(request(url, "GET", "/health", token=None)[2])


def metric(url, outcome):
    from prometheus_client.parser import text_string_to_metric_families

    status, _, text = request(url, "GET", "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {s.labels["outcome"]: s.value for s in families["rlpost_sandbox_requests"].samples}[outcome]


def test_burst_within_the_queue_all_succeeds(server):
    answers = burst(server, SLOTS + QUEUE, "import time\ntime.sleep(1)\nprint('done')")
    assert len(answers) == SLOTS + QUEUE
    assert [(s, json.loads(b)["stdout"]) for s, _, b in answers] == [(200, "done\n")] * (SLOTS + QUEUE)
    assert (health(server)["busy"], health(server)["queued"]) == (0, 0)


def test_burst_beyond_the_queue_refuses_the_excess_only(server):
    before = health(server)["rejected"]
    excess = 3
    answers = burst(server, SLOTS + QUEUE + excess, "import time\ntime.sleep(2)\nprint('done')")
    assert len(answers) == SLOTS + QUEUE + excess  # nobody dropped
    refused = [(h, b) for s, h, b in answers if s == 429]
    served = [b for s, h, b in answers if s == 200]
    assert len(refused) == excess and len(served) == SLOTS + QUEUE
    assert all(int(h["Retry-After"]) >= 1 and "queue is full" in b for h, b in refused)
    assert all(json.loads(b)["stdout"] == "done\n" for b in served)
    assert health(server)["rejected"] == before + excess


def test_a_wide_burst_is_answered_in_full(server):
    # Far more connects at once than socketserver's default listen backlog of 5.
    n = 48
    answers = burst(server, n, "import time\ntime.sleep(1)\nprint('done')")
    statuses = sorted(s for s, _, _ in answers)
    assert statuses == [200] * (SLOTS + QUEUE) + [429] * (n - SLOTS - QUEUE)


def test_a_wait_past_the_request_deadline_is_refused(server):
    before = metric(server, "wait_expired")
    holders = [threading.Thread(target=request, args=(server, "POST", "/run",
                                                      {"code": "import time\ntime.sleep(3)", "timeout_s": 10}))
               for _ in range(SLOTS)]
    for t in holders:
        t.start()
    deadline = time.monotonic() + 10
    while health(server)["busy"] < SLOTS and time.monotonic() < deadline:
        time.sleep(0.05)
    start = time.monotonic()
    status, headers, body = request(server, "POST", "/run", {"code": "print(1)", "timeout_s": 0.5})
    waited = time.monotonic() - start
    for t in holders:
        t.join()
    assert status == 429 and "within the request's wait" in body and "Retry-After" in headers
    assert 0.5 <= waited < 2.5  # it waited its own deadline, not the server's 30 s
    assert metric(server, "wait_expired") == before + 1


def test_token_is_required_and_metrics_parse(server):
    before = metric(server, "unauthorized")
    program = {"code": "print(7)"}
    assert request(server, "POST", "/run", program, token=None)[0] == 401
    status, headers, _ = request(server, "POST", "/run", program, token="wrong-" + TOKEN)
    assert status == 401 and headers["WWW-Authenticate"] == "Bearer"
    assert request(server, "GET", "/metrics", token=None)[0] == 401
    assert request(server, "GET", "/health", token=None)[0] == 200  # open for load-balancer probes
    status, _, body = request(server, "POST", "/run", program)
    assert (status, json.loads(body)["stdout"]) == (200, "7\n")
    assert metric(server, "unauthorized") == before + 3
    assert metric(server, "ok") >= 1
    assert health(server)["unauthorized"] == before + 3


def test_client_survives_a_server_killed_mid_burst(server):
    env = dict(os.environ, RLPOST_SANDBOX_TOKEN=TOKEN)
    proc_b, url_b = start_local(env=env, args=["--max-concurrency", str(SLOTS), "--max-queue", str(QUEUE),
                                               "--base-uid", str(BASE_UID_B)])
    client = SandboxClient([server, url_b], token=TOKEN, retries=5, backoff_s=0.1)
    results, lock = [], threading.Lock()

    def worker():
        for _ in range(3):
            result = client.run("import time\ntime.sleep(0.5)\nprint('done')", timeout_s=10.0)
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while health(url_b)["busy"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert health(url_b)["busy"] >= 1  # killed with runs in flight
        proc_b.kill()
        for t in threads:
            t.join(timeout=120)
    finally:
        stop_local(proc_b)
    assert [r.stdout for r in results] == ["done\n"] * 12
    assert client.fleet.ejections >= 1 and client.retried >= 1
    # The killed server's runs died with it (bwrap --die-with-parent; the backstop otherwise).
    deadline = time.monotonic() + 10 + 5
    while uid_processes(BASE_UID_B) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert uid_processes(BASE_UID_B) == []


def uid_processes(base_uid):
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and base_uid <= os.stat(f"/proc/{entry}").st_uid < base_uid + SLOTS:
                pids.append(int(entry))
        except FileNotFoundError:
            pass
    return pids
