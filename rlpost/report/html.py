"""One self-contained HTML page for a run: plots as inline base64 PNGs, a table of
sampled completions, the config, and the plotted series as JSON in
``<script type="application/json" id="report-data">`` (what tests and other tools
read back). No external files, fonts or scripts, so the page can be mailed or
attached to an issue as is.
"""

from __future__ import annotations

import html
import json
import math

import yaml

from rlpost.report.data import RunData, finite_or_none
from rlpost.report.plots import build_panels, render_png

SUMMARY_KEYS = ["reward/mean", "eval/accuracy", "policy/kl", "policy/entropy", "response/length_mean",
                "policy/clip_frac", "timing/step_s"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:24px;color:#1b1f24;max-width:1400px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} .warn{color:#a15c00}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.grid img{width:100%;border:1px solid #e4e4e4;border-radius:4px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ddd;padding:4px 8px;vertical-align:top}
th{background:#f5f5f5;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
td.text{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:12px;max-width:520px}
pre{background:#f7f7f7;padding:10px;font-size:12px;overflow:auto}
"""

# Fills the sample table's step filter from the embedded data. Marks the page as
# rendered (body[data-report-ready] = number of series, body[data-images-decoded] =
# plots the browser could decode) so a headless browser test can tell that the
# script ran to the end and every PNG is valid.
_JS = """
(function () {
  var data = JSON.parse(document.getElementById("report-data").textContent);
  var select = document.getElementById("sample-step");
  if (select) {
    var steps = [];
    data.samples.forEach(function (row) { if (steps.indexOf(row.step) < 0) steps.push(row.step); });
    steps.forEach(function (step) {
      var option = document.createElement("option");
      option.value = String(step); option.textContent = "step " + step; select.appendChild(option);
    });
    select.addEventListener("change", function () {
      document.querySelectorAll("#samples tbody tr").forEach(function (tr) {
        tr.style.display = (!select.value || tr.dataset.step === select.value) ? "" : "none";
      });
    });
  }
  document.body.dataset.reportReady = String(Object.keys(data.series).length);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    document.body.dataset.imagesDecoded = String(imgs.filter(function (i) { return i.naturalWidth > 0; }).length);
  });
})();
"""


def render_report(run: RunData, samples_per_step: int = 4, sample_steps: int = 4) -> str:
    panels = build_panels(run)
    samples = pick_samples(run.samples, sample_steps, samples_per_step)
    data = {
        "output_dir": str(run.output_dir),
        "steps": [r["step"] for r in run.records],
        "panels": [{"title": p.title, "keys": [s.key for s in p.series]} for p in panels],
        "series": {s.key: {"steps": list(s.steps), "values": [finite_or_none(v) for v in s.values]}
                   for p in panels for s in p.series},
        "samples": samples,
    }
    body = [
        _header(run),
        _summary(run),
        "<h2>Training curves</h2>",
        '<div class="grid">' + "".join(
            f'<figure><img alt="{html.escape(p.title)}" src="data:image/png;base64,{render_png(p)}"></figure>'
            for p in panels) + "</div>",
        _samples_table(samples),
        _config(run),
    ]
    # "<" is escaped inside the JSON so no string in it can close the script element.
    payload = json.dumps(data, allow_nan=False).replace("<", "\\u003c")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>rlpost report: {html.escape(run.output_dir.name)}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}"
            f'<script type="application/json" id="report-data">{payload}</script>'
            f"<script>{_JS}</script></body></html>\n")


def pick_samples(samples: list[dict], num_steps: int, per_step: int) -> list[dict]:
    """Up to ``per_step`` rows from each of ``num_steps`` logged steps, spread from
    the first to the last, so the table shows how completions changed."""
    steps = sorted({row["step"] for row in samples if isinstance(row.get("step"), int)})
    if len(steps) > num_steps:
        picks = {steps[round(i * (len(steps) - 1) / (num_steps - 1))] for i in range(num_steps)} \
            if num_steps > 1 else {steps[-1]}
        steps = sorted(picks)
    out = []
    for step in steps:
        rows = [row for row in samples if row.get("step") == step][:per_step]
        out.extend({k: _json_safe(v) for k, v in row.items()} for row in rows)
    return out


def _json_safe(value):
    if isinstance(value, float):
        return finite_or_none(value)
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return html.escape(str(value))
    if isinstance(value, (int, float)):
        return "nan" if isinstance(value, float) and not math.isfinite(value) else f"{value:.4g}"
    return html.escape(str(value))


def _header(run: RunData) -> str:
    cfg = run.config or {}
    total = (cfg.get("trainer") or {}).get("total_steps")
    last = run.records[-1]["step"] if run.records else None
    facts = [f"steps logged: {len(run.records)}", f"last step: {last}" + (f" of {total}" if total else "")]
    for section, key in (("model", "path"), ("algorithm", "name"), ("reward", "fn")):
        value = (cfg.get(section) or {}).get(key)
        if value is not None:
            facts.append(f"{section}.{key}: {value}")
    warn = (f'<p class="meta warn">{run.skipped_lines} unreadable line(s) skipped '
            f"(a run still being written has a partial last line)</p>" if run.skipped_lines else "")
    return (f"<h1>rlpost run report</h1><p class=\"meta\">{html.escape(str(run.output_dir))}</p>"
            f"<p class=\"meta\">{html.escape(' · '.join(facts))}</p>{warn}")


def _summary(run: RunData) -> str:
    rows = []
    for key in SUMMARY_KEYS:
        s = run.series(key)
        if s is None:
            continue
        finite = [v for v in s.values if math.isfinite(v)] or [math.nan]
        rows.append(f"<tr><td>{key}</td><td class=num>{_fmt(s.values[0])}</td><td class=num>{_fmt(s.values[-1])}"
                    f"</td><td class=num>{_fmt(min(finite))}</td><td class=num>{_fmt(max(finite))}</td></tr>")
    if not rows:
        return ""
    return ("<h2>Summary</h2><table><thead><tr><th>metric</th><th>first</th><th>last</th><th>min</th><th>max</th>"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _samples_table(samples: list[dict]) -> str:
    if not samples:
        return ("<h2>Sample completions</h2><p class=\"meta\">No samples.jsonl in this run "
                "(written by <code>Tracker.log_samples</code>).</p>")
    rows = []
    for row in samples:
        components = row.get("components") or {}
        comp = ", ".join(f"{k}={_fmt(v)}" for k, v in components.items()) if isinstance(components, dict) else ""
        error = f'<br><span class="warn">{html.escape(str(row["error"]))}</span>' if row.get("error") else ""
        rows.append(
            f'<tr data-step="{row.get("step")}"><td class=num>{row.get("step")}</td>'
            f'<td class=text>{html.escape(str(row.get("prompt", "")))}</td>'
            f'<td class=text>{html.escape(str(row.get("completion", "")))}</td>'
            f'<td class=text>{html.escape(str(row.get("answer", "")))}</td>'
            f'<td class=num>{_fmt(row.get("reward"))}{error}</td><td>{comp}</td></tr>')
    return ('<h2>Sample completions</h2><p><label>Show <select id="sample-step"><option value="">all steps'
            '</option></select></label></p><table id="samples"><thead><tr><th>step</th><th>prompt</th>'
            "<th>completion</th><th>answer</th><th>reward</th><th>components</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _config(run: RunData) -> str:
    if run.config is None:
        return ""
    text = yaml.safe_dump(run.config, sort_keys=False)
    return f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{html.escape(text)}</pre></details>"
