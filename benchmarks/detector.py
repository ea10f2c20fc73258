"""Time the collapse detector and report rendering on a big synthetic run (issue 4: 100k steps x 32 layers x 64
experts in <= 10 s).

    python benchmarks/detector.py                       # the issue's size, in-memory arrays
    python benchmarks/detector.py --steps 20000 --frames # also time the DataFrame path (the loader's output)
    python benchmarks/detector.py --steps 5000 --disk    # also time `moewatch report` end to end on a run dir

The set-up (sampling the synthetic run) is timed separately and is not part of the target. The detector works on
per-layer [steps, experts] arrays, so the issue's size (205M expert rows) costs ~1.6 GB instead of a >10 GB table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moewatch.detect import DetectorConfig  # noqa: E402
from moewatch.detect.engine import analyze, analyze_frames  # noqa: E402
from moewatch.detect.synthetic import benchmark_scenario, simulate  # noqa: E402
from moewatch.report import RunReport, render, report_paths  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--frames", action="store_true", help="also time detection from pandas frames")
    ap.add_argument("--disk", action="store_true", help="also time report_paths on a written run directory")
    args = ap.parse_args()
    config = DetectorConfig()
    sc = benchmark_scenario(args.steps, args.layers, args.experts)
    rows = args.steps * args.layers * args.experts
    print(f"synthetic run: {args.steps} steps x {args.layers} layers x {args.experts} experts = {rows / 1e6:.0f}M "
          f"expert rows (layer 0 drifts to collapse from step {sc.onset})")

    t0 = time.perf_counter()
    run = simulate(sc, lean=True)
    data = run.layer_data()
    print(f"  set-up (sampling, not timed against the target): {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    analysis = analyze(data, config)
    t_detect = time.perf_counter() - t0
    report = RunReport(Path("synthetic"), {"model_class": "SyntheticMoE"}, "finished", args.steps, analysis)
    times = {}
    for fmt in ("text", "json", "html"):
        t1 = time.perf_counter()
        out = render([report], fmt, config)
        times[fmt] = (time.perf_counter() - t1, len(out))
    flagged = sorted({a.layer for a in analysis.alerts if a.severity != "info"})
    print(f"  detect: {t_detect:.2f} s ({len(analysis.alerts)} alerts, "
          f"{sum(a.severity == 'critical' for a in analysis.alerts)} critical; layers flagged: {', '.join(flagged)})")
    for fmt, (t, n) in times.items():
        print(f"  render {fmt:5s}: {t:.2f} s ({n / 1e6:.1f} MB)")
    total = t_detect + times["text"][0] + times["json"][0] + times["html"][0]
    print(f"  detect + text + json + html: {total:.2f} s   (target <= 10 s)")
    print(f"  peak memory (max RSS): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB")

    if args.frames:
        del data
        layers, experts = run.frames()
        t0 = time.perf_counter()
        analyze_frames(layers, experts, config)
        t = time.perf_counter() - t0
        print(f"  detect from DataFrames ({len(experts) / 1e6:.0f}M expert rows): {t:.2f} s")
        del layers, experts

    if args.disk:
        with tempfile.TemporaryDirectory() as tmp:
            run.write(Path(tmp) / "run")
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                code = report_paths([Path(tmp) / "run"], "text", config)
            t = time.perf_counter() - t0
            print(f"  moewatch report (load + global view + detect + text) on disk: {t:.2f} s, exit code {code}")


if __name__ == "__main__":
    main()
