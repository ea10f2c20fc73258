"""Cold start of `moewatch serve` on a big run, as a user meets it: the server process starts, a headless Chromium
opens the run's page (a bookmark: /run/<path>), and the clock stops when the expert heatmap is drawn. Also the
server's peak RSS (issue "Real pretraining scale": heatmap <= 15 s after `moewatch serve` starts, server <= 2 GiB).

    python benchmarks/dashboard_cold.py --dir /tmp/moewatch-bench-dashboard   # the run benchmarks/dashboard.py writes
    python benchmarks/dashboard_cold.py --dir /tmp/moewatch-bench-dashboard-grads --grads  # recording grad_norm too
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashboard import CHROME_FLAGS, make_run  # noqa: E402

DRAWN = """
const gd = document.querySelector('#heatmap .js-plotly-plot');
return !!(gd && gd.data && gd.data.length && gd.data[0].type === 'heatmap' && gd.querySelector('.hm image, image'));
"""


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moewatch-bench-dashboard"))
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--grads", action="store_true", help="the run records a grad_norm per expert and step")
    args = ap.parse_args()
    run = args.dir / "run"
    make_run(run, args.steps, args.layers, args.experts, 1000, grads=args.grads)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tempfile.mkdtemp(prefix='moewatch-cold-')}"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)  # the browser is up first
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "moewatch.cli", "serve", str(args.dir), "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/run/run"
        while True:  # the server's socket opens after its imports
            try:
                driver.get(url)
                if "moewatch" in driver.title:
                    break
            except Exception:
                pass
            time.sleep(0.05)
        up = time.perf_counter() - t0
        while not driver.execute_script(DRAWN):
            if time.perf_counter() - t0 > 300:
                raise TimeoutError("the heatmap did not draw in 300 s")
            time.sleep(0.05)
        drawn = time.perf_counter() - t0
        rss = peak_rss(server.pid)
        rows = args.steps * args.layers * args.experts
        print(f"{args.steps:,} steps x {args.layers} layers x {args.experts} experts ({rows / 1e6:.0f} M expert rows): "
              f"page served {up:.1f} s, heatmap drawn {drawn:.1f} s after `moewatch serve` started; "
              f"server peak RSS {rss / 2**30:.2f} GiB")
    finally:
        driver.quit()
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
