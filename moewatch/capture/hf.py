"""Introspection of router classes, mostly for transformers models (without importing transformers).

transformers 5.x marks where routing can be observed with ``type(model)._can_record_outputs["router_logits"]``: an
``OutputRecorder(target_class, index=...)`` (or a class, a class name, or a list of those). It is a hint: it misses
some routers (JetMoE's attention router, hash routers) and names whole MoE blocks for others (Doge, Ernie-4.5-VL,
JetMoE attention). Discovery therefore combines it with duck typing and uses it for two things only: which classes
compute routing although they carry no ``num_experts``/``top_k`` attributes (DBRX, Switch, NLLB, Gemma-4), and at which
output position their logits sit (Llama-4: 1, Switch/NLLB: 2).

The rest reads a router class's source once (cached) to learn what its ``forward`` returns by name (Gemma-4 returns
probabilities where others return logits) and whether it scores experts with a sigmoid or a softmax.
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
