"""Read back what W&B recorded in offline mode: the run's transaction log `wandb/offline-run-*/run-<id>.wandb`.

The file is W&B's record log: a 7-byte header (`:W&B`, magic 0xBEE1, version 0) and then LevelDB-log framed records
(32 KiB blocks; each chunk a 7-byte header of CRC32, length and type: full, first, middle, last), each record a
`wandb.proto.wandb_internal_pb2.Record`. wandb 0.2x+ writes it from its Go core and ships no Python reader, so this
small one is the tests' own; it checks every chunk's CRC.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + HEADER + length > len(data):  # a chunk still being written
            break
        payload = data[pos + HEADER:pos + HEADER + length]
        assert zlib.crc32(payload, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, f"bad CRC at byte {pos}"
        pos += HEADER + length
        if kind == FULL:
            out.append(payload)
        elif kind == FIRST:
            pending = payload
        elif kind == MIDDLE:
            pending += payload
        elif kind == LAST:
            out.append(pending + payload)
            pending = b""
    records = []
    for payload in out:
        record = pb.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _key(item: Any) -> str:
    return item.key if item.key else "/".join(item.nested_key)


def _nested(items: Any) -> dict[str, Any]:
    """History or summary items as a dict; a nested item (e.g. a histogram's `values`) goes under its parent key."""
    out: dict[str, Any] = {}
    for item in items:
        value = json.loads(item.value_json)
        if item.key or len(item.nested_key) == 1:
            out[_key(item)] = value
        else:
            *parent, leaf = item.nested_key
            out.setdefault("/".join(parent), {})[leaf] = value
    return out


@dataclass
class OfflineRun:
    """What one offline run recorded, in order."""

    path: Path
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per committed row
    summary: dict[str, Any] = field(default_factory=dict)  # the latest value of each summary key
    alerts: list[Any] = field(default_factory=list)  # AlertRecord: title, text, level, wait_duration (ms)
    metrics: dict[str, Any] = field(default_factory=dict)  # define_metric: name (or glob) -> MetricRecord
    files: list[str] = field(default_factory=list)  # paths of the files records (run.save)

    @property
    def files_dir(self) -> Path:
        return self.path.parent / "files"


def read_offline_run(wandb_dir: Path, run_id: str | None = None, timeout: float = 20.0) -> OfflineRun:
    """The one finished offline run under `wandb_dir` (its `wandb/` folder or a parent of it), or the one with
    `run_id`. W&B's core process may still be writing the log when `run.finish()` returns: this waits (up to
    `timeout` seconds) for the run's `exit` record."""
    pattern = f"**/offline-run-*/run-{run_id or '*'}.wandb"
    found = sorted(Path(wandb_dir).glob(pattern))
    assert len(found) == 1, f"expected one offline run under {wandb_dir}, found {found}"
    deadline = time.monotonic() + timeout
    while True:
        records = read_records(found[0])
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, f"{found[0]} has no exit record: the run was not finished"
        time.sleep(0.05)
    run = OfflineRun(found[0])
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_nested(record.history.item))
        elif kind == "summary":
            for item in record.summary.update:
                value = json.loads(item.value_json)
                if item.key or len(item.nested_key) == 1:
                    run.summary[_key(item)] = value
                else:
                    *parent, leaf = item.nested_key
                    run.summary.setdefault("/".join(parent), {})[leaf] = value
        elif kind == "alert":
            run.alerts.append(record.alert)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "files":
            run.files.extend(f.path for f in record.files.files)
    return run


def rows_with(run: OfflineRun, key: str) -> list[dict[str, Any]]:
    return [row for row in run.history if key in row]
