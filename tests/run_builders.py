"""Run directories built row by row for the reader tests: several ranks, a resumed session, a corrupt part, and a
multi-process run whose group sum failed. One copy for the loader, the report's stream and the dashboard's tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moewatch.detect import synthetic as syn
from moewatch.store import schema


def rewrite_parts(path: Path, table: str, frames: list[pd.DataFrame]) -> None:
    """Replace a table's parts with one part per frame (the run-directory schema's columns)."""
    folder = path / table
    for f in folder.glob("*.parquet"):
        f.unlink()
    sch = schema.SCHEMAS[table]
    for i, df in enumerate(frames):
        pq.write_table(pa.Table.from_pandas(df[sch.names], schema=sch, preserve_index=False),
                       folder / f"part-{i:03d}.parquet")


def split_ranks(run: syn.SyntheticRun) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(experts of rank 0, of rank 1, layers of rank 0, of rank 1): each expert's tokens split unevenly between
    two ranks, a moving bias they hold slightly differently, and different entropies."""
    layers, experts = run.frames()
    ex0, ex1 = experts.copy(), experts.copy()
    ex0["tokens"] = experts["tokens"] // 3
    ex1["tokens"] = experts["tokens"] - ex0["tokens"]
    ex1["rank"] = np.int32(1)
    ex0["bias"] = ex0["step"] * 1e-3 + ex0["expert"]
    ex1["bias"] = ex0["bias"] + 0.5
    ly0, ly1 = layers.copy(), layers.copy()
    ly0["tokens"] = layers["tokens"] // 3
    ly1["tokens"] = layers["tokens"] - ly0["tokens"]
    ly1["rank"] = np.int32(1)
    ly1["entropy"] = layers["entropy"] * 0.5
    return ex0, ex1, ly0, ly1


def ranked_run(path: Path, part_steps: int | None = None) -> Path:
    """A synthetic run (3 layers x 8 experts, top-2, capacity; 600 steps) written as two ranks, rank 0's steps
    200-299 re-recorded by a resumed session with other counts (those must win), and a corrupt experts part.
    ``part_steps``: cut each rank's rows into parts of that many steps, as the writer does (None: one part)."""
    sc = syn.Scenario("c", "sudden", "collapse", onset=300, ramp=60, steps=600, layers=3, num_experts=8, top_k=2,
                      capacity_factor=1.0)
    run = syn.simulate(sc)
    run.write(path)
    ex0, ex1, ly0, ly1 = split_ranks(run)
    again = ex0[(ex0["step"] >= 200) & (ex0["step"] < 300)].copy()
    again["tokens"] = again["tokens"][::-1].to_numpy()
    again["session"] = np.int32(1)
    again_l = ly0[(ly0["step"] >= 200) & (ly0["step"] < 300)].copy()
    again_l["session"] = np.int32(1)

    def chunks(df: pd.DataFrame) -> list[pd.DataFrame]:
        if part_steps is None:
            return [df]
        return [df[(df["step"] >= s) & (df["step"] < s + part_steps)] for s in range(0, 600, part_steps)]

    rewrite_parts(path, schema.EXPERTS, [*chunks(ex0), *chunks(ex1), again])
    rewrite_parts(path, schema.LAYERS, [*chunks(ly0), *chunks(ly1), again_l])
    (path / schema.EXPERTS / "part-999.parquet").write_bytes(b"not parquet")
    return path


def write_rows(run_dir: Path, rank: int, session: int, n: int, rows: list[tuple[int, int, list[int]]]) -> None:
    """A part file pair of `rank` holding (seq, step, per-expert tokens) rows of one layer, top-1, no logits."""
    from moewatch.store.schema import EXPERTS, LAYERS, SCHEMAS
    from moewatch.store.writer import PartWriter

    ex = {f.name: [] for f in SCHEMAS[EXPERTS]}
    ly = {f.name: [] for f in SCHEMAS[LAYERS]}
    for seq, step, tokens in rows:
        for e, t in enumerate(tokens):
            for k, v in dict(step=step, layer="gate", expert=e, tokens=t, dropped=0, prob_mean=None, bias=None,
                             rank=rank, session=session, seq=seq).items():
                ex[k].append(v)
        c = np.asarray(tokens, float)
        for k, v in dict(step=step, layer="gate", tokens=int(c.sum()), top_k=1, num_experts=len(tokens),
                         cv=c.std() / c.mean(), max_share=c.max() / c.sum(), dead=int((c == 0).sum()), dropped=0,
                         drop_rate=0.0, nonfinite=0, calls=1, time=0.0, rank=rank, session=session, seq=seq).items():
            ly[k].append(v)
    for name in ly:
        if not ly[name]:
            ly[name] = [None] * len(rows)
    for name in ex:  # columns no row sets (gate_mass): null
        if not ex[name]:
            ex[name] = [None] * len(ex["step"])
    writer = PartWriter(run_dir, rank, session)
    writer.count = n
    writer.write(EXPERTS, pa.table(ex, schema=SCHEMAS[EXPERTS]))
    writer.write(LAYERS, pa.table(ly, schema=SCHEMAS[LAYERS]))


FALLBACK_TOKENS = [[3, 1], [2, 2], [4, 0], [1, 3], [3, 0], [1, 2]]  # the run below's global counts, steps 0-5


def fallback_run(run_dir: Path) -> Path:
    """A two-process run whose group sum failed after step 3: rank 1 rewrote the round it could not confirm (steps
    2-3) although the writer had written it; from step 4 both wrote their own rows. Every token counts once in
    ``FALLBACK_TOKENS``."""
    from moewatch.store.manifest import new_manifest, write_manifest

    run_dir.mkdir()
    write_manifest(run_dir, new_manifest(routers=[], world_size=2))
    group_sum = {0: [3, 1], 1: [2, 2], 2: [4, 0], 3: [1, 3]}  # steps 0-3 summed over ranks 0 and 1
    own = {0: {4: [1, 0], 5: [0, 1]}, 1: {2: [1, 1], 3: [0, 2], 4: [2, 0], 5: [1, 1]}}
    write_rows(run_dir, 0, 1, 0, [(s, s, t) for s, t in group_sum.items()])
    write_rows(run_dir, 0, 1, 2, [(s, s, t) for s, t in own[0].items()])
    write_rows(run_dir, 1, 1, 0, [(s, s, t) for s, t in own[1].items()])
    (run_dir / "ranks").mkdir()
    for rank, seq in ((0, 4), (1, 2)):
        entry = {"aggregation": "group", "group": [0, 1], "writer": 0, "agreed": True,
                 "fallback": {"session": 1, "seq": seq, "step": seq, "reason": "test"}}
        (run_dir / "ranks" / f"r{rank:04d}.json").write_text(json.dumps({"rank": rank, "sessions": {"1": entry}}))
    return run_dir
