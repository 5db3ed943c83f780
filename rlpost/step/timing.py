"""Per-step phase timings, shared by the synchronous and the overlapped loops."""

from __future__ import annotations

import time


class Timer(dict):
    """Collects ``timing/<name>_s`` entries: ``with timer("rollout"): ...``."""

    def __call__(self, name: str):
        timer = self

        class _Span:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer[f"timing/{name}_s"] = timer.get(f"timing/{name}_s", 0.0) + time.perf_counter() - self.t0

        return _Span()
