"""moewatch.load returns at once and reads a table on first access, with the eager loader's result; the filtered
reads (run.experts_frame / run.layers_frame) equal filtering the full global view; the duckdb and pyarrow recipes of
docs/format.md ("Reading a run") run and agree with them."""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import moewatch
from moewatch.store import reader, schema
from moewatch.store.reader import Run
from tests.run_builders import fallback_run
from tests.run_builders import ranked_run as build_ranked_run

REPO = Path(__file__).resolve().parents[1]
TABLES = ("experts", "layers", "eval_experts", "eval_layers")


def eager_load(path: Path) -> Run:
    """moewatch.load as it was before it became lazy: every table read, de-duplicated, at once (the reference)."""
    meta = reader.read_run_manifest(path)
    skipped: list[str] = []
    frames = {}
    rules = reader.fallback_rules(reader.read_rank_manifests(path))
    for ex, ly in ((schema.EXPERTS, schema.LAYERS), (schema.EVAL_EXPERTS, schema.EVAL_LAYERS)):
        ex_t = reader.read_parts(reader.part_files(path, ex), ex, skipped)
        ly_t = reader.read_parts(reader.part_files(path, ly), ly, skipped)
        if rules:
            ex_t, ly_t = reader.superseded_rows(ex_t, rules), reader.superseded_rows(ly_t, rules)
        layers = ly_t.to_pandas()
        if reader.has_repeats(layers):
            ex_t, layers = reader.newest_rows(ex_t), reader.newest_rows(ly_t).to_pandas()
        frames[ex], frames[ly] = ex_t.to_pandas(), layers
    return Run(path, meta, frames[schema.EXPERTS], frames[schema.LAYERS], frames[schema.EVAL_EXPERTS],
               frames[schema.EVAL_LAYERS], skipped)


def assert_same_run(path: Path) -> None:
    """Every lazy table, the global view and the skipped list equal the eager loader's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = eager_load(path)
        run = moewatch.load(path)
        for name in TABLES:
            pd.testing.assert_frame_equal(getattr(run, name), getattr(ref, name), obj=name)
    assert sorted(run.skipped) == sorted(ref.skipped)
    assert run.steps == ref.steps and run.layer_names == ref.layer_names
    got, want = run.global_view(), ref.global_view()
    pd.testing.assert_frame_equal(got.experts, want.experts)
    pd.testing.assert_frame_equal(got.layers, want.layers)


def rows(frame: pd.DataFrame, layer=None, steps=None, columns=None) -> pd.DataFrame:
    """What a filtered read must return: the full frame filtered in pandas."""
    keep = np.ones(len(frame), dtype=bool)
    if layer is not None:
        keep &= frame["layer"].isin([layer] if isinstance(layer, str) else layer).to_numpy()
    if steps is not None:
        lo, hi = (steps, steps) if isinstance(steps, int) else steps
        keep &= ((frame["step"] >= (lo if lo is not None else -np.inf))
                 & (frame["step"] <= (hi if hi is not None else np.inf))).to_numpy()
    out = frame.loc[keep].reset_index(drop=True)
    return out if columns is None else out[columns]


def assert_filtered_reads(path: Path) -> None:
    """experts_frame / layers_frame, on disk and on the tables once held, equal filtering the full frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        full = moewatch.load(path)
        view = full.global_view()
        names = full.layer_names
        steps = sorted(full.layers["step"].unique())
        lo, hi = int(steps[len(steps) // 4]), int(steps[len(steps) // 2])
        cases = [dict(), dict(layer=names[0]), dict(layer=names[-1:] + names[:1]), dict(steps=(lo, hi)),
                 dict(steps=lo), dict(steps=(None, lo)), dict(steps=(hi, None)),
                 dict(layer=names[0], steps=(lo, hi), columns=["step", "expert", "tokens", "prob_mean"])]
        for held in (False, True):
            run = moewatch.load(path)
            if held:  # filtered in memory once the tables are read
                run.experts, run.layers  # noqa: B018
            for case in cases:
                msg = f"{case} held={held}"
                cols = case.get("columns")
                pd.testing.assert_frame_equal(run.experts_frame(**case), rows(view.experts, **case), obj=msg)
                lcols = None if cols is None else ["step", "layer", "tokens", "cv", "max_share", "dead"]
                pd.testing.assert_frame_equal(run.layers_frame(**{**case, "columns": lcols}),
                                              rows(view.layers, **{**case, "columns": lcols}), obj=msg)
                each = {**case, "ranks": "each"}
                pd.testing.assert_frame_equal(run.experts_frame(**each), rows(full.experts, **case), obj=msg)
                pd.testing.assert_frame_equal(run.layers_frame(**{**each, "columns": lcols}),
                                              rows(full.layers, **{**case, "columns": lcols}), obj=msg)


@pytest.fixture(scope="module")
def ranked_run(tmp_path_factory) -> Path:
    """Two ranks, a resumed session and a corrupt part, in parts of 100 steps as the writer leaves them (so step
    filters can skip whole files' row groups)."""
    return build_ranked_run(tmp_path_factory.mktemp("lazy") / "ranks", part_steps=100)


def test_load_reads_no_part_until_a_table_is_asked_for(tmp_path, monkeypatch):
    src = REPO / "sample_runs" / "collapse"
    if not src.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    path = Path(shutil.copytree(src, tmp_path / "run"))
    parts = reader.part_files(path, schema.EXPERTS)
    for f in parts:
        f.write_bytes(b"unreadable")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no part is opened: nothing to warn about
        real = (reader.pq.read_table, reader.pq.read_metadata, reader.ds.dataset)

        def refuse(*args, **kwargs):
            raise AssertionError("moewatch.load read a part file")

        for name in ("read_table", "read_metadata"):
            monkeypatch.setattr(reader.pq, name, refuse)
        monkeypatch.setattr(reader.ds, "dataset", refuse)
        run = moewatch.load(path)
        assert run.status == "finished" and run.meta["routers"] and run.layer_names == ["blocks.0.moe.router",
                                                                                      "blocks.1.moe.router"]
        assert "not read yet" in repr(run) and run.skipped == []
        monkeypatch.setattr(reader.pq, "read_table", real[0])
        monkeypatch.setattr(reader.pq, "read_metadata", real[1])
        monkeypatch.setattr(reader.ds, "dataset", real[2])
        assert run.steps == 400  # the layers table's step column only
    with pytest.warns(RuntimeWarning, match="corrupt part"):
        experts = run.experts
    assert experts.empty and sorted(run.skipped) == sorted(map(str, parts))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read once, kept: no second warning
        assert run.experts is experts and len(run.layers) == 800
    # The filtered read skips the same parts (already named: not warned again) and still answers.
    assert run.experts_frame(layer="blocks.0.moe.router", steps=(0, 9)).empty


def test_lazy_tables_equal_the_eager_loader_on_the_sample_runs():
    root = REPO / "sample_runs"
    if not root.is_dir():
        pytest.skip("sample_runs/ is not in this checkout")
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        assert_same_run(path)
    assert_filtered_reads(root / "aux-free-bias")  # bias column, one layer
    assert_filtered_reads(root / "z-loss+aux")


def test_lazy_tables_equal_the_eager_loader_across_ranks_and_a_resumed_session(ranked_run, tmp_path):
    assert_same_run(ranked_run)
    run = moewatch.load(ranked_run)
    with pytest.warns(RuntimeWarning, match="part-999"):
        assert run.experts["rank"].nunique() == 2
    assert run.skipped == [str(ranked_run / "experts" / "part-999.parquet")]
    assert not run.layers.duplicated(["rank", "step", "layer"]).any()  # the resumed steps kept once
    assert_same_run(fallback_run(tmp_path / "fallback"))


def test_filtered_reads_equal_filtering_the_global_view(ranked_run, tmp_path):
    assert_filtered_reads(ranked_run)
    assert_filtered_reads(fallback_run(tmp_path / "fallback"))
    run = moewatch.load(ranked_run)
    with pytest.warns(RuntimeWarning, match="part-999"):
        window = run.experts_frame(steps=(250, 250), ranks="each")
    # the resumed session's rows won for rank 0; rank 1 was never re-recorded
    assert set(zip(window["rank"], window["session"], strict=True)) == {(0, 1), (1, 0)}
    assert run.layers_frame(columns="cv").columns.tolist() == ["cv"]


def test_a_run_built_from_frames_is_kept_as_given(ranked_run):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = eager_load(ranked_run)
    run = Run(ranked_run, ref.meta, ref.experts, ref.layers)
    assert run.experts is ref.experts and run.layers is ref.layers and run.eval_experts.empty and run.skipped == []
    assert run.steps == 600 and run.status == "finished"
    view = run.global_view()
    pd.testing.assert_frame_equal(view.experts, ref.global_view().experts)
    name = run.layer_names[1]
    pd.testing.assert_frame_equal(run.experts_frame(layer=name, steps=(100, 120)),
                                  rows(view.experts, layer=name, steps=(100, 120)))
    run.layers = ref.layers.iloc[:0]
    assert run.steps == 0


def test_bad_arguments_name_the_valid_ones(ranked_run):
    run = moewatch.load(ranked_run)
    names = run.layer_names
    cases = [
        (dict(layer="nope"), f"unknown layer 'nope': this run's layers are {', '.join(names)}"),
        (dict(layer=[names[0], "nope"]), "unknown layer 'nope'"),
        (dict(layer=[]), "layer must be a layer name or a list"),
        (dict(layer=3), "layer must be a layer name or a list"),
        (dict(steps=(300, 200)), r"selects nothing \(first > last\); this run has steps 0\.\.599"),
        (dict(steps=(700, 800)), r"outside this run; this run has steps 0\.\.599"),
        (dict(steps=(None, -1)), r"outside this run; this run has steps 0\.\.599"),
        (dict(steps="0:10"), r"steps must be a step or \(first, last\).*0\.\.599"),
        (dict(steps=(1.5, 3)), r"steps must be a step or \(first, last\)"),
        (dict(columns=["tokens", "nope"]), "unknown column 'nope' for experts .*: valid columns are step, layer"),
        (dict(columns=["session"]), r"unknown column 'session' for experts \(ranks='global'\)"),
        (dict(columns=[]), "columns is empty"),
        (dict(ranks="all"), "ranks must be 'global'"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match) as info:
            run.experts_frame(**kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown column 'expert' for layers"):
        run.layers_frame(columns=["expert"])
    assert run.skipped == []  # validation read footers only
    with pytest.warns(RuntimeWarning, match="part-999"):
        assert run.experts_frame(columns=["session"], ranks="each").columns.tolist() == ["session"]


def _recipes() -> dict[str, str]:
    """The python blocks of docs/format.md's "Reading a run" section, by the engine they import."""
    text = (REPO / "docs" / "format.md").read_text(encoding="utf-8")
    section = text.split("## Reading a run", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return {engine: b for b in blocks for engine in ("duckdb", "pyarrow.dataset") if f"import {engine}" in b}


def _run_recipe(code: str, path: Path, lo: int, hi: int) -> pd.DataFrame:
    assert 'run_dir = "runs/exp1"' in code and "1000" in code and "1999" in code
    code = code.replace('run_dir = "runs/exp1"', f"run_dir = {str(path)!r}")
    code = code.replace("1000", str(lo)).replace("1999", str(hi))
    scope: dict = {}
    exec(compile(code, "docs/format.md", "exec"), scope)
    return scope["totals"]


@pytest.mark.parametrize("engine", ["duckdb", "pyarrow.dataset"])
def test_the_documented_query_recipes_agree_with_the_filtered_read(ranked_run, tmp_path, engine):
    if engine == "duckdb":
        pytest.importorskip("duckdb")
    recipe = _recipes()[engine]
    path = Path(shutil.copytree(ranked_run, tmp_path / "run"))
    (path / "experts" / "part-999.parquet").unlink()  # the engines would refuse a corrupt part
    for table in ("experts", "layers"):  # the writer's part names (the recipes' glob)
        for i, f in enumerate(sorted((path / table).glob("part-*.parquet"))):
            f.rename(f.with_name(f"r0000-s0001-{i:08d}.parquet"))
    (path / "experts" / ".tmp-r0000-s0002-00000000.parquet").write_bytes(b"a write in progress")
    # the sample runs' example code: `run = moewatch.load(...)`, then the snippet as documented
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", (REPO / "docs" / "format.md").read_text(
        encoding="utf-8").split("## Reading a run", 1)[1].split("\n## ", 1)[0], flags=re.S) if "experts_frame" in b)
    scope = {"moewatch": moewatch}
    exec(compile(snippet.replace('"runs/exp1"', repr(str(path))).replace("(1000, 1999)", "(150, 349)"),
                 "docs/format.md", "exec"), scope)
    assert scope["grid"].shape == (200, 8) and list(scope["metrics"].columns) == ["step", "cv", "max_share", "dead"]
    run = moewatch.load(path)
    for lo, hi in ((150, 349), (0, 599)):  # across the resumed steps 200-299, and the whole run
        want = (run.experts_frame(steps=(lo, hi)).groupby(["layer", "expert"], as_index=False)["tokens"].sum())
        got = _run_recipe(recipe, path, lo, hi)
        assert list(got.columns) == ["layer", "expert", "tokens"]
        np.testing.assert_array_equal(got["layer"].astype(str), want["layer"].astype(str))
        np.testing.assert_array_equal(got["expert"].astype(int), want["expert"].astype(int))
        np.testing.assert_array_equal(got["tokens"].astype(np.int64), want["tokens"].astype(np.int64))
    # the recipe without de-duplication would count the resumed steps twice: the check above has teeth
    raw = pq.read_table(path / "experts").to_pandas()
    assert raw["tokens"].sum() > run.experts_frame()["tokens"].sum()


def test_reading_a_run_does_not_import_torch():
    """The loader, the dense reader, the detector and the report never need torch: a notebook or a CI job that
    only reads runs does not pay its import (about 1 s and 200 MB)."""
    import subprocess
    import sys

    code = ("import sys, moewatch, moewatch.store.reader, moewatch.store.dense, moewatch.store.compact, "
            "moewatch.detect, moewatch.report; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"
