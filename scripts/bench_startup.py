"""Time from the command to the first step line of a training run, and the CPU each
process spent by then (issue #17's "fast start").

    .venv/bin/python scripts/bench_startup.py --runs 3 [-- extra overrides]

Runs ``python -m rlpost.train +recipe=grpo_math trainer.total_steps=1`` (the tiny
model) ``--runs`` times, each in a fresh output folder. While a run starts, the
process tree's CPU times are sampled every 50 ms; at the first ``step 0`` line (the
step-0 eval, after every component is ready) it prints the seconds since the
command started and the run's own "components ready" line; at that line, the CPU
seconds each kind of process had spent (driver, trainer, rollout, reward, Ray's own). The first run also warms
the caches a fresh checkout fills once (built-in model, prompt cache): it is
reported, and ``--skip-first`` leaves it out of the summary.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def kind(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    try:
        cmd = " ".join(proc.cmdline())
    except psutil.Error:
        return "gone"
    for name in ("TrainerActor", "RolloutActor", "RewardActor", "EnvActor", "CriticActor"):
        if name in cmd:
            return name.replace("Actor", "").lower()
    if "ray::IDLE" in cmd or "default_worker.py" in cmd:
        return "ray worker (idle)"
    return "ray"


def one_run(extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix="rlpost-startup-")
    cmd = [sys.executable, "-u", "-m", "rlpost.train", "+recipe=grpo_math", "trainer.total_steps=1",
           f"output_dir={out}", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    root = psutil.Process(proc.pid)
    cpu: dict[int, tuple[str, float]] = {}
    first_step = ready_line = None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    ready_cpu: dict[str, float] = {}
    while first_step is None and proc.poll() is None:
        if ready_line is not None and not ready_cpu:
            for k, seconds in cpu.values():
                ready_cpu[k] = ready_cpu.get(k, 0.0) + seconds
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                known = cpu.get(p.pid, ("", 0.0))[0]
                # an idle worker becomes an actor: its title changes
                cpu[p.pid] = (known if known not in ("", "ray worker (idle)") else kind(p, proc.pid),
                              t.user + t.system)
            except psutil.Error:
                pass
        for line in list(lines):
            if "components ready" in line and ready_line is None:
                ready_line = line.strip()
            if line.startswith("step 0"):
                first_step = time.perf_counter() - t0
        time.sleep(0.05)
    proc.wait(timeout=300)
    reader.join(10)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{''.join(lines)}")
    return {"first_step_s": first_step, "ready": ready_line, "cpu": ready_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-first", action="store_true", help="leave the first (cache-warming) run out of the summary")
    args, extra = ap.parse_known_args()
    extra = [x for x in extra if x != "--"]
    results = []
    for i in range(args.runs):
        load = os.getloadavg()[0]
        r = one_run(extra)
        total = sum(r["cpu"].values())
        parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["cpu"].items(), key=lambda kv: -kv[1]))
        print(f"run {i + 1}: first step line at {r['first_step_s']:.1f} s (load {load:.1f}); CPU {total:.1f} s: {parts}")
        print(f"    {r['ready']}")
        results.append(r)
    kept = results[1:] if args.skip_first and len(results) > 1 else results
    times = [r["first_step_s"] for r in kept]
    cpus = [sum(r["cpu"].values()) for r in kept]
    print(f"median first step {statistics.median(times):.1f} s (min {min(times):.1f}), "
          f"median CPU {statistics.median(cpus):.1f} s over {len(kept)} runs")


if __name__ == "__main__":
    main()
