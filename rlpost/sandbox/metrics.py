"""The sandbox server's counters, as JSON for ``/health`` and in the Prometheus text
exposition format (version 0.0.4) for ``/metrics``. Written by hand: it is a few lines
and keeps the server free of dependencies beyond the standard library."""

from __future__ import annotations

import threading

# Outcomes of a POST /run or a session's run: the run's own status when it ran, else
# why it did not (no_session: 404, an unknown, deleted or reaped session; session_busy:
# 409, a call while the session's previous one still runs).
OUTCOMES = ("ok", "timeout", "memory", "error", "queue_full", "wait_expired", "unauthorized",
            "bad_request", "internal_error", "no_session", "session_busy")
# Seconds; a run's wall time is bounded by its timeout (at most --max-timeout-s).
BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)  # the last one is +Inf
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[next((i for i, b in enumerate(BUCKETS) if value <= b), len(BUCKETS))] += 1
        self.total += value
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, count in zip([*map(repr, BUCKETS), "+Inf"], self.counts):
            cumulative += count
            out.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
        return [*out, f"{name}_sum {self.total}", f"{name}_count {self.n}"]


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.outcomes = dict.fromkeys(OUTCOMES, 0)
        self.run_seconds = Histogram()
        self.queue_wait_seconds = Histogram()

    def outcome(self, name: str) -> None:
        with self._lock:
            self.outcomes[name] += 1

    def ran(self, status: str, run_s: float, wait_s: float) -> None:
        with self._lock:
            self.outcomes[status] += 1
            self.run_seconds.observe(run_s)
            self.queue_wait_seconds.observe(wait_s)

    def summary(self) -> dict[str, int]:
        """The ``/health`` counters; ``served`` and ``rejected`` keep their old meaning
        (runs answered 200, requests answered 429)."""
        with self._lock:
            o = dict(self.outcomes)
        served = o["ok"] + o["timeout"] + o["memory"] + o["error"]
        return {"served": served, "rejected": o["queue_full"] + o["wait_expired"], "unauthorized": o["unauthorized"]}

    def prometheus(self, busy: int, queued: int, capacity: int, max_queue: int,
                   sessions: tuple[int, int, dict[str, int]] = (0, 0, {})) -> str:
        """``sessions``: (live sessions, --max-sessions, session events by name)."""
        live, max_sessions, events = sessions
        with self._lock:
            lines = ["# HELP rlpost_sandbox_requests_total Runs requested (POST /run, POST /sessions/ID/run) by "
                     "outcome (unauthorized: every route).",
                     "# TYPE rlpost_sandbox_requests_total counter"]
            lines += [f'rlpost_sandbox_requests_total{{outcome="{k}"}} {v}' for k, v in self.outcomes.items()]
            for name, value, help_ in (
                ("busy_slots", busy, "Runs in progress."),
                ("queued_requests", queued, "Requests waiting for a slot."),
                ("capacity_slots", capacity, "Runs allowed at once (--max-concurrency)."),
                ("max_queue", max_queue, "Requests allowed to wait (--max-queue)."),
                ("live_sessions", live, "Sessions alive now."),
                ("max_sessions", max_sessions, "Sessions allowed at once (--max-sessions)."),
            ):
                lines += [f"# HELP rlpost_sandbox_{name} {help_}", f"# TYPE rlpost_sandbox_{name} gauge",
                          f"rlpost_sandbox_{name} {value}"]
            lines += ["# HELP rlpost_sandbox_sessions_total Session events: created, deleted, reaped (idle), "
                      "refused (--max-sessions reached), over_disk (closed past --disk-mb).",
                      "# TYPE rlpost_sandbox_sessions_total counter"]
            lines += [f'rlpost_sandbox_sessions_total{{event="{k}"}} {v}' for k, v in events.items()]
            for name, hist, help_ in (
                ("run_seconds", self.run_seconds, "Wall time of a run in its slot."),
                ("queue_wait_seconds", self.queue_wait_seconds, "Time a run waited for its slot."),
            ):
                lines += [f"# HELP rlpost_sandbox_{name} {help_}", f"# TYPE rlpost_sandbox_{name} histogram",
                          *hist.lines(f"rlpost_sandbox_{name}")]
        return "\n".join(lines) + "\n"
