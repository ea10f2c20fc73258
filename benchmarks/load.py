"""Time `moewatch.load` on a synthetic run directory written in the real part-file format.

    python benchmarks/load.py --steps 5000 --layers 16 --experts 64

Or measure an existing run directory, each call in a fresh process (wall time and the process's peak RSS):
`load` alone, `run.layers`, `run.experts_frame(layer=<one layer>)`, a 1,000-step window of it, and
`run.layers_frame(layer=<one layer>)`:

    python benchmarks/load.py --run /tmp/moewatch-bench-dashboard/run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

import moewatch
from moewatch.store.manifest import new_manifest, write_manifest
from moewatch.store.schema import EXPERTS, LAYERS, SCHEMAS, conform
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
            ly = {f.name: np.zeros(n_ly, dtype=f.type.to_pandas_dtype()) for f in SCHEMAS[LAYERS]
                  if not pa.types.is_list(f.type)}
            ly.update(step=np.repeat(s, layers), layer=np.tile(names, S), session=np.full(n_ly, session, np.int32),
                      seq=np.repeat(s, layers), tokens=np.full(n_ly, 4096), top_k=np.full(n_ly, 2, np.int32),
                      num_experts=np.full(n_ly, experts, np.int32), cv=rng.random(n_ly))
            writer.write(EXPERTS, conform(pa.table(ex), SCHEMAS[EXPERTS]))
            writer.write(LAYERS, conform(pa.table(ly), SCHEMAS[LAYERS]))


CALLS = {
    "import": None,
    "load": "run = moewatch.load(path); run.status, run.meta, run.layer_names",
    "steps": "run = moewatch.load(path); run.steps",
    "layers": "run = moewatch.load(path); run.layers",
    "experts_frame(layer)": "run = moewatch.load(path); run.experts_frame(layer=run.layer_names[len(run.layer_names) // 2])",
    "experts_frame(layer, 1000 steps)": "run = moewatch.load(path); "
                                         "run.experts_frame(layer=run.layer_names[0], steps=(50000, 50999))",
    "layers_frame(layer)": "run = moewatch.load(path); run.layers_frame(layer=run.layer_names[0])",
}


CHILD = """
import json, sys, time
t0 = time.perf_counter()
import moewatch, moewatch.store.reader  # pandas, pyarrow: counted apart, as "import"
t1 = time.perf_counter()
path, code = sys.argv[1], sys.argv[2]
scope = {"moewatch": moewatch, "path": path}
*setup, last = code.split("; ") if code else ["None"]
exec("; ".join(setup), scope)
out = eval(last, scope)
t2 = time.perf_counter()
frame = hasattr(out, "memory_usage")
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (this benchmark's own imports)
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"import_s": t1 - t0, "wall_s": t2 - t1, "peak_rss_mib": hwm / 1024,
                  "rows": len(out) if frame else None,
                  "frame_mib": float(out.memory_usage(deep=True).sum()) / 2**20 if frame else None}))
"""


def measure_run(path: str) -> None:
    print(f"{'call':34s} {'wall':>8s} {'peak RSS':>10s} {'rows':>12s} {'frame':>10s}")
    for name in CALLS:
        # each call in a fresh interpreter: its peak RSS is that call's (plus the imports, measured alone)
        res = subprocess.run([sys.executable, "-c", CHILD, path, CALLS[name] or ""], capture_output=True,
                             text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        wall = r["import_s"] if name == "import" else r["wall_s"]
        rows = f"{r['rows']:,}" if r["rows"] is not None else ""
        frame = f"{r['frame_mib']:.0f} MiB" if r["frame_mib"] is not None else ""
        print(f"{name:34s} {wall:7.2f}s {r['peak_rss_mib']:7.0f} MiB {rows:>12s} {frame:>10s}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="measure this run directory instead of writing a synthetic one")
    ap.add_argument("--steps", type=int, default=5000)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--steps-per-part", type=int, default=100)
    ap.add_argument("--sessions", type=int, default=1, help="2 = a resumed run that repeats steps")
    args = ap.parse_args()
    if args.run:
        measure_run(args.run)
        return
    with tempfile.TemporaryDirectory() as d:
        run_dir = Path(d)
        t0 = time.perf_counter()
        write_run(run_dir, args.steps, args.layers, args.experts, args.steps_per_part, args.sessions)
        t1 = time.perf_counter()
        run = moewatch.load(run_dir)
        t_open = time.perf_counter()
        run.experts, run.layers  # noqa: B018  (load returns at once; the tables are read on first access)
        t2 = time.perf_counter()
        g = run.global_view()
        t3 = time.perf_counter()
    print(f"rows: experts={len(run.experts):,} layers={len(run.layers):,} (written in {t1 - t0:.1f} s)")
    print(f"load                          {t_open - t1:6.2f} s")
    print(f"load + run.experts/run.layers {t2 - t1:6.2f} s")
    print(f"global_view                   {t3 - t2:6.2f} s  ({len(g.experts):,} rows)")


if __name__ == "__main__":
    main()
