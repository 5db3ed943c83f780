"""Session pieces without bubblewrap: the bash/code request, upload checks, the session
store's bookkeeping (cap, busy, delete while busy, idle reaping by the clock), the
session client's retry policy against a scripted server, the terminal tool and
environments/fix_test.py through the fake client."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from environments.fix_test import REPOS, FixTestEnv, check_program, make_rows
from rlpost.envs import Task
from rlpost.errors import SandboxError
from rlpost.sandbox import FakeSandboxClient, Limits, RunRequest, RunResult
from rlpost.sandbox.client import SandboxClient, SandboxSession
from rlpost.sandbox.sessions import SessionBusy, SessionGone, SessionsFull, SessionStore, UploadError, check_files
from rlpost.tools import TerminalTool, make_tool


def test_bash_request_and_its_wire_form():
    req = RunRequest.parse({"bash": "ls", "timeout_s": 2}, Limits())
    assert req == RunRequest("ls", "", 2.0, 256, "bash")
    assert req.to_json() == {"bash": "ls", "stdin": "", "timeout_s": 2.0, "memory_mb": 256}
    with pytest.raises(ValueError, match="either code .* or bash"):
        RunRequest.parse({"code": "1", "bash": "ls"}, Limits())


@pytest.mark.parametrize("files, message", [
    ({"../up": ""}, "bad file path"), ({"/abs": ""}, "bad file path"), ({"a/../b": ""}, "bad file path"),
    ({"": ""}, "bad file path"), ({"a": 1}, "files must be an object"), (["a"], "files must be an object"),
    ({f"f{i}": "" for i in range(257)}, "at most 256 files"), ({"big": "x" * ((4 << 20) + 1)}, "the limit is 4194304"),
])
def test_uploads_are_checked(files, message):
    with pytest.raises(UploadError, match=message):
        check_files(files, Limits())


def test_upload_cap_is_the_smaller_of_upload_and_disk():
    with pytest.raises(UploadError, match="the limit is 1048576 bytes"):
        check_files({"big": "x" * ((1 << 20) + 1)}, Limits(disk_mb=1))
    assert check_files({"dir/f.py": "x = 1\n"}, Limits()) == {"dir/f.py": "x = 1\n"}


def test_store_cap_busy_delete_and_reaping(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = SessionStore(Limits(max_sessions=2, session_idle_s=10.0), base_uid=None)
    store.can_mount = False  # plain directories: the bookkeeping is what is tested here
    a, b = store.create({"x.txt": "a"}), store.create({})
    assert (a.workspace / "x.txt").read_text() == "a" and a.uid is None
    with pytest.raises(SessionsFull, match="all 2 sessions"):
        store.create({})
    assert store.checkout(a.id) is a
    with pytest.raises(SessionBusy):
        store.checkout(a.id)
    # Busy sessions are never reaped; idle ones are, 10 s after their last use.
    assert store.reap(now=a.last_used + 11.0) == 1 and store.count() == 1
    with pytest.raises(SessionGone, match="reaped after 10 s idle"):
        store.checkout(b.id)
    assert not b.workspace.exists()
    store.delete(a.id)  # while busy: it goes when the call ends
    with pytest.raises(SessionGone, match="deleted"):
        store.checkout(a.id)
    assert a.workspace.exists()
    store.checkin(a)
    assert not a.workspace.exists() and store.count() == 0
    assert store.events == {"created": 2, "deleted": 1, "reaped": 1, "refused": 1, "over_disk": 0}
    with pytest.raises(SessionGone, match="no session nope"):
        store.delete("nope")


def test_a_workspace_past_the_disk_cap_closes_the_session(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    store = SessionStore(Limits(disk_mb=1), base_uid=None)
    store.can_mount = False
    s = store.create({})
    store.checkout(s.id)
    (s.workspace / "big").write_bytes(b"x" * (2 << 20))
    assert "passed the disk limit of 1 MiB" in store.checkin(s)
    assert not s.workspace.exists() and store.events["over_disk"] == 1


def _scripted_server():
    """A loopback server answering every request with the queued (code, body) pairs."""
    answers, seen = [], []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, json.loads(self.rfile.read(length)) if length else None))
            code, body = answers.pop(0)
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_DELETE = answer

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, (f"http://127.0.0.1:{httpd.server_address[1]}", answers, seen)


@pytest.fixture
def scripted():
    httpd, parts = _scripted_server()
    yield parts
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def scripted_other():
    httpd, parts = _scripted_server()
    yield parts
    httpd.shutdown()
    httpd.server_close()


def test_a_session_follows_the_url_its_server_advertises(scripted, scripted_other):
    """Behind a load balancer, the server that created the session names itself."""
    balancer, answers, seen = scripted
    direct, direct_answers, direct_seen = scripted_other
    answers.append((201, {"session_id": "s9", "idle_s": 600, "url": direct + "/"}))
    direct_answers.append((200, {"status": "ok", "stdout": "", "stderr": "", "exit_code": 0}))
    session = SandboxClient(balancer).open_session()
    assert session.run(bash="true").status == "ok"
    assert [s[:2] for s in seen] == [("POST", "/sessions")]
    assert [s[:2] for s in direct_seen] == [("POST", "/sessions/s9/run")]


def test_session_calls_go_to_their_server_and_retry_only_429(scripted):
    url, answers, seen = scripted
    sleeps = []
    client = SandboxClient(url, retries=2, sleep=sleeps.append)
    answers += [(201, {"session_id": "s1", "idle_s": 600}), (429, {"error": "full"}),
                (200, {"status": "ok", "stdout": "hi\n", "stderr": "", "exit_code": 0})]
    session = client.open_session({"a.py": "x = 1"})
    assert isinstance(session, SandboxSession) and (session.url, session.id) == (url, "s1")
    assert session.run(bash="echo hi").stdout == "hi\n"
    assert [s[:2] for s in seen] == [("POST", "/sessions"), ("POST", "/sessions/s1/run"), ("POST", "/sessions/s1/run")]
    assert seen[0][2] == {"files": {"a.py": "x = 1"}} and seen[2][2]["bash"] == "echo hi"
    assert client.retried == 1 and len(sleeps) == 1
    # A 500 may have run the command: not retried (a session call is not idempotent).
    answers.append((500, {"error": "boom"}))
    with pytest.raises(SandboxError, match="HTTP 500"):
        session.run("print(1)")
    answers.append((404, {"error": "session s1 is gone (reaped after 600 s idle)"}))
    with pytest.raises(SandboxError, match="reaped after 600 s idle"):
        session.run("print(1)")
    answers.append((200, {"deleted": "s1"}))
    session.close()
    session.close()
    assert seen[-1][:2] == ("DELETE", "/sessions/s1") and len(seen) == 6


def test_terminal_tool_runs_bash_in_the_session():
    def respond(files, language, code):
        return RunResult("ok", files.get(code.removeprefix("cat "), ""), "", 0) if code.startswith("cat ") \
            else RunResult("error", "", "bash: nope: command not found\n", 127)

    session = FakeSandboxClient(respond_session=respond).open_session({"a.txt": "hello\n"})
    tool = TerminalTool(session, timeout_s=3.0, memory_mb=64)
    assert tool({"command": "cat a.txt"}) == "hello"
    assert tool({"command": "nope"}) == "stderr:\nbash: nope: command not found\n[status: error, exit code 127]"
    assert tool({"cmd": "ls"}).startswith("Error: missing required argument(s) ['command']")
    assert session.calls == [("bash", "cat a.txt"), ("bash", "nope")]
    assert make_tool("terminal", session=session).name == "terminal"


def test_fix_test_env_through_the_fake_client():
    """The env's logic: one session per episode with the variant's files, a tool turn that
    does not fix the test continues, the check's PASS ends the episode with reward 1."""
    verdicts = iter(["FAIL", "PASS"])

    def respond(files, language, code):
        if language == "python":  # the check program
            assert code == check_program(REPOS[2])
            return RunResult("ok", next(verdicts) + "\n", "", 0)
        return RunResult("ok", "ran\n", "", 0)

    client = FakeSandboxClient(respond_session=respond)
    env = FixTestEnv(client=client)
    row = make_rows("train", 3, 0)[2]
    env.reset(Task(uid="t", question=row["prompt"], answer="tests", metadata={"variant": row["variant"]}))
    (session,) = client.sessions
    assert session.files == {"text.py": REPOS[2].source, "test_text.py": REPOS[2].test}
    call = '<tool_call>{"name": "terminal", "arguments": {"command": "ls"}}</tool_call>'
    first = env.step(call)
    assert not first.done and first.reward == {"accuracy": 0.0} and first.observation[0]["content"] == "ran"
    second = env.step(call)
    assert second.done and second.reward == {"accuracy": 1.0}
    env.close()  # the DELETE goes out on a thread of its own
    deadline = time.monotonic() + 5
    while not session.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    assert session.closed and [c[0] for c in session.calls] == ["bash", "python", "bash", "python"]
