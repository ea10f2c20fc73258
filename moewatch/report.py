"""`moewatch report`: judge one run or a folder of runs and render the verdict as text, markdown, JSON or HTML.

Owns finding runs under a path, running the detector on each run's global view, the four renderings and the exit
code: 0 for healthy, warning and recovered runs, 1 when a run is critical or collapsed (``fail_on`` lowers the bar to
recovered or warning); bad input raises :class:`ReportInputError`, which the CLI turns into exit 2 with its one-line
message. The JSON layout is a contract documented in docs/format.md. The HTML page (its summary table and charts)
is moewatch.report_html's; ``render_html`` here hands over to it.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from moewatch.detect import (
    STATUSES,
    Alert,
    Analysis,
    DetectorConfig,
    analyze_run,
    fails,
    parse_pairs,
)
from moewatch.detect.alerts import FAILING, SEVERITY_RANK, worst_status
from moewatch.detect.verdict import verdict
from moewatch.store.manifest import problem_lines

FORMATS = ("text", "markdown", "json", "html")
FAIL_ON = ("warning", "recovered", "critical", "collapsed")


class ReportInputError(ValueError):
    """Bad input for a report (missing path, no run under it, unreadable run, bad config); one line, says what to do."""


@dataclass
class RunReport:
    """One run's verdict: where it is, its manifest, and the detector's analysis."""

    path: Path
    meta: dict[str, Any]
    run_status: str
    steps: int
    analysis: Analysis
    # Per layer, over its last detector window: margin_mean, near_tie_frac, override_frac (None: not recorded).
    routing: dict[str, dict[str, float | None]] = field(default_factory=dict)

    @property
    def status(self) -> str:
        return self.analysis.status

    @property
    def verdict(self) -> str:
        return verdict(self.analysis)

    @property
    def problems(self) -> list[str]:
        """Capture problems recorded in run.json (a silent router, an unreadable output, ...), one line each."""
        return problem_lines(self.meta)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "status": self.status,
            "verdict": self.verdict,
            "problems": [p for p in self.meta.get("problems") or [] if isinstance(p, dict)],
            "run_status": self.run_status,
            "model_class": self.meta.get("model_class"),
            "steps": self.steps,
            "layers": [_json_safe(self.layer_summary(layer)) for layer in self.analysis.layers],
            "alerts": [a.to_dict() for a in self.analysis.alerts],
        }


    def layer_summary(self, layer: Any) -> dict[str, Any]:
        """The layer's final-window numbers: the detector's, with the routing diagnostics before its status."""
        summary = layer.summary()
        status = summary.pop("status")
        routing = self.routing.get(layer.layer, {})
        return {**summary, **{c: routing.get(c) for c in ROUTING_COLUMNS}, "status": status}


# The routing diagnostics in the per-layer table and JSON (docs/format.md): over each layer's last detector window.
ROUTING_COLUMNS = ("margin_mean", "near_tie_frac", "override_frac")


def routing_summary(path: Path, layers: list[Any]) -> dict[str, dict[str, float | None]]:
    """Per layer, the routing diagnostics over its last detector window, all ranks summed: the margin and override
    sums of the window's steps, then their ratios (exact, like the global view). Reads only the layers table's
    rows of those steps and the columns it needs; a run recorded before schema 2, or a router that does not show
    them, gives None."""
    from moewatch.store.reader import hist_matrix, load

    windows = {r.layer: (int(r.series["first"][-1]), int(r.series["last"][-1])) for r in layers
               if len(r.series["last"])}
    if not windows:
        return {}
    lo, hi = min(a for a, _ in windows.values()), max(b for _, b in windows.values())
    try:
        frame = load(path, eval=False).layers_frame(
            steps=(lo, hi), ranks="each", columns=["step", "layer", "margin_mean", "margin_tokens", "margin_hist",
                                                  "overridden", "override_slots"])
    except ValueError:  # steps or layers the parts no longer hold (a run rewritten under us): say nothing
        return {}
    out: dict[str, dict[str, float | None]] = {}
    hist = hist_matrix(frame["margin_hist"]) if len(frame) else None
    for name, (first, last) in windows.items():
        rows = ((frame["layer"] == name) & (frame["step"] >= first) & (frame["step"] <= last)).to_numpy()
        n = float(frame["margin_tokens"][rows].sum())
        margin = float((frame["margin_mean"][rows] * frame["margin_tokens"][rows]).sum())
        near = float(np.nansum(hist[rows, 0])) if hist is not None else 0.0
        slots = float(frame["override_slots"][rows].sum())
        over = float(frame["overridden"][rows].sum())
        out[name] = {"margin_mean": margin / n if n > 0 else None, "near_tie_frac": near / n if n > 0 else None,
                     "override_frac": over / slots if slots > 0 else None}
    return out


def build_config(path: Path | None, pairs: list[str]) -> DetectorConfig:
    """Defaults, then the TOML file, then ``--set key=value`` pairs; any mistake is a ReportInputError."""
    try:
        config = DetectorConfig.from_toml(path) if path is not None else DetectorConfig()
        return config.with_overrides(parse_pairs(pairs)) if pairs else config
    except ValueError as exc:
        raise ReportInputError(f"{exc} (see docs/detector.md for the settings)") from None


def find_run_dirs(paths: Iterable[Path]) -> list[Path]:
    """Run directories named by ``paths``: each a run (has run.json) or a folder searched recursively for runs."""
    from moewatch.store.reader import find_runs

    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportInputError(f"{path} does not exist: pass a run directory or a folder of runs")
        if not path.is_dir():
            raise ReportInputError(f"{path} is not a directory: pass a run directory or a folder of runs")
        runs = find_runs(path)
        if not runs:
            what = "is empty" if not any(path.iterdir()) else "holds no moewatch run (no run.json below it)"
            raise ReportInputError(f"{path} {what}: pass a run directory written by moewatch.attach")
        found.extend(r for r in runs if r not in found)
    return found


def build_report(path: Path, config: DetectorConfig, progress: bool = False) -> RunReport:
    """Judge one run on its all-ranks global view (``moewatch.detect.analyze_run``: streamed layer by layer)."""
    from moewatch.store.manifest import run_state
    from moewatch.store.reader import RunError, read_run_manifest

    try:
        meta = read_run_manifest(path)
    except RunError as exc:
        raise ReportInputError(str(exc)) from None
    wrap = None
    routers = len(meta.get("routers") or [])
    if progress and routers > 1:
        from tqdm.auto import tqdm

        def wrap(items):
            # Not tqdm(items): it would hold the last layer (and its group's buffer) while the next is read.
            with tqdm(total=routers, desc=f"layers of {path.name}", unit="layer", leave=False, disable=None,
                      file=sys.stderr, mininterval=1.0) as bar:
                for item in items:
                    bar.update(1)
                    yield item
                    del item

    try:
        analysis = analyze_run(path, config, progress=wrap)
    except ValueError as exc:
        raise ReportInputError(f"{path}: {exc}") from None
    except OSError as exc:
        raise ReportInputError(f"cannot read {path}: {exc}") from None
    if not analysis.layers:
        problems = problem_lines(meta, limit=3)
        why = f"; run.json records: {'; '.join(problems)}" if problems else ""
        raise ReportInputError(f"{path} has no recorded steps yet: report it once training has flushed some{why}")
    analysis.alerts = analysis.shown_alerts()
    return RunReport(path, meta, run_state(meta), analysis.steps, analysis, routing_summary(path, analysis.layers))


def report_paths(paths: list[Path], fmt: str = "text", config: DetectorConfig | None = None,
                 out: Path | None = None, fail_on: str = FAILING) -> int:
    """Report every run under ``paths`` in ``fmt`` to ``out`` (stdout when None); returns the exit code, 1 when a
    run's status is ``fail_on`` or worse."""
    if fmt not in FORMATS:
        raise ReportInputError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if fail_on not in FAIL_ON:
        raise ReportInputError(f"unknown --fail-on {fail_on!r}: choose one of {', '.join(FAIL_ON)}")
    config = config or DetectorConfig()
    run_dirs = find_run_dirs(paths)
    from tqdm.auto import tqdm

    bar = tqdm(run_dirs, desc="reading runs", unit="run", disable=None if len(run_dirs) > 1 else True,
               file=sys.stderr)
    reports = [build_report(p, config, progress=True) for p in bar]
    text = render(reports, fmt, config, sources=paths)
    if out is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        try:
            Path(out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise ReportInputError(f"cannot write the report to {out}: {exc}") from None
    return exit_code(reports, fail_on)


def exit_code(reports: list[RunReport], fail_on: str = FAILING) -> int:
    """1 when any run is ``fail_on`` or worse (default: critical or collapsed), else 0."""
    return 1 if any(fails(r.status, fail_on) for r in reports) else 0


def overall_status(reports: list[RunReport]) -> str:
    return worst_status([r.status for r in reports])


def render(reports: list[RunReport], fmt: str, config: DetectorConfig | None = None, *,
           sources: Iterable[Path] | None = None) -> str:
    """``reports`` in ``fmt``; ``sources`` (the paths asked for) are named in the HTML page's header."""
    if fmt == "json":
        return render_json(reports)
    if fmt == "markdown":
        return render_markdown(reports)
    if fmt == "html":
        return render_html(reports, config or DetectorConfig(), sources=sources)
    if fmt == "text":
        return render_text(reports)
    raise ReportInputError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")


# ----------------------------------------------------------------------------------------------------- JSON


def render_json(reports: list[RunReport]) -> str:
    doc = {"status": overall_status(reports), "runs": [r.to_dict() for r in reports]}
    return json.dumps(doc, indent=2) + "\n"


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------ text and markdown

_COLUMNS = ("layer", "E", "k", "cv", "entropy", "max share", "dead", "drop rate", "z-loss", "margin", "near ties",
            "override", "status")


def _layer_rows(report: RunReport) -> list[tuple[str, ...]]:
    rows = []
    for layer in report.analysis.layers:
        s = report.layer_summary(layer)
        rows.append((
            s["layer"], str(s["num_experts"]), str(s["top_k"]), _num(s["cv"], "{:.2f}"),
            _num(s["entropy_norm"], "{:.3f}"), _num(s["max_share"], "{:.1%}"), str(s["dead"]),
            _num(s["drop_rate"], "{:.2%}"), _num(s["z_loss"], "{:.3g}"), _num(s["margin_mean"], "{:.3f}", "—"),
            _num(s["near_tie_frac"], "{:.1%}", "—"), _num(s["override_frac"], "{:.1%}", "—"), s["status"],
        ))
    return rows


def _num(v: float | None, spec: str, null: str = "-") -> str:
    return null if v is None or not math.isfinite(v) else spec.format(v)


@dataclass
class _Group:
    """Episodes of one (severity, kind, layer), shown as one entry: a flapping condition is one line, not ten."""

    alerts: list[Alert]

    @property
    def head(self) -> Alert:
        # The message shown is the episode holding at the end if there is one (so the row agrees with the layer
        # table's last window), else the worst episode's; onset is the first episode's.
        pick = max if self.alerts[0].kind not in ("entropy_collapse",) else min
        pool = [a for a in self.alerts if a.ongoing] or self.alerts
        return pick(pool, key=lambda a: a.value if math.isfinite(a.value) else -math.inf)

    @property
    def first(self) -> Alert:
        return min(self.alerts, key=lambda a: a.first_step)

    def span(self) -> str:
        first = self.first
        last = max(a.last_step for a in self.alerts)
        ongoing = any(a.ongoing for a in self.alerts)
        text = f"steps {first.first_step}-{last}{' (ongoing)' if ongoing else ''}, raised at step {first.detected_step}"
        if len(self.alerts) > 1:
            text += f", {len(self.alerts)} episodes"
        est = [a.collapse_step for a in self.alerts if a.collapse_step is not None]
        if est and first.kind in ("imbalance_trend", "entropy_collapse", "drops", "logit_drift"):
            text += f", projected crossing at step {est[0]}"
        return text


def _groups(alerts: list[Alert]) -> list[_Group]:
    by: dict[tuple[str, str, str], list[Alert]] = {}
    for a in alerts:
        by.setdefault((a.severity, a.kind, a.layer), []).append(a)
    groups = [_Group(v) for v in by.values()]
    return sorted(groups, key=lambda g: (-SEVERITY_RANK[g.alerts[0].severity], g.first.first_step, g.alerts[0].layer))


def _header(report: RunReport) -> str:
    windows = sorted({layer.window for layer in report.analysis.layers})
    win = f"{windows[0]}" if len(windows) == 1 else f"{windows[0]}-{windows[-1]}"
    return (f"model {report.meta.get('model_class', '?')} | run {report.run_status} | {report.steps} steps | "
            f"{len(report.analysis.layers)} routers | windows of {win} steps")


def _table_text(rows: list[tuple[str, ...]]) -> list[str]:
    table = [_COLUMNS, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(_COLUMNS))]
    out = []
    for r in table:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:-1], strict=True)]
        out.append("  ".join([*cells, r[-1]]))
    return out


def render_text(reports: list[RunReport]) -> str:
    lines: list[str] = []
    for rep in reports:
        lines += [f"== {rep.path}  [{rep.status.upper()}]", _header(rep), ""]
        if rep.problems:
            lines.append("Capture problems (run.json): what moewatch could not record")
            lines += [f"  {p}" for p in rep.problems] + [""]
        lines.append("Per layer, over the last window (cv with sampling noise removed):")
        lines += ["  " + row for row in _table_text(_layer_rows(rep))]
        lines.append("")
        groups = _groups(rep.analysis.alerts)
        counts = {s: sum(1 for a in rep.analysis.alerts if a.severity == s) for s in ("critical", "warning", "info")}
        lines.append(f"Alerts: {counts['critical']} critical, {counts['warning']} warning, {counts['info']} info")
        for g in groups:
            a = g.head
            lines.append(f"  {a.severity.upper():8s} {a.kind:16s} {a.layer}: {g.span()}")
            lines.append(f"           {a.message}")
            lines.append(f"           lever: {a.lever}")
        lines += ["", f"Verdict: {rep.verdict}", ""]
    if len(reports) > 1:
        lines.append(f"Overall: {overall_status(reports).upper()} ({_tally(reports)} of {len(reports)} runs)")
    return "\n".join(lines).rstrip() + "\n"


def _tally(reports: list[RunReport]) -> str:
    """'1 collapsed, 1 recovered, 2 healthy', most severe first, statuses with no run left out."""
    n = {s: sum(1 for r in reports if r.status == s) for s in STATUSES}
    return ", ".join(f"{n[s]} {s}" for s in reversed(STATUSES) if n[s])


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown(reports: list[RunReport]) -> str:
    lines: list[str] = ["# moewatch report", ""]
    if len(reports) > 1:
        lines += [f"**Overall: {overall_status(reports)}** ({_tally(reports)} of {len(reports)} runs).", ""]
    for rep in reports:
        lines += [f"## `{rep.path}` — {rep.status}", "", _md(_header(rep)), ""]
        if rep.problems:
            lines += ["**Capture problems** (run.json): what moewatch could not record", ""]
            lines += [f"- {_md(p)}" for p in rep.problems] + [""]
        lines.append("| " + " | ".join(_COLUMNS) + " |")
        lines.append("|" + "|".join(["---"] + ["---:"] * (len(_COLUMNS) - 2) + ["---"]) + "|")
        lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in _layer_rows(rep)]
        lines.append("")
        groups = _groups(rep.analysis.alerts)
        if groups:
            lines += ["| severity | kind | layer | when | message | lever |", "|---|---|---|---|---|---|"]
            for g in groups:
                a = g.head
                lines.append(f"| {a.severity} | {a.kind} | `{_md(a.layer)}` | {_md(g.span())} | {_md(a.message)} | "
                             f"{_md(a.lever)} |")
        else:
            lines.append("No alerts.")
        lines += ["", f"**Verdict:** {_md(rep.verdict)}", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- HTML


def render_html(reports: list[RunReport], config: DetectorConfig, *, sources: Iterable[Path] | None = None,
                made: datetime | None = None) -> str:
    """One self-contained page (moewatch.report_html): a summary of the runs, worst first, then each run's charts."""
    # Imported here: text, markdown and JSON reports never load plotly.
    from moewatch.report_html import render_html as page

    return page(reports, config, sources=sources, made=made)
