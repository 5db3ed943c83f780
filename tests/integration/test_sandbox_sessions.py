"""Stateful sandbox sessions against the real service (bubblewrap on loopback): files
persist across a session's calls and vanish with it; one session cannot see another's
workspace; every limit of a one-off run holds inside a session, which survives it.

Skipped, with the reason, only where `bwrap` is not installed (`.ci/run` installs it)."""

import glob
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.request

import pytest

from rlpost.errors import SandboxError
from rlpost.sandbox.client import SandboxClient, SandboxSession
from rlpost.sandbox.runner import BASE_UID
from rlpost.sandbox.server import start_local, stop_local

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed: apt-get install bubblewrap"),
]

REPO = {"calc.py": "def add(a, b):\n    return a - b\n", "data/notes.txt": "three lines\nof\ntext\n"}


@pytest.fixture(scope="module")
def server():
    proc, url = start_local(args=["--max-concurrency", "2", "--max-upload-kb", "64", "--disk-mb", "16"])
    yield url
    stop_local(proc)
    assert proc.returncode == 0
    assert not glob.glob(os.path.join(tempfile.gettempdir(), "rlpost-session-*")), "shutdown left a workspace"


@pytest.fixture
def client(server):
    return SandboxClient(server, retries=5, backoff_s=0.1)


def metrics(url):
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    events = {s.labels["event"]: s.value for s in families["rlpost_sandbox_sessions"].samples
              if s.name == "rlpost_sandbox_sessions_total"}
    live = families["rlpost_sandbox_live_sessions"].samples[0].value
    return live, events


def test_files_persist_across_calls_and_go_with_the_session(client):
    session = client.open_session(REPO)
    # Uploaded files are there, bash runs in the workspace, and what it writes stays.
    first = session.run(bash="wc -l < data/notes.txt; echo 'x = 41' > made.py; mkdir -p out && echo hi > out/f")
    assert (first.status, first.stdout) == ("ok", "3\n")
    second = session.run("import calc, made\nprint(calc.add(2, 3), made.x + 1, open('out/f').read().strip())")
    assert (second.status, second.stdout) == ("ok", "-1 42 hi\n"), second.stderr
    # A fix made by one call is what the next one runs.
    assert session.run(bash="sed -i 's/a - b/a + b/' calc.py && python3 -c 'import calc; print(calc.add(2, 3))'"
                       ).stdout == "5\n"
    failing = session.run(bash="cat missing.txt")
    assert failing.status == "error" and failing.exit_code == 1 and "No such file" in failing.stderr
    session.close()
    with pytest.raises(SandboxError, match="HTTP 404.*gone \\(deleted\\)"):
        session._call("POST", f"/sessions/{session.id}/run", {"bash": "ls"}, 10.0)
    session.close()  # a second close is a no-op
    # A new session starts empty: nothing of the deleted one is left.
    with client.open_session() as fresh:
        assert fresh.run(bash="ls -A").stdout == ""


def test_one_session_cannot_read_another(client):
    with client.open_session({"secret.txt": "s3cr3t-of-a"}) as a, client.open_session() as b:
        # The host path of a's workspace: the server runs on this host.
        (host_dir,) = {os.path.dirname(p) for p in
                       glob.glob(os.path.join(tempfile.gettempdir(), "rlpost-session-*", "secret.txt"))}
        assert open(os.path.join(host_dir, "secret.txt")).read() == "s3cr3t-of-a"  # the control
        probe = (f"cat {host_dir}/secret.txt; ls {tempfile.gettempdir()}/ ; ls /sandbox;"
                 " find / -name secret.txt -not -path '/proc/*' 2>/dev/null; echo done")
        result = b.run(bash=probe, timeout_s=30.0)
        assert "s3cr3t" not in result.stdout and "secret.txt" not in result.stdout, result
        assert result.stdout.endswith("done\n"), result
        assert "No such file" in result.stderr
        assert a.run(bash="cat secret.txt").stdout == "s3cr3t-of-a"


def test_limits_hold_in_a_session_and_it_survives(client):
    with client.open_session({"keep.txt": "still here"}) as session:
        bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
        start = time.monotonic()
        assert session.run(bomb, timeout_s=3.0).status == "timeout"
        assert time.monotonic() - start < 3.0 + 5.0
        # bash's bomb: its top shell exits at once, which ends the run's PID namespace and
        # every fork with it (whether the forks reach the process cap first is a race);
        # nothing of it may outlive the call (checked at the end).
        start = time.monotonic()
        session.run(bash=":(){ :|:& };:", timeout_s=3.0)
        assert time.monotonic() - start < 3.0 + 5.0
        hog = session.run("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))", memory_mb=128)
        assert hog.status == "memory"
        # The workspace is capped at --disk-mb 16: a bigger write fails, the session lives on.
        fill = session.run(bash="for i in 1 2 3 4 5; do head -c 5M /dev/zero > big$i || exit 9; done", timeout_s=10.0)
        assert fill.status == "error" and fill.exit_code == 9, fill
        assert session.run(bash="rm -f big*; cat keep.txt").stdout == "still here"
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        try:
            port = listener.getsockname()[1]
            net = session.run(f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
                              "    print('connected')\nexcept OSError:\n    print('failed')\n")
        finally:
            listener.close()
        assert net.stdout == "failed\n"
    deadline = time.monotonic() + 5
    while session_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert session_processes() == []


def session_processes():
    """Host pids owned by a session uid (base uid + 2 slots onwards, when the server runs
    as root): any left over means a run escaped its cleanup."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and BASE_UID + 2 <= os.stat(f"/proc/{entry}").st_uid < BASE_UID + 2 + 64:
                pids.append(int(entry))
        except FileNotFoundError:
            pass
    return pids


def test_upload_limits_are_clear(client):
    with pytest.raises(SandboxError, match="HTTP 400.*bad file path '../x'"):
        client.open_session({"../x": "escape"})
    with pytest.raises(SandboxError, match="HTTP 400.*the limit is 65536 bytes"):
        client.open_session({"big.txt": "x" * 70_000})
    with pytest.raises(ValueError, match="exactly one of code"):
        client.open_session().run()


def test_idle_sessions_are_reaped_and_the_cap_holds():
    proc, url = start_local(args=["--session-idle-s", "2", "--max-sessions", "2"])
    try:
        client = SandboxClient(url, retries=0)
        kept, dropped = client.open_session({"f": "1"}), client.open_session({"f": "2"})
        with pytest.raises(SandboxError, match="HTTP 429.*all 2 sessions are in use"):
            client.open_session()
        opened = time.monotonic()
        while time.monotonic() - opened < 3.5:  # kept in use past the idle timeout; dropped left alone
            assert kept.run(bash="cat f").stdout == "1"
            time.sleep(0.5)
        with pytest.raises(SandboxError, match="gone \\(reaped after 2 s idle\\)"):
            dropped.run(bash="cat f")
        live, events = metrics(url)
        assert (live, events["created"], events["reaped"], events["refused"]) == (1, 2, 1, 1)
        kept.close()
        assert metrics(url)[0] == 0
    finally:
        stop_local(proc)


def test_session_routes_need_the_token_and_calls_are_sequential():
    env = dict(os.environ, RLPOST_SANDBOX_TOKEN="s3ssion-token")
    proc, url = start_local(env=env)
    try:
        with pytest.raises(SandboxError, match="HTTP 401"):
            SandboxClient(url, token="wrong", retries=0).open_session()
        client = SandboxClient(url, token="s3ssion-token", retries=0)
        session = client.open_session()
        stranger = SandboxSession(SandboxClient(url, token="wrong", retries=0), url, session.id)
        with pytest.raises(SandboxError, match="HTTP 401"):
            stranger.run(bash="ls")
        with pytest.raises(SandboxError, match="HTTP 401"):
            stranger._call("DELETE", f"/sessions/{session.id}", None, 10.0)
        # A second call while the first runs is refused, not queued behind it.
        slow = threading.Thread(target=session.run, kwargs={"bash": "sleep 3", "timeout_s": 10.0})
        slow.start()
        time.sleep(1.0)
        with pytest.raises(SandboxError, match="HTTP 409.*already running a call"):
            session.run(bash="true")
        slow.join()
        assert session.run(bash="echo after").stdout == "after\n"
        session.close()
    finally:
        stop_local(proc)
