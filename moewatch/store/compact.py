"""Compaction: many small part files of a table merged into a few, crash-safely, so a 100k-step run does not leave
thousands of files per table (which parallel file systems punish and every reader pays to open).

A compacted part ``<table>/r<rank>-s<session>-c<first>-<last>.parquet`` holds the rows of consecutive
parts ``r<rank>-s<session>-<n>.parquet`` (``first`` to ``last``) that it replaces, grouped by layer with a row group per
layer (so readers of a few layers skip the rest by statistics), and names them in its Parquet key-value metadata (``moewatch.replaces``: a JSON list of file names). Readers list a table through
:func:`live_parts`, which leaves out every part that a present compacted part replaces. So at any moment each row is
read exactly once: before the compacted part is renamed into place (atomically, like every moewatch file) readers
see the sources; from then on they see the compacted part, whether or not the sources are deleted yet. A compaction
killed at any point loses nothing; the next one deletes what an interrupted one left behind.
"""

from __future__ import annotations

import json
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from moewatch.store.manifest import atomic_write_bytes
from moewatch.store.schema import RANKS_DIR, SCHEMAS, TABLES, part_bytes

REPLACES = b"moewatch.replaces"
_PLAIN = re.compile(r"^r(\d+)-s(\d+)-(\d+)\.parquet$")
COMPACTED = re.compile(r"^r(\d+)-s(\d+)-c(\d+)-(\d+)\.parquet$")
STALE_SECONDS = 3600.0
DEFAULT_ROWS = 4_000_000  # rows per compacted part: ~20 flushes of 32 layers x 64 experts x 100 steps


@dataclass
class Compaction:
    """What :func:`compact` did: parts merged into how many, files deleted (sources and leftovers)."""

    merged: int = 0
    written: int = 0
    deleted: int = 0
    tables: list[str] = field(default_factory=list)
    rollups: bool = False


def live_parts(folder: Path) -> list[Path]:
    """The part files of one table folder a reader must read, sorted: those no present compacted part replaces."""
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))
    replaced: set[str] = set()
    for f in files:
        if COMPACTED.match(f.name):
            replaced.update(replaced_by(f))
    return [f for f in files if f.name not in replaced] if replaced else files


def replaced_by(f: Path) -> list[str]:
    """The part names a compacted part replaces ([] when it cannot be read: its sources then stay live)."""
    try:
        meta = pq.read_schema(f).metadata or {}
        return [str(n) for n in json.loads(meta.get(REPLACES, b"[]"))]
    except (OSError, pa.ArrowException, ValueError, TypeError):
        return []


def compact(run_dir: str | Path, *, rows: int = DEFAULT_ROWS, min_parts: int = 2, rank: int | None = None,
            session: int | None = None, rollups: bool = True) -> Compaction:
    """Merge consecutive plain parts of each table (and of ``ranks/`` tables) into parts of up to ``rows`` rows,
    per (rank, session); only ``rank``/``session`` when given (a writer compacting its own parts). Parts are
    immutable once written, so this is safe while the run is still training. A whole-run compaction then writes
    the run's rollups (``moewatch.store.rollup``) unless ``rollups`` is False. Returns what it did."""
    run_dir = Path(run_dir)
    done = Compaction()
    for folder in _table_folders(run_dir):
        table = folder.name
        done.deleted += _sweep(folder)
        groups: dict[tuple[int, int], list[tuple[int, Path]]] = {}
        for f in live_parts(folder):
            m = _PLAIN.match(f.name)
            if m is None:
                continue
            key = (int(m.group(1)), int(m.group(2)))
            if (rank is None or key[0] == rank) and (session is None or key[1] == session):
                groups.setdefault(key, []).append((int(m.group(3)), f))
        for (r, s), parts in groups.items():
            # The newest plain part of a session stays as it is: attach numbers a resumed session after the
            # sessions its part names show (``r<rank>-s<session>-<n>``, not compacted names), so merging them all
            # would let the next attach reuse this session number, and its new parts (named like the replaced
            # ones) would be hidden by this compacted part, then deleted by the next compaction.
            for batch in _batches(sorted(parts)[:-1], rows):
                if len(batch) < min_parts:
                    continue
                try:
                    _merge(folder, table, r, s, batch)
                except (OSError, pa.ArrowException, ValueError) as e:
                    # A part whose data cannot be read (or a full disk): leave this batch as it is, go on.
                    warnings.warn(f"moewatch: compaction left {len(batch)} parts of {folder} as they are "
                                  f"({type(e).__name__}: {e})", RuntimeWarning, stacklevel=2)
                    continue
                done.merged += len(batch)
                done.written += 1
                done.deleted += _delete(f for _, f in batch)
        if groups:
            done.tables.append(str(folder.relative_to(run_dir)))
    if rank is None and session is None and rollups:
        from moewatch.store.rollup import write_rollups

        done.rollups = write_rollups(run_dir) is not None
    return done


def _table_folders(run_dir: Path) -> list[Path]:
    out = [run_dir / t for t in TABLES] + [run_dir / RANKS_DIR / t for t in TABLES]
    return [f for f in out if f.is_dir()]


def _batches(parts: list[tuple[int, Path]], rows: int) -> Iterable[list[tuple[int, Path]]]:
    """Runs of consecutive parts (in writing order) whose rows add up to at most ``rows`` (a part over it stays
    alone); a part that cannot be read ends a run and stays where it is."""
    batch: list[tuple[int, Path]] = []
    size = 0
    for n, f in parts:
        try:
            count = pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException, ValueError):
            if batch:
                yield batch
            batch, size = [], 0  # a corrupt part is left where it is (readers skip it with a warning)
            continue
        if batch and size + count > rows:
            yield batch
            batch, size = [], 0
        batch.append((n, f))
        size += count
    if batch:
        yield batch


def _merge(folder: Path, table: str, rank: int, session: int, batch: list[tuple[int, Path]]) -> Path:
    schema = SCHEMAS[table]
    merged = pa.concat_tables([pq.read_table(f, schema=schema) for _, f in batch])
    names = [f.name for _, f in batch]
    merged = merged.replace_schema_metadata({**(merged.schema.metadata or {}), REPLACES: json.dumps(names).encode()})
    # Grouped by layer (a stable sort: writing order within a layer), a row group per layer: a reader after a few
    # layers skips the others' row groups by their statistics instead of decoding them.
    merged = merged.take(pc.sort_indices(merged, sort_keys=[("layer", "ascending")]))
    path = folder / f"r{rank:04d}-s{session:04d}-c{batch[0][0]:08d}-{batch[-1][0]:08d}.parquet"
    atomic_write_bytes(path, part_bytes(merged))  # from here on readers see this part instead of its sources
    return path


def _sweep(folder: Path) -> int:
    """Delete the sources that present compacted parts replace (left behind by an interrupted compaction), and
    temporary files of writes killed mid-way (dot-names no reader lists) once they are ``STALE_SECONDS`` old: a
    live write renames its file within seconds, on this host or any other sharing the file system."""
    present = {p.name for p in folder.iterdir()}
    stale = []
    now = time.time()
    for f in folder.iterdir():
        if COMPACTED.match(f.name):
            stale.extend(folder / n for n in replaced_by(f) if n in present)
        elif f.name.startswith(".tmp-"):
            try:
                if now - f.stat().st_mtime > STALE_SECONDS:
                    stale.append(f)
            except FileNotFoundError:
                pass
    return _delete(stale)


def _delete(files: Iterable[Path]) -> int:
    n = 0
    for f in files:
        try:
            f.unlink()
            n += 1
        except FileNotFoundError:
            pass
    return n
