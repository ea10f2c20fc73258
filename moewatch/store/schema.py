"""The run-directory format: table schemas, folder and file names, the schema version, and how a part file is laid
out (`part_bytes`: a row group per layer in experts parts; `conform`: a table in a schema's columns). Torch-free:
every reader imports it.

Documented for users in docs/format.md; change both together and bump SCHEMA_VERSION on any incompatible change.

Version 2 added the routing diagnostics (experts: ``gate_mass``; layers: ``margin_mean``, ``near_tie_frac``,
``margin_tokens``, ``margin_hist``, ``override_frac``, ``overridden``, ``override_slots``) and expert learning
(experts: ``grad_norm``, ``param_norm``). Readers read version-1 parts against these schemas, so the columns those
parts lack read as null.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SCHEMA_VERSION = 2

MANIFEST = "run.json"
EXPERTS = "experts"
LAYERS = "layers"
EVAL_EXPERTS = "eval_experts"
EVAL_LAYERS = "eval_layers"
TABLES = (EXPERTS, LAYERS, EVAL_EXPERTS, EVAL_LAYERS)
RANKS_DIR = "ranks"  # per-rank rows (attach(per_rank=True)) and the rank manifests r<rank>.json

# Columns that identify where a row came from; the newest (session, seq) wins for a repeated (rank, step, layer).
_PROVENANCE = [
    pa.field("rank", pa.int32(), nullable=False),
    pa.field("session", pa.int32(), nullable=False),
    pa.field("seq", pa.int64(), nullable=False),
]

EXPERTS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("expert", pa.int32(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("dropped", pa.int64(), nullable=False),
        pa.field("prob_mean", pa.float64()),
        pa.field("bias", pa.float64()),
        pa.field("gate_mass", pa.float64()),
        # float32: computed in float32 on the device, and a value per expert and step that no codec shrinks (random
        # mantissas): float64 would double a 58 x 256 run's biggest column for digits that are not there.
        pa.field("grad_norm", pa.float32()),  # L2 norm of the expert's gradients at the optimizer step(s)
        pa.field("param_norm", pa.float32()),  # L2 norm of the expert's parameters, at flush steps
        *_PROVENANCE,
    ]
)

LAYERS_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("layer", pa.string(), nullable=False),
        pa.field("tokens", pa.int64(), nullable=False),
        pa.field("top_k", pa.int32(), nullable=False),
        pa.field("num_experts", pa.int32(), nullable=False),
        pa.field("entropy", pa.float64()),
        pa.field("entropy_norm", pa.float64()),
        pa.field("cv", pa.float64()),
        pa.field("max_share", pa.float64()),
        pa.field("dead", pa.int32(), nullable=False),
        pa.field("dropped", pa.int64(), nullable=False),
        pa.field("drop_rate", pa.float64()),
        pa.field("logit_abs_max", pa.float64()),
        pa.field("logit_mean", pa.float64()),
        pa.field("logit_std", pa.float64()),
        pa.field("z_loss", pa.float64()),
        pa.field("aux_loss", pa.float64()),
        pa.field("nonfinite", pa.int64(), nullable=False),
        pa.field("margin_mean", pa.float64()),
        pa.field("near_tie_frac", pa.float64()),
        pa.field("margin_tokens", pa.int64()),
        pa.field("margin_hist", pa.list_(pa.int64())),  # metrics.MARGIN_BINS counts, edges in docs/format.md
        pa.field("override_frac", pa.float64()),
        pa.field("overridden", pa.int64()),
        pa.field("override_slots", pa.int64()),
        pa.field("calls", pa.int32(), nullable=False),
        pa.field("time", pa.float64()),
        *_PROVENANCE,
    ]
)

SCHEMAS = {EXPERTS: EXPERTS_SCHEMA, LAYERS: LAYERS_SCHEMA, EVAL_EXPERTS: EXPERTS_SCHEMA, EVAL_LAYERS: LAYERS_SCHEMA}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in ``schema``'s column order and types; a column it lacks (one a newer format added, such as
    schema 2's routing diagnostics) is null. For writers of synthetic or hand-built parts."""
    cols = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
            for f in schema]
    return pa.Table.from_arrays(cols, schema=schema)


def part_bytes(table: pa.Table) -> bytes:
    """A part file's bytes (zstd), as the writer and compaction write it (docs/format.md). An experts table gets one row group per run of rows of one layer (the writer
    and compaction group rows by layer), so each row group's statistics name its layer."""
    buf = io.BytesIO()
    if "expert" not in table.column_names or table.num_rows == 0:
        pq.write_table(table, buf, compression="zstd")
        return buf.getvalue()
    layer = table["layer"].combine_chunks()
    cuts = pc.indices_nonzero(pc.not_equal(layer[1:], layer[:-1])).to_numpy() + 1
    bounds = [0, *cuts.tolist(), table.num_rows]
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as out:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            out.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
    return buf.getvalue()
