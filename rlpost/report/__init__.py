"""Run reports: ``python -m rlpost.report <output_dir> [--out report.html]``.

Reads a run directory (``metrics.jsonl``, and ``config.yaml`` / ``samples.jsonl``
when present; a run still in progress works) and writes one self-contained HTML
page with the training curves and sampled completions.
"""

from rlpost.report.data import ReportError, RunData, Series, load_run
from rlpost.report.html import render_report
from rlpost.report.plots import Panel, build_panels

__all__ = ["Panel", "ReportError", "RunData", "Series", "build_panels", "load_run", "render_report",
           "write_report"]


def write_report(output_dir, out=None, samples_per_step: int = 4, sample_steps: int = 4):
    """Render the report of ``output_dir`` to ``out`` (default ``<output_dir>/report.html``);
    returns the path written."""
    from pathlib import Path

    from rlpost.utils.files import write_atomic

    run = load_run(output_dir)
    path = Path(out) if out is not None else Path(output_dir) / "report.html"
    write_atomic(path, render_report(run, samples_per_step, sample_steps))  # a refreshing browser never sees half
    return path
