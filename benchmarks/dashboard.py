"""Dashboard benchmark: first load, overview and layer-view build times on a synthetic run of 100k x 32 x 64.

    python benchmarks/dashboard.py                 # the issue's shape: 100k steps x 32 layers x 64 experts
    python benchmarks/dashboard.py --steps 10000   # quicker

Writes the run once (as moewatch would: part files of `--part-steps` steps, zstd Parquet) under --dir and reuses it.
Measures, in this process:
  first load     reading every part file into the dashboard cache (moewatch.app.data.RunData.refresh)
  detection      the collapse detector on the cached arrays, with its health frame, verdict sentence and the run
                 list's chart (runs in the background in the app; the strip waits for it, the charts do not)
  overview       the layer x window health strip from the detector's health frame, built and serialized to JSON
  layer view     heatmap + share lines + metric panels of one layer in the detector's windows (the default), built
                 and serialized (a layer switch); also with raw per-step counts
  first paint    overview + layer view: the server side of the first paint once the data is cached
  zoom           the layer view re-binned to a 5%-wide step range
  live append    reading one new part file (`--part-steps` more steps) and building the appended figures
Targets (issue 5): first paint <= 1.5 s after the data is cached, layer switch <= 300 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from moewatch.store.schema import (
    EXPERTS,
    EXPERTS_SCHEMA,
    LAYERS,
    LAYERS_SCHEMA,
    MANIFEST,
    SCHEMA_VERSION,
    conform,
    part_bytes,
)

WIDTH_PX = 1150  # plot width in a 1400 px browser window (what the page asks for)


def layer_name(i: int) -> str:
    return f"model.layers.{i}.mlp.gate"


def shares(rng: np.random.Generator, steps: np.ndarray, E: int, collapse: bool, total: int) -> np.ndarray:
    """[S, E] load shares: a fixed mild imbalance; the collapsing layer drifts to one expert from S/2 to 3S/4."""
    base = rng.dirichlet(np.full(E, 50.0))
    p = np.broadcast_to(base, (len(steps), E)).copy()
    if collapse:
        c = np.clip((steps - total / 2) / (total / 4), 0, 1)[:, None] * 0.6
        hot = np.zeros(E)
        hot[0] = 1.0
        p = (1 - c) * p + c * hot
    return p


def write_part(run: Path, table: str, t: pa.Table, n: int) -> None:
    folder = run / table
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"r0000-s0001-{n:08d}.parquet").write_bytes(part_bytes(t))  # the writer's layout: a row group per layer


def chunk_tables(rng, lo: int, hi: int, total: int, layers: int, E: int, k: int, tokens: int, seq0: int,
                 grads: bool = False) -> tuple[pa.Table, pa.Table]:
    steps = np.arange(lo, hi, dtype=np.int64)
    S = len(steps)
    ex_cols: dict[str, list[np.ndarray]] = {c: [] for c in ("step", "layer", "expert", "tokens", "grad_norm")}
    ly: dict[str, list[np.ndarray]] = {c: [] for c in ("step", "layer", "cv", "max_share", "dead", "entropy_norm",
                                                        "z_loss", "logit_abs_max", "aux_loss")}
    for li in range(layers):
        p = shares(np.random.default_rng(li), steps, E, li == 7, total)
        counts = rng.poisson(p * tokens * k).astype(np.int64)
        tot = counts.sum(axis=1, keepdims=True).clip(min=1)
        f = counts / tot
        ex_cols["step"].append(np.repeat(steps, E))
        ex_cols["layer"].append(np.full(S * E, li, dtype=np.int32))
        ex_cols["expert"].append(np.tile(np.arange(E, dtype=np.int32), S))
        ex_cols["tokens"].append(counts.reshape(-1))
        if grads:  # an expert's gradient grows with the tokens it gets: the collapsing layer's starved ones stall
            noise = np.exp(0.3 * rng.standard_normal(counts.shape))
            ex_cols["grad_norm"].append((1e-3 * np.sqrt(counts) * noise).reshape(-1))
        mean = counts.mean(axis=1)
        ly["step"].append(steps)
        ly["layer"].append(np.full(S, li, dtype=np.int32))
        ly["cv"].append(counts.std(axis=1) / mean)
        ly["max_share"].append(f.max(axis=1))
        ly["dead"].append((counts == 0).sum(axis=1))
        ent = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(axis=1) / np.log(E)
        ly["entropy_norm"].append(ent * 0.85)
        ly["z_loss"].append(5 + 10 * (1 - ent) + rng.normal(0, 0.1, S))
        ly["logit_abs_max"].append(4 + 6 * (1 - ent) + rng.normal(0, 0.05, S))
        ly["aux_loss"].append(E * (f * p).sum(axis=1))
    names = pa.array([layer_name(i) for i in range(layers)])
    n_ex = S * E * layers
    ex = conform(pa.table({
        "step": np.concatenate(ex_cols["step"]),
        "layer": pa.DictionaryArray.from_arrays(np.concatenate(ex_cols["layer"]), names).cast(pa.string()),
        "expert": np.concatenate(ex_cols["expert"]),
        "tokens": np.concatenate(ex_cols["tokens"]),
        "dropped": np.zeros(n_ex, np.int64),
        "prob_mean": pa.nulls(n_ex, pa.float64()),
        "bias": pa.nulls(n_ex, pa.float64()),
        "rank": np.zeros(n_ex, np.int32),
        "session": np.ones(n_ex, np.int32),
        "seq": np.repeat(np.tile(np.arange(seq0, seq0 + S, dtype=np.int64), layers), E),
        **({"grad_norm": np.concatenate(ex_cols["grad_norm"])} if grads else {}),
    }), EXPERTS_SCHEMA)
    n_ly = S * layers
    ent = np.concatenate(ly["entropy_norm"])
    lyt = conform(pa.table({
        "step": np.concatenate(ly["step"]),
        "layer": pa.DictionaryArray.from_arrays(np.concatenate(ly["layer"]), names).cast(pa.string()),
        "tokens": np.full(n_ly, tokens, np.int64), "top_k": np.full(n_ly, k, np.int32),
        "num_experts": np.full(n_ly, E, np.int32), "entropy": ent * np.log(E), "entropy_norm": ent,
        "cv": np.concatenate(ly["cv"]), "max_share": np.concatenate(ly["max_share"]),
        "dead": np.concatenate(ly["dead"]).astype(np.int32), "dropped": np.zeros(n_ly, np.int64),
        "drop_rate": np.zeros(n_ly), "logit_abs_max": np.concatenate(ly["logit_abs_max"]),
        "logit_mean": np.zeros(n_ly), "logit_std": np.ones(n_ly), "z_loss": np.concatenate(ly["z_loss"]),
        "aux_loss": np.concatenate(ly["aux_loss"]), "nonfinite": np.zeros(n_ly, np.int64),
        "calls": np.ones(n_ly, np.int32), "time": np.zeros(n_ly), "rank": np.zeros(n_ly, np.int32),
        "session": np.ones(n_ly, np.int32), "seq": np.tile(np.arange(seq0, seq0 + S, dtype=np.int64), layers),
    }), LAYERS_SCHEMA)
    return ex, lyt


def make_run(path: Path, steps: int, layers: int, experts: int, part_steps: int, status: str = "running",
             top_k: int = 2, tokens: int = 4096, grads: bool = False) -> None:
    params = {"steps": steps, "layers": layers, "experts": experts, "part_steps": part_steps, "v": 3}
    if (top_k, tokens) != (2, 4096):
        params.update(top_k=top_k, tokens=tokens)
    if grads:
        params.update(grads=True)
    manifest = {"schema_version": SCHEMA_VERSION, "status": status, "model_class": "benchmark.SyntheticMoE",
                "world_size": 1, "heartbeat": time.time(), "flush_seconds": 30.0,
                "routers": [{"name": layer_name(i), "num_experts": experts, "top_k": top_k} for i in range(layers)]}
    stamp = path / "bench.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params:
        (path / MANIFEST).write_text(json.dumps(manifest))  # "running": live reads keep headroom to append into
        return
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for n, lo in enumerate(range(0, steps, part_steps)):
        hi = min(steps, lo + part_steps)
        ex, ly = chunk_tables(rng, lo, hi, steps, layers, experts, top_k, tokens, lo, grads)
        write_part(path, EXPERTS, ex, n)
        write_part(path, LAYERS, ly, n)
        print(f"\r  writing synthetic run: {hi:,}/{steps:,} steps", end="", file=sys.stderr, flush=True)
    (path / MANIFEST).write_text(json.dumps(manifest))
    stamp.write_text(json.dumps(params))
    print(f"\n  wrote {path} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


def timed(fn, repeat: int = 1) -> tuple[float, float, object]:
    """Median wall and CPU time (this process, all threads) of `repeat` calls, and the last result."""
    wall, cpu, out = [], [], None
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def to_json(fig) -> str:
    from plotly.io.json import to_json_plotly

    return to_json_plotly(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--part-steps", type=int, default=1000, help="steps per part file (a flush)")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moewatch-bench-dashboard"))
    ap.add_argument("--repeat", type=int, default=5, help="median of this many builds per figure")
    ap.add_argument("--browser", action="store_true",
                    help="also time the page in headless Chromium (/usr/bin/chromium + chromedriver, selenium)")
    args = ap.parse_args()

    from moewatch.app import figures
    from moewatch.app.arrays import human_bytes

    run_dir = args.dir / "run"
    make_run(run_dir, args.steps, args.layers, args.experts, args.part_steps)
    rows = args.steps * args.layers * args.experts
    print(f"run: {args.steps:,} steps x {args.layers} layers x {args.experts} experts = {rows / 1e6:,.0f}M expert rows"
          f" in {len(list((run_dir / EXPERTS).iterdir()))} parts "
          f"({human_bytes(sum(f.stat().st_size for f in run_dir.rglob('*.parquet')))} on disk)")

    # Live append: keep the last part aside, load without it, then let it "arrive".
    last = sorted((run_dir / EXPERTS).iterdir())[-1].name
    aside = args.dir / "aside"
    aside.mkdir(exist_ok=True)
    for table in (EXPERTS, LAYERS):
        (run_dir / table / last).rename(aside / f"{table}-{last}")

    results: list[tuple[str, float, float, str]] = []

    def measure(name: str, fn, repeat: int = 1, note=lambda out: "") -> tuple[float, object]:
        wall, cpu, out = timed(fn, repeat)
        results.append((name, wall, cpu, note(out)))
        return wall, out

    try:
        from moewatch.app import create_app
        from moewatch.app.catalog import run_id_for

        app = create_app(args.dir, refresh_seconds=3600)  # the app's own cache: the browser reuses this load
        catalog = app.moewatch_catalog
        run_id = run_id_for(catalog.root, run_dir)
        _, run = measure("first load (read all parts into the cache)", lambda: catalog.run(run_id))
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        mem = f"cache {human_bytes(run.nbytes)}, peak RSS {human_bytes(rss)}"

        layer = layer_name(7)
        from moewatch.app.windows import detector_window

        window = detector_window(run, layer)  # what the charts use before the detector has answered

        def layer_view(lo=0, hi=None, sort=False, window=window):
            return [to_json(figures.heatmap_figure(run, layer, lo, hi, WIDTH_PX, sort, window=window)[0]),
                    to_json(figures.shares_figure(run, layer, lo, hi, sort, window=window)[0]),
                    to_json(figures.metrics_figure(run, layer, lo, hi, window=window)[0])]

        _, det = measure("detection on the cached arrays, with health + verdict (background thread)",
                         lambda: catalog.detector.get(run, wait=600),
                         note=lambda out: f"{len(out.alerts)} alerts shown, {len(out.health):,} health windows")
        ov_s, _ = measure("overview figure (build + JSON)",
                          lambda: to_json(figures.overview_figure(run.layer_names, det.health, WIDTH_PX)[0]),
                          args.repeat, lambda out: f"{len(out) / 1e6:.2f} MB JSON")
        ov_cpu = results[-1][2]
        lv_s, _ = measure(f"layer view = layer switch (windows of {window} steps: heatmap + shares + metrics, "
                          "build + JSON)", layer_view, args.repeat,
                          lambda out: f"{sum(map(len, out)) / 1e6:.2f} MB JSON")
        lv_cpu = results[-1][2]
        measure("layer view, raw per-step counts", lambda: layer_view(window=None), args.repeat,
                lambda out: f"{sum(map(len, out)) / 1e6:.2f} MB JSON")
        measure("layer view, experts sorted by load", lambda: layer_view(sort=True), args.repeat)
        results.append(("first paint, server side (overview + layer view)", ov_s + lv_s, ov_cpu + lv_cpu,
                        "target <= 1.5 s"))
        lo, hi = run.index_range(args.steps * 0.5, args.steps * 0.55)
        measure("zoom: layer view re-binned to 5% of the steps", lambda: layer_view(lo, hi), args.repeat,
                lambda out: f"{hi - lo:,} steps")
        if args.browser:
            for name, secs in browser_times(app, layer_name(3)).items():
                results.append((name, secs, float("nan"), "in headless Chromium, from the server's cache"))

        for table in (EXPERTS, LAYERS):
            (aside / f"{table}-{last}").rename(run_dir / table / last)
        n_before, gen = run.n, run.generation
        measure("live: read one new part file", run.refresh,
                note=lambda out: f"+{run.n - n_before:,} steps, appended in place")
        assert run.n > n_before and run.dirty_since(gen) == n_before
        measure("live: rebuild the layer view after it", layer_view)
    finally:
        for table in (EXPERTS, LAYERS):
            p = aside / f"{table}-{last}"
            if p.exists():
                p.rename(run_dir / table / last)

    load = os.getloadavg()[0]
    print(f"memory: {mem}; load average {load:.1f} on {os.cpu_count()} cores (wall times suffer when it is high)")
    width = max(len(r[0]) for r in results)
    print(f"  {'':<{width}}  {'wall':>9}  {'cpu':>9}")
    for name, wall, cpu, note in results:
        cpu_text = "      -" if cpu != cpu else f"{cpu * 1000:6.0f}"
        print(f"  {name:<{width}}  {wall * 1000:6.0f} ms  {cpu_text} ms  {note}")
    print(f"targets: first paint <= 1500 ms -> {'met' if ov_s + lv_s <= 1.5 else 'MISSED'}; "
          f"layer switch <= 300 ms -> {'met' if lv_s <= 0.3 else 'MISSED'}")


CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,1500")
DRAWN_JS = """
return arguments[0].every(id => {
  const gd = document.querySelector('#' + id + ' .js-plotly-plot');
  return !!(gd && gd.data && gd.data.length && (!window.__old || gd.data[0] !== window.__old[id]));
});
"""


def browser_times(app, other_layer: str) -> dict[str, float]:
    """First paint of the run page and one layer switch, as a user sees them (server in this process)."""
    import tempfile
    import threading

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    profile = tempfile.mkdtemp(prefix="moewatch-bench-chrome-")
    for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    graphs = ["overview", "heatmap", "shares", "metrics"]

    def until(condition, timeout: float = 120.0) -> float:
        t0 = time.perf_counter()
        while not condition():
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError("the page did not draw in time")
            time.sleep(0.02)
        return time.perf_counter()

    try:
        out = {}
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        until(lambda: driver.find_elements(By.CSS_SELECTOR, "a.run-link"))
        link = driver.find_element(By.CSS_SELECTOR, "a.run-link")
        t0 = time.perf_counter()
        link.click()  # as a user does: from the run list, the app's scripts already loaded
        out["browser: click a run in the list -> all four charts drawn"] = until(
            lambda: driver.execute_script(DRAWN_JS, graphs)) - t0
        driver.execute_script("window.__old = {}; for (const id of arguments[0]) { window.__old[id] = "
                              "document.querySelector('#' + id + ' .js-plotly-plot').data[0]; }", graphs[1:])
        driver.find_element(By.ID, "layer").click()
        driver.find_element(By.CSS_SELECTOR, ".dash-dropdown-search").send_keys(other_layer)
        option = next(o for o in driver.find_elements(By.CSS_SELECTOR, "[role=option]") if o.text == other_layer)
        t0 = time.perf_counter()
        option.click()
        out["browser: pick another layer -> heatmap, shares, metrics redrawn"] = until(
            lambda: driver.execute_script(DRAWN_JS, graphs[1:])) - t0
        return out
    finally:
        driver.quit()
        server.shutdown()


if __name__ == "__main__":
    main()
