"""Stateful sandbox sessions: a workspace that lives across many runs of one episode.

A session is created (optionally with files uploaded into its workspace), used for
many runs (Python programs or bash scripts, each under every limit of a one-off run:
``rlpost.sandbox.runner``), and deleted, or reaped once idle for ``session_idle_s``.

Contract:
- A session's workspace is a host directory of its own, mounted as /sandbox in each of
  its runs and nowhere else: a run sees its own session's files and no other's.
- When the server runs as root, each session owns a uid of its own
  (``base_uid + max_concurrency + index``), its workspace is mode 0700 and, where the
  server may mount, a tmpfs of ``disk_mb`` (the same disk cap as a one-off run). Where
  it may not, the workspace is a plain directory whose size is checked after each run;
  a session past the cap is closed.
- One run at a time per session (``checkout``/``checkin``); a second concurrent call is
  refused (409) rather than queued, since an episode's calls are sequential.
- The reaper never removes a session while one of its calls is queued or running; a
  delete that arrives then takes effect when the call ends.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from rlpost.sandbox.types import Limits

MS_NOSUID, MS_NODEV = 2, 4
MNT_DETACH = 2

# Why a session id is unknown; the 404 says which, so a caller can tell a reaped session
# from a typo. Remembered for a bounded number of recently ended sessions.
_GONE_MEMORY = 4096


class SessionBusy(Exception):
    """A call is already running in this session."""


class SessionGone(Exception):
    """No such session: never created, deleted, or reaped."""


class SessionsFull(Exception):
    """``max_sessions`` sessions are alive."""


class UploadError(ValueError):
    """The files given at creation break a limit or name a bad path."""


@dataclass
class Session:
    id: str
    index: int  # which of the max_sessions uid/slot numbers it holds
    workspace: Path
    uid: int | None
    mounted: bool
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    doomed: bool = False  # deleted while busy: removed at checkin
    runs: int = 0


def check_files(files: Any, limits: Limits) -> dict[str, str]:
    """Validate the upload ``{relative/path: text}``; raises ``UploadError`` naming the problem."""
    if files is None:
        return {}
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise UploadError("files must be an object of {relative path: file text}")
    if len(files) > limits.max_upload_files:
        raise UploadError(f"at most {limits.max_upload_files} files may be uploaded, got {len(files)}")
    total = sum(len(v.encode()) for v in files.values())
    cap = min(limits.max_upload_bytes, limits.disk_mb << 20)
    if total > cap:
        raise UploadError(f"uploaded files total {total} bytes; the limit is {cap} bytes")
    for name in files:
        parts = PurePosixPath(name).parts
        if (not parts or name.startswith("/") or "\0" in name or any(p in ("..", ".") for p in parts)
                or any(len(p.encode()) > 255 for p in parts)):
            raise UploadError(f"bad file path {name!r}: give a relative path without '..'")
    return files


class SessionStore:
    """The live sessions of one server. Thread-safe."""

    def __init__(self, limits: Limits, base_uid: int | None):
        """``base_uid``: the first session uid when the server runs as root, else None
        (runs keep the server's uid)."""
        self.limits, self.base_uid = limits, base_uid
        self._sessions: dict[str, Session] = {}
        self._free = list(range(limits.max_sessions - 1, -1, -1))
        self._gone: dict[str, str] = {}
        self._lock = threading.Lock()
        self.events = {"created": 0, "deleted": 0, "reaped": 0, "refused": 0, "over_disk": 0}
        self.can_mount = os.geteuid() == 0 and _mount_works()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        return {"session_disk": "tmpfs" if self.can_mount else "checked after each run"}

    def count(self) -> int:
        with self._lock:
            return len(self._sessions)

    def start_reaper(self) -> None:
        self._reaper = threading.Thread(target=self._reap_loop, daemon=True, name="rlpost-session-reaper")
        self._reaper.start()

    def create(self, files: dict[str, str]) -> Session:
        with self._lock:
            if not self._free:
                self.events["refused"] += 1
                raise SessionsFull(f"all {self.limits.max_sessions} sessions are in use")
            index = self._free.pop()
        try:
            session = self._make(index, files)
        except BaseException:
            with self._lock:
                self._free.append(index)
            raise
        with self._lock:
            self._sessions[session.id] = session
            self.events["created"] += 1
        return session

    def _make(self, index: int, files: dict[str, str]) -> Session:
        uid = None if self.base_uid is None else self.base_uid + index
        workspace = Path(tempfile.mkdtemp(prefix="rlpost-session-"))
        mounted = False
        try:
            if self.can_mount:
                options = f"size={self.limits.disk_mb << 20},mode=0700"
                if uid is not None:
                    options += f",uid={uid},gid={uid}"
                _mount_tmpfs(workspace, options)
                mounted = True
            for name, text in files.items():
                path = workspace / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            if uid is not None:
                for path in [workspace, *workspace.rglob("*")]:
                    os.lchown(path, uid, uid)
            os.chmod(workspace, 0o700 if uid is not None else 0o755)
        except OSError as e:
            _remove_workspace(workspace, mounted)
            raise UploadError(f"cannot write the uploaded files: {e}") from e
        return Session(secrets.token_urlsafe(16), index, workspace, uid, mounted)

    def checkout(self, session_id: str) -> Session:
        """Mark the session busy for one call; ``SessionGone`` / ``SessionBusy``."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.doomed:
                raise SessionGone(self._why_gone(session_id))
            if session.busy:
                raise SessionBusy(f"session {session_id} is already running a call; calls in a session are sequential")
            session.busy = True
            return session

    def checkin(self, session: Session) -> str | None:
        """End the call. Returns why the session was closed by it, or None."""
        over = None
        if not session.mounted and _disk_usage(session.workspace) > self.limits.disk_mb << 20:
            over = f"the session's workspace passed the disk limit of {self.limits.disk_mb} MiB; session closed"
        with self._lock:
            session.busy, session.last_used = False, time.monotonic()
            session.runs += 1
            if over:
                self.events["over_disk"] += 1
            if session.doomed or over:
                self._drop(session, "deleted" if session.doomed else "over_disk")
            else:
                return None
        _remove_workspace(session.workspace, session.mounted)
        return over

    def delete(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            if session is None or session.doomed:
                raise SessionGone(self._why_gone(session_id))
            if session.busy:  # the running call's checkin removes it
                session.doomed = True
                self.events["deleted"] += 1
                return
            self._drop(session, "deleted")
            self.events["deleted"] += 1
        _remove_workspace(session.workspace, session.mounted)

    def reap(self, now: float | None = None) -> int:
        """Remove sessions idle past ``session_idle_s``; returns how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [s for s in self._sessions.values()
                    if not s.busy and now - s.last_used > self.limits.session_idle_s]
            for s in idle:
                self._drop(s, f"reaped after {self.limits.session_idle_s:g} s idle")
                self.events["reaped"] += 1
        for s in idle:
            _remove_workspace(s.workspace, s.mounted)
        return len(idle)

    def close(self) -> None:
        """Stop the reaper and remove every session (server shutdown)."""
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            for s in sessions:
                self._drop(s, "the server shut down")
        for s in sessions:
            _remove_workspace(s.workspace, s.mounted)

    def _drop(self, session: Session, why: str) -> None:
        """Under the lock: forget the session and free its index."""
        del self._sessions[session.id]
        self._free.append(session.index)
        self._gone[session.id] = why
        if len(self._gone) > _GONE_MEMORY:
            self._gone.pop(next(iter(self._gone)))

    def _why_gone(self, session_id: str) -> str:
        live = self._sessions.get(session_id)
        why = "deleted" if live is not None and live.doomed else self._gone.get(session_id)
        return f"session {session_id} is gone ({why})" if why else f"no session {session_id} on this server"

    def _reap_loop(self) -> None:
        period = min(max(self.limits.session_idle_s / 4, 0.05), 5.0)
        while not self._stop.wait(period):
            self.reap()


def _mount_works() -> bool:
    probe = Path(tempfile.mkdtemp(prefix="rlpost-session-probe-"))
    try:
        _mount_tmpfs(probe, "size=65536")
    except OSError:
        probe.rmdir()
        return False
    _remove_workspace(probe, True)
    return True


def _mount_tmpfs(path: Path, options: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount tmpfs on {path}: {os.strerror(errno)}")


def _remove_workspace(path: Path, mounted: bool) -> None:
    if mounted:
        # Lazy: a process of a killed run may still hold a file open for a moment.
        ctypes.CDLL(None, use_errno=True).umount2(str(path).encode(), MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)


def _disk_usage(path: Path) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total
