"""Sandbox client and request validation without bubblewrap: the client's retry policy
against a scripted loopback HTTP server, the server's request checks, and the python
tool's formatting through the fake client."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rlpost.errors import SandboxError
from rlpost.sandbox import FakeSandboxClient, Limits, RunRequest, RunResult, SandboxClient
from rlpost.tools import PythonTool, make_tool

OK = {"status": "ok", "stdout": "2\n", "stderr": "", "exit_code": 0}


@pytest.fixture
def scripted():
    """A loopback server answering POST /run with the queued (code, body) pairs in order."""
    answers, bodies = [], []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            code, body = answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", answers, bodies
    httpd.shutdown()
    httpd.server_close()


def no_sleep(sleeps):
    return lambda s: sleeps.append(s)


def test_retries_overload_and_server_errors(scripted):
    url, answers, bodies = scripted
    answers += [(429, {"error": "busy"}), (503, {"error": "down"}), (200, OK)]
    sleeps = []
    client = SandboxClient(url, retries=3, backoff_s=0.1, sleep=no_sleep(sleeps))
    assert client.run("print(1 + 1)", stdin="x", timeout_s=2.0, memory_mb=64) == RunResult("ok", "2\n", "", 0)
    assert bodies[0] == {"code": "print(1 + 1)", "stdin": "x", "timeout_s": 2.0, "memory_mb": 64}
    assert len(bodies) == 3 and client.retried == 2
    # Exponential backoff with jitter in [0.5, 1] of 0.1 * 2**k.
    assert 0.05 <= sleeps[0] <= 0.1 and 0.1 <= sleeps[1] <= 0.2


def test_timeout_status_is_a_result_not_an_error(scripted):
    url, answers, _ = scripted
    answers.append((200, {"status": "timeout", "stdout": "", "stderr": "", "exit_code": 137}))
    assert SandboxClient(url, retries=0).run("while True: pass").status == "timeout"


def test_gives_up_after_retries(scripted):
    url, answers, bodies = scripted
    answers += [(500, {"error": "boom"})] * 3
    with pytest.raises(SandboxError, match="after 3 attempts.*HTTP 500"):
        SandboxClient(url, retries=2, sleep=lambda s: None).run("print(1)")
    assert len(bodies) == 3


def test_bad_request_is_not_retried(scripted):
    url, answers, bodies = scripted
    answers += [(400, {"error": "timeout_s must be in (0, 60.0]"}), (200, OK)]
    with pytest.raises(SandboxError, match="HTTP 400.*timeout_s"):
        SandboxClient(url, retries=3, sleep=lambda s: None).run("print(1)", timeout_s=1e6)
    assert len(bodies) == 1


def test_unreachable_server():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SandboxClient(f"http://127.0.0.1:{port}", retries=1, sleep=lambda s: None)
    assert not client.health()
    with pytest.raises(SandboxError, match="after 2 attempts"):
        client.run("print(1)")


def test_malformed_answer_is_an_error(scripted):
    url, answers, _ = scripted
    answers.append((200, {"status": "great", "stdout": "", "stderr": "", "exit_code": 0}))
    with pytest.raises(SandboxError, match="unknown status"):
        SandboxClient(url, retries=0).run("print(1)")


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "JSON object"),
        ({"stdin": ""}, "code and stdin must be strings"),
        ({"code": "1", "timeout_s": 0}, "timeout_s must be in"),
        ({"code": "1", "timeout_s": 61}, "timeout_s must be in"),
        ({"code": "1", "timeout_s": float("nan")}, "timeout_s must be a number"),
        ({"code": "1", "memory_mb": 8}, "memory_mb must be in"),
        ({"code": "1", "memory_mb": 1.5}, "memory_mb must be an integer"),
        ({"code": "1", "memory_mb": True}, "memory_mb must be an integer"),
        ({"code": "1", "network": True}, "unknown fields"),
        ({"code": "x" * ((1 << 20) + 1)}, "limited to"),
    ],
)
def test_request_validation(body, message):
    with pytest.raises(ValueError, match=message):
        RunRequest.parse(body, Limits())


def test_request_defaults():
    assert RunRequest.parse({"code": "print(1)"}, Limits()) == RunRequest("print(1)", "", 5.0, 256)


def test_limits_must_be_positive():
    with pytest.raises(SandboxError, match="max_concurrency"):
        Limits(max_concurrency=0)


def test_python_tool_formats_results():
    answers = {
        "ok": RunResult("ok", "42\n", "", 0),
        "crash": RunResult("error", "", "Traceback ...\nZeroDivisionError: division by zero\n", 1),
        "quiet": RunResult("ok", "", "", 0),
        "slow": RunResult("timeout", "partial\n", "[sandbox] wall-clock limit of 2 s reached\n", 137),
    }
    fake = FakeSandboxClient(lambda code, stdin: answers[code])
    tool = PythonTool(fake, timeout_s=2.0, memory_mb=128)
    assert tool({"code": "ok"}) == "42"
    assert tool({"code": "crash"}) == (
        "stderr:\nTraceback ...\nZeroDivisionError: division by zero\n[status: error, exit code 1]"
    )
    assert tool({"code": "quiet"}) == "(no output)"
    assert tool({"code": "slow", "stdin": "in"}) == (
        "partial\nstderr:\n[sandbox] wall-clock limit of 2 s reached\n[status: timeout, exit code 137]"
    )
    assert fake.calls[-1] == ("slow", "in", 2.0, 128)  # limits come from the recipe, not the model
    assert tool({"source": "print(1)"}).startswith("Error: missing required argument(s) ['code']")
    assert len(fake.calls) == 4
    assert make_tool("python", client=fake).name == "python"
