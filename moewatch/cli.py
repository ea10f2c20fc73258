"""The `moewatch` command line: a thin typer layer that parses arguments and calls the library.

Bad input exits 2 with one line on stderr that says what is wrong and what to do.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="moewatch",
    help="Training-health monitor for Mixture-of-Experts routers.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


def fail(message: str) -> None:
    typer.echo(f"moewatch: error: {message}", err=True)
    raise typer.Exit(2)


class Format(str, Enum):
    text = "text"
    markdown = "markdown"
    json = "json"
    html = "html"


class FailOn(str, Enum):
    warning = "warning"
    recovered = "recovered"
    critical = "critical"
    collapsed = "collapsed"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@app.command()
def summary(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by moewatch.attach.")],
) -> None:
    """Print a run's manifest and the last recorded step of every router."""
    from moewatch.store.reader import RunError, load

    try:
        run = load(run_dir)
    except RunError as e:
        fail(str(e))
    typer.echo(format_summary(run))


def format_summary(run) -> str:
    lines = [f"run {run.path}  status={run.status}  steps={run.steps}  model={run.meta.get('model_class')}"]
    if run.layers.empty:
        lines.append("  no steps recorded yet")
        return "\n".join(lines)
    last = run.global_view().layers.sort_values("step").groupby("layer", sort=False).tail(1)
    cols = ["layer", "step", "tokens", "num_experts", "top_k", "cv", "entropy_norm", "max_share", "dead",
            "drop_rate", "z_loss", "aux_loss"]
    lines.append(last[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return "\n".join(lines)


@app.command()
def report(
    path: Annotated[Path, typer.Argument(help="A run directory, or a folder of runs (each is reported).")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.text,
    config: Annotated[Path | None, typer.Option(help="TOML file of detector thresholds.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one threshold: key=value (repeatable).")]
    = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write the report to this file.")] = None,
    fail_on: Annotated[FailOn, typer.Option("--fail-on", help="Exit 1 when a run's status is this or worse.")]
    = FailOn.critical,
) -> None:
    """Print a collapse report. Statuses: healthy, warning, recovered, critical, collapsed.

    Exit 1 when a run is critical or collapsed at its end (a CI gate; --fail-on recovered or warning tightens it,
    --fail-on collapsed lets drops and NaNs pass), 0 otherwise, 2 on bad input.
    """
    from moewatch.report import ReportInputError, build_config, report_paths

    try:
        detector_config = build_config(config, set_ or [])
        code = report_paths([path], format.value, detector_config, out=output, fail_on=fail_on.value)
    except ReportInputError as e:
        fail(str(e))
    raise typer.Exit(code)


@app.command()
def serve(
    path: Annotated[Path, typer.Argument(help="A run directory or a folder holding many (found by run.json).")],
    host: Annotated[str, typer.Option(help="Interface to bind; keep 127.0.0.1 unless you mean to share it.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8050,
    refresh: Annotated[float, typer.Option(help="Seconds between live updates of running runs.")] = 5.0,
    debug: Annotated[bool, typer.Option(help="Dash debug mode (never on a shared host).")] = False,
    config: Annotated[Path | None, typer.Option(help="TOML file of detector thresholds (as for report).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one threshold: key=value (repeatable).")]
    = None,
) -> None:
    """Open the dashboard of expert load over time (live while runs are training)."""
    if not path.exists():
        fail(f"{path} does not exist: pass a run directory or a folder of runs")
    if not path.is_dir():
        fail(f"{path} is not a directory: pass a run directory or a folder of runs")
    if not 0 < port < 65536:
        fail(f"--port must be between 1 and 65535, got {port}")
    if refresh <= 0:
        fail(f"--refresh must be > 0 seconds, got {refresh}")
    from moewatch.report import ReportInputError, build_config

    try:
        detector_config = build_config(config, set_ or [])
    except ReportInputError as e:
        fail(str(e))
    from moewatch.app import create_app

    dash_app = create_app(path, refresh_seconds=refresh, config=detector_config)
    typer.echo(f"moewatch: serving {path.resolve()} at http://{host}:{port}/  (Ctrl+C to stop)")
    dash_app.run(host=host, port=port, debug=debug)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for the scenario runs (one run directory each).")]
    = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="Training steps per scenario (default: the scenario's).")]
    = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    seed: Annotated[int, typer.Option(help="Random seed (data, init, noise).")] = 0,
    scenario: Annotated[list[str] | None, typer.Option(help="Run only these scenarios (repeatable).")] = None,
) -> None:
    """Train the reference MoE under several balancing scenarios with moewatch attached."""
    from moewatch.reference.demo import SCENARIOS, format_summary_table, judge, run_demo

    if steps is not None and steps < 1:
        fail(f"--steps must be >= 1, got {steps}")
    names = scenario or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        fail(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    dev = device.value
    if dev == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device cuda asked for but no CUDA device is available; use --device cpu")
    if out.exists() and not out.is_dir():
        fail(f"--out {out} is a file; pass a folder")
    summaries = run_demo(out, steps=steps, device=dev, seed=seed, scenarios=names, progress=True)
    typer.echo("")
    typer.echo(format_summary_table(summaries, judge(summaries)))
    typer.echo(f"\nOpen the dashboard:   moewatch serve {out}")
    typer.echo(f"Collapse report:      moewatch report {out}")


@app.command()
def compact(
    path: Annotated[Path, typer.Argument(help="A run directory, or a folder of runs (each is compacted).")],
    rows: Annotated[int, typer.Option(help="Rows per compacted part file.")] = 4_000_000,
) -> None:
    """Merge a run's small part files into few large ones, crash-safely (safe while it is still training)."""
    from moewatch.report import ReportInputError, find_run_dirs
    from moewatch.store.compact import compact as compact_run

    if rows < 1:
        fail(f"--rows must be >= 1, got {rows}")
    try:
        runs = find_run_dirs([path])
    except ReportInputError as e:
        fail(str(e))
    for run in runs:
        done = compact_run(run, rows=rows)
        what = (f"merged {done.merged} part files into {done.written}" if done.written
                else "nothing to merge (already compact)")
        extra = f"; removed {done.deleted - done.merged} left over by an interrupted compaction" \
            if done.deleted > done.merged else ""
        rolled = "; rollups written" if done.rollups else ""
        typer.echo(f"{run}: {what}{extra}{rolled}")


@app.command()
def version() -> None:
    """Print the moewatch version."""
    from moewatch import __version__

    typer.echo(__version__)


# typer vendors click; its ClickException is the base of the public typer.BadParameter.
_ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        sys.exit(130)
    except typer.Abort:
        sys.exit(130)
    except _ClickException as e:
        # Bad arguments: one line that says what is wrong and where to look (exit 2), not a usage box.
        ctx = getattr(e, "ctx", None)
        where = f"{ctx.command_path} --help" if ctx is not None else "moewatch --help"
        text = e.format_message().replace("Value error, ", "")
        if text:  # empty when the help was shown for a bare `moewatch`
            typer.echo(f"moewatch: error: {text} (see `{where}`)", err=True)
        sys.exit(e.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
