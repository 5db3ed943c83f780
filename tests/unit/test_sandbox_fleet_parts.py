"""The fleet pieces without bubblewrap: the server's slot queue, its Prometheus text, the
client's choice of server (least busy, ejection, return), the bearer token it sends, and
the server's refusal to bind beyond loopback without a token."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlpost.errors import SandboxError
from rlpost.sandbox import SandboxClient
from rlpost.sandbox.admission import QUEUE_FULL, WAIT_EXPIRED, SlotPool
from rlpost.sandbox.client import Fleet, shared_client
from rlpost.sandbox.metrics import Metrics
from rlpost.sandbox.server import is_loopback

OK = {"status": "ok", "stdout": "", "stderr": "", "exit_code": 0}


def test_slot_pool_queues_in_arrival_order():
    pool = SlotPool(capacity=1, max_queue=2)
    assert pool.acquire(1.0) == 0
    order = []

    def wait(name):
        slot = pool.acquire(5.0)
        order.append(name)
        pool.release(slot)

    first = threading.Thread(target=wait, args=("first",))
    first.start()
    while pool.usage() != (1, 1):
        time.sleep(0.01)
    second = threading.Thread(target=wait, args=("second",))
    second.start()
    while pool.usage() != (1, 2):
        time.sleep(0.01)
    assert pool.acquire(5.0) == QUEUE_FULL  # a third waiter does not fit
    pool.release(0)
    first.join()
    second.join()
    assert order == ["first", "second"]
    assert pool.usage() == (0, 0)


def test_slot_pool_wait_expires_and_leaves_the_queue():
    pool = SlotPool(capacity=1, max_queue=1)
    assert pool.acquire(1.0) == 0
    start = time.monotonic()
    assert pool.acquire(0.2) == WAIT_EXPIRED
    assert 0.2 <= time.monotonic() - start < 2.0
    assert pool.usage() == (1, 0)
    assert SlotPool(capacity=1, max_queue=0).acquire(1.0) == 0
    pool.release(0)
    assert pool.acquire(0.0) == 0  # free slot: no wait needed


def test_metrics_text_parses():
    parser = pytest.importorskip("prometheus_client.parser")
    m = Metrics()
    m.ran("ok", 0.3, 0.0)
    m.ran("timeout", 2.0, 1.2)
    m.outcome("queue_full")
    families = {f.name: f for f in parser.text_string_to_metric_families(m.prometheus(1, 3, 4, 8))}
    requests = {s.labels["outcome"]: s.value for s in families["rlpost_sandbox_requests"].samples}
    assert requests["ok"] == 1 and requests["timeout"] == 1 and requests["queue_full"] == 1
    assert requests["unauthorized"] == 0
    assert families["rlpost_sandbox_queued_requests"].samples[0].value == 3
    buckets = {s.labels.get("le"): s.value for s in families["rlpost_sandbox_run_seconds"].samples
               if s.name.endswith("_bucket")}
    assert (buckets["0.25"], buckets["0.5"], buckets["2.5"], buckets["+Inf"]) == (0, 1, 2, 2)
    assert m.summary() == {"served": 2, "rejected": 1, "unauthorized": 0}


def test_fleet_least_busy_ejection_and_return():
    now = [0.0]
    fleet = Fleet(["http://a/", "http://b"], eject_s=10.0, clock=lambda: now[0])
    first, second = fleet.acquire(), fleet.acquire()
    assert {first, second} == {"http://a", "http://b"}  # spread, not piled on one
    fleet.release(first)
    assert fleet.acquire() == first  # the least busy
    fleet.set_aside("http://a", 10.0, failed=True)
    assert [fleet.acquire() for _ in range(3)] == ["http://b"] * 3
    assert not fleet.other_available("http://b")
    now[0] = 10.5  # ejection over: back in rotation
    assert "http://a" in {fleet.acquire() for _ in range(2)}
    assert fleet.ejections == 1
    with pytest.raises(SandboxError, match="at least one server"):
        Fleet([], eject_s=1.0)


@pytest.fixture
def recording_server():
    """A loopback server answering 200 ok and recording each request's Authorization."""
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.headers.get("Authorization"))
            data = json.dumps(OK).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", seen
    httpd.shutdown()
    httpd.server_close()


def dead_url():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def test_client_skips_a_dead_server_without_sleeping(recording_server, monkeypatch):
    url, seen = recording_server
    monkeypatch.setenv("RLPOST_SANDBOX_TOKEN", "from-env")
    sleeps = []
    client = SandboxClient([dead_url(), url], retries=2, sleep=sleeps.append)
    for _ in range(4):
        assert client.run("print(1)").status == "ok"
    assert len(seen) == 4 and client.fleet.ejections == 1  # ejected once, then avoided
    assert client.retried <= 1 and sleeps == []
    assert seen[0] == "Bearer from-env"
    SandboxClient(url, token="explicit").run("print(1)")
    assert seen[-1] == "Bearer explicit"


def test_an_answer_cut_off_midway_moves_to_another_server(recording_server):
    url, seen = recording_server

    class CutOff(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):  # promises 1000 bytes, sends 10 and hangs up: a server dying mid-answer
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b'{"status":')
            self.close_connection = True

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), CutOff)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        client = SandboxClient([f"http://127.0.0.1:{httpd.server_address[1]}", url], retries=1)
        assert client.run("print(1)").status == "ok"
        assert client.retried == 1 and client.fleet.ejections == 1 and len(seen) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_is_loopback():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("sandbox.internal")


def test_refuses_to_serve_beyond_loopback_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "RLPOST_SANDBOX_TOKEN"}
    # The check comes before anything binds or runs, so this needs no bubblewrap.
    proc = subprocess.run([sys.executable, "-m", "rlpost.sandbox", "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 1
    assert "refusing to serve on 0.0.0.0 without a token" in proc.stderr and "Traceback" not in proc.stderr


def test_environments_share_one_client_per_server_list():
    from environments.code import CodeEnv

    urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    first, second = CodeEnv(sandbox_url=urls), CodeEnv(sandbox_url=list(urls))
    assert first.client is second.client and first.client.fleet.urls == urls
    assert shared_client("http://127.0.0.1:1") is not first.client
