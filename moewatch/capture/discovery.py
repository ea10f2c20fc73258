"""Router discovery: find every router in a PyTorch MoE model and say how to observe it.

`discover(model)` returns one `RouterSpec` per router, named by the qualified name of the module that computes the
routing logits. Strategies, tried together on every module (the innermost router wins when they nest):

1. **Router modules** (duck typing, `RouterModule`): a module with integer expert-count and top-k attributes
   (``num_experts``/``n_routed_experts``/``num_local_experts``/... and ``top_k``/``num_experts_per_tok``/...) that does not
   hold the experts itself. This covers the moewatch router protocol (forward returns an object with ``logits`` and
   ``indices``) and nearly every transformers 5.x router (forward returns ``(router_logits, weights, indices)``).
   Classes named by ``_can_record_outputs["router_logits"]`` count as routers even without those attributes (DBRX,
   Switch, NLLB, Gemma-4); then E comes from their output projection and K from their config or parent block.
2. **Product-key routers** (`ProductKeyBlock`, Doge): the key projection is the router; the choice is read on the
   expert-embedding lookup.
3. **Classic blocks** (`ClassicBlock`, transformers 4.x / research code): an ``nn.Linear`` named ``gate``, ``router``
   or ``wg`` inside a block that holds ``experts`` and a top-k attribute. The choice is not visible there, so it is
   recorded as top-k of the logits (exact for plain top-k routers, a guess for anything else).

Routers whose output does not show their choice (DBRX returns bare logits) get a second probe on the sibling
experts module, which receives ``top_k_index`` (see `readers.ExpertsInputReader`). `routers=` replaces all of this.

Before all of these, the routers of training stacks (torchtitan, DeepSpeed, OLMo-core, NeMo Automodel, LitGPT,
lucidrains' MoE code, Megatron-Core) are recognised by class (`moewatch.capture.stacks`); their MoE blocks are then
closed to the strategies above. `moe_looking_modules` names the modules that look like MoE blocks but hold no router
found, for the warning at attach.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from moewatch.capture import hf, stacks
from moewatch.capture.readers import (
    SELECTIONS,
    ExpertsInputReader,
    IndicesInputReader,
    ProductKeyReader,
    RouterReader,
    protocol_type,
)
from moewatch.capture.types import Probe, RouterSpec, ordered, probe_signals

log = logging.getLogger(__name__)

# Attribute spellings seen across MoE code bases, most specific first. ZAYA's `num_router_classes` counts its skip
# class; LongCat's `n_routed_experts` counts its zero-compute experts; both match the width of the logits.
EXPERT_ATTRS = ("num_router_classes", "n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts",
                "n_experts")
TOPK_ATTRS = ("top_k", "num_experts_per_tok", "moe_top_k", "moe_topk", "moe_k", "top_k_experts", "k",
              "num_experts_per_token", "num_selected_experts")
BIAS_ATTRS = ("e_score_correction_bias", "expert_bias", "balancing_biases", "score_correction_bias", "expert_bias_E",
              "score_bias")
GATE_NAMES = ("gate", "router", "wg")
# Further spellings, used only to infer E and K of a module already known to be a router (found, or registered by
# hand), never to decide that a module is one: research code and training stacks (lucidrains' `num_gates`/`top_n`,
# NeMo's `n_experts`/`topk`, LitGPT's config `n_expert`/`n_expert_per_token`, Megatron's `num_moe_experts`).
MORE_EXPERT_ATTRS = (*EXPERT_ATTRS, "num_gates", "n_expert", "num_moe_experts", "n_routed_experts")
MORE_TOPK_ATTRS = (*TOPK_ATTRS, "topk", "top_n", "n_expert_per_token", "n_activated_experts", "moe_router_topk")
# Class names of MoE blocks (for the "MoE-looking but no router" warning).
MOE_CLASS = re.compile(r"(MoE|Moe|MixtureOfExperts|MoELayer|MoeLayer|SparseMoeBlock|SparseMLP)$")


class NoRouterFoundError(RuntimeError):
    """No router was found in the model: the message says what was searched for and how to register by hand."""


@runtime_checkable
class ProductKeyBlock(Protocol):
    """A product-key MoE block: ``num_keys**2`` experts scored by the sums of two key halves."""

    num_keys: int
    router_gate: nn.Linear
    down_embed: nn.Embedding


# ---------------------------------------------------------------------------------------------- attribute lookups


def int_attr(obj: Any, names: tuple[str, ...]) -> int | None:
    """The first of ``obj``'s attributes ``names`` holding a positive int (not a bool), or None."""
    for n in names:
        v = getattr(obj, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _expert_container(module: nn.Module) -> bool:
    """True for a block that holds its experts (a child named ``experts``/``*_experts``, not a shared expert)."""
    for name, _ in module.named_children():
        if name == "experts" or (name.endswith("experts") and "shared" not in name):
            return True
    return False


def _has_embedding(module: nn.Module) -> bool:
    """Routers hold no embedding table; a module that does is a whole model or a product-key block."""
    return any(isinstance(m, nn.Embedding) for m in module.modules())


def _projection_width(module: nn.Module) -> int | None:
    """Output width of the module's routing projection: itself if Linear, its weight's rows, or its one Linear child."""
    if isinstance(module, nn.Linear):
        return module.out_features
    w = getattr(module, "weight", None)
    if isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0])
    linears = [c for c in module.children() if isinstance(c, nn.Linear)]
    return linears[0].out_features if len(linears) == 1 else None


def _num_experts(module: nn.Module) -> int | None:
    return (int_attr(module, MORE_EXPERT_ATTRS) or _projection_width(module)
            or int_attr(getattr(module, "config", None), MORE_EXPERT_ATTRS))


def _top_k(module: nn.Module, parent: nn.Module | None, model: nn.Module | None) -> int | None:
    for owner in (module, getattr(module, "config", None), parent, getattr(parent, "config", None)):
        if owner is not None and (k := int_attr(owner, MORE_TOPK_ATTRS)):
            return k
    if m := re.search(r"Top(\d+)", type(module).__name__):  # Switch's Top1Router, NLLB's Top2Router
        return int(m.group(1))
    cfg = getattr(model, "config", None)
    return int_attr(cfg, MORE_TOPK_ATTRS) if cfg is not None else None


def find_bias(module: nn.Module, parent: nn.Module | None, num_experts: int) -> Callable[[], torch.Tensor] | None:
    """A getter for the router's correction bias (shape E), looked up on the router, its children, then its parent.

    The getter re-reads the attribute on every call, so a bias replaced by assignment or a state-dict load is seen.
    """
    owners = [module, *module.children()] + ([parent] if parent is not None else [])
    for owner in owners:
        for attr in BIAS_ATTRS:
            t = getattr(owner, attr, None)
            if isinstance(t, torch.Tensor) and t.numel() == num_experts:
                return lambda o=owner, a=attr: getattr(o, a).detach().reshape(-1)
    return None


def _capacity(module: nn.Module) -> tuple[int | None, float | None]:
    cap = int_attr(module, ("expert_capacity", "capacity"))
    factor = getattr(module, "capacity_factor", None)
    return (cap, float(factor) if isinstance(factor, (int, float)) and not isinstance(factor, bool) else None)


def _kind(module: nn.Module) -> str:
    if type(module).__module__.startswith("transformers."):
        return "transformers"
    return "moewatch" if protocol_type(type(module)) is not None else "router"


# ---------------------------------------------------------------------------------------------- spec builders


def _parents(model: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    named = dict(model.named_modules())
    out: dict[str, tuple[nn.Module, nn.Module | None]] = {}
    for name, m in named.items():
        parent = named.get(name.rpartition(".")[0]) if name else None
        out[name] = (m, parent)
    return out


def _sibling_experts(parent: nn.Module | None, router: nn.Module) -> nn.Module | None:
    """The router's sibling experts module when its forward takes the choice (``experts(h, top_k_index, w)``)."""
    experts = getattr(parent, "experts", None) if parent is not None else None
    if not isinstance(experts, nn.Module) or experts is router:
        return None
    try:
        params = inspect.signature(type(experts).forward).parameters
    except (TypeError, ValueError):
        return None
    takes_choice = any("index" in p or "indices" in p or p in ("selected_experts", "expert_ids", "topk_ids")
                       for p in params)
    return experts if takes_choice else None


def _arg_position(module: nn.Module, arg: str) -> int | None:
    """Position of `arg` among the module forward's arguments (after self), if it takes one."""
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return names.index(arg) if arg in names else None


def router_spec(
    name: str,
    module: nn.Module,
    parent: nn.Module | None,
    num_experts: int,
    top_k: int,
    *,
    logits_index: int | None = None,
    kind: str | None = None,
) -> RouterSpec:
    """The spec for a router module read through `RouterReader` (plus an experts probe when it returns bare logits)."""
    scoring, score_fn = hf.infer_scoring(module)
    experts = _sibling_experts(parent, module)
    # Only routers that return bare logits need the experts' view of the choice (DBRX).
    watch_experts = experts is not None and hf.returns_single(type(module)) is not False
    null_expert = None
    classes = getattr(module, "num_router_classes", None)
    if isinstance(classes, int) and classes == num_experts and int_attr(module, ("num_experts",)) == classes - 1:
        null_expert = classes - 1  # ZAYA: its skip class is masked to expert 0 with weight 0 before the experts
    own_kind = _kind(module)
    kind = kind or own_kind
    recipe = hf.selection_recipe(type(module))
    # A transformers router's [.., K] float output is what its block hands the experts as combine weights.
    weights = (own_kind == "transformers" or recipe is not None) and hf.returns_weights(type(module))
    protocol = protocol_type(type(module))
    reader = RouterReader(num_experts, top_k, scoring=scoring, score_fn=score_fn, logits_index=logits_index,
                          names=hf.return_names(type(module)), guess_choice=not watch_experts,
                          null_expert=null_expert, padding_arg=_arg_position(module, "padding_mask"),
                          weights=weights, selection=SELECTIONS[recipe] if recipe is not None else None,
                          protocol_methods=protocol is not None, protocol=protocol)
    probes = [Probe(module, reader)]
    if watch_experts:
        assert experts is not None
        probes.append(Probe(experts, ExpertsInputReader(reader)))
    capacity, factor = _capacity(module)
    bias = find_bias(module, parent, num_experts)
    # Only a router returning bare logits with no experts probe has its choice recomputed (top-k of the logits).
    guessed = not watch_experts and hf.returns_single(type(module)) is True and protocol is None
    counts = "counts_topk" if guessed else "counts"
    drops = ("drops",) if capacity is not None or factor is not None else ()
    return RouterSpec(name=name, num_experts=num_experts, top_k=top_k, probes=probes, capacity=capacity,
                      capacity_factor=factor, bias=bias, kind=kind,
                      measures=ordered((counts, *drops, "distribution", *(() if reader.returns_probs else ("logits",)),
                                        *probe_signals(probes)) + (("bias",) if bias is not None else ())))


def _product_key_spec(name: str, block: nn.Module) -> RouterSpec | None:
    n = block.num_keys
    k = int_attr(block, TOPK_ATTRS)
    if k is None or k > n or block.router_gate.out_features != 2 * n:
        return None
    # Experts beyond num_keys**2 (a non-square expert count) are unreachable, so E is num_keys**2.
    return RouterSpec(name=f"{name}.router_gate" if name else "router_gate", num_experts=n * n, top_k=k,
                      probes=[Probe(block.router_gate, ProductKeyReader(n)),
                              Probe(block.down_embed, IndicesInputReader(k))],
                      bias=None, kind="product_key")


def _classic_spec(name: str, linear: nn.Linear, parent: nn.Module) -> RouterSpec | None:
    k = int_attr(parent, TOPK_ATTRS) or int_attr(getattr(parent, "config", None), MORE_TOPK_ATTRS)
    E = linear.out_features
    if k is None or not 1 <= k <= E:
        return None
    reader = RouterReader(E, k, scoring=hf.infer_scoring(parent)[0], guess_choice=True)
    bias = find_bias(linear, parent, E)
    return RouterSpec(name=name, num_experts=E, top_k=k, probes=[Probe(linear, reader)], bias=bias, kind="classic",
                      measures=("counts_topk", "distribution", "logits") + (("bias",) if bias is not None else ()),
                      note="the block hides its choice: counts are top-k of the logits")


# ---------------------------------------------------------------------------------------------- discovery


def _contains(outer: str, inner: str) -> bool:
    """Whether module `inner` lies strictly inside module `outer` (qualified names; "" is the root)."""
    return inner != outer and (outer == "" or inner.startswith(outer + "."))


def _inside(name: str, owners: list[str]) -> bool:
    return any(name == o or _contains(o, name) for o in owners)


def _closed(name: str, blocks: list[str]) -> bool:
    """Whether `name` lies in (or around) a training-stack MoE block, where only the stack's router counts."""
    return any(name == b or _contains(b, name) or _contains(name, b) for b in blocks)


def _router_candidates(model: nn.Module, tree: dict[str, tuple[nn.Module, nn.Module | None]],
                       closed: list[str]) -> Iterator[RouterSpec]:
    hints = hf.recorder_hints(model)
    found: dict[str, tuple[nn.Module, nn.Module | None, int | None]] = {}
    product_keys: dict[str, nn.Module] = {}
    for name, (m, parent) in tree.items():
        if not name or _closed(name, closed):  # the model itself is never one of its routers
            continue
        if (isinstance(m, ProductKeyBlock) and isinstance(m.router_gate, nn.Linear)
                and isinstance(m.down_embed, nn.Embedding)):
            product_keys[name] = m
            continue
        hint = next((h for h in hints if h.matches(m)), None)
        duck = int_attr(m, EXPERT_ATTRS) is not None and int_attr(m, TOPK_ATTRS) is not None
        if (duck or hint is not None) and not _expert_container(m) and not _has_embedding(m):
            found[name] = (m, parent, hint.index if hint is not None else None)
    # Keep the innermost: a candidate that contains another (a block named by the recorder, JetMoE's MoA) is not one.
    every = [*found, *product_keys]
    inner = [n for n in found if not any(_contains(n, o) or _contains(o, n) and o in product_keys for o in every)]
    for name, block in product_keys.items():
        spec = _product_key_spec(name, block)
        if spec is not None:
            yield spec
    for name in inner:
        m, parent, index = found[name]
        E = _num_experts(m)
        K = _top_k(m, parent, model)
        if E is None or K is None or not 1 <= K <= E or E < 2:
            log.debug("moewatch: skipping router-like module %s (num_experts=%s, top_k=%s)", name, E, K)
            continue
        yield router_spec(name, m, parent, E, K, logits_index=index)


def _classic_candidates(tree: dict[str, tuple[nn.Module, nn.Module | None]], taken: list[str]) -> Iterator[RouterSpec]:
    for name, (m, parent) in tree.items():
        if not isinstance(m, nn.Linear) or parent is None or name.rpartition(".")[2] not in GATE_NAMES:
            continue
        if _inside(name, taken) or not _expert_container(parent):
            continue
        spec = _classic_spec(name, m, parent)
        if spec is not None:
            yield spec


def _explicit(model: nn.Module, routers: Mapping[str, nn.Module | RouterSpec]) -> list[RouterSpec]:
    tree = _parents(model)
    by_id = {id(m): (n, p) for n, (m, p) in tree.items()}
    specs = []
    for name, value in routers.items():
        if isinstance(value, RouterSpec):
            specs.append(value if value.name == name else replace(value, name=name))
            continue
        if not isinstance(value, nn.Module):
            raise TypeError(f"routers[{name!r}] must be an nn.Module or a RouterSpec, got {type(value).__name__}")
        parent = by_id.get(id(value), (None, None))[1]
        match = stacks.stack_spec(name, value, parent)
        if match is not None:
            specs.append(match.spec)
            continue
        E = _num_experts(value)
        K = _top_k(value, parent, model)
        if E is None or K is None:
            missing = " and ".join(w for w, v in (("num_experts", E), ("top_k", K)) if v is None)
            raise ValueError(
                f"router {name!r} ({type(value).__name__}): cannot infer its {missing}. Give the module integer "
                f"attributes `num_experts` and `top_k` (or a weight of shape [num_experts, hidden]), or pass "
                f"routers={{{name!r}: RouterSpec(name={name!r}, num_experts=..., top_k=..., probes=[...])}}"
            )
        if not 1 <= K <= E:
            raise ValueError(f"router {name!r}: top_k={K} must be in [1, num_experts={E}]")
        specs.append(router_spec(name, value, parent, E, K, kind="custom"))
    return specs


def discover(model: nn.Module, routers: Mapping[str, nn.Module | RouterSpec] | None = None) -> list[RouterSpec]:
    """Find every router in `model` (see the module docstring), in module order.

    `routers` replaces discovery: keys are router names (qualified names as in ``model.named_modules()``), values a
    module (read generically; E and K from its attributes, weight shape or parent block) or a ready `RouterSpec`.
    An empty mapping returns no spec (record by hand with ``watch.record``).

    Raises:
        NoRouterFoundError: automatic discovery found nothing.
        ValueError: an explicit router's expert count or top-k cannot be inferred.
    """
    if routers is not None:
        return _explicit(model, routers)
    tree = _parents(model)
    matches = stacks.stack_routers(tree)
    closed = [m.block for m in matches]
    specs = [m.spec for m in matches] + list(_router_candidates(model, tree, closed))
    taken = [s.name for s in specs] + closed + [n for n, (m, _) in tree.items() if any(p.module is m for s in specs
                                                                                    for p in s.probes)]
    specs += list(_classic_candidates(tree, taken))
    if not specs:
        raise NoRouterFoundError(_not_found_message(model, moe_looking_modules(model, [])))
    order = {n: i for i, n in enumerate(tree)}
    return sorted(specs, key=lambda s: order.get(s.name, len(order)))


def moe_looking_modules(model: nn.Module, specs: list[RouterSpec]) -> list[str]:
    """Modules that look like MoE blocks (a child named ``experts``, or a class name ending in ``MoE``/``Moe``/
    ``MoELayer``/``SparseMoeBlock``/...) but hold none of `specs`' probed modules: routers discovery missed.

    Only the outermost such module is named; one nested in a block that holds a router is part of that block."""
    probed = {id(p.module) for s in specs for p in s.probes}
    named = dict(model.named_modules())
    holds = [n for n, m in named.items() if id(m) in probed]
    routed = [n for n, m in named.items() if _looks_moe(m) and any(h == n or _contains(n, h) for h in holds)]
    out: list[str] = []
    for name, m in named.items():
        if not name or not _looks_moe(m):
            continue
        if any(h == name or _contains(name, h) for h in holds) or any(_contains(b, name) for b in routed):
            continue
        if not any(_contains(o, name) for o in out):
            out.append(name)
    return out


def _looks_moe(m: nn.Module) -> bool:
    return _expert_container(m) or bool(MOE_CLASS.search(type(m).__name__))


def _not_found_message(model: nn.Module, moe_like: list[str] | None = None) -> str:
    where = ""
    if moe_like:
        shown = ", ".join(f"`{n}` ({type(dict(model.named_modules())[n]).__name__})" for n in moe_like[:5])
        more = f" and {len(moe_like) - 5} more" if len(moe_like) > 5 else ""
        where = f"These modules look like MoE blocks but hold no router it can read: {shown}{more}.\n"
    return (
        f"moewatch found no MoE router in {type(model).__name__}. {where}It searched for:\n"
        f"  - routers of transformers MoE models (classes named in `_can_record_outputs['router_logits']`, or modules "
        f"returning (router_logits, weights, indices));\n"
        f"  - the moewatch router protocol: a module with int attributes `num_experts` and `top_k` whose forward "
        f"returns an object with `logits` and `indices` (optionally `probs`, `dropped`);\n"
        f"  - classic MoE blocks: an nn.Linear named {' / '.join(repr(g) for g in GATE_NAMES)} inside a block that "
        f"holds `experts` and a top-k attribute ({', '.join(TOPK_ATTRS[:3])} or `k`);\n"
        f"  - the routers of torchtitan, DeepSpeed, OLMo-core, NeMo Automodel, LitGPT, st-moe-pytorch, "
        f"mixture-of-experts and Megatron-Core.\n"
        f"Register routers by hand with moewatch.attach(model, run_dir, routers={{'name': module}}) (a module or a "
        f"moewatch.RouterSpec per router), or record fused routers yourself with "
        f"watch.record(layer, logits=..., indices=..., dropped=...)."
    )
