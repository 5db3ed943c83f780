"""Per-run cgroups (pids + memory), used when the server may create them.

Rlimits are per process, so a program that forks 32 children each using its
RLIMIT_AS could still take 32x the memory; a cgroup caps the sum. Where no cgroup is
writable (rootless hosts, locked-down containers), runs still have rlimits, the per-slot
uid's RLIMIT_NPROC and the PID namespace; ``describe()`` tells the health endpoint which.

Supports cgroup v1 (a hierarchy per controller, what this project's containers have)
and a pure cgroup v2 mount whose own cgroup delegates pids and memory.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """controller (``"pids"``, ``"memory"``, ``""`` for v2) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path.lstrip("/")
    return paths


def _parents() -> dict[str, Path] | None:
    """Where run cgroups go, per controller, or None when no usable hierarchy exists."""
    try:
        own = _own_paths()
    except OSError:
        return None
    if (ROOT / "cgroup.controllers").exists():  # pure v2
        parent = ROOT / own.get("", "")
        try:
            (parent / "cgroup.subtree_control").write_text("+pids +memory")
        except OSError:
            pass  # already delegated, or not allowed: the probe below decides
        enabled = (parent / "cgroup.subtree_control").read_text().split()
        return {"v2": parent} if {"pids", "memory"} <= set(enabled) else None
    dirs = {c: ROOT / c / own[c] for c in ("pids", "memory") if c in own and (ROOT / c).is_dir()}
    return dirs if len(dirs) == 2 else None


@dataclass
class RunCgroup:
    """One run's cgroup(s). The launcher joins them before it drops privileges, so every
    process of the run, forks included, is accounted for from the first instruction."""

    dirs: list[Path]
    v2: bool

    @property
    def procs_files(self) -> list[str]:
        return [str(d / "cgroup.procs") for d in self.dirs]

    def oom_killed(self) -> bool:
        events = self.dirs[0] / "memory.events" if self.v2 else self.dirs[1] / "memory.oom_control"
        try:
            for line in events.read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and int(value) > 0:
                    return True
        except (OSError, ValueError):
            pass
        return False

    def kill_all(self) -> None:
        # v1 has no cgroup.kill; killing twice catches a fork that raced the first pass.
        for _ in range(2):
            for procs in self.procs_files:
                try:
                    pids = Path(procs).read_text().split()
                except OSError:
                    continue
                for pid in pids:
                    try:
                        os.kill(int(pid), signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(50):  # killed processes leave the cgroup a moment after SIGKILL
                try:
                    d.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    self.kill_all()
                    time.sleep(0.02)


class CgroupFactory:
    """Creates a fresh cgroup per run under this process's own cgroup(s)."""

    def __init__(self) -> None:
        self._parents = _parents() if os.geteuid() == 0 or os.access(ROOT, os.W_OK) else None
        if self._parents is not None:
            probe = self.create(max_pids=4, memory_bytes=64 << 20)
            if probe is None:
                self._parents = None
            else:
                probe.remove()

    def describe(self) -> str:
        if self._parents is None:
            return "none"
        return "v2 pids+memory" if "v2" in self._parents else "v1 pids+memory"

    def create(self, max_pids: int, memory_bytes: int) -> RunCgroup | None:
        if self._parents is None:
            return None
        name = f"rlpost-sandbox-{uuid.uuid4().hex[:12]}"
        dirs = [p / name for p in self._parents.values()]
        cg = RunCgroup(dirs, v2="v2" in self._parents)
        try:
            for d in dirs:
                d.mkdir()
            if cg.v2:
                (dirs[0] / "pids.max").write_text(str(max_pids))
                (dirs[0] / "memory.max").write_text(str(memory_bytes))
                if (dirs[0] / "memory.swap.max").exists():
                    (dirs[0] / "memory.swap.max").write_text("0")
            else:
                (dirs[0] / "pids.max").write_text(str(max_pids))
                (dirs[1] / "memory.limit_in_bytes").write_text(str(memory_bytes))
                memsw = dirs[1] / "memory.memsw.limit_in_bytes"
                if memsw.exists():  # no swapping past the limit where swap accounting is on
                    memsw.write_text(str(memory_bytes))
        except OSError:
            cg.remove()
            return None
        return cg
