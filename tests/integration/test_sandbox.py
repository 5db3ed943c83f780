"""The real sandbox service (`python -m rlpost.sandbox serve` on loopback, bubblewrap
isolation) against hostile programs. Each must be contained and reported with the right
status, and the service must answer `ok` to a normal program right after.

Skipped, with the reason, only where `bwrap` is not installed (`.ci/run` installs it)."""

import json
import os
import shutil
import socket
import threading
import time
import urllib.request

import pytest

from rlpost.errors import SandboxError
from rlpost.sandbox.client import SandboxClient
from rlpost.sandbox.isolation import BACKSTOP_GRACE_S
from rlpost.sandbox.runner import BASE_UID
from rlpost.sandbox.server import start_local, stop_local

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) not installed: apt-get install bubblewrap"),
]

SECRET = "rlpost-test-secret-3f9a1c"
CONCURRENCY = 2
SLACK_S = 5.0  # containment bound beyond the run's own timeout; generous for a loaded CI box


@pytest.fixture(scope="module")
def server():
    env = dict(os.environ, RLPOST_SANDBOX_TEST_SECRET=SECRET)
    # --max-queue 0: the refusal test below needs a full server to answer 429 at once.
    proc, url = start_local(env=env, args=["--max-concurrency", str(CONCURRENCY), "--output-limit-kb", "64",
                                           "--max-queue", "0"])
    yield proc, url
    stop_local(proc)
    assert proc.returncode == 0  # SIGTERM is a clean shutdown


@pytest.fixture
def client(server):
    return SandboxClient(server[1], retries=10, backoff_s=0.1)


def health(url):
    with urllib.request.urlopen(url + "/health", timeout=5) as r:
        return json.load(r)


def sandbox_processes():
    """Host pids owned by a slot uid: any left over means a run escaped its cleanup."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and BASE_UID <= os.stat(f"/proc/{entry}").st_uid < BASE_UID + CONCURRENCY:
                pids.append(int(entry))
        except FileNotFoundError:
            pass
    return pids


def timed_run(client, code, **kw):
    start = time.monotonic()
    result = client.run(code, **kw)
    return result, time.monotonic() - start


@pytest.fixture(autouse=True)
def still_serving(server, client):
    """After every test, hostile or not, a normal program still runs and nothing of the
    sandbox's processes is left on the host."""
    yield
    result = client.run("print(sum(range(10)))")
    assert (result.status, result.stdout, result.exit_code) == ("ok", "45\n", 0)
    assert server[0].poll() is None
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []


def test_health_and_normal_run(server, client):
    assert client.health()
    info = health(server[1])
    assert info["capacity"] == CONCURRENCY and info["isolation"] == "bwrap"
    result = client.run("import sys\nprint(sys.stdin.read().upper())\nsys.exit(3)", stdin="abc")
    assert (result.status, result.stdout, result.exit_code) == ("error", "ABC\n", 3)
    assert client.run("print(input()[::-1])", stdin="h\u00e9llo \u2713").stdout == "\u2713 oll\u00e9h\n"


def test_infinite_loop_times_out(client):
    result, elapsed = timed_run(client, "while True:\n    pass", timeout_s=2.0)
    assert result.status == "timeout"
    assert elapsed < 2.0 + SLACK_S


def test_fork_bomb_is_capped_and_killed(client):
    # Count how many children the program can hold at once: the pids cgroup / per-slot
    # RLIMIT_NPROC must stop it well short of exhausting the host.
    count = (
        "import os, time\nn = 0\n"
        "while n < 10000:\n"
        "    try:\n        pid = os.fork()\n    except OSError:\n        break\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\nprint(n)\n"
    )
    result = client.run(count, timeout_s=10.0)
    assert result.status == "ok", result.stderr
    # Limits.max_processes (32) less the outer bwrap, its PID-1 reaper and the program itself.
    assert 0 < int(result.stdout) <= 32 - 3
    # The classic bomb: every process forks forever. Contained, and killed at the deadline.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result, elapsed = timed_run(client, bomb, timeout_s=3.0)
    assert result.status == "timeout"
    assert elapsed < 3.0 + SLACK_S


def test_memory_bomb(client):
    result = client.run("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))", memory_mb=128)
    assert result.status == "memory"
    assert "MemoryError" in result.stderr
    # Under the limit the same kind of allocation is fine.
    assert client.run("x = bytearray(50 << 20)\nprint(len(x))", memory_mb=128).stdout == str(50 << 20) + "\n"


def test_memory_summed_over_forks(server, client):
    # Four children of 100 MiB each stay under the per-process RLIMIT_AS of 128 MiB; only
    # the run's memory cgroup (128 MiB + 72 MiB of tmpfs) can see the 400 MiB total.
    if health(server[1])["cgroups"] == "none":
        pytest.skip("no writable cgroup on this host: memory is capped per process only")
    code = (
        "import os, time\npids = []\nfor _ in range(4):\n    pid = os.fork()\n"
        "    if pid == 0:\n        x = b'x' * (100 << 20)\n        time.sleep(2)\n        os._exit(0)\n"
        "    pids.append(pid)\nprint([os.waitpid(p, 0)[1] for p in pids])\n"
    )
    result = client.run(code, timeout_s=20.0, memory_mb=128)
    assert result.status == "memory", result


def test_no_network_to_host_loopback(client):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    try:
        # Control: from this process the listener does accept, so the failure below is the sandbox's doing.
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        code = (
            "import socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n    print('connected')\n"
            "except OSError as e:\n    print('failed', type(e).__name__)\n"
        )
        result = client.run(code)
    finally:
        listener.close()
    assert result.status == "ok"
    assert result.stdout.startswith("failed"), result.stdout


def test_writes_outside_its_directory_fail(client, tmp_path):
    target = tmp_path / "escaped.txt"
    code = (
        "import os\nresults = []\n"
        f"for path in [{str(target)!r}, '/usr/escaped.txt', '/escaped.txt', '/dev/escaped.txt']:\n"
        "    try:\n        open(path, 'w').write('x')\n        results.append('wrote')\n"
        "    except OSError:\n        results.append('refused')\n"
        "open('inside.txt', 'w').write('fine')\nresults.append(open('inside.txt').read())\nprint(results)\n"
    )
    result = client.run(code)
    assert result.stdout == "['refused', 'refused', 'refused', 'refused', 'fine']\n", result.stderr
    assert not target.exists()
    assert not os.path.exists("/usr/escaped.txt") and not os.path.exists("/escaped.txt")


def test_cannot_read_service_environment(server, client):
    # The control: the variable really is in the server's environment.
    assert SECRET.encode() in open(f"/proc/{server[0].pid}/environ", "rb").read()
    code = (
        "import os, glob\nfound = [k for k, v in os.environ.items() if 'rlpost-test' in v]\n"
        f"for path in ['/proc/1/environ', '/proc/{server[0].pid}/environ', f'/proc/{{os.getppid()}}/environ']"
        " + glob.glob('/proc/*/environ'):\n"
        "    try:\n        if b'rlpost-test' in open(path, 'rb').read():\n            found.append(path)\n"
        "    except OSError:\n        pass\nprint(found)\n"
    )
    result = client.run(code)
    assert (result.status, result.stdout) == ("ok", "[]\n"), result.stderr


def test_huge_output_is_truncated(client):
    result, elapsed = timed_run(client, "while True:\n    print('x' * 10000)", timeout_s=10.0)
    assert result.status == "error"
    assert len(result.stdout.encode()) == 64 * 1024
    assert "output limit" in result.stderr
    assert elapsed < 10.0  # killed at the cap, not at the deadline


def test_concurrency_limit_and_client_retry(server, client):
    url = server[1]
    before = health(url)["rejected"]
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(client.run("import time\ntime.sleep(1.5)\nprint('done')")))
        for _ in range(CONCURRENCY + 1)
    ]
    for t in threads:
        t.start()
    # While both slots are busy, a client that may not retry is turned away (429)...
    deadline = time.monotonic() + 10
    while health(url)["busy"] < CONCURRENCY and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(SandboxError, match="429"):
        SandboxClient(url, retries=0).run("print(1)")
    for t in threads:
        t.join()
    # ...while the retrying clients all got through.
    assert [r.stdout for r in results] == ["done\n"] * (CONCURRENCY + 1)
    assert health(url)["rejected"] > before
    assert client.retried >= 1


def test_bad_request_is_refused_not_retried(client):
    with pytest.raises(SandboxError, match="400"):
        client.run("print(1)", timeout_s=10_000.0)
    assert client.retried == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="runs have uids of their own only when the server is root")
def test_runs_die_with_a_killed_server():
    # A second server (slots from BASE_UID, like the module's) killed hard mid-run must
    # not leave the program running on the host. bwrap's --die-with-parent ends it at
    # once, except when the kill lands in the instant before bwrap's child has set it
    # up; then the in-sandbox backstop ends it at its deadline plus BACKSTOP_GRACE_S.
    run_timeout_s = 4.0
    proc, url = start_local(args=["--max-concurrency", "1"])
    try:
        sleeper = SandboxClient(url, retries=0)
        slow = threading.Thread(
            target=lambda: pytest.raises(SandboxError, sleeper.run, "import time\ntime.sleep(60)",
                                         timeout_s=run_timeout_s),
            daemon=True,
        )
        slow.start()
        deadline = time.monotonic() + 10
        while health(url)["busy"] < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_processes()
    finally:
        proc.kill()
        stop_local(proc)
    slow.join(timeout=10)
    deadline = time.monotonic() + run_timeout_s + BACKSTOP_GRACE_S + SLACK_S
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []


def test_backstop_ends_a_run_whose_server_never_kills_it(tmp_path):
    # The bwrap command line alone, with nobody watching the deadline: the in-sandbox
    # timeout still ends a sleeping program at its deadline plus BACKSTOP_GRACE_S.
    import subprocess

    from rlpost.sandbox.isolation import bwrap_argv, default_python, find_bwrap

    main = tmp_path / "main.py"
    main.write_text("import time\ntime.sleep(60)\n")
    os.chmod(tmp_path, 0o755)
    start = time.monotonic()
    proc = subprocess.run(bwrap_argv(find_bwrap(), default_python(), main, 1 << 20, wall_limit_s=1.0),
                          capture_output=True, timeout=60)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr
    assert 1.0 + BACKSTOP_GRACE_S - 0.5 < elapsed < 1.0 + BACKSTOP_GRACE_S + SLACK_S
