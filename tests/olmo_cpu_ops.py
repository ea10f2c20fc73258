"""Plain-torch stand-ins for OLMo-core's token-permutation ops (its own are GPU-only Triton kernels), so its MoE layers
run on CPU in the tests. Only the permutation is replaced: routers, expert MLPs and capacity logic stay OLMo-core's.

Semantics, from OLMo-core's kernels: ``indices`` sorts the flattened (token, k) slots by expert; ``bins`` are the
cumulative per-expert counts (bin ends). ``binned_gather`` keeps at most ``bin_size`` slots of each expert (the first
in sorted order) and zero-pads; ``binned_scatter`` adds them back weighted, so dropped slots contribute nothing.
`GATHERED` records, per ``binned_gather`` call, how many slots of each expert were kept (what reached the experts).
"""

from __future__ import annotations

import torch

GATHERED: list[torch.Tensor] = []


def _starts(bins: torch.Tensor) -> list[int]:
    ends = bins.long().tolist()
    return [0, *ends[:-1]]


def gather(x, indices, bin_ids, bins, top_k):
    return x.index_select(0, indices.long() // top_k)


def scatter(x, indices, bin_ids, weights, bins, top_k):
    N = indices.numel() // top_k
    slots = indices.long()
    y = x if weights is None else x * weights.reshape(-1).index_select(0, slots).unsqueeze(-1)
    return torch.zeros(N, x.shape[-1], dtype=x.dtype).index_add(0, slots // top_k, y)


def binned_gather(x, indices, bins, bin_size, top_k):
    rows, kept = [], []
    for start, end in zip(_starts(bins), bins.long().tolist(), strict=True):
        n = min(end - start, bin_size)
        kept.append(n)
        take = x.index_select(0, indices[start:start + n].long() // top_k)
        rows.append(torch.cat([take, x.new_zeros(bin_size - n, x.shape[-1])]))
    GATHERED.append(torch.tensor(kept))
    return torch.stack(rows)


def binned_scatter(x, indices, weights, bins, top_k):
    N = indices.numel() // top_k
    out = x.new_zeros(N, x.shape[-1])
    for e, (start, end) in enumerate(zip(_starts(bins), bins.long().tolist(), strict=True)):
        n = min(end - start, x.shape[1])
        slots = indices[start:start + n].long()
        y = x[e, :n]
        if weights is not None:
            y = y * weights.reshape(-1).index_select(0, slots).unsqueeze(-1)
        out = out.index_add(0, slots // top_k, y)
    return out


def install(monkeypatch) -> None:
    """Replace OLMo-core's permutation ops (as its MoE modules see them) with the functions above."""
    from olmo_core.nn.moe import parallel_mlp

    for name in ("gather", "scatter", "binned_gather", "binned_scatter"):
        monkeypatch.setattr(parallel_mlp.ops, name, globals()[name])
    GATHERED.clear()
