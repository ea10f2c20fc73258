"""Time `moewatch.load` on a synthetic run directory written in the real part-file format.

    python benchmarks/load.py --steps 5000 --layers 16 --experts 64
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import moewatch
from moewatch.store.manifest import new_manifest, write_manifest
from moewatch.store.schema import EXPERTS, LAYERS, SCHEMAS
from moewatch.store.writer import PartWriter


def write_run(run_dir: Path, steps: int, layers: int, experts: int, steps_per_part: int, sessions: int) -> None:
    names = [f"model.layers.{i}.mlp.gate" for i in range(layers)]
    write_manifest(run_dir, new_manifest(routers=[{"name": n, "num_experts": experts, "top_k": 2} for n in names]))
    rng = np.random.default_rng(0)
    for session in range(1, sessions + 1):
        writer = PartWriter(run_dir, rank=0, session=session)
        # a resumed session re-records the last 10% of the previous one
        first = 0 if session == 1 else int(steps * 0.9)
        for start in range(first, steps, steps_per_part):
            s = np.arange(start, min(start + steps_per_part, steps))
            S = len(s)
            n_ex = S * layers * experts
            ex = {
                "step": np.repeat(s, layers * experts), "layer": np.tile(np.repeat(names, experts), S),
                "expert": np.tile(np.arange(experts, dtype=np.int32), S * layers),
                "tokens": rng.integers(0, 200, n_ex), "dropped": np.zeros(n_ex, np.int64),
                "prob_mean": rng.random(n_ex), "bias": np.full(n_ex, np.nan),
                "rank": np.zeros(n_ex, np.int32), "session": np.full(n_ex, session, np.int32),
                "seq": np.repeat(s, layers * experts),
            }
            n_ly = S * layers
            ly = {f.name: np.zeros(n_ly, dtype=f.type.to_pandas_dtype()) for f in SCHEMAS[LAYERS]}
            ly.update(step=np.repeat(s, layers), layer=np.tile(names, S), session=np.full(n_ly, session, np.int32),
                      seq=np.repeat(s, layers), tokens=np.full(n_ly, 4096), top_k=np.full(n_ly, 2, np.int32),
                      num_experts=np.full(n_ly, experts, np.int32), cv=rng.random(n_ly))
            writer.write(EXPERTS, pa.Table.from_pydict(ex, schema=SCHEMAS[EXPERTS]))
            writer.write(LAYERS, pa.Table.from_pydict(ly, schema=SCHEMAS[LAYERS]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--steps-per-part", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=1, help="2 = a resumed run that repeats steps")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        t0 = time.perf_counter()
        write_run(run_dir, args.steps, args.layers, args.experts, args.steps_per_part, args.sessions)
        t1 = time.perf_counter()
        run = moewatch.load(run_dir)
        t2 = time.perf_counter()
        g = run.global_view()
        t3 = time.perf_counter()
    print(f"rows: experts={len(run.experts):,} layers={len(run.layers):,} (written in {t1 - t0:.1f} s)")
    print(f"load        {t2 - t1:6.2f} s")
    print(f"global_view {t3 - t2:6.2f} s  ({len(g.experts):,} rows)")


if __name__ == "__main__":
    main()
