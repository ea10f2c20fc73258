"""Readers: turn one hooked module call into a `Routing` (see `moewatch.capture.types`).

A reader runs inside a forward hook on the training thread, so every reader here is host-sync-free: it looks only at
tensor metadata (dtype, shape) in Python and otherwise issues device ops with static output shapes (reshape, topk,
gather, where). No `.item()`, `.tolist()`, `.cpu()`, boolean-mask indexing, `nonzero` or `unique`.

Router outputs come in a few shapes, and `RouterReader` adapts to whichever it sees, call by call:

- the moewatch router protocol: an object with `logits` and `indices` (optionally `probs`, `dropped`);
- the transformers contract: a tuple holding float logits ``[.., E]`` and integer indices ``[.., K]``, e.g.
  ``(router_logits, top_k_weights, top_k_index)`` (a bool ``[.., K]`` tensor in the tuple is read as capacity drops);
- a capacity-masked one-hot dispatch mask ``[.., E]`` (Switch-Transformers, NLLB-MoE): the choice is the router's
  top-k over its logits (the mask's own argmax where the token was kept) and a slot is dropped where the mask (or
  the dense combine weights, for top-2) is zero for that expert;
- dense per-expert scores ``[.., E]`` that are zero except at the chosen experts (Llama-4): the choice is their top-k;
- a sorted dispatch with per-expert sizes as a Python list (JetMoE): JetMoE chooses with ``logits.topk(k)`` on the
  very tensor it returns, so the same op on it reproduces that choice exactly;
- bare logits (DBRX, classic ``gate`` Linears): the choice is read by an `ExpertsInputReader` on the experts module
  when one is probed, else recomputed as top-k of the logits (the only case where moewatch guesses the choice).

The routing diagnostics (`Routing.weights_TK`, ``select_TE``, ``unbiased_TE``) are filled only where they are exact:
the combine weights from a transformers router's ``[.., K]`` weights output (what its MoE block hands the experts),
the selection scores from a router whose ``forward`` is one of the recipes `moewatch.capture.hf.selection_recipe`
knows (`logit_selection`, `deepseek_v3_selection`), and from the moewatch router protocol's optional fields.
`RouterReader.signals(module)` declares which of them a router gets, from those same flags (`moewatch.inspect`
lists them in ``measures``).

Shape legend: T tokens (leading dims flattened), E experts, K experts chosen per token.
"""

from __future__ import annotations

import itertools
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from moewatch.capture.types import Routing, UnreadableOutput
from moewatch.metrics import MARGIN_SCALE


@runtime_checkable
class RouterOutput(Protocol):
    """The moewatch router protocol: what a router's forward returns (e.g. a NamedTuple).

    ``logits`` ``[.., E]`` raw router logits and ``indices`` ``[.., K]`` the experts chosen; optionally ``probs``
    ``[.., E]`` (the router's distribution or non-negative scores), ``dropped`` (bool ``[.., K]``, capacity refusals)
    and ``scoring`` (``"softmax"`` or ``"sigmoid"``), and for the routing diagnostics ``weights`` (``[.., K]``
    combine weights), ``select`` (``[.., E]`` the scores it ranked), ``select_space`` (``"logits"`` or
    ``"sigmoid"``) and ``unbiased`` (``[.., E]`` those scores without its correction bias); see `Routing`. A router
    whose output type is fixed (its ``forward`` annotated to return it, like the reference model's) may instead
    define ``combine_weights(output)`` and ``selection_scores(output)`` (returning ``(select, select_space, unbiased
    or None)`` or None), which the reader calls on each output.
    """

    logits: torch.Tensor
    indices: torch.Tensor


def _describe(output: Any) -> str:
    """A short structural description of an output (types, shapes, dtypes) for error messages."""
    if isinstance(output, torch.Tensor):
        return f"Tensor{tuple(output.shape)}:{str(output.dtype).removeprefix('torch.')}"
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(_describe(x) for x in output) + ")"
    return type(output).__name__


def _is_int(t: torch.Tensor) -> bool:
    return not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool


def _flat(t: torch.Tensor, width: int) -> torch.Tensor:
    return t.reshape(-1, width)


def topk_choice(scores_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k experts per token of `scores_TE` (logits or any monotone transform of them)."""
    return torch.topk(scores_TE.float(), top_k, dim=-1).indices


@dataclass
class _Parsed:
    """Where each role sits in one router output (positions into the output tuple, None when absent)."""

    logits: int | None = None
    logits_are_probs: bool = False
    indices: int | None = None
    weights: int | None = None
    dropped: int | None = None
    mask: int | None = None
    dense: int | None = None
    sizes: int | None = None

    @property
    def has_choice(self) -> bool:
        return self.indices is not None or self.mask is not None or self.dense is not None or self.sizes is not None


def parse_roles(
    items: Sequence[Any],
    num_experts: int,
    top_k: int,
    *,
    logits_index: int | None = None,
    names: Sequence[str | None] | None = None,
) -> _Parsed:
    """Classify the elements of a router's output tuple by dtype and trailing dim (metadata only, no sync).

    `logits_index` (e.g. from transformers' `_can_record_outputs`) and `names` (the variable names in the router's
    `return` statement) break ties when several float tensors end in E.
    """
    E, K = num_experts, top_k
    p = _Parsed()
    float_E: list[int] = []
    for i, x in enumerate(items):
        if isinstance(x, torch.Tensor):
            if x.dim() < 2:  # 1-D tensors are per-slot bookkeeping (JetMoE's sort order), never [.., E] or [.., K]
                continue
            if x.is_floating_point():
                if x.shape[-1] == E:
                    float_E.append(i)
                elif x.shape[-1] == K and p.weights is None:
                    p.weights = i
            elif x.shape[-1] == K and K != E and _is_int(x):
                if p.indices is None:
                    p.indices = i
            elif x.shape[-1] == K and K != E and x.dtype == torch.bool:
                if p.dropped is None:
                    p.dropped = i
            elif x.shape[-1] == E and p.mask is None:
                p.mask = i
        elif isinstance(x, (list, tuple)) and len(x) == E and all(isinstance(v, int) for v in x):
            p.sizes = i
    names = list(names) if names is not None and len(names) == len(items) else None
    if float_E:
        if logits_index is not None and logits_index in float_E:
            pick = logits_index
        elif names is not None and any("logit" in (names[i] or "") for i in float_E):
            pick = next(i for i in float_E if "logit" in (names[i] or ""))
        else:
            pick = float_E[0]
        p.logits = pick
        p.logits_are_probs = names is not None and "prob" in (names[pick] or "") and "logit" not in (names[pick] or "")
        rest = [i for i in float_E if i != pick]
        if rest and p.indices is None:
            p.dense = rest[0]
    return p


class RouterReader:
    """Reads a router module's own output; adapts to the protocol object, tuple contracts or bare logits.

    Args:
        num_experts, top_k: the router's E and K.
        scoring: ``"softmax"`` or ``"sigmoid"``: how its logits become a distribution.
        score_fn: a scoring function that is neither (e.g. DeepSeek-V4's sqrt-softplus): applied to the logits to
            give `probs_TE` (non-negative scores, normalized per token by the metrics).
        logits_index, names: hints for `parse_roles`.
        guess_choice: with bare logits and no other probe showing the choice, record top-k of the logits.
        null_expert: for routers with a "skip" class whose choice they mask to index 0 with weight 0 before the
            experts (ZAYA): slots with zero weight are recorded as this expert id.
        padding_arg: position of a ``padding_mask`` argument in the router's forward (NLLB-MoE), if it takes one:
            padded tokens are then masked out (the router zeroes their dispatch, which would otherwise read as drops).
        weights: read the ``[.., K]`` float output beside the indices as the combine weights (transformers routers
            returning ``(router_logits, weights, indices)``, whose MoE blocks hand exactly that tensor to the experts).
        selection: the router's selection recipe (`SELECTIONS`): the scores it ranked, rebuilt from its logits.
        protocol_methods: call the router's ``combine_weights(output)`` and ``selection_scores(output)`` (a router
            whose ``forward`` is annotated to return the moewatch router protocol, like the reference model's).
        protocol: the router's annotated output type (the moewatch router protocol), for `signals`.

    `signals(module)` says which routing diagnostics it records: ``gate_mass`` with ``weights``, what the
    ``selection`` recipe gives, and for a protocol router what a dry `_read_protocol` of a stand-in output fills.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        scoring: str = "softmax",
        score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
        logits_index: int | None = None,
        names: Sequence[str | None] | None = None,
        guess_choice: bool = True,
        null_expert: int | None = None,
        padding_arg: int | None = None,
        weights: bool = False,
        selection: SelectionRecipe | None = None,
        protocol_methods: bool = False,
        protocol: type | None = None,
    ):
        self.num_experts = num_experts
        self.top_k = top_k
        self.scoring = scoring
        self.score_fn = score_fn
        self.logits_index = logits_index
        self.names = names
        self.guess_choice = guess_choice
        self.null_expert = null_expert
        self.padding_arg = padding_arg
        self.weights = weights
        self.selection = selection
        self.protocol_methods = protocol_methods
        self.protocol = protocol
        # Whether the last output showed the choice; an ExpertsInputReader reads it only when this is False.
        self.has_choice: bool | None = None

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing | None:
        # hasattr, not isinstance(output, RouterOutput): a runtime Protocol check costs more than the whole read.
        if hasattr(output, "indices") and hasattr(output, "logits") and not isinstance(output, torch.Tensor):
            self.has_choice = True
            return self._read_protocol(module, output)
        items = output if isinstance(output, (tuple, list)) else (output,)
        p = parse_roles(items, self.num_experts, self.top_k, logits_index=self.logits_index, names=self.names)
        self.has_choice = p.has_choice
        if p.logits is None and p.indices is None:
            raise UnreadableOutput(
                f"no float [.., {self.num_experts}] logits and no integer [.., {self.top_k}] indices in its output "
                f"({_describe(output)})")
        E, K = self.num_experts, self.top_k
        r = Routing(scoring=self.scoring)
        if self.padding_arg is not None and p.logits is not None:
            r.token_mask_T = _non_padding(args, kwargs, self.padding_arg, items[p.logits].numel() // E)
        logits_TE = None
        if p.logits is not None:
            x_TE = _flat(items[p.logits], E)
            if p.logits_are_probs:
                r.probs_TE = x_TE
            else:
                logits_TE = r.logits_TE = x_TE
                if self.score_fn is not None:
                    r.probs_TE = self.score_fn(x_TE.float())
        if p.indices is not None:
            ids_TK = _flat(items[p.indices], K)
            if self.null_expert is not None and p.weights is not None:
                ids_TK = torch.where(_flat(items[p.weights], K) == 0, self.null_expert, ids_TK)
            r.indices_TK = ids_TK
            if p.dropped is not None:
                r.dropped_TK = _flat(items[p.dropped], K)
            if self.weights and p.weights is not None and items[p.weights].numel() == ids_TK.numel():
                r.weights_TK = _flat(items[p.weights], K)
            if self.selection is not None and logits_TE is not None:
                r.select_TE, r.select_space, r.unbiased_TE = self.selection.scores(module, logits_TE)
        elif logits_TE is not None and p.mask is not None:
            dense_TE = _flat(items[p.dense], E) if p.dense is not None else None
            r.indices_TK, r.dropped_TK = dispatch_choice(_flat(items[p.mask], E), logits_TE, K, dense_TE)
        elif logits_TE is not None and p.sizes is not None:
            r.indices_TK = topk_choice(logits_TE, K)
        elif p.dense is not None:
            r.indices_TK = topk_choice(_flat(items[p.dense], E), K)
        elif logits_TE is not None and self.guess_choice:
            r.indices_TK = topk_choice(logits_TE, K)
        return r

    @property
    def returns_probs(self) -> bool:
        """Its ``forward``'s source names the ``[.., E]`` scores it returns as probabilities and nothing as logits
        (Gemma-4): `parse_roles` reads them as the distribution, so no logits (z-loss, logit range) are recorded."""
        names = self.names
        if not names or any("logit" in (n or "") for n in names):
            return False
        i = self.logits_index if self.logits_index is not None and self.logits_index < len(names) else 0
        return "prob" in (names[i] or "")

    def signals(self, module: nn.Module) -> tuple[str, ...]:
        """The routing diagnostics this reader records for `module` in a training forward (see `types.SIGNALS`)."""
        if self.protocol is not None:
            return self._protocol_signals(module)
        out = ("gate_mass",) if self.weights else ()
        if self.selection is not None:
            out += self.selection.signals(module, self.num_experts, self.top_k)
        return out

    def _protocol_signals(self, module: nn.Module) -> tuple[str, ...]:
        """A protocol router's diagnostics, by the code that records them: `_read_protocol` on a stand-in output
        (one token, zero logits, experts 0..K-1 kept), with the router in training mode for the call (its
        ``selection_scores`` may give nothing while training, as the reference model's does under ``noisy_topk``).
        A router whose methods fail on the stand-in is taken at its word: what its output type and methods offer."""
        fields = _fields(self.protocol)
        try:
            with torch.no_grad():
                r = self._read_protocol(module, _stand_in(self.protocol, fields, module, self.num_experts,
                                                          self.top_k), training=True)
        except Exception:
            methods = self.protocol_methods
            offers = {"weights": "weights" in fields or (methods and hasattr(module, "combine_weights")),
                      "select": "select" in fields or (methods and hasattr(module, "selection_scores")),
                      "unbiased": "unbiased" in fields or (methods and hasattr(module, "selection_scores"))}
        else:
            offers = {"weights": r.weights_TK is not None, "select": r.select_TE is not None,
                      "unbiased": r.unbiased_TE is not None}
        return tuple(signal for signal, key in (("gate_mass", "weights"), ("margin", "select"),
                                                ("override", "unbiased"))
                     if offers[key] and (signal != "margin" or self.num_experts > self.top_k))

    def _read_protocol(self, module: nn.Module, out: Any, training: bool | None = None) -> Routing:
        E, K = self.num_experts, self.top_k
        logits = getattr(out, "logits", None)
        probs = getattr(out, "probs", None)
        indices = getattr(out, "indices", None)
        dropped = getattr(out, "dropped", None)
        scoring = getattr(out, "scoring", None) or self.scoring
        r = Routing(
            logits_TE=_flat(logits, E) if isinstance(logits, torch.Tensor) else None,
            probs_TE=_flat(probs, E) if isinstance(probs, torch.Tensor) else None,
            indices_TK=_flat(indices, K) if isinstance(indices, torch.Tensor) else None,
            dropped_TK=_flat(dropped, K) if isinstance(dropped, torch.Tensor) else None,
            scoring=scoring if isinstance(scoring, str) else self.scoring,
        )
        weights = getattr(out, "weights", None)
        if not isinstance(weights, torch.Tensor) and self.protocol_methods and hasattr(module, "combine_weights"):
            weights = _in_mode(module, training, module.combine_weights, out)
        if isinstance(weights, torch.Tensor):
            r.weights_TK = _flat(weights, K)
        select, space, unbiased = getattr(out, "select", None), getattr(out, "select_space", None), getattr(
            out, "unbiased", None)
        if not isinstance(select, torch.Tensor) and self.protocol_methods and hasattr(module, "selection_scores"):
            select, space, unbiased = _in_mode(module, training, module.selection_scores, out) or (None, None, None)
        if isinstance(select, torch.Tensor) and space in MARGIN_SCALE:
            r.select_TE, r.select_space = _flat(select, E), space
        if isinstance(unbiased, torch.Tensor):
            r.unbiased_TE = _flat(unbiased, E)
        return r


def protocol_type(cls: type) -> type | None:
    """The moewatch router protocol type `cls.forward` is annotated to return (fields ``logits`` and ``indices``)."""
    try:
        ret = typing.get_type_hints(cls.forward).get("return")
    except Exception:  # unresolvable annotations: not a protocol router we can describe
        return None
    return ret if isinstance(ret, type) and {"logits", "indices"} <= _fields(ret) else None


def _fields(ret: type | None) -> set[str]:
    return set(getattr(ret, "_fields", ())) | set(getattr(ret, "__annotations__", {}))


def _in_mode(module: nn.Module, training: bool | None, fn: Callable[[Any], Any], out: Any) -> Any:
    """``fn(out)`` with `module.training` set to `training` for the call (None: as it is)."""
    if training is None or module.training == training:
        return fn(out)
    was = module.training
    module.training = training
    try:
        return fn(out)
    finally:
        module.training = was


def _stand_in(ret: type, fields: set[str], module: nn.Module, num_experts: int, top_k: int) -> Any:
    """One token's protocol output of type `ret` on `module`'s device: zero logits and scores, uniform
    probabilities, experts 0..K-1 chosen and kept with equal weights. The optional fields the type has are filled
    (a router whose output type carries ``weights``, ``select`` or ``unbiased`` hands them over); unknown ones None."""
    ref = next(itertools.chain(module.parameters(), module.buffers()), None)
    device = ref.device if ref is not None else None
    E, K = num_experts, top_k
    known = {
        "logits": torch.zeros(1, E, device=device), "probs": torch.full((1, E), 1.0 / E, device=device),
        "indices": torch.arange(K, device=device).unsqueeze(0),
        "dropped": torch.zeros(1, K, dtype=torch.bool, device=device),
        "weights": torch.full((1, K), 1.0 / K, device=device), "select": torch.zeros(1, E, device=device),
        "select_space": "logits", "unbiased": torch.zeros(1, E, device=device), "scoring": "softmax",
    }
    values = {f: known.get(f) for f in fields}
    try:
        return ret(**values)
    except Exception:  # a type that cannot be built from keywords: the readers only read attributes
        return SimpleNamespace(**values)


# ---------------------------------------------------------------------------------------------- selection recipes

# selection(module, logits_TE) -> (select_TE, select_space, unbiased_TE or None); see `Routing`.
Selection = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, str, "torch.Tensor | None"]]


def logit_selection(module: nn.Module, logits_TE: torch.Tensor) -> tuple[torch.Tensor, str, None]:
    """Routers that choose the top-k of their logits or of the softmax of them: the logits are the selection space
    (softmax is monotone, and the log of a probability ratio is the logit gap). No correction bias."""
    return logits_TE, "logits", None


def group_limited(scores_TE: torch.Tensor, num_group: int, topk_group: int, fill: float = float("-inf"),
                  per_group: int = 2) -> torch.Tensor:
    """`scores_TE` with the experts outside each token's `topk_group` best groups set to `fill`: DeepSeek-V3's group
    limit, with its ops (groups scored by the sum of their `per_group` best scores), so the same groups come out."""
    T, E = scores_TE.shape
    group_scores_TG = scores_TE.view(T, num_group, E // num_group).topk(per_group, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores_TG, k=topk_group, dim=-1, sorted=False)[1]
    group_mask_TG = torch.zeros_like(group_scores_TG)
    group_mask_TG.scatter_(1, group_idx, 1)
    score_mask_TE = group_mask_TG.unsqueeze(-1).expand(-1, num_group, E // num_group).reshape(-1, E)
    return scores_TE.masked_fill(~score_mask_TE.bool(), fill)


def deepseek_v3_selection(module: nn.Module, logits_TE: torch.Tensor) -> tuple[torch.Tensor, str, torch.Tensor]:
    """DeepSeek-V3's router (`hf.selection_recipe` "deepseek_v3"): it ranks sigmoid(logits) + its correction bias
    within the groups that score best with the bias. Without the bias it would rank the sigmoid scores within the
    groups that score best without it. Same ops as the router, so the same floats and the same groups."""
    scores_TE = logits_TE.sigmoid()
    G, k = int(module.num_group), int(module.topk_group)
    select_TE = group_limited(scores_TE + module.e_score_correction_bias, G, k)
    return select_TE, "sigmoid", group_limited(scores_TE, G, k)


def _all_experts(module: nn.Module, num_experts: int) -> int:
    return num_experts


def _allowed_groups(module: nn.Module, num_experts: int) -> int:
    """Experts a token of a group-limited router can choose among: those of its ``topk_group`` groups."""
    return num_experts * int(module.topk_group) // int(module.num_group)


@dataclass(frozen=True)
class SelectionRecipe:
    """A selection rule moewatch rebuilds from a router's logits, and what that gives.

    ``scores(module, logits_TE)`` -> ``(select_TE, space, unbiased_TE or None)`` (`Selection`); ``biased``: it gives
    the unbiased scores too (the override); ``choosable(module, E)``: how many experts a token can choose among (a
    margin needs an unchosen one that could have been chosen, so none is recorded when that is K)."""

    scores: Selection
    biased: bool
    choosable: Callable[[nn.Module, int], int] = _all_experts

    def signals(self, module: nn.Module, num_experts: int, top_k: int) -> tuple[str, ...]:
        """The diagnostics this recipe records for `module` (``margin``, ``override``)."""
        margin = ("margin",) if self.choosable(module, num_experts) > top_k else ()
        return margin + (("override",) if self.biased else ())


SELECTIONS: dict[str, SelectionRecipe] = {
    "logits": SelectionRecipe(logit_selection, biased=False),
    "deepseek_v3": SelectionRecipe(deepseek_v3_selection, biased=True, choosable=_allowed_groups),
}


def _non_padding(args: tuple, kwargs: dict, position: int, T: int) -> torch.Tensor | None:
    """Real-token mask from a router's ``padding_mask`` (non-zero = padding; a 4-D attention mask, additive or
    boolean, contributes its last query row, as NLLB-MoE reads it)."""
    pm = kwargs.get("padding_mask", args[position] if len(args) > position else None)
    if not isinstance(pm, torch.Tensor):
        return None
    if pm.dim() == 4:
        pm = pm[:, :, -1, :]
    if pm.numel() < T:
        return None
    return ~pm.reshape(-1)[-T:].bool()


def dispatch_choice(
    mask_TE: torch.Tensor, logits_TE: torch.Tensor, top_k: int, dense_TE: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choice and capacity drops of a dispatch-mask router (Switch top-1, NLLB top-2).

    The router picks its top-k over the logits; capacity then zeroes the dispatch of tokens that overflow. Where the
    mask row is non-zero it names the kept top-1 expert exactly, so that column is taken from the mask (this guards
    against ties between softmax-rounded probabilities and logits). `dense_TE` (NLLB's combine weights) marks the kept
    top-2 assignments; a slot whose expert is neither in the mask nor has a non-zero combine weight was dropped.
    """
    ids_TK = topk_choice(logits_TE, top_k)
    kept_TE = mask_TE != 0
    any_T = kept_TE.any(dim=-1)
    first_T = torch.where(any_T, kept_TE.float().argmax(dim=-1), ids_TK[:, 0])
    ids_TK = torch.cat([first_T.unsqueeze(-1), ids_TK[:, 1:]], dim=-1) if top_k > 1 else first_T.unsqueeze(-1)
    if dense_TE is not None:
        kept_TE = kept_TE | (dense_TE != 0)
    dropped_TK = ~kept_TE.gather(-1, ids_TK)
    return ids_TK, dropped_TK


class ExpertsInputReader:
    """Reads the choice from the experts module's input, for routers whose output does not show it (DBRX).

    The transformers experts contract is ``experts(hidden_states, top_k_index, top_k_weights)``: the first integer
    tensor ``[.., K]`` among the call's arguments is the choice. It contributes only when `router` (the reader on the
    module computing the logits) saw no choice in its own output, so nothing is counted twice.
    """

    def __init__(self, router: RouterReader):
        self.router = router

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing | None:
        if self.router.has_choice is not False:
            return None
        K = self.router.top_k
        for x in (*args, *kwargs.values()):
            if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[-1] == K and _is_int(x):
                return Routing(indices_TK=_flat(x, K))
        return None


class ProductKeyReader:
    """Product-key routers (Doge's CDMoE): logits for each of ``num_keys**2`` experts from two key halves.

    The router Linear gives ``2 * num_keys`` scores per token, viewed as ``[2, T, num_keys]`` exactly as the block
    does; the score of expert ``i * num_keys + j`` is ``x_i + y_j`` (the block's top-k over those sums is exact because
    its top-``num_keys`` per half contains the overall top-k for K <= num_keys). The choice itself is read on the
    expert-embedding lookup by `IndicesInputReader`.
    """

    def __init__(self, num_keys: int, scoring: str = "softmax"):
        self.num_keys = num_keys
        self.scoring = scoring

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing | None:
        if not isinstance(output, torch.Tensor):
            return None
        n = self.num_keys
        xy_2TN = output.reshape(2, -1, n)
        logits_TE = (xy_2TN[0].unsqueeze(-1) + xy_2TN[1].unsqueeze(-2)).reshape(-1, n * n)
        return Routing(logits_TE=logits_TE, scoring=self.scoring)


class IndicesInputReader:
    """Reads ``[.., K]`` expert ids from a module's first argument (e.g. an expert-embedding lookup)."""

    def __init__(self, top_k: int):
        self.top_k = top_k

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Routing | None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(x, torch.Tensor) and _is_int(x) and x.shape[-1] == self.top_k:
            return Routing(indices_TK=_flat(x, self.top_k))
        return None
