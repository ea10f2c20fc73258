"""Router-health metric math: pure tensor functions, no I/O, no state.

Two halves:
- the hot path, `observe()`: one router call -> a flat vector of additive sums (plus one running max), computed on the
  router's device with no host sync, so the training step never waits on moewatch;
- the cold path, `finalize_layers()`: per-step sums -> the recorded per-expert and per-layer metrics, vectorized over
  steps in float64 (run in the writer thread, and again by the loader for the all-ranks view).

Shape legend: S steps, T tokens, E experts, K experts chosen per token.

Layout of one layer's accumulator (float64, length `state_size(E)`):
    [0, E)          tokens     assignments that reached expert i
    [E, 2E)         dropped    assignments refused by expert i's capacity
    2E              sentinel   slots routed to no expert (index outside [0, E))
    2E+1            ignored    padding slots (token mask), discarded
    [2E+2, 3E+2)    prob_sum   sum over observed tokens of the router probability P_i
    3E+2 ...        scalars, see SCALARS
    then E          gate_mass  sum of the combine weights of the assignments expert i received
    then ...        routing scalars, see ROUTING_SCALARS
    then MARGIN_BINS margin_hist tokens per routing-margin bin (edges `margin_edges()`)
    then E          grad_sq    each expert's summed squared gradients at the optimizer steps of the step
    then 1          grad_steps the optimizer steps those squares span, times the rank's share (see below)
    then E          param_sq   each expert's squared parameter norm (at a flush step only)
    then 1          param_share the rank's share (see below) where param_sq was written, else 0
    last E          bias       the router's correction bias, copied once per step

Every entry is a sum except `logit_abs_max` (a running max) and `bias` (a copy), so summing accumulators over
calls, steps or ranks gives the accumulator of their union (moewatch.capture.reduce relies on this).

Expert learning (`grad_sq` ... `param_share`), written by the Watch at `step()` from moewatch.capture.grads (training
accumulators only): a rank's *share* is 1 for a layer whose expert parameters every rank holds whole (data
parallel: the gradients are all-reduced before the optimizer step, so every rank holds the same full squares) and
1/R for DTensor-sharded ones (FSDP2: each rank holds its shard's squares), R the ranks of the group summing the
steps (1 without one). The recorded norms are ``sqrt(grad_sq / grad_steps)`` and ``sqrt(param_sq / param_share)``:
one rank's own values give its norms (R replicas summed give R times both, the same ratio; R shards summed give the
full squares over one share), so they stay exact through the rank sum and in rank-level rows alike.

Routing margin, in logit units: per token, the selection score of the weakest chosen expert minus that of the strongest
unchosen one, in the space the router selects in (`Routing.select_TE`), times `MARGIN_SCALE[space]`: 1 for logits
(the gap is the log of the two experts' probability ratio), 4 for sigmoid scores (a score gap d needs a logit change
of at least 4d to close, since sigmoid' <= 1/4). Ties give 0; a chosen set that is not the top-k of the scores
(rounding between the router's and the given scores) counts as 0. `MARGIN_EPS` (0.05) is the near-tie threshold and the
first histogram edge; the other edges grow by sqrt(2) up to 6.4 (`margin_edges()`).
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

ROUTING_SCALARS = (
    "margin_sum",  # sum of the routing margins (logit units) of the tokens that have one
    "margin_tokens",  # tokens with a margin (a choice, and a finite unchosen score beside it)
    "overridden",  # assignments whose expert is below the k-th largest score without the correction bias
    "override_slots",  # assignments checked for that (a chosen expert of a token whose unbiased scores were seen)
    "weight_slots",  # assignments whose combine weight was seen (gate_mass is recorded where this is > 0)
    "spill",  # scratch: the scatter-add target of the weights of assignments not received (never read)
)
_N_ROUTING = len(ROUTING_SCALARS)

# Routing-margin histogram: bin 0 is [0, MARGIN_EPS), bin i >= 1 is [MARGIN_EPS * 2**((i-1)/2), the next edge), the
# last bin open-ended (>= 6.4).
MARGIN_EPS = 0.05
MARGIN_BINS = 16
# Logit units per unit of selection score: the smallest logit change that closes a gap d is d / max(score').
MARGIN_SCALE = {"logits": 1.0, "sigmoid": 4.0}


def margin_edges() -> list[float]:
    """The MARGIN_BINS - 1 inner edges of the margin histogram (logit units): MARGIN_EPS * sqrt(2)**i, i = 0..14."""
    return [MARGIN_EPS * 2.0 ** (i / 2) for i in range(MARGIN_BINS - 1)]


def state_size(num_experts: int) -> int:
    return _offsets(num_experts)["bias"] + num_experts  # the bias is last


def _offsets(num_experts: int) -> dict[str, int]:
    E = num_experts
    sc = 3 * E + 2
    gate = sc + _N_SCALARS
    rs = gate + E
    hist = rs + _N_ROUTING
    grad = hist + MARGIN_BINS
    param = grad + E + 1
    return {"tokens": 0, "dropped": E, "sentinel": 2 * E, "ignored": 2 * E + 1, "prob_sum": 2 * E + 2,
            "scalars": sc, "logit_sum": sc + SCALARS.index("logit_sum"),
            "logit_abs_max": sc + SCALARS.index("logit_abs_max"), "gate_mass": gate, "routing": rs,
            "spill": rs + ROUTING_SCALARS.index("spill"), "margin_hist": hist, "grad_sq": grad,
            "grad_steps": grad + E, "param_sq": param, "param_share": param + E, "bias": param + E + 1}


def bias_slice(num_experts: int) -> slice:
    start = _offsets(num_experts)["bias"]
    return slice(start, start + num_experts)


def grad_slice(num_experts: int) -> slice:
    """`grad_sq` [E] and `grad_steps` (the last of the E + 1 entries)."""
    start = _offsets(num_experts)["grad_sq"]
    return slice(start, start + num_experts + 1)


def param_slice(num_experts: int) -> slice:
    """`param_sq` [E] and `param_share` (the last of the E + 1 entries)."""
    start = _offsets(num_experts)["param_sq"]
    return slice(start, start + num_experts + 1)


def put_norms(state: torch.Tensor, where: slice, sq_E: torch.Tensor, weight: float) -> None:
    """Write squares `sq_E` [E] (on any device; float32 is fine) and their weight into `state[where]`
    (`grad_slice` or `param_slice`), adding to what is there. No host sync when `sq_E` is on the state's device (a
    different device, rare: experts placed apart from their router, costs a copy)."""
    part = state[where]
    part[:-1].add_(sq_E if sq_E.device == state.device else sq_E.to(state.device))  # add_ promotes float32
    part[-1:].add_(weight)


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
    weights_TK: torch.Tensor | None = None,
    select_TE: torch.Tensor | None = None,
    select_space: str = "logits",
    unbiased_TE: torch.Tensor | None = None,
) -> None:
    """Add one router call to a layer's accumulator `state` in place (see the module docstring for its layout).

    `weights_TK`, `select_TE` and `unbiased_TE` (see `moewatch.capture.types.Routing`) are read only together with
    `indices_TK`: they describe the choice it holds.
    """
    E = num_experts
    off = _offsets(E)
    if indices_TK is not None:
        ids = indices_TK.long()
        ids_TK = ids.reshape(-1, 1) if ids.dim() == 1 else ids.reshape(-1, ids.shape[-1])
        in_range_TK = (ids_TK >= 0) & (ids_TK < E)
        # Map every slot to one accumulator cell: its expert, its expert's drop cell, the sentinel or the padding cell.
        slot_TK = torch.where(in_range_TK, ids_TK, off["sentinel"])
        if dropped_TK is not None:
            refused_TK = dropped_TK.reshape(slot_TK.shape).bool() & in_range_TK
            slot_TK = torch.where(refused_TK, slot_TK + E, slot_TK)
        keep_T1 = token_mask_T.reshape(-1, 1).bool() if token_mask_T is not None else None
        if keep_T1 is not None:
            slot_TK = torch.where(keep_T1, slot_TK, off["ignored"])
        flat = slot_TK.reshape(-1)
        # One scatter-add per call: the slot counts, and the gate mass and margin bins when they are observed
        # (a scatter-add of per-call sums into a single cell would serialize on the GPU; those are reduced instead).
        cells = [flat]
        values = [torch.ones(flat.shape, dtype=state.dtype, device=state.device)]
        sums: list[torch.Tensor] | None = None
        if weights_TK is not None:
            w_TK = weights_TK.reshape(slot_TK.shape).to(state.dtype)
            received_TK = slot_TK < E  # not refused, not a sentinel, not padding
            cells.append(torch.where(received_TK, slot_TK + off["gate_mass"], off["spill"]).reshape(-1))
            values.append(torch.where(received_TK & torch.isfinite(w_TK), w_TK, 0.0).reshape(-1))
            sums = _routing_sums(sums, state, weight_slots=received_TK.sum())
        if select_TE is not None:
            bins_T, margin_T, has_T = _margins(select_TE.reshape(-1, E), ids_TK, in_range_TK, select_space)
            if keep_T1 is not None:
                has_T = has_T * keep_T1.reshape(-1)
            cells.append(bins_T + off["margin_hist"])
            values.append(has_T.to(state.dtype))
            sums = _routing_sums(sums, state, margin_sum=(margin_T * has_T).sum(), margin_tokens=has_T.sum())
        if unbiased_TE is not None:
            over_TK, seen_TK = _overrides(unbiased_TE.reshape(-1, E), ids_TK, in_range_TK)
            if keep_T1 is not None:
                seen_TK = seen_TK & keep_T1
            sums = _routing_sums(sums, state, overridden=(over_TK & seen_TK).sum(), override_slots=seen_TK.sum())
        state.index_add_(0, torch.cat(cells) if len(cells) > 1 else flat,
                         torch.cat(values) if len(values) > 1 else values[0])
        if sums is not None:
            rs = off["routing"]
            state[rs : rs + len(sums)].add_(torch.stack(sums))

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


def _routing_sums(sums: list[torch.Tensor] | None, state: torch.Tensor, **named: torch.Tensor) -> list[torch.Tensor]:
    """The routing scalars of one call (ROUTING_SCALARS order, up to `weight_slots`), `named` ones filled in."""
    if sums is None:
        zero = torch.zeros((), dtype=state.dtype, device=state.device)
        sums = [zero] * ROUTING_SCALARS.index("spill")
    for name, value in named.items():
        sums[ROUTING_SCALARS.index(name)] = value.to(state.dtype)
    return sums


_EDGES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _edges_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """`margin_edges()` as a tensor on `device`, made there (arange and pow: no host-to-device copy, no sync)."""
    key = (device, dtype)
    edges = _EDGES.get(key)
    if edges is None:
        i = torch.arange(MARGIN_BINS - 1, device=device, dtype=torch.float64)
        edges = _EDGES[key] = (MARGIN_EPS * torch.pow(2.0, i / 2)).to(dtype)
    return edges


def _margins(select_TE: torch.Tensor, ids_TK: torch.Tensor, in_range_TK: torch.Tensor,
             space: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per token: (histogram bin, margin in logit units, 1.0 where it has one else 0.0) of the choice `ids_TK`.

    margin = (weakest chosen score - strongest unchosen score) * MARGIN_SCALE[space], clamped at 0. A token has one
    when both are finite: it chose an expert (a sentinel slot is no choice), its scores have no NaN, and an unchosen
    expert is selectable (-inf marks an expert the router could not choose: masked, or outside the allowed groups).
    A token without one gets margin 0 (bin 0) and weight 0.0, so its scatter-add adds nothing.
    """
    E = select_TE.shape[-1]
    # float64: the gap of two float32 (or bf16) scores is exact in it, so ties are exactly 0.
    # Column E stands in for sentinel slots: +inf never lowers the weakest chosen score.
    x_TX = torch.nn.functional.pad(select_TE.double(), (0, 1), value=torch.inf)
    chosen_TK = torch.where(in_range_TK, ids_TK, E)
    weakest_T = x_TX.gather(1, chosen_TK).amin(dim=-1)
    strongest_T = x_TX.scatter_(1, chosen_TK, -torch.inf)[:, :E].amax(dim=-1)
    margin_T = weakest_T - strongest_T
    if MARGIN_SCALE[space] != 1.0:
        margin_T = margin_T * MARGIN_SCALE[space]
    has_T = torch.isfinite(margin_T)
    margin_T = torch.where(has_T, margin_T.clamp_min(0.0), 0.0)
    bins_T = torch.bucketize(margin_T, _edges_on(margin_T.device, margin_T.dtype), right=True)
    return bins_T, margin_T, has_T.to(torch.float64)


def _overrides(unbiased_TE: torch.Tensor, ids_TK: torch.Tensor,
               in_range_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per assignment: (whether the bias overrode it, whether it was checked).

    Overridden: the chosen expert's unbiased score is strictly below the token's k-th largest unbiased score, so no
    tie-break of the unbiased top-k would have chosen it. Checked: a chosen expert (not a sentinel) of a token whose
    unbiased scores hold no NaN.
    """
    x_TE = unbiased_TE.float() if unbiased_TE.dtype in (torch.float16, torch.bfloat16) else unbiased_TE
    K = ids_TK.shape[-1]
    kth_T1 = torch.topk(x_TE, K, dim=-1).values[:, K - 1 :]
    chosen_TK = x_TE.gather(1, torch.where(in_range_TK, ids_TK, 0))
    seen_TK = in_range_TK & ~torch.isnan(x_TE).any(dim=-1, keepdim=True)
    return chosen_TK < kth_T1, seen_TK


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

    Returns per-expert arrays [S, E] (tokens, dropped, prob_mean, bias, gate_mass, grad_norm, param_norm) and
    per-layer arrays [S] (and ``margin_hist`` [S, MARGIN_BINS]); NaN marks what was not recorded.
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
    rs = off["routing"]
    routing = {name: st[:, rs + i] for i, name in enumerate(ROUTING_SCALARS)}
    layer.update(routing_columns(routing["margin_sum"], routing["margin_tokens"],
                                 st[:, off["margin_hist"] : off["margin_hist"] + MARGIN_BINS],
                                 routing["overridden"], routing["override_slots"]))
    bs = bias_slice(E)
    gate = off["gate_mass"]
    experts = dict(
        tokens=tokens_SE,
        dropped=dropped_SE,
        prob_mean=prob_mean_SE,
        bias=st[:, bs] if has_bias else torch.full_like(tokens_SE, torch.nan),
        gate_mass=torch.where(routing["weight_slots"].unsqueeze(-1) > 0, st[:, gate : gate + E], torch.nan),
        grad_norm=_weighted_norm(st[:, grad_slice(E)]),
        param_norm=_weighted_norm(st[:, param_slice(E)]),
    )
    return {"experts": experts, "layer": layer}


def _weighted_norm(block_SX: torch.Tensor) -> torch.Tensor:
    """sqrt(squares / weight) per step from a `grad_slice`/`param_slice` block [S, E + 1]; NaN where the weight is 0
    (not recorded). Rounding can leave a tiny negative from float sums of zeros: clamped at 0."""
    w_S1 = block_SX[:, -1:]
    return torch.where(w_S1 > 0, (block_SX[:, :-1] / w_S1.where(w_S1 > 0, 1.0)).clamp_min(0).sqrt(), torch.nan)


def routing_columns(margin_sum_S: torch.Tensor, margin_tokens_S: torch.Tensor, margin_hist_SH: torch.Tensor,
                    overridden_S: torch.Tensor, override_slots_S: torch.Tensor) -> dict[str, torch.Tensor]:
    """The recorded routing-margin and override columns from their sums (float64, NaN where not recorded).

    Shared by the writer (per step) and the loader (the same sums over ranks), so both derive them alike:
    ``margin_mean`` = margin_sum / margin_tokens, ``near_tie_frac`` = margin_hist[:, 0] / margin_tokens (margins
    below MARGIN_EPS), ``override_frac`` = overridden / override_slots; the counts are NaN where their denominator
    is 0 (the signal was not recorded).
    """
    n_S = margin_tokens_S.double()
    has_S = n_S > 0
    slots_S = override_slots_S.double()
    checked_S = slots_S > 0
    return dict(
        margin_mean=_safe_div(margin_sum_S.double(), n_S),
        near_tie_frac=_safe_div(margin_hist_SH[:, 0].double(), n_S),
        margin_tokens=torch.where(has_S, n_S, torch.nan),
        margin_hist=torch.where(has_S.unsqueeze(-1), margin_hist_SH.double(), torch.nan),
        override_frac=_safe_div(overridden_S.double(), slots_S),
        overridden=torch.where(checked_S, overridden_S.double(), torch.nan),
        override_slots=torch.where(checked_S, slots_S, torch.nan),
    )
