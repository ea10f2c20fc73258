"""Router-health metric math: pure tensor functions, no I/O, no state.

Two halves:
- the hot path, `observe()`: one router call -> a flat vector of additive sums (plus one running max), computed on the
  router's device with no host sync, so the training step never waits on moewatch;
- the cold path, `finalize_layers()`: per-step sums -> the recorded per-expert and per-layer metrics, vectorized over
  steps in float64 (run in the writer thread, and again by the loader for the all-ranks view).

Shape legend: S steps, T tokens, E experts, K experts chosen per token.

Layout of one layer's accumulator (float64, length `state_size(E)`):
    [0, E)          tokens   assignments that reached expert i
    [E, 2E)         dropped  assignments refused by expert i's capacity
    2E              sentinel slots routed to no expert (index outside [0, E))
    2E+1            ignored  padding slots (token mask), discarded
    [2E+2, 3E+2)    prob_sum sum over observed tokens of the router probability P_i
    3E+2 ...        scalars, see SCALARS
    last E          bias     the router's correction bias, copied once per step
"""

from __future__ import annotations

import math

import torch

SCALARS = (
    "prob_tokens",  # tokens whose router distribution was observed (finite logits, not padding)
    "entropy_sum",  # sum of per-token entropy, nats
    "lse_sq_sum",  # sum of logsumexp(logits)^2 (z-loss numerator)
    "logit_sum",  # sum of finite logits
    "logit_sq_sum",  # sum of squared finite logits
    "logit_count",  # number of finite logits
    "nonfinite",  # number of NaN/+inf logits (-inf marks a masked expert and is not counted)
    "logit_abs_max",  # running max |logit| (max, not a sum)
)
_N_SCALARS = len(SCALARS)


def state_size(num_experts: int) -> int:
    return 5 * num_experts + 2 + _N_SCALARS


def _offsets(num_experts: int) -> dict[str, int]:
    E = num_experts
    sc = 3 * E + 2
    return {"tokens": 0, "dropped": E, "sentinel": 2 * E, "ignored": 2 * E + 1, "prob_sum": 2 * E + 2,
            "scalars": sc, "logit_sum": sc + SCALARS.index("logit_sum"),
            "logit_abs_max": sc + SCALARS.index("logit_abs_max"), "bias": sc + _N_SCALARS}


def bias_slice(num_experts: int) -> slice:
    start = _offsets(num_experts)["bias"]
    return slice(start, start + num_experts)


# ---------------------------------------------------------------- hot path (device, no sync)


def router_distribution(logits_TE: torch.Tensor, scoring: str = "softmax") -> torch.Tensor:
    """The router's distribution over experts, rows summing to 1 (sigmoid scores are normalized per token)."""
    x_TE = logits_TE.float()
    if scoring == "softmax":
        return torch.softmax(x_TE, dim=-1)
    if scoring == "sigmoid":
        return normalize_scores(torch.sigmoid(x_TE))
    raise ValueError(f"scoring must be 'softmax' or 'sigmoid', got {scoring!r}")


def normalize_scores(scores_TE: torch.Tensor) -> torch.Tensor:
    s_TE = scores_TE.float().clamp_min(0)
    return s_TE / s_TE.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """Per-token entropy in nats; 0·log 0 = 0."""
    p_TE = probs_TE.float()
    return -(p_TE * torch.log(p_TE.clamp_min(torch.finfo(p_TE.dtype).tiny))).sum(dim=-1)


def observe(
    state: torch.Tensor,
    num_experts: int,
    *,
    logits_TE: torch.Tensor | None = None,
    probs_TE: torch.Tensor | None = None,
    indices_TK: torch.Tensor | None = None,
    dropped_TK: torch.Tensor | None = None,
    scoring: str = "softmax",
    token_mask_T: torch.Tensor | None = None,
) -> None:
    """Add one router call to a layer's accumulator `state` in place (see the module docstring for its layout)."""
    E = num_experts
    off = _offsets(E)
    if indices_TK is not None:
        ids = indices_TK.long()
        ids_TK = ids.reshape(-1, 1) if ids.dim() == 1 else ids.reshape(-1, ids.shape[-1])
        # Map every slot to one accumulator cell: its expert, its expert's drop cell, the sentinel or the padding cell.
        slot_TK = torch.where((ids_TK < 0) | (ids_TK >= E), off["sentinel"], ids_TK)
        if dropped_TK is not None:
            refused_TK = dropped_TK.reshape(slot_TK.shape).bool() & (slot_TK < E)
            slot_TK = torch.where(refused_TK, slot_TK + E, slot_TK)
        if token_mask_T is not None:
            keep_T1 = token_mask_T.reshape(-1, 1).bool()
            slot_TK = torch.where(keep_T1, slot_TK, off["ignored"])
        flat = slot_TK.reshape(-1)
        state.index_add_(0, flat, torch.ones(flat.shape, dtype=state.dtype, device=state.device))

    if logits_TE is None and probs_TE is None:
        return
    source = logits_TE if logits_TE is not None else probs_TE
    assert source is not None
    if source.shape[-1] != E:
        raise ValueError(f"router output has {source.shape[-1]} experts in its last dim, expected {E}")
    x_TE = logits_TE.reshape(-1, E).float() if logits_TE is not None else None
    lse_T = torch.logsumexp(x_TE, dim=-1) if x_TE is not None else None
    if probs_TE is not None:
        p_TE = normalize_scores(probs_TE.reshape(-1, E))
    elif scoring == "softmax":
        assert x_TE is not None and lse_T is not None
        p_TE = torch.exp(x_TE - lse_T.unsqueeze(-1))
    else:
        p_TE = router_distribution(x_TE, scoring)
    ent_T = -torch.special.xlogy(p_TE, p_TE).sum(dim=-1)  # xlogy: 0·log 0 = 0 for masked (-inf) experts
    # A token whose distribution is not finite (NaN or +inf logits) is left out of every per-token statistic.
    row_ok_T = torch.isfinite(ent_T)
    if lse_T is not None:
        row_ok_T = row_ok_T & torch.isfinite(lse_T)
        lse_sq_T = lse_T.square()
    else:
        lse_sq_T = torch.zeros_like(ent_T)
    if token_mask_T is not None:
        row_ok_T = row_ok_T & token_mask_T.reshape(-1).bool()
    # One masked reduction fills prob_sum[E], prob_tokens, entropy_sum and lse_sq_sum (adjacent in the layout).
    block_TX = torch.cat([p_TE, row_ok_T.unsqueeze(-1).to(p_TE.dtype), ent_T.unsqueeze(-1), lse_sq_T.unsqueeze(-1)],
                         dim=-1)
    block_TX = torch.where(row_ok_T.unsqueeze(-1), block_TX, 0.0)
    ps = off["prob_sum"]
    state[ps : ps + E + 3].add_(block_TX.sum(dim=0))
    if x_TE is None:
        return
    # Logit moments over finite logits; -inf (a deliberately masked expert) is excluded but not counted as bad.
    finite_TE = torch.isfinite(x_TE)
    xf_TE = torch.where(finite_TE, x_TE, 0.0)
    n_finite = finite_TE.sum()
    n_bad = torch.isnan(x_TE).sum() + torch.isposinf(x_TE).sum()
    ls = off["logit_sum"]
    state[ls : ls + 4].add_(torch.stack([xf_TE.sum(), xf_TE.square().sum(), n_finite.float(), n_bad.float()]))
    if x_TE.numel():
        am = off["logit_abs_max"]
        torch.maximum(state[am : am + 1], xf_TE.abs().amax().reshape(1), out=state[am : am + 1])


# ---------------------------------------------------------------- cold path (host, float64, vectorized over steps)


def cv(counts_SE: torch.Tensor) -> torch.Tensor:
    """Coefficient of variation: population std / mean of per-expert counts (NaN where the mean is 0)."""
    c = counts_SE.double()
    mean = c.mean(dim=-1)
    std = c.std(dim=-1, correction=0)
    return torch.where(mean > 0, std / mean.where(mean > 0, 1.0), torch.nan)


def max_share(counts_SE: torch.Tensor) -> torch.Tensor:
    c = counts_SE.double()
    total = c.sum(dim=-1)
    return torch.where(total > 0, c.amax(dim=-1) / total.where(total > 0, 1.0), torch.nan)


def dead(counts_SE: torch.Tensor) -> torch.Tensor:
    return (counts_SE == 0).sum(dim=-1)


def aux_loss(counts_SE: torch.Tensor, prob_mean_SE: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss E·Σ f_i·P_i, f_i = fraction of assignments to expert i (1.0 when balanced).

    transformers' `load_balancing_loss_func` uses f_i = assignments / tokens, so its value is top_k times this one.
    """
    c = counts_SE.double()
    total = c.sum(dim=-1, keepdim=True)
    f = c / total.where(total > 0, 1.0)
    E = c.shape[-1]
    out = E * (f * prob_mean_SE.double()).sum(dim=-1)
    return torch.where(total.squeeze(-1) > 0, out, torch.nan)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.double(), dim=-1).square().mean()


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.where(den > 0, 1.0), torch.nan)


def finalize_layers(states_SX: torch.Tensor, num_experts: int, top_k: int, has_bias: bool) -> dict[str, torch.Tensor]:
    """Per-step accumulators of one layer -> recorded columns.

    Returns per-expert arrays [S, E] (tokens, dropped, prob_mean, bias) and per-layer arrays [S].
    """
    E = num_experts
    off = _offsets(E)
    st = states_SX.double()
    tokens_SE = st[:, : E]
    dropped_SE = st[:, E : 2 * E]
    sentinel_S = st[:, off["sentinel"]]
    scal = st[:, off["scalars"] : off["scalars"] + _N_SCALARS]
    col = {name: scal[:, i] for i, name in enumerate(SCALARS)}
    prob_tokens_S = col["prob_tokens"]
    prob_mean_SE = _safe_div(st[:, off["prob_sum"] : off["prob_sum"] + E], prob_tokens_S.unsqueeze(-1))
    slots_S = tokens_SE.sum(-1) + dropped_SE.sum(-1) + sentinel_S
    # Tokens come from the choice when it was observed, else from the distribution side.
    routed_S = torch.where(slots_S > 0, torch.round(slots_S / top_k), prob_tokens_S)
    has_counts_S = slots_S > 0
    mean_logit = _safe_div(col["logit_sum"], col["logit_count"])
    var_logit = _safe_div(col["logit_sq_sum"], col["logit_count"]) - mean_logit.square()
    layer = dict(
        tokens=routed_S,
        entropy=_safe_div(col["entropy_sum"], prob_tokens_S),
        cv=torch.where(has_counts_S, cv(tokens_SE), torch.nan),
        max_share=torch.where(has_counts_S, max_share(tokens_SE), torch.nan),
        dead=torch.where(has_counts_S, dead(tokens_SE), 0),
        dropped=dropped_SE.sum(-1) + sentinel_S,
        drop_rate=_safe_div(dropped_SE.sum(-1) + sentinel_S, slots_S),
        logit_abs_max=torch.where(col["logit_count"] > 0, col["logit_abs_max"], torch.nan),
        logit_mean=mean_logit,
        logit_std=var_logit.clamp_min(0).sqrt(),
        z_loss=torch.where(col["logit_count"] > 0, _safe_div(col["lse_sq_sum"], prob_tokens_S), torch.nan),
        aux_loss=torch.where(has_counts_S & (prob_tokens_S > 0), aux_loss(tokens_SE, prob_mean_SE), torch.nan),
        nonfinite=col["nonfinite"],
    )
    layer["entropy_norm"] = layer["entropy"] / math.log(E) if E > 1 else torch.zeros_like(layer["entropy"])
    bs = bias_slice(E)
    experts = dict(
        tokens=tokens_SE,
        dropped=dropped_SE,
        prob_mean=prob_mean_SE,
        bias=st[:, bs] if has_bias else torch.full_like(tokens_SE, torch.nan),
    )
    return {"experts": experts, "layer": layer}
