"""Readers for the routers of training stacks: torchtitan, DeepSpeed, OLMo-core, NeMo Automodel, LitGPT, lucidrains'
st-moe-pytorch / mixture-of-experts, and Megatron-Core.

Each reader turns one call of a stack's router (or of the module next to it that shows the choice) into `Routing`s,
reading the router's *actual* choice after bias, group limits and capacity. Where a router hands over scores or
probabilities instead of logits, those are passed as ``probs_TE`` (the router's own distribution) and the raw logits
come from the router's own projection (a hooked Linear, or the same projection op re-run on the same input, which
is what the router computed); when neither is possible (input noise drawn inside the router) the logit columns are
left null rather than filled from a softmax of probabilities.

Stacks that report capacity only as per-expert counts (DeepSpeed's pre-capacity ``exp_counts``, OLMo-core's
``batch_size_per_expert`` against its expert capacity) are recorded with `count_slots`: one slot per assignment,
sorted by expert, the first ``kept[e]`` of expert ``e``'s slots kept and the rest dropped. The per-expert totals are
exact; which token was dropped is not recorded (moewatch's tables do not keep tokens).

The routing diagnostics (`Routing.weights_TK`, ``select_TE``, ``unbiased_TE``) are filled where a stack hands them
over or its own ops rebuild them exactly: the combine weights torchtitan, OLMo-core (dropless), NeMo, LitGPT's grouped
router and Megatron return; the selection scores of torchtitan, OLMo-core (dropless) and LitGPT from the scores or
logits they return or re-run, with the correction bias and group limits applied by the same ops. DeepSpeed, the
lucidrains gates, NeMo's and Megatron's selection, OLMo-core's capacity MoE and LitGPT's plain gate's weights (scaled
by its block) are left null. Each reader's ``signals(module)`` declares which of them it records, from the same
conditions (`moewatch.capture.types.SIGNALS`); the conditions that also decide its logit columns (input noise) are
methods the spec builders in `moewatch.capture.stacks` call too.

Everything here runs in forward hooks: no host sync (no ``.item()``, ``.tolist()``, ``.cpu()``, boolean indexing,
``nonzero`` or ``unique``); shapes come from tensor metadata and Python attributes only. Stack imports happen inside
the readers, so importing this module never imports a stack.

Shape legend: T tokens, E experts, K experts chosen per token, C expert capacity, N assignment slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moewatch.capture.readers import _describe, group_limited
from moewatch.capture.types import Routing, UnreadableOutput


def _arg(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def count_slots(routed_E: torch.Tensor, kept_E: torch.Tensor, num_slots: int) -> Routing:
    """Choice and drops from per-expert counts: ``routed_E`` assignments before capacity, ``kept_E`` after.

    Builds ``num_slots`` slots (a static size: tokens × K) sorted by expert: slot ``r`` belongs to the expert whose
    cumulative count first exceeds ``r``; within an expert's run the first ``kept_E[e]`` slots are kept and the
    rest dropped. Slots past ``routed_E.sum()`` (tokens the router left out, e.g. DeepSpeed's ``used_token``) are
    masked out. No host sync: searchsorted and gathers on static shapes.
    """
    E = routed_E.shape[0]
    routed_E = routed_E.reshape(-1).long()
    kept_E = torch.minimum(kept_E.reshape(-1).long(), routed_E)
    end_E = torch.cumsum(routed_E, 0)
    r_N = torch.arange(num_slots, device=routed_E.device)
    ids_N = torch.searchsorted(end_E, r_N, right=True)
    valid_N = ids_N < E
    safe_N = ids_N.clamp(max=E - 1)
    rank_N = r_N - (end_E - routed_E).gather(0, safe_N)
    dropped_N = rank_N >= kept_E.gather(0, safe_N)
    return Routing(indices_TK=safe_N.unsqueeze(-1), dropped_TK=dropped_N.unsqueeze(-1), token_mask_T=valid_N)


def kept_cells(kept_TE: torch.Tensor) -> Routing:
    """Every kept (token, expert) assignment of a dense kept-mask ``[T, E]``, one slot per cell (others masked)."""
    T, E = kept_TE.shape
    ids_N = torch.arange(E, device=kept_TE.device).repeat(T)
    return Routing(indices_TK=ids_N.unsqueeze(-1), token_mask_T=kept_TE.reshape(-1))


def drops_only(ids_T: torch.Tensor, dropped_T: torch.Tensor) -> Routing:
    """Capacity refusals only: slot ``t`` names expert ``ids_T[t]`` and counts where ``dropped_T[t]``."""
    return Routing(indices_TK=ids_T.reshape(-1, 1), dropped_TK=torch.ones_like(ids_T, dtype=torch.bool).reshape(-1, 1),
                   token_mask_T=dropped_T.reshape(-1))


class LogitsStash:
    """Probe on a router's own logits projection (an ``nn.Linear`` it calls): keeps the last output for the router's
    reader, which runs right after in the same forward, and records nothing itself."""

    def __init__(self) -> None:
        self.logits: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.logits = output if isinstance(output, torch.Tensor) else None
        return None

    def take(self, num_tokens: int, num_experts: int) -> torch.Tensor | None:
        """The stashed logits as ``[T, E]`` if they match this call's token count, and forget them."""
        x, self.logits = self.logits, None
        if x is None or x.shape[-1] != num_experts or x.numel() != num_tokens * num_experts:
            return None
        return x.reshape(num_tokens, num_experts)


# ---------------------------------------------------------------------------------------------- torchtitan


class TorchtitanRouterReader:
    """torchtitan ``TokenChoiceTopKRouter``: ``router(x, expert_bias) -> (top_scores [.., K], ids [.., K],
    scores [.., E])``. ``scores`` are post-activation (softmax or sigmoid): the router's distribution. Raw logits come
    from its ``gate`` Linear (stashed by a `LogitsStash` probe; ``gate``: that probe exists). ``biased``: the MoE
    block passes an ``expert_bias_E`` (for `signals`; each call reads the bias it was given)."""

    def __init__(self, num_experts: int, top_k: int, scoring: str, stash: LogitsStash, *, gate: bool = True,
                 biased: bool = False):
        self.num_experts, self.top_k, self.scoring, self.stash = num_experts, top_k, scoring, stash
        self.gate, self.biased = gate, biased

    @staticmethod
    def _groups(module: nn.Module) -> tuple[int, int] | None:
        G, k = getattr(module, "num_expert_groups", None), getattr(module, "num_limited_groups", None)
        return (int(G), int(k)) if G is not None and k is not None else None

    def _plan(self, module: nn.Module, biased: bool, logits: bool) -> tuple[bool, bool]:
        """(select scores, unbiased scores) rebuilt for a call with(out) a bias and gate logits: sigmoid routers rank
        scores (+ bias) in their node-limited groups; a softmax router's ranking is its logits' only without a bias
        or groups. Round-robin routing (``_debug_force_load_balance``) chooses by no score."""
        if getattr(module, "_debug_force_load_balance", False):
            return False, False
        select = self.scoring == "sigmoid" or (not biased and getattr(module, "num_expert_groups", None) is None
                                               and logits)
        return select, biased

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        select, unbiased = self._plan(module, self.biased, self.gate)
        groups = self._groups(module)
        choosable = self.num_experts * groups[1] // groups[0] if groups is not None else self.num_experts
        return ("gate_mass",) + (("margin",) if select and choosable > self.top_k else ()) + (
            ("override",) if unbiased else ())

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        E, K = self.num_experts, self.top_k
        if not (isinstance(output, tuple) and len(output) == 3 and output[2].shape[-1] == E
                and output[1].shape[-1] == K):
            raise UnreadableOutput(f"expected (top_scores [.., {K}], expert_ids [.., {K}], scores [.., {E}]), "
                                   f"got {_describe(output)}")
        top, ids, scores = output
        scores_TE = scores.reshape(-1, E)
        r = Routing(logits_TE=self.stash.take(scores_TE.shape[0], E), probs_TE=scores_TE,
                    indices_TK=ids.reshape(-1, K), scoring=self.scoring, weights_TK=top.reshape(-1, K))
        bias = _arg(args, kwargs, 1, "expert_bias_E")
        bias = bias if isinstance(bias, torch.Tensor) else None
        select, unbiased = self._plan(module, bias is not None, r.logits_TE is not None)
        groups = self._groups(module)

        def limit(x_TE: torch.Tensor) -> torch.Tensor:  # node-limited routing, by the router's rule
            return group_limited(x_TE, *groups) if groups is not None else x_TE

        if unbiased:
            r.unbiased_TE = limit(scores_TE)
        if select and self.scoring == "sigmoid":
            r.select_TE, r.select_space = limit(scores_TE if bias is None else scores_TE + bias), "sigmoid"
        elif select:
            r.select_TE = r.logits_TE  # top-k of a softmax is top-k of its logits; the gap is a log-probability ratio
        return r


# ---------------------------------------------------------------------------------------------- DeepSpeed


class DeepSpeedGateReader:
    """DeepSpeed ``TopKGate``: ``gate(input [S, D], used_token, sparse_routes, use_tutel)``.

    Outputs: sparse routes ``(l_aux, capacity, E, indices [K, S] (-1 = dropped), locations, gates, exp_counts)`` (what
    ``MOELayer`` uses) or dense ``(l_aux, combine_weights [S, E, C], dispatch_mask [S, E, C], exp_counts)``.
    ``exp_counts`` holds each expert's assignments *before* capacity; the kept ones are the non-negative indices (or
    the dispatch mask), so per-expert drops are their difference (`count_slots`). The logits are the gate's own
    ``linear(input.float(), wg.weight.float())`` re-run on the same input; under ``noisy_gate_policy="Jitter"`` the
    gate multiplies its input by fresh noise, so the logit and distribution columns stay null while training.
    """

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k

    @staticmethod
    def noisy(module: nn.Module, training: bool = True) -> bool:
        """Whether the gate noises its input in a forward (``noisy_gate_policy="Jitter"`` while training): then no
        logits and no distribution are recorded."""
        return getattr(module, "noisy_gate_policy", None) == "Jitter" and training

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        return ()  # its combine weights are per capacity slot and its selection may be noisy: none recorded

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Routing]:
        E, K = self.num_experts, self.top_k
        x = _arg(args, kwargs, 0, "input")
        if not isinstance(output, tuple) or not isinstance(x, torch.Tensor) or len(output) not in (4, 7):
            raise UnreadableOutput(f"expected TopKGate's 4- or 7-tuple, got {_describe(output)}")
        S = x.shape[0]
        exp_counts_E = output[-1]
        if len(output) == 7:
            ids_KS = output[3].long()
            slot_N = torch.where(ids_KS >= 0, ids_KS, E).reshape(-1)
            kept_E = torch.zeros(E + 1, dtype=torch.long, device=slot_N.device)
            kept_E.index_add_(0, slot_N, torch.ones_like(slot_N))
            kept_E = kept_E[:E]
        else:
            kept_E = output[2].reshape(S, E, -1).any(dim=-1).sum(dim=0)
        if not (isinstance(exp_counts_E, torch.Tensor) and exp_counts_E.numel() == E):
            raise UnreadableOutput(f"expected exp_counts of {E} experts last, got {_describe(output)}")
        out = [count_slots(exp_counts_E, kept_E, S * K)]
        if not self.noisy(module, module.training):
            logits_SE = F.linear(x.float(), module.wg.weight.float())
            used = _arg(args, kwargs, 1, "used_token")
            mask_S = used.reshape(-1) != 0 if isinstance(used, torch.Tensor) and used.numel() == S else None
            out.append(Routing(logits_TE=logits_SE, token_mask_T=mask_S))
        return out


# ---------------------------------------------------------------------------------------------- OLMo-core


class OlmoRouterReader:
    """OLMo-core ``MoERouter``: ``router(x) -> (expert_weights [.., K], expert_indices [.., K], batch_size_per_expert
    [E], aux_loss)``. Records the distribution from the router's own ``get_expert_logits(x)`` (not returned; re-run on
    the same input unless ``jitter_eps`` noised it) and, with ``count_choice`` (dropless MoE), the choice itself. In a
    capacity MoE the choice is read on the experts' input instead (`OlmoCapacityReader`), where drops are known."""

    def __init__(self, num_experts: int, top_k: int, scoring: str, count_choice: bool):
        self.num_experts, self.top_k, self.scoring, self.count_choice = num_experts, top_k, scoring, count_choice

    @staticmethod
    def noisy(module: nn.Module, training: bool = True) -> bool:
        """Whether the router noises its input in a forward (``jitter_eps`` while training): then its logits cannot
        be re-run, and neither the logit and distribution columns nor the margin and override are recorded."""
        return getattr(module, "jitter_eps", None) is not None and training

    @staticmethod
    def _plan(module: nn.Module, scoring: str) -> tuple[bool, bool]:
        """(select scores, unbiased scores) that `_selection` rebuilds: a sigmoid router's scores (+ its
        ``score_bias`` when ``bias_gamma`` is set), a softmax router's logits when it has no bias; the unbiased
        scores with a bias. Random or uniform expert assignment chooses by no score."""
        if getattr(module, "random_expert_assignment", False) or getattr(module, "uniform_expert_assignment", False):
            return False, False
        biased = getattr(module, "bias_gamma", None) is not None and getattr(module, "score_bias", None) is not None
        return scoring == "sigmoid" or not biased, biased

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        if not self.count_choice:  # a capacity MoE: which slot was dropped is not known
            return ()
        select, unbiased = (False, False) if self.noisy(module) else self._plan(module, self.scoring)
        return ("gate_mass",) + (("margin",) if select and self.num_experts > self.top_k else ()) + (
            ("override",) if unbiased else ())

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        E, K = self.num_experts, self.top_k
        if not (isinstance(output, tuple) and len(output) >= 2 and isinstance(output[1], torch.Tensor)
                and output[1].shape[-1] == K):
            raise UnreadableOutput(f"expected (expert_weights, expert_indices [.., {K}], ...), got {_describe(output)}")
        r = Routing(scoring=self.scoring)
        if self.count_choice:
            r.indices_TK = output[1].reshape(-1, K)
            if isinstance(output[0], torch.Tensor) and output[0].shape == output[1].shape:
                r.weights_TK = output[0].reshape(-1, K)
        x = _arg(args, kwargs, 0, "x")
        if isinstance(x, torch.Tensor) and not self.noisy(module, module.training):
            r.logits_TE = module.get_expert_logits(x).float().reshape(-1, E)
            if self.count_choice:
                self._selection(module, r, r.logits_TE)
        return r

    def _selection(self, module: nn.Module, r: Routing, logits_TE: torch.Tensor) -> None:
        """The scores `MoERouter.get_top_k` ranks, rebuilt with the router's ops (a sigmoid router adds 1e-7, a
        ``bias_gamma`` router its ``score_bias``), as `_plan` says."""
        select, unbiased = self._plan(module, self.scoring)
        bias = module.score_bias if unbiased else None
        if self.scoring == "sigmoid":
            scores_TE = F.sigmoid(logits_TE) + 1e-7
            if select:
                r.select_TE = scores_TE if bias is None else scores_TE + bias.unsqueeze(0)
                r.select_space = "sigmoid"
        else:
            scores_TE = logits_TE.softmax(dim=-1)
            if select:
                r.select_TE = logits_TE
        if unbiased:
            r.unbiased_TE = scores_TE


class OlmoCapacityReader:
    """OLMo-core ``ParallelMLP`` (capacity MoE): ``experts(x, expert_weights, expert_indices, batch_size_per_expert)``.

    It sorts the assignments by expert and gathers at most ``expert_capacity(tokens)`` of each expert's bin, so
    expert ``e`` receives ``min(batch_size_per_expert[e], capacity)`` and the rest are dropped (`count_slots`)."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        return ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        E, K = self.num_experts, self.top_k
        ids = _arg(args, kwargs, 2, "expert_indices")
        counts_E = _arg(args, kwargs, 3, "batch_size_per_expert")
        if not (isinstance(ids, torch.Tensor) and isinstance(counts_E, torch.Tensor) and counts_E.numel() == E):
            raise UnreadableOutput("expected experts(x, expert_weights, expert_indices, batch_size_per_expert)")
        slots = ids.numel()
        capacity = module.expert_capacity(slots // K)
        return count_slots(counts_E, counts_E.clamp(max=capacity), slots)


# ---------------------------------------------------------------------------------------------- NeMo Automodel


def nemo_gate_logits(gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """NeMo Automodel ``Gate``'s projection exactly as its forward computes it (same dtypes, same op)."""
    precision = getattr(gate, "gate_precision", None)
    bias = getattr(gate, "bias", None)
    if precision is not None:
        x, weight = x.to(dtype=precision), gate.weight.to(dtype=precision)
        bias = bias.to(dtype=precision) if bias is not None else None
    else:
        weight = gate.weight.to(dtype=x.dtype)
        bias = bias.to(dtype=x.dtype) if bias is not None else None
    return F.linear(x, weight, bias=bias)


class NemoGateReader:
    """NeMo Automodel ``Gate``: ``gate(x [T, D], token_mask [T], cp_mesh) -> (weights [T, K], indices [T, K],
    aux_loss)``. The choice is the returned indices (after bias, group limits and router replay); the logits are the
    gate's projection re-run on the same input (`nemo_gate_logits`), scored as its ``score_func`` does; padding
    tokens (``token_mask`` False) are left out, as the gate leaves them out of its own load statistics."""

    def __init__(self, num_experts: int, top_k: int, score_func: str):
        self.num_experts, self.top_k, self.score_func = num_experts, top_k, score_func

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        return ("gate_mass",)  # its returned weights; its selection (bias, groups, replay) is not rebuilt

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        E, K = self.num_experts, self.top_k
        x = _arg(args, kwargs, 0, "x")
        if not (isinstance(output, tuple) and len(output) >= 2 and isinstance(x, torch.Tensor)
                and isinstance(output[1], torch.Tensor) and output[1].shape[-1] == K):
            raise UnreadableOutput(f"expected (weights, indices [.., {K}], aux_loss), got {_describe(output)}")
        logits_TE = nemo_gate_logits(module, x).reshape(-1, E)
        r = Routing(logits_TE=logits_TE, indices_TK=output[1].reshape(-1, K),
                    scoring="sigmoid" if "sigmoid" in self.score_func else "softmax")
        if isinstance(output[0], torch.Tensor) and output[0].shape == output[1].shape:
            r.weights_TK = output[0].reshape(-1, K)
        if self.score_func == "sqrtsoftplus":
            r.probs_TE = torch.sqrt(F.softplus(logits_TE.float()))
        mask = _arg(args, kwargs, 1, "token_mask")
        if isinstance(mask, torch.Tensor) and mask.numel() == logits_TE.shape[0]:
            r.token_mask_T = mask.reshape(-1)
        return r


# ---------------------------------------------------------------------------------------------- LitGPT


class LitGPTGateReader:
    """LitGPT ``LLaMAMoE.gate`` (a bias-free Linear): the block chooses ``torch.topk(gate(x), n_expert_per_token)`` on
    exactly this output, so the same op on it is the block's choice."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        # its logits are what it ranks; its weights are rescaled by the block after this output (not recorded)
        return ("margin",) if self.num_experts > self.top_k else ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        if not (isinstance(output, torch.Tensor) and output.shape[-1] == self.num_experts):
            raise UnreadableOutput(f"expected logits [.., {self.num_experts}], got {_describe(output)}")
        logits_TE = output.reshape(-1, self.num_experts)
        return Routing(logits_TE=logits_TE, indices_TK=torch.topk(logits_TE, self.top_k).indices,
                       select_TE=logits_TE)


class LitGPTGroupedReader:
    """LitGPT ``GroupedTopkRouter`` (DeepSeek-V3 style): ``router(x) -> (topk_weights, topk_indices)``; the logits
    are its ``F.linear(x.float(), weight.float())`` re-run on the same input, scored with a sigmoid."""

    def __init__(self, num_experts: int, top_k: int):
        self.num_experts, self.top_k = num_experts, top_k

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        # experts outside the chosen groups rank at 0.0, a finite competitor: a margin whenever E > K
        return ("gate_mass",) + (("margin",) if self.num_experts > self.top_k else ()) + ("override",)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing:
        E, K = self.num_experts, self.top_k
        x = _arg(args, kwargs, 0, "x")
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(x, torch.Tensor)
                and output[1].shape[-1] == K):
            raise UnreadableOutput(f"expected (topk_weights, topk_indices [.., {K}]), got {_describe(output)}")
        logits_TE = F.linear(x.type(torch.float32), module.weight.type(torch.float32)).reshape(-1, E)
        r = Routing(logits_TE=logits_TE, indices_TK=output[1].reshape(-1, K), scoring="sigmoid")
        cfg = module.config
        scale = getattr(cfg, "routed_scaling_factor", 1.0)
        # LLaMAMoE scales the router's weights by routed_scaling_factor before combining (when it is not 1).
        r.weights_TK = output[0].reshape(-1, K) * scale if scale != 1.0 else output[0].reshape(-1, K)
        scores_TE = logits_TE.sigmoid()
        r.select_TE = self._grouped(cfg, scores_TE + module.e_score_correction_bias.unsqueeze(0))
        r.select_space = "sigmoid"
        r.unbiased_TE = self._grouped(cfg, scores_TE)
        return r

    @staticmethod
    def _grouped(cfg: Any, scores_TE: torch.Tensor) -> torch.Tensor:
        """``get_topk_indices``' group limit: experts outside the chosen groups score 0.0 (not -inf), as it ranks."""
        return group_limited(scores_TE, int(cfg.n_expert_groups), int(cfg.n_topk_groups), fill=0.0,
                             per_group=int(cfg.n_topk_scores_per_group))


# ---------------------------------------------------------------------------------------------- lucidrains


def _first_choice(raw_TE: torch.Tensor) -> torch.Tensor:
    return torch.topk(raw_TE, 1, dim=-1).indices[:, 0]


class STMoEGatingReader:
    """st-moe-pytorch ``TopNGating``: ``gate(x, noise_gates, noise_mult) -> (dispatch [.., E, C], combine, balance_loss,
    z_loss)``; logits from its ``to_gates`` Linear (`LogitsStash`).

    Every kept assignment (a non-zero dispatch row) counts at its expert. The first expert is always routed: where
    the noise-free top-1 of the logits was not dispatched, capacity refused it (a drop). Further experts are routed
    at random by the gate's threshold policy, so one that was not dispatched cannot be told from one the policy
    skipped: such slots count neither as tokens nor as drops (``tokens`` = routed assignments / K)."""

    def __init__(self, num_experts: int, top_k: int, stash: LogitsStash):
        self.num_experts, self.top_k, self.stash = num_experts, top_k, stash

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        return ()  # dispatch tensors only: the further experts are routed at random

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Routing]:
        E = self.num_experts
        if not (isinstance(output, tuple) and len(output) == 4 and isinstance(output[0], torch.Tensor)
                and output[0].dim() >= 3 and output[0].shape[-2] == E):
            raise UnreadableOutput(f"expected (dispatch [.., {E}, C], combine, balance_loss, z_loss), got "
                                   f"{_describe(output)}")
        kept_TE = (output[0] != 0).any(dim=-1).reshape(-1, E)
        T = kept_TE.shape[0]
        out = [kept_cells(kept_TE)]
        logits_TE = self.stash.take(T, E)
        if logits_TE is not None:
            out.append(Routing(logits_TE=logits_TE))
            if not _arg(args, kwargs, 1, "noise_gates"):
                first_T = _first_choice(logits_TE.softmax(dim=-1))
                out.append(drops_only(first_T, ~kept_TE.gather(1, first_T.unsqueeze(-1)).squeeze(-1)))
        return out


class Top2GatingReader:
    """mixture-of-experts ``Top2Gating``: ``gate(x [.., n, D], importance) -> (dispatch [.., n, E, C], combine, loss)``.

    The logits are its ``x @ w_gating`` re-run on the same input. The first expert is always routed; the second too
    under the ``"all"`` policy, and where its normalized gate passes the threshold under ``"threshold"``: a routed
    expert that was not dispatched was refused by capacity. Under ``"random"`` a second expert that was not
    dispatched cannot be told from one the policy skipped (not counted, as in `STMoEGatingReader`)."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        return ()  # dispatch tensors only

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> list[Routing]:
        E = self.num_experts
        x = _arg(args, kwargs, 0, "x")
        if not (isinstance(output, tuple) and len(output) == 3 and isinstance(x, torch.Tensor)
                and output[0].shape[-2] == E):
            raise UnreadableOutput(f"expected (dispatch [.., {E}, C], combine, loss), got {_describe(output)}")
        kept_TE = (output[0] != 0).any(dim=-1).reshape(-1, E)
        out = [kept_cells(kept_TE)]
        w = module.w_gating
        if w.dim() != 2 or _arg(args, kwargs, 1, "importance") is not None:
            return out  # hierarchical gates and importance masks: counts only
        logits_TE = torch.einsum("...bnd,...de->...bne", x, w).reshape(-1, E)
        out.append(Routing(logits_TE=logits_TE))
        raw_TE = logits_TE.softmax(dim=-1)
        first_T = _first_choice(raw_TE)
        kept_first_T = kept_TE.gather(1, first_T.unsqueeze(-1)).squeeze(-1)
        out.append(drops_only(first_T, ~kept_first_T))
        policy = module.second_policy_train if module.training else module.second_policy_eval
        if policy in ("all", "threshold"):
            rest_TE = raw_TE * (1.0 - F.one_hot(first_T, E).to(raw_TE.dtype))
            second_T = _first_choice(rest_TE)
            routed_T = torch.ones_like(kept_first_T)
            if policy == "threshold":
                g1_T, g2_T = raw_TE.gather(1, first_T.unsqueeze(-1)), rest_TE.gather(1, second_T.unsqueeze(-1))
                threshold = module.second_threshold_train if module.training else module.second_threshold_eval
                routed_T = (g2_T / (g1_T + g2_T + module.eps) > threshold).squeeze(-1)
            kept_second_T = kept_TE.gather(1, second_T.unsqueeze(-1)).squeeze(-1)
            out.append(drops_only(second_T, routed_T & ~kept_second_T))
        return out


# ---------------------------------------------------------------------------------------------- Megatron-Core


def megatron_logits(router: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Megatron-Core ``TopKRouter.gating`` re-run on the same input: its ``router_gating_linear`` (Transformer
    Engine's GEMM when installed, else the same ``mm``/``addmm`` in the router dtype that function falls back to),
    without gating's one-time move of CPU weights to CUDA (None when the weights are not on the input's device)."""
    from megatron.core.transformer.moe import moe_utils

    if router.weight.device != x.device:
        return None
    dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(getattr(router.config, "moe_router_dtype", None),
                                                              x.dtype)
    if getattr(moe_utils, "te_general_gemm", None) is not None:
        return moe_utils.router_gating_linear(x, router.weight, router.bias, dtype)
    x_TD = x.reshape(-1, x.shape[-1]).to(dtype)
    w_ED = router.weight.to(dtype)
    out_TE = x_TD @ w_ED.t() if router.bias is None else torch.addmm(router.bias.to(dtype), x_TD, w_ED.t())
    return out_TE.view(*x.shape[:-1], -1)


class MegatronRouterReader:
    """Megatron-Core ``TopKRouter``: ``router(input [S, B, H], padding_mask) -> (probs [T, E], routing_map [T, E])``,
    both *after* token dropping. ``probs`` is sparse (zero off the kept choice), so the distribution comes from the
    logits (`megatron_logits`, re-run unless input jitter or forced load balancing randomized them). Without a
    capacity factor ``routing_map`` is the choice. With one, the pre-drop choice is recomputed by the router's own
    ``topk_routing_with_score_function`` on those logits, and a chosen expert missing from ``routing_map`` was dropped.
    ``padding_mask`` marks padding with True (as the router's own statistics read it); padded tokens are left out."""

    def __init__(self, num_experts: int, top_k: int, scoring: str):
        self.num_experts, self.top_k, self.scoring = num_experts, top_k, scoring

    @staticmethod
    def noisy(module: nn.Module, training: bool = True) -> bool:
        """Whether a forward randomizes the routing input (``moe_input_jitter_eps`` while training, or forced load
        balancing): then its logits are not re-run, and no logit or distribution column is recorded."""
        cfg = module.config
        return (getattr(cfg, "moe_input_jitter_eps", None) is not None and training) or bool(
            getattr(cfg, "moe_router_force_load_balancing", False))

    @staticmethod
    def _recomputes_pre_drop(module: nn.Module) -> bool:
        """Whether the pre-drop choice of a capacity router is rebuilt from the logits (not for Sinkhorn routing
        or router replay)."""
        return getattr(module, "routing_type", "") != "sinkhorn" and getattr(module, "router_replay", None) is None

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        # the combine weights are read where the choice is: routing_map, or a capacity router's rebuilt pre-drop one
        capacity = getattr(module.config, "moe_expert_capacity_factor", None) is not None
        known = not capacity or (not self.noisy(module) and self._recomputes_pre_drop(module))
        return ("gate_mass",) if known else ()

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing | list[Routing]:
        E, K = self.num_experts, self.top_k
        if not (isinstance(output, tuple) and len(output) == 2 and output[1].shape[-1] == E
                and output[1].dtype == torch.bool):
            raise UnreadableOutput(f"expected (probs [T, {E}], routing_map [T, {E}] bool), got {_describe(output)}")
        map_TE = output[1].reshape(-1, E)
        cfg = module.config
        x = _arg(args, kwargs, 0, "input")
        logits_TE = None
        if isinstance(x, torch.Tensor) and not self.noisy(module, module.training):
            raw = megatron_logits(module, x)
            logits_TE = raw.reshape(-1, E) if raw is not None else None
        pad = _arg(args, kwargs, 1, "padding_mask")
        real_T = ~pad.reshape(-1).bool() if isinstance(pad, torch.Tensor) and pad.numel() == map_TE.shape[0] else None
        r = Routing(logits_TE=logits_TE, scoring=self.scoring, token_mask_T=real_T)
        pre_TE = map_TE
        if getattr(cfg, "moe_expert_capacity_factor", None) is not None:
            pre_TE = self._pre_drop(module, logits_TE)
        if pre_TE is not None:
            r.indices_TK = torch.topk(pre_TE.float(), K, dim=-1).indices  # its K chosen experts
            r.dropped_TK = ~map_TE.gather(1, r.indices_TK)
            # probs are the combine weights, zero off the kept choice (a dropped slot receives nothing anyway)
            r.weights_TK = output[0].reshape(-1, E).gather(1, r.indices_TK)
            return r
        # The pre-drop choice cannot be recomputed (randomized or replayed routing): record the kept assignments.
        return [r, kept_cells(map_TE if real_T is None else map_TE & real_T.unsqueeze(-1))]

    def _pre_drop(self, module: nn.Module, logits_TE: torch.Tensor | None) -> torch.Tensor | None:
        if logits_TE is None or not self._recomputes_pre_drop(module):
            return None
        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        cfg = module.config
        _, map_TE = topk_routing_with_score_function(
            logits_TE, self.top_k, use_pre_softmax=cfg.moe_router_pre_softmax, num_groups=cfg.moe_router_num_groups,
            group_topk=cfg.moe_router_group_topk, scaling_factor=cfg.moe_router_topk_scaling_factor,
            score_function=module.score_function, expert_bias=module.expert_bias, fused=False)
        return map_TE


def as_list(result: Routing | Sequence[Routing] | None) -> Sequence[Routing]:
    """A reader's result as a sequence of observations."""
    if result is None:
        return ()
    return (result,) if isinstance(result, Routing) else result
