"""Never silent, end to end: what capture could not record (run.json ``problems``) reaches the report and the
dashboard, and a run that recorded nothing says why."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import moewatch
from moewatch.report import ReportInputError, build_report, report_paths
from tests.toy import ToyMoE

D, E = 8, 4


class HalfRouted(torch.nn.Module):
    """Two toy MoE blocks; training only ever runs the first, so the second router stays silent."""

    def __init__(self):
        super().__init__()
        self.toy = ToyMoE(d=D, num_experts=E, top_k=2, layers=2)

    def forward(self, x):
        return self.toy.blocks[0](x)


def _silent_run(root: Path, steps: int = 4) -> Path:
    torch.manual_seed(0)
    model = HalfRouted()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with moewatch.attach(model, root, silent_steps=2, grads=False) as watch:  # no optimizer here
            for _ in range(steps):
                model(torch.randn(2, 6, D)).sum().backward()
                watch.step()
    return root


def test_report_lists_capture_problems_in_every_format(tmp_path, capsys):
    run = _silent_run(tmp_path / "run")
    rep = build_report(run, moewatch.detect.DetectorConfig())
    assert len(rep.problems) == 1 and rep.problems[0].startswith("silent_router (toy.blocks.1.router, step ")
    report_paths([run], "text")
    out = capsys.readouterr().out
    assert "Capture problems (run.json)" in out and "silent_router (toy.blocks.1.router" in out
    report_paths([run], "markdown")
    assert "**Capture problems**" in capsys.readouterr().out
    report_paths([run], "html")
    assert "Capture problems (run.json)" in capsys.readouterr().out
    report_paths([run], "json")
    doc = json.loads(capsys.readouterr().out)
    assert [(p["kind"], p["router"]) for p in doc["runs"][0]["problems"]] == [("silent_router", "toy.blocks.1.router")]


def test_a_run_that_recorded_nothing_says_why(tmp_path):
    run = _silent_run(tmp_path / "run", steps=0)
    manifest = json.loads((run / "run.json").read_text())
    manifest["problems"] = [{"kind": "silent_router", "router": "toy.blocks.0.router", "step": 3,
                             "message": "recorded nothing in its first 3 training steps"}]
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(ReportInputError, match=r"no recorded steps yet.*run.json records: silent_router"):
        build_report(run, moewatch.detect.DetectorConfig())


def test_dashboard_shows_capture_problems(tmp_path):
    from moewatch.app.callbacks import header_view
    from moewatch.app.catalog import Catalog

    _silent_run(tmp_path / "runs" / "half")
    catalog = Catalog(tmp_path / "runs", background=False)
    row = catalog.summaries()[0]
    assert "1 capture problem" in row.problem
    header = header_view(catalog, row.run_id, 5.0)
    text = json.dumps(header, default=lambda c: c.to_plotly_json() if hasattr(c, "to_plotly_json") else str(c))
    assert "capture problem: silent_router (toy.blocks.1.router" in text
