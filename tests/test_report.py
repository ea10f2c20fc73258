"""`moewatch report`: finding runs, the four formats, the JSON contract, exit codes and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import moewatch
from moewatch.detect import DetectorConfig
from moewatch.detect import synthetic as syn
from moewatch.detect.evaluate import _strength
from moewatch.report import ReportInputError, build_config, find_run_dirs, report_paths

LAYER_KEYS = {"layer", "cv", "entropy_norm", "max_share", "dead", "drop_rate", "z_loss", "margin_mean", "near_tie_frac",
              "override_frac"}
ALERT_KEYS = {"kind", "severity", "layer", "experts", "first_step", "last_step", "value", "threshold", "message",
              "lever"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    syn.simulate(syn.Scenario("collapse", "sudden", "collapse", onset=1500, ramp=150, steps=2200)).write(
        root / "team" / "collapsed")
    syn.simulate(syn.Scenario("healthy", "healthy", "healthy", steps=2200)).write(root / "healthy")
    syn.simulate(syn.Scenario("osc", "oscillation", "degraded", onset=200, steps=2200,
                              strength=_strength(0.7, 16, 1))).write(root / "wobbly")
    return root


def run_report(capsys, paths, fmt="text", **kw) -> tuple[int, str]:
    code = report_paths([Path(p) for p in paths], fmt, **kw)
    return code, capsys.readouterr().out


def test_exit_codes_follow_the_verdict(runs, capsys):
    assert run_report(capsys, [runs / "healthy"])[0] == 0
    code, out = run_report(capsys, [runs / "wobbly"])
    assert code == 0 and "[WARNING]" in out  # warnings only still pass a CI gate
    assert run_report(capsys, [runs / "team" / "collapsed"])[0] == 1
    assert run_report(capsys, [runs])[0] == 1  # a folder: worst run decides


def test_text_report_layout(runs, capsys):
    code, out = run_report(capsys, [runs / "team" / "collapsed"])
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.strip().startswith("layer"))
    for col in ("cv", "entropy", "max share", "dead", "drop rate", "z-loss"):
        assert col in lines[header]
    for col in ("margin", "near ties", "override"):
        assert col in lines[header]
    assert "model.layers.0.mlp.gate" in lines[header + 1] and lines[header + 1].rstrip().endswith("collapsed")
    assert lines[header + 1].split()[-4:-1] == ["—", "—", "—"]  # not recorded by the synthetic run
    assert lines[header + 2].rstrip().endswith("healthy")
    severities = [line.split()[0] for line in lines if line.startswith(("  CRITICAL", "  WARNING", "  INFO"))]
    assert severities and severities == sorted(severities, key=["CRITICAL", "WARNING", "INFO"].index)
    assert any("lever:" in line for line in lines) and "from step" in out
    assert lines[-1].startswith("Verdict: COLLAPSED")


def test_folder_reports_every_run_with_an_overall_line(runs, capsys):
    code, out = run_report(capsys, [runs])
    assert out.count("== ") == 3 and "Overall: COLLAPSED (1 collapsed, 1 warning, 1 healthy of 3 runs)" in out


def test_json_contract(runs, capsys):
    code, out = run_report(capsys, [runs], "json")
    doc = json.loads(out)
    assert set(doc) == {"status", "runs"} and doc["status"] == "collapsed" and code == 1
    by_name = {Path(r["path"]).name: r for r in doc["runs"]}
    assert {n: r["status"] for n, r in by_name.items()} == {"collapsed": "collapsed", "healthy": "healthy",
                                                            "wobbly": "warning"}
    for r in doc["runs"]:
        assert {"path", "status", "layers", "alerts"} <= set(r)
        assert len(r["layers"]) == 2 and all(LAYER_KEYS <= set(layer) for layer in r["layers"])
        for a in r["alerts"]:
            assert ALERT_KEYS <= set(a) and a["severity"] in ("info", "warning", "critical")
            assert isinstance(a["experts"], list) and a["first_step"] <= a["last_step"]
    assert by_name["healthy"]["alerts"] == []
    # the synthetic runs record no routing diagnostics: null, never 0
    assert all(layer[k] is None for r in doc["runs"] for layer in r["layers"]
               for k in ("margin_mean", "near_tie_frac", "override_frac"))
    crit = [a for a in by_name["collapsed"]["alerts"] if a["severity"] == "critical"]
    assert {a["kind"] for a in crit} >= {"imbalance", "dominant_expert"}


def test_markdown_tables(runs, capsys):
    _, out = run_report(capsys, [runs / "team" / "collapsed"], "markdown")
    assert out.startswith("# moewatch report")
    assert ("| layer | E | k | cv | entropy | max share | dead | drop rate | z-loss | margin | near ties | override "
            "| status |") in out
    assert "| severity | kind | layer | when | message | lever |" in out and "**Verdict:** COLLAPSED" in out


def test_html_is_self_contained(runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    code = report_paths([runs], "html", out=out)
    page = out.read_text()
    assert code == 1 and capsys.readouterr().out == ""
    # Booleans, not `in page`: a failing assert would print the whole 5 MB page.
    framed = page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    external = re.search(r"<(script|link)[^>]*\b(src|href)=", page) is not None
    libraries = page.count("plotly.js v")
    figures = islands(page)
    assert framed and not external  # plotly.js is inlined: the page works offline, as a CI artifact or mail
    assert libraries == 1  # the library once, however many charts
    assert page.count("class='mw-chart'") == len(figures) >= 3 * 4  # cv, max share and a heatmap per layer per run
    # SVG traces only: a WebGL trace per chart runs a folder report out of the browser's WebGL contexts.
    assert {t["type"] for f in figures for t in f["data"]} == {"scatter", "heatmap"}
    assert all(word in page for word in ("expert load", "wobbly", "Verdict", "COLLAPSED"))


def islands(page: str) -> list[dict]:
    """The charts of a report page: the JSON island after each chart div."""
    return [json.loads(m) for m in re.findall(r"<div class='mw-chart'></div><script type='application/json'>(.*?)"
                                              r"</script>", page)]


def summary_rows(page: str) -> list[list[str]]:
    table = re.search(r"<table class='summary'>(.*?)</table>", page).group(1)
    return [[re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row)]
            for row in re.findall(r"<tr>(.*?)</tr>", table)[1:]]


def test_html_folder_report_opens_with_a_summary_worst_first(runs, tmp_path, capsys):
    from moewatch.report import build_report, render_html

    out = tmp_path / "report.html"
    report_paths([runs], "html", out=out)
    page = out.read_text()
    rows = summary_rows(page)
    # worst first in the detector's status order; each row links to its run's section, which follow that order
    assert [r[:2] for r in rows] == [["team/collapsed", "collapsed"], ["wobbly", "warning"], ["healthy", "healthy"]]
    collapsed, wobbly, healthy = rows
    assert collapsed[2] == "model.layers.0.mlp.gate collapsed"  # the worst layer, and what is wrong: the verdict
    assert f"<b>Verdict:</b> COLLAPSED: {collapsed[3]}</p>" in page and "since step 1540" in collapsed[3]
    assert collapsed[4].isdigit() and wobbly[4] == healthy[4] == "-"  # the first critical step, if any
    assert collapsed[5] == "2200" and healthy[3] == "no warning on any of 2 layers."
    anchors = re.findall(r"<a href='#(run-\d+)'>", page)
    sections = re.findall(r"<h2 id='(run-\d+)'>([^:]+):", page)
    assert anchors == [a for a, _ in sections] == ["run-1", "run-2", "run-3"]
    assert [name for _, name in sections] == ["team/collapsed", "wobbly", "healthy"]
    meta = re.search(r"<p class='meta'>(.*?)</p>", page).group(1)
    assert re.match(rf"Made \d{{4}}-\d\d-\d\d \d\d:\d\d UTC from <code>{re.escape(str(runs))}</code> by moewatch "
                    rf"{re.escape(moewatch.__version__)} &middot; 3 runs: 1 collapsed, 1 warning, 1 healthy", meta)
    assert meta.endswith("detector settings: defaults")

    # One run: no summary table; called without sources (as the W&B / MLflow bridges do), it names the run.
    config = DetectorConfig().with_overrides({"cv_warning": "0.4"})
    one = render_html([build_report(runs / "healthy", config)], config)
    assert "<table class='summary'>" not in one and f"from <code>{runs / 'healthy'}</code>" in one
    assert "1 run &middot; detector settings: cv_warning=0.4" in one


def test_html_charts_stop_growing_with_the_run(runs):
    """A run of 30,000 windows: each line keeps at most LINE_POINTS points (a one-window spike among them) and each
    heatmap about a chart's pixels of columns."""
    import numpy as np
    from moewatch.app.downsample import LINE_POINTS

    from moewatch.detect.engine import Analysis, LayerResult
    from moewatch.report import RunReport
    from moewatch.report_html import CHART_PX, _figures

    w, e = 30_000, 8
    rng = np.random.default_rng(0)
    cv = rng.uniform(0.1, 0.2, w)
    cv[12_345] = 7.0
    share = rng.dirichlet(np.ones(e), w).astype(np.float32)
    series = {"first": np.arange(w) * 20, "last": np.arange(w) * 20 + 19, "cv": cv, "max_share": share.max(axis=1),
              "entropy_norm": np.ones(w), "drop_rate": np.zeros(w), "z_loss": np.zeros(w), "dead": np.zeros(w, int),
              "share": share}
    layer = LayerResult("l0", e, 2, 20, w * 20, [], series)
    rep = RunReport(Path("long"), {}, "finished", w * 20, Analysis([layer], []))
    lines_cv, lines_share, heat = _figures(rep)
    trace = lines_cv["data"][0]
    assert len(trace["x"]) <= LINE_POINTS and 7.0 in trace["y"] and trace["x"][-1] == w * 20 - 1
    assert len(heat["data"][0]["x"]) == CHART_PX and np.asarray(heat["data"][0]["z"]).shape == (e, CHART_PX)


def test_html_size_of_a_100_run_folder_report(tmp_path):
    """plotly.js once (~4.8 MB), then a few kB per run of the sample-run size: 100 runs stay under 15 MB."""
    from moewatch.report import build_report, render_html

    samples = Path(__file__).resolve().parents[1] / "sample_runs"
    dirs = sorted(p.parent for p in samples.glob("*/run.json"))
    if not dirs:
        pytest.skip("sample_runs/ is not in this checkout")
    reports = [build_report(d, DetectorConfig()) for d in dirs]
    one = len(render_html(reports[:1], DetectorConfig()).encode())
    hundred = len(render_html([reports[i % len(reports)] for i in range(100)], DetectorConfig()).encode())
    per_run = (hundred - one) / 99
    assert hundred < 15e6 and per_run < 60e3, (hundred, per_run)


def test_config_and_overrides_change_the_verdict(runs, tmp_path, capsys):
    lenient = tmp_path / "lenient.toml"
    lenient.write_text("[detector]\ncv_warning = 0.9\ncv_critical = 5.0\ndominant_critical = 0.99\n"
                       "dominant_warning = 0.98\ntrend_horizon = 0.1\n")
    config = build_config(lenient, ["dead_critical_fraction=1.0", "entropy_critical=0.01"])
    assert config.cv_critical == 5.0 and config.dead_critical_fraction == 1.0
    assert run_report(capsys, [runs / "wobbly"], config=config)[0] == 0
    with pytest.raises(ReportInputError, match="no_such_key"):
        build_config(None, ["no_such_key=1"])
    with pytest.raises(ReportInputError, match="key=value"):
        build_config(None, ["cv_warning"])
    with pytest.raises(ReportInputError, match="does not exist"):
        build_config(tmp_path / "nope.toml", [])


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_bad_input_says_what_is_wrong(tmp_path, runs, capsys):
    with pytest.raises(ReportInputError) as exc:
        report_paths([tmp_path / "missing"], "text")
    assert "does not exist" in one_line(exc)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportInputError) as exc:
        report_paths([empty], "text")
    assert "is empty" in one_line(exc)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("hi")
    with pytest.raises(ReportInputError) as exc:
        report_paths([tmp_path / "junk"], "text")
    assert "no moewatch run" in one_line(exc)
    with pytest.raises(ReportInputError) as exc:
        report_paths([tmp_path / "junk" / "notes.txt"], "text")
    assert "not a directory" in one_line(exc)
    with pytest.raises(ReportInputError) as exc:
        report_paths([runs / "healthy"], "pdf")
    assert "text, markdown, json, html" in one_line(exc)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "run.json").write_text(json.dumps({"schema_version": 1, "status": "running", "routers": []}))
    with pytest.raises(ReportInputError) as exc:
        report_paths([fresh], "text")
    assert "no recorded steps" in one_line(exc)
    (fresh / "run.json").write_text("{not json")
    with pytest.raises(ReportInputError) as exc:
        report_paths([fresh], "text")
    assert "run.json" in one_line(exc)
    assert capsys.readouterr().out == ""  # nothing half-printed before the error


def test_find_run_dirs_recurses_and_dedups(runs):
    found = find_run_dirs([runs, runs / "healthy"])
    assert [p.name for p in found] == ["healthy", "collapsed", "wobbly"]


def test_cli_exit_codes(runs, tmp_path):
    from typer.testing import CliRunner

    from moewatch.cli import app

    cli = CliRunner()
    ok = cli.invoke(app, ["report", str(runs / "healthy"), "--format", "json"])
    assert ok.exit_code == 0 and json.loads(ok.stdout)["status"] == "healthy"
    bad = cli.invoke(app, ["report", str(runs / "team"), "--set", "cv_warning=0.4"])
    assert bad.exit_code == 1 and "COLLAPSED" in bad.stdout
    missing = cli.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.stderr
    unknown = cli.invoke(app, ["report", str(runs), "--set", "bogus=1"])
    assert unknown.exit_code == 2 and "bogus" in unknown.stderr
    out = tmp_path / "r.md"
    md = cli.invoke(app, ["report", str(runs / "healthy"), "--format", "markdown", "--output", str(out)])
    assert md.exit_code == 0 and out.read_text().startswith("# moewatch report")


def test_default_config_is_used_when_none_given(runs, capsys):
    assert run_report(capsys, [runs / "wobbly"], config=None)[0] == run_report(
        capsys, [runs / "wobbly"], config=DetectorConfig())[0]


def test_a_warning_covered_by_a_critical_of_the_same_kind_is_folded_but_an_earlier_one_stays():
    from moewatch.detect import Alert
    from moewatch.detect.alerts import fold_covered as fold_covered_warnings

    def alert(kind, severity, first, last, layer="l0"):
        return Alert(kind=kind, severity=severity, layer=layer, experts=(), first_step=first, last_step=last,
                     value=1.0, threshold=0.5, message="m", lever="x", detected_step=first)

    crit = alert("imbalance", "critical", 10, 100)
    covered = alert("imbalance", "warning", 10, 100)
    earlier = alert("imbalance", "warning", 0, 100)  # began before the critical: the early warning
    other_kind = alert("dead_expert", "warning", 10, 100)
    other_layer = alert("imbalance", "warning", 10, 100, layer="l1")
    kept = fold_covered_warnings([crit, covered, earlier, other_kind, other_layer])
    assert kept == [crit, earlier, other_kind, other_layer]
    # An info (a briefly starved expert) inside a warning of its kind is folded too; one that began first stays.
    info_in = alert("dead_expert", "info", 20, 90)
    info_first = alert("dead_expert", "info", 5, 90)
    assert fold_covered_warnings([other_kind, info_in, info_first]) == [other_kind, info_first]
