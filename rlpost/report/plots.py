"""The report's panels: which metrics each plot shows, and PNG rendering with
matplotlib's Agg canvas (no display needed)."""

from __future__ import annotations

import base64
import io
import re
from dataclasses import dataclass

from rlpost.report.data import ReportError, RunData, Series

# Step stages of rlpost.step.controller, bottom to top in the stacked time plot.
STAGES = ("rollout", "reward", "old_logprobs", "ref_logprobs", "train", "weight_sync", "eval")


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]  # lines; for the stacked time panel, the layers
    stacked: bool = False


def _pick(run: RunData, keys) -> tuple[Series, ...]:
    return tuple(s for s in (run.series(k) for k in keys) if s is not None)


def build_panels(run: RunData) -> list[Panel]:
    """Panels with at least one logged series, in a fixed order."""
    keys = run.keys()
    components = [k for k in keys if re.fullmatch(r"reward/.+_mean", k) and k != "reward/mean"]
    eval_keys = ["eval/accuracy"] + [k for k in keys if k.startswith(("eval/mean@", "eval/pass@"))]
    panels = [
        Panel("Reward (train samples)", "reward", _pick(run, ["reward/mean", *components])),
        Panel("Held-out accuracy", "accuracy", _pick(run, eval_keys)),
        Panel("KL", "nats", _pick(run, ["policy/kl", "policy/approx_kl_old", "reward/seq_kl_mean"])),
        Panel("Entropy", "nats / token", _pick(run, ["policy/entropy"])),
        Panel("Response length", "tokens", _pick(run, ["response/length_mean", "response/length_max"])),
        Panel("Clip fraction", "fraction", _pick(run, ["policy/clip_frac", "response/clip_ratio"])),
        Panel("Step time breakdown", "seconds", _timing_layers(run), stacked=True),
    ]
    return [p for p in panels if p.series]


def _timing_layers(run: RunData) -> tuple[Series, ...]:
    """``timing/<stage>_s`` on every step that has any timing (0 where a stage did
    not run), plus ``other`` = ``timing/step_s`` minus the stages inside it."""
    rows = [r for r in run.records if any(k.startswith("timing/") for k in r)]
    stages = [s for s in STAGES if any(f"timing/{s}_s" in r for r in rows)]
    known = {f"timing/{s}_s" for s in STAGES} | {"timing/step_s"}
    stages += sorted({k[len("timing/"):-2] for r in rows for k in r
                      if k.startswith("timing/") and k.endswith("_s") and k not in known})
    if not rows:
        return ()
    steps = tuple(r["step"] for r in rows)

    def value(r, key):
        v = r.get(key, 0.0)
        return float(v) if isinstance(v, (int, float)) else 0.0

    layers = [Series(f"timing/{s}_s", steps, tuple(value(r, f"timing/{s}_s") for r in rows)) for s in stages]
    # eval runs outside the step, so timing/step_s does not include it.
    inside = [s for s in stages if s != "eval"]
    other = tuple(max(value(r, "timing/step_s") - sum(value(r, f"timing/{s}_s") for s in inside), 0.0)
                  if "timing/step_s" in r else 0.0 for r in rows)
    if any(other):
        layers.append(Series("timing/other_s", steps, other))
    return tuple(layers)


def render_png(panel: Panel) -> str:
    """The panel as a base64-encoded PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ReportError("the run report draws its plots with matplotlib: pip install matplotlib "
                          "(or rlpost[report])") from exc
    # A Figure on the Agg canvas, not pyplot: no global figure state to leak and no
    # switching of the backend of a notebook that imported this module.
    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if panel.stacked:
        bottom = [0.0] * len(panel.series[0].steps)
        for s in panel.series:
            ax.bar(s.steps, s.values, bottom=bottom, width=0.85, label=_label(s.key))
            bottom = [b + v for b, v in zip(bottom, s.values)]
    else:
        for s in panel.series:
            marker = "o" if len(s.steps) <= 30 else None
            ax.plot(s.steps, s.values, marker=marker, markersize=3, linewidth=1.4, label=_label(s.key))
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.stacked:  # many layers: the legend goes below the bars, not over them
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.22))
    else:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _label(key: str) -> str:
    return key[len("timing/"):-2] if key.startswith("timing/") else key
