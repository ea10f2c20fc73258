"""Introspection of router classes, mostly for transformers models (without importing transformers).

transformers 5.x marks where routing can be observed with ``type(model)._can_record_outputs["router_logits"]``: an
``OutputRecorder(target_class, index=...)`` (or a class, a class name, or a list of those). It is a hint: it misses
some routers (JetMoE's attention router, hash routers) and names whole MoE blocks for others (Doge, Ernie-4.5-VL,
JetMoE attention). Discovery therefore combines it with duck typing and uses it for two things only: which classes
compute routing although they carry no ``num_experts``/``top_k`` attributes (DBRX, Switch, NLLB, Gemma-4), and at which
output position their logits sit (Llama-4: 1, Switch/NLLB: 2).

The rest reads a router class's source once (cached) to learn what its ``forward`` returns by name (Gemma-4 returns
probabilities where others return logits), whether it scores experts with a sigmoid or a softmax, and which selection
recipe it runs (`selection_recipe`): the routing margin and the balancer override need the very scores a router
ranks, so they are recorded only for routers whose ``forward`` is, statement for statement, one of the recipes below.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class RecorderHint:
    """One ``router_logits`` entry of a model's ``_can_record_outputs``: which class, and the logits' output index."""

    target: type | None
    class_name: str | None
    index: int

    def matches(self, module: nn.Module) -> bool:
        if self.target is not None:
            return isinstance(module, self.target)
        return self.class_name is not None and type(module).__name__.endswith(self.class_name)


def recorder_hints(model: nn.Module) -> list[RecorderHint]:
    """All ``router_logits`` recorder entries declared by `model` and its sub-models (composite models)."""
    hints: list[RecorderHint] = []
    seen: set[int] = set()
    for m in model.modules():
        table = getattr(type(m), "_can_record_outputs", None)
        if not isinstance(table, dict) or id(table) in seen:
            continue
        seen.add(id(table))
        specs = table.get("router_logits")
        if specs is None:
            continue
        for spec in specs if isinstance(specs, (list, tuple)) else [specs]:
            if isinstance(spec, type):
                hints.append(RecorderHint(spec, None, 1))
            elif isinstance(spec, str):
                hints.append(RecorderHint(None, spec, 1))
            else:  # transformers.utils.output_capturing.OutputRecorder, read by attribute
                target = getattr(spec, "target_class", None)
                hints.append(RecorderHint(target if isinstance(target, type) else None,
                                          getattr(spec, "class_name", None), int(getattr(spec, "index", 0) or 0)))
    return hints


def _class_ast(cls: type) -> ast.ClassDef | None:
    try:
        src = textwrap.dedent(inspect.getsource(cls))
        tree = ast.parse(src)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    return node if isinstance(node, ast.ClassDef) else None


def _forward_ast(cls: type) -> ast.FunctionDef | None:
    node = _class_ast(cls)
    if node is None:
        return None
    return next((f for f in node.body if isinstance(f, ast.FunctionDef) and f.name == "forward"), None)


@functools.lru_cache(maxsize=256)
def return_names(cls: type) -> tuple[str | None, ...] | None:
    """Variable names in the ``return`` of ``cls.forward`` (one per element; None for expressions), if readable.

    Only the class's own ``forward`` is read (an inherited one is looked up on the defining class).
    """
    owner = next((c for c in cls.__mro__ if "forward" in vars(c)), None)
    if owner is None or owner.__module__.startswith("torch."):
        return None
    fn = _forward_ast(owner)
    if fn is None:
        return None
    returns = [n for n in ast.walk(fn) if isinstance(n, ast.Return) and n.value is not None]
    if not returns:
        return None
    value = returns[-1].value

    def name(e: ast.expr) -> str | None:
        while isinstance(e, (ast.Call, ast.Attribute, ast.BinOp)):  # x.to(...), x * scale: keep the variable name
            e = e.func if isinstance(e, ast.Call) else e.value if isinstance(e, ast.Attribute) else e.left
        return e.id if isinstance(e, ast.Name) else None

    if isinstance(value, ast.Tuple):
        return tuple(name(e) for e in value.elts)
    return (name(value),)


def returns_single(cls: type) -> bool | None:
    """True when ``cls.forward`` returns one value (bare logits), False for a tuple, None when unreadable."""
    names = return_names(cls)
    return None if names is None else len(names) == 1


def returns_weights(cls: type) -> bool:
    """Whether ``cls.forward`` returns the transformers router contract ``(router_logits, weights, indices, ...)``: a
    tuple of three or more values whose first is named as logits or probabilities. Its ``[.., K]`` weights are what
    the MoE block hands its experts (gate mass); Switch, NLLB (dispatch masks first), Llama-4 (dense scores), JetMoE
    (a sorted dispatch) and DBRX (bare logits) return other layouts."""
    names = return_names(cls)
    return names is not None and len(names) >= 3 and any(w in (names[0] or "") for w in ("logit", "prob"))


_SCORING_ATTRS = ("scoring_func", "score_fn", "expert_selection_fn", "scoring_function", "score_func", "scoring")


@functools.lru_cache(maxsize=256)
def _source_scoring(cls: type) -> str:
    """'sigmoid' when the class's code calls a sigmoid and never a softmax (comments ignored), else 'softmax'."""
    calls: set[str] = set()
    for c in cls.__mro__:
        if c.__module__.startswith(("torch.", "builtins")):
            break
        node = _class_ast(c)
        if node is None:
            continue
        for n in ast.walk(node):
            if isinstance(n, ast.Call):
                f = n.func
                calls.add(f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else "")
    sig = {"sigmoid", "sigmoid_", "logsigmoid"} & calls
    soft = {"softmax", "log_softmax"} & calls
    return "sigmoid" if sig and not soft else "softmax"


def infer_scoring(module: nn.Module) -> tuple[str, Callable[[torch.Tensor], torch.Tensor] | None]:
    """How `module` turns logits into expert scores: ('softmax' | 'sigmoid', score_fn or None).

    An explicit scoring attribute wins (a name such as ``expert_selection_fn="sigmoid"`` or a scoring module such as
    ``score_fn = ACT2FN["sqrtsoftplus"]``); a scoring function that is neither sigmoid nor softmax is returned so the
    reader can apply it to the logits. Otherwise the class's own code decides.
    """
    for owner in (module, getattr(module, "config", None)):
        for attr in _SCORING_ATTRS:
            v = getattr(owner, attr, None) if owner is not None else None
            if v is None:
                continue
            label = v.lower() if isinstance(v, str) else type(v).__name__.lower()
            if "sigmoid" in label:
                return "sigmoid", None
            if "softmax" in label:
                return "softmax", None
            if callable(v) and not isinstance(v, str):
                return "sigmoid", v
    return _source_scoring(type(module)), None


# The selection recipes moewatch can reproduce exactly, by the source of a transformers router's `forward` (compared as
# syntax trees: formatting and comments aside, the code must be the same). "logits": the choice is the top-k of the
# logits or of their softmax, so the logits are the selection space. "deepseek_v3": sigmoid scores plus
# `e_score_correction_bias`, top-k within the `topk_group` best of `num_group` groups (groups scored by their two best
# biased scores). Any other router, including one edited from these, gets no margin and no override (null columns).
_RECIPES: dict[str, tuple[str, ...]] = {
    "logits": (
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits.float(), dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
""",  # Mixtral, MiniMax
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    if self.norm_topk_prob:
        router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
""",  # Qwen2/3-MoE, Qwen3-Next, OLMoE, FlexOlmo, ...
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states, self.weight)
    router_probs = torch.nn.functional.softmax(router_logits, dtype=torch.float, dim=-1)
    router_top_value, router_indices = torch.topk(router_probs, self.top_k, dim=-1)
    router_top_value /= router_top_value.sum(dim=-1, keepdim=True)
    router_top_value = router_top_value.to(router_logits.dtype)
    router_scores = router_top_value
    return router_logits, router_scores, router_indices
""",  # Qwen3.5-MoE, Qwen3-VL-MoE
        """
def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    router_logits = F.linear(hidden_states, self.weight).float()
    top_k_logits, top_k_index = router_logits.topk(self.top_k, dim=-1)
    top_k_weights = torch.softmax(top_k_logits, dim=-1).type_as(hidden_states)
    return router_logits, top_k_weights, top_k_index
""",  # GraniteMoe (and its shared / hybrid / SWA variants)
        """
def forward(self, hidden_states):
    router_logits = F.linear(hidden_states, self.weight, self.bias)
    router_top_value, router_indices = torch.topk(router_logits, self.top_k, dim=-1)
    router_scores = torch.nn.functional.softmax(router_top_value, dim=1, dtype=router_top_value.dtype)
    return router_logits, router_scores, router_indices
""",  # GPT-OSS
    ),
    "deepseek_v3": (
        """
def forward(self, hidden_states):
    hidden_states = hidden_states.view(-1, self.hidden_dim)
    router_logits = F.linear(hidden_states.type(torch.float32), self.weight.type(torch.float32))
    scores = router_logits.sigmoid()
    scores_for_choice = scores + self.e_score_correction_bias
    group_scores = (
        scores_for_choice.view(-1, self.num_group, self.num_experts // self.num_group)
        .topk(2, dim=-1)[0]
        .sum(dim=-1)
    )
    group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores)
    group_mask.scatter_(1, group_idx, 1)
    score_mask = (
        group_mask.unsqueeze(-1)
        .expand(-1, self.num_group, self.num_experts // self.num_group)
        .reshape(-1, self.num_experts)
    )
    scores_for_choice = scores_for_choice.masked_fill(~score_mask.bool(), float("-inf"))
    topk_indices = torch.topk(scores_for_choice, k=self.top_k, dim=-1, sorted=False)[1]
    topk_weights = scores.gather(1, topk_indices)
    if self.norm_topk_prob:
        denominator = topk_weights.sum(dim=-1, keepdim=True) + 1e-20
        topk_weights /= denominator
    topk_weights = topk_weights * self.routed_scaling_factor
    return router_logits, topk_weights, topk_indices
""",  # DeepSeek-V3 and the models that copy its router (GLM-4-MoE, dots1, Kimi-Linear, Exaone-MoE, ...)
    ),
}


def _tree(fn: ast.FunctionDef) -> str:
    """A function's syntax tree as text, without its docstring (comments and formatting are not in the tree)."""
    body = fn.body[1:] if (fn.body and isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant)
                           and isinstance(fn.body[0].value.value, str)) else fn.body
    return ast.dump(ast.FunctionDef(name=fn.name, args=fn.args, body=body, decorator_list=[], returns=fn.returns),
                    annotate_fields=False)


@functools.lru_cache(maxsize=1)
def _recipe_trees() -> dict[str, str]:
    out = {}
    for recipe, sources in _RECIPES.items():
        for src in sources:
            fn = ast.parse(textwrap.dedent(src)).body[0]
            assert isinstance(fn, ast.FunctionDef)
            out[_tree(fn)] = recipe
    return out


@functools.lru_cache(maxsize=256)
def selection_recipe(cls: type) -> str | None:
    """The selection recipe of a router class (``"logits"`` or ``"deepseek_v3"``, see `_RECIPES`), or None.

    The class's own ``forward`` (or the inherited one) must be one of the recipes' code exactly; a router whose
    forward a hub kernel may replace (``use_kernel_forward_from_hub``) keeps the recipe, as kernels implement the same
    contract."""
    owner = next((c for c in cls.__mro__ if "forward" in vars(c)), None)
    if owner is None or owner.__module__.startswith("torch."):
        return None
    fn = _forward_ast(owner)
    return _recipe_trees().get(_tree(fn)) if fn is not None else None
