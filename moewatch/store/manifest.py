"""The run manifest (`run.json`) and atomic file writes.

Every file moewatch writes appears atomically: written under a dot-name that pyarrow.dataset and pandas ignore,
fsynced, then renamed into place, so a reader never sees half a file and a crash never leaves one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from moewatch.store.schema import MANIFEST, SCHEMA_VERSION

STATUSES = ("running", "finished", "crashed")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The manifest as a dict; raises FileNotFoundError or ValueError (bad JSON) with the path in the message."""
    path = Path(run_dir) / MANIFEST
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def write_manifest(run_dir: Path, manifest: dict[str, Any], heartbeat: bool = True) -> None:
    """Atomically replace run.json; ``heartbeat=False`` keeps its heartbeat (an edit after the run, not a sign of life)."""
    manifest = dict(manifest)
    if heartbeat or "heartbeat" not in manifest:
        manifest["heartbeat"] = time.time()
    atomic_write_bytes(Path(run_dir) / MANIFEST, json.dumps(manifest, indent=2, default=str).encode("utf-8"))


def new_manifest(**fields: Any) -> dict[str, Any]:
    import platform

    import torch

    from moewatch import __version__

    now = time.time()
    return {
        "schema_version": SCHEMA_VERSION,
        "moewatch_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "created": now,
        "status": "running",
        "sessions": 1,
        "heartbeat": now,
        **fields,
    }


def run_state(manifest: dict[str, Any]) -> str:
    """running / finished / crashed; a `running` run whose heartbeat stopped long ago is reported crashed."""
    status = str(manifest.get("status", "running"))
    if status == "running":
        beat = float(manifest.get("heartbeat", 0) or 0)
        stale_after = 3 * min(float(manifest.get("flush_seconds", 30.0) or 30.0), 30.0) + 60.0
        if beat and time.time() - beat > stale_after:
            return "crashed"
    return status


def problem_lines(manifest: dict[str, Any], limit: int = 20) -> list[str]:
    """The capture problems run.json records (``problems``: silent routers, unreadable outputs, failing hooks, MoE
    blocks with no router found), one readable line each, oldest first; the report and the dashboard show these."""
    problems = [p for p in manifest.get("problems") or [] if isinstance(p, dict)]
    lines = []
    for p in problems[:limit]:
        where = p.get("router") or "model"
        step = f", step {p['step']}" if p.get("step") is not None else ""
        lines.append(f"{p.get('kind', 'problem')} ({where}{step}): {p.get('message', '')}".rstrip(": "))
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more in run.json (problems)")
    return lines
