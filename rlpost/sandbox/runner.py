"""Run one program under every limit and turn what happened into a ``RunResult``.

Limits, and what enforces each (docs/sandbox.md has the full isolation model):

- wall clock: this process kills the run at ``timeout_s`` (status ``timeout``);
- CPU time: RLIMIT_CPU at ``ceil(timeout_s)`` sends SIGXCPU (status ``timeout``);
- memory: RLIMIT_AS per process plus a memory cgroup over the whole run where one can be
  created (status ``memory``);
- processes: a pids cgroup, and RLIMIT_NPROC on a uid used by this slot alone;
- output: stdout and stderr are read incrementally and capped; past the cap the run is
  killed (status ``error``), so a flood never sits in the server's memory;
- disk: the working directory is a tmpfs of ``Limits.disk_mb``; RLIMIT_FSIZE per file.
"""

from __future__ import annotations

import json
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlpost.sandbox.cgroups import CgroupFactory, RunCgroup
from rlpost.sandbox.isolation import SANDBOX_ENV, SHM_BYTES, bwrap_argv, default_python, find_bwrap
from rlpost.sandbox.types import Limits, RunRequest, RunResult

LAUNCHER = str(Path(__file__).with_name("launch.py"))
BASE_UID = 61000  # slot k runs as uid/gid base_uid + k; keep this range free of real users
_OOM_MARKERS = ("MemoryError", "Cannot allocate memory", "std::bad_alloc", "out of memory")


class _Capture:
    """Keeps the first ``cap`` bytes of a stream and remembers whether more came."""

    def __init__(self, cap: int):
        self.cap, self.data, self.overflow = cap, bytearray(), False

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        self.data += chunk[:room]
        self.overflow = self.overflow or len(chunk) > room

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class Sandbox:
    """Runs programs in isolation; thread-safe (each run has its own temp dir, cgroup and
    slot uid). The HTTP server owns the slots and calls ``run`` from its threads."""

    def __init__(self, limits: Limits = Limits(), python: str | None = None, base_uid: int = BASE_UID):
        self.limits, self.base_uid = limits, base_uid
        self.bwrap = find_bwrap()
        self.python = python or default_python()
        self.cgroups = CgroupFactory()
        self.drop_uid = os.geteuid() == 0

    def describe(self) -> dict:
        return {"isolation": "bwrap", "cgroups": self.cgroups.describe(), "per_slot_uid": self.drop_uid}

    def run(self, request: RunRequest, slot: int = 0, workspace: Path | None = None, uid: int | None = None) -> RunResult:
        """Run ``request`` in a fresh tmpfs, or in ``workspace`` (a session's directory on
        the host, kept between calls) as ``uid`` (the session's own uid; None: the slot's)."""
        host_dir = Path(tempfile.mkdtemp(prefix="rlpost-sandbox-"))
        cgroup = None
        try:
            os.chmod(host_dir, 0o755)  # bwrap runs as the slot uid and must read main.py
            main = host_dir / ("main.sh" if request.language == "bash" else "main.py")
            main.write_text(request.code, encoding="utf-8")
            (host_dir / "stdin").write_text(request.stdin, encoding="utf-8")
            disk = self.limits.disk_mb << 20
            # The tmpfs pages the run writes are charged to its cgroup as well.
            cgroup = self.cgroups.create(self.limits.max_processes, (request.memory_mb << 20) + disk + SHM_BYTES)
            argv = bwrap_argv(self.bwrap, self.python, main, disk, request.timeout_s,
                              language=request.language, workspace=workspace)
            if uid is None and self.drop_uid:
                uid = self.base_uid + slot
            with open(host_dir / "stdin", "rb") as stdin:
                return self._supervise(request, self._spawn(request, uid, cgroup, argv, stdin), cgroup)
        finally:
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(host_dir, ignore_errors=True)

    def _spawn(self, request: RunRequest, uid: int | None, cgroup: RunCgroup | None, argv, stdin) -> subprocess.Popen:
        cpu = math.ceil(request.timeout_s)
        rlimits = {
            "RLIMIT_AS": [request.memory_mb << 20] * 2,
            "RLIMIT_CPU": [cpu, cpu + 1],  # soft: SIGXCPU; hard: SIGKILL one second later
            "RLIMIT_FSIZE": [self.limits.max_file_mb << 20] * 2,
            "RLIMIT_CORE": [0, 0],
            "RLIMIT_NOFILE": [256, 256],
        }
        if uid is not None:  # as a non-root user it would count all of that user's processes
            rlimits["RLIMIT_NPROC"] = [self.limits.max_processes] * 2
        spec = {
            "cgroup_procs": cgroup.procs_files if cgroup else [],
            "rlimits": rlimits,
            "uid": uid,
            "gid": uid,
            "env": SANDBOX_ENV,
            "server_pid": os.getpid(),
        }
        cmd = [sys.executable, "-I", "-S", LAUNCHER, json.dumps(spec), *argv]
        return subprocess.Popen(
            cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env={}, close_fds=True, start_new_session=True,
        )

    def _supervise(self, request: RunRequest, proc: subprocess.Popen, cgroup: RunCgroup | None) -> RunResult:
        out, err = _Capture(self.limits.output_limit_bytes), _Capture(self.limits.output_limit_bytes)
        deadline = time.monotonic() + request.timeout_s
        timed_out = self._pump(proc, out, err, deadline)
        if not timed_out and not (out.overflow or err.overflow):
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                timed_out = True
        if proc.poll() is None:
            _kill(proc, cgroup)
        proc.stdout.close()
        proc.stderr.close()
        exit_code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        return _classify(request, exit_code, out, err, timed_out, cgroup is not None and cgroup.oom_killed())

    @staticmethod
    def _pump(proc: subprocess.Popen, out: _Capture, err: _Capture, deadline: float) -> bool:
        """Read both pipes until EOF, the deadline (returns True) or an overflow."""
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ, out)
            sel.register(proc.stderr, selectors.EVENT_READ, err)
            while sel.get_map():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return True
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    else:
                        key.data.add(chunk)
                if out.overflow or err.overflow:
                    return False
        return False


def _kill(proc: subprocess.Popen, cgroup: RunCgroup | None) -> None:
    # Killing the outer bwrap takes the PID namespace with it (--die-with-parent makes
    # its init die, and the kernel then kills every process in the namespace); the
    # cgroup pass catches anything that escaped the process group.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if cgroup is not None:
        cgroup.kill_all()
    proc.wait()


def _classify(req: RunRequest, exit_code: int, out: _Capture, err: _Capture, timed_out: bool, oom: bool) -> RunResult:
    stderr = err.text()
    if timed_out or exit_code == 128 + signal.SIGXCPU:
        status = "timeout"
        note = f"wall-clock limit of {req.timeout_s:g} s reached" if timed_out else "CPU-time limit reached"
    elif oom or (exit_code != 0 and any(m in stderr[-4096:] for m in _OOM_MARKERS)):
        status, note = "memory", f"memory limit of {req.memory_mb} MiB reached"
    elif out.overflow or err.overflow:
        which = "stdout" if out.overflow else "stderr"
        status, note = "error", f"{which} passed the output limit of {out.cap} bytes; truncated and killed"
    else:
        status, note = ("ok" if exit_code == 0 else "error"), ""
    if note:
        stderr += ("" if stderr.endswith("\n") or not stderr else "\n") + f"[sandbox] {note}\n"
    return RunResult(status, out.text(), stderr, exit_code)
