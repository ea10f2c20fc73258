"""Training-stack routers: recognise the MoE routers of torchtitan, DeepSpeed, OLMo-core, NeMo Automodel, LitGPT,
lucidrains' st-moe-pytorch / mixture-of-experts and Megatron-Core, and build their `RouterSpec`s.

Each stack is matched by the class (anywhere in the module's MRO) and the Python package it comes from, never by
importing the stack. A match names the router (the module computing the logits: the run's ``layer``), the MoE block
around it (its subtree is then closed to the generic strategies, so expert modules never show up as phantom
routers), the probes reading it (`moewatch.capture.stack_readers`), what they can measure, and its bias. What they
measure is asked of the readers where the readers decide it: the routing diagnostics from their ``signals(module)``
(`types.probe_signals`), the logit and distribution columns from the same input-noise checks the readers run.

`stack_spec(name, module, parent, tree)` is used both by discovery and for modules registered by hand with
``attach(model, run_dir, routers={name: module})``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moewatch.capture import stack_readers as sr
from moewatch.capture.types import Probe, RouterSpec, ordered, probe_signals

log = logging.getLogger(__name__)

Tree = dict[str, tuple[nn.Module, "nn.Module | None"]]


@dataclass(frozen=True)
class StackMatch:
    """A recognised stack router: its spec and the qualified name of the MoE block holding it (closed to others)."""

    spec: RouterSpec
    block: str


def _is(module: nn.Module, package: str, *classes: str) -> bool:
    """Whether `module` is an instance of a class named in `classes` defined in `package` (or a subclass of one)."""
    for c in type(module).__mro__:
        if c.__name__ in classes and (c.__module__ == package or c.__module__.startswith(package + ".")):
            return True
    return False


def _tensor_getter(owner: nn.Module, attr: str, num_experts: int) -> Callable[[], torch.Tensor | None] | None:
    t = getattr(owner, attr, None)
    if isinstance(t, torch.Tensor) and t.numel() == num_experts:
        return lambda: (getattr(owner, attr).detach().reshape(-1) if isinstance(getattr(owner, attr, None),
                                                                             torch.Tensor) else None)
    return None


def _block_of(name: str) -> str:
    return name.rpartition(".")[0]


def _measures(*base: str, probes: list[Probe], bias: object = None) -> tuple[str, ...]:
    """`base` plus the routing diagnostics the probes' readers declare, plus ``bias`` when the router has one."""
    return ordered((*base, *probe_signals(probes)) + (("bias",) if bias is not None else ()))


# ---------------------------------------------------------------------------------------------- one builder per stack


def _torchtitan(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if not _is(m, "torchtitan", "TokenChoiceTopKRouter"):
        return None
    E, K = int(m.num_experts), int(m.top_k)
    gate = getattr(m, "gate", None)
    scoring = "sigmoid" if m.score_func == "sigmoid" else "softmax"
    stash = sr.LogitsStash()
    has_gate = isinstance(gate, nn.Module)
    bias = _tensor_getter(parent, "expert_bias_E", E) if parent is not None else None
    probes = ([Probe(gate, stash)] if has_gate else []) + [
        Probe(m, sr.TorchtitanRouterReader(E, K, scoring, stash, gate=has_gate, biased=bias is not None))]
    return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, bias=bias, kind="torchtitan",
                                 measures=_measures("counts", "distribution", *(("logits",) if has_gate else ()),
                                                    probes=probes, bias=bias),
                                 note="distribution from the router's own scores; logits from its gate Linear"),
                      _block_of(name))


def _deepspeed(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if not _is(m, "deepspeed", "TopKGate"):
        return None
    E, K = int(m.wg.out_features), int(m.k)
    reader = sr.DeepSpeedGateReader(E, K)
    jitter = reader.noisy(m)
    factor = getattr(m, "capacity_factor", None)
    probes = [Probe(m, reader)]
    measures = _measures("counts", "drops", *(() if jitter else ("distribution", "logits")), probes=probes)
    note = ("per-expert drops from exp_counts (pre-capacity) minus kept routes"
            + ("; Jitter noise: no logits while training" if jitter else ""))
    block = _block_of(name)
    return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes,
                                 capacity_factor=float(factor) if isinstance(factor, (int, float)) else None,
                                 kind="deepspeed", measures=measures, note=note),
                      _block_of(block) if block.endswith("deepspeed_moe") else block)


def _olmo_core(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if not _is(m, "olmo_core", "MoERouter"):
        return None
    E, K = int(m.num_experts), int(m.top_k)
    gating = str(getattr(m, "gating_function", "softmax"))
    scoring = "sigmoid" if gating.endswith("sigmoid") else "softmax"
    experts = getattr(parent, "experts", None) if parent is not None else None
    capacity = experts is not None and callable(getattr(experts, "expert_capacity", None))
    reader = sr.OlmoRouterReader(E, K, scoring, count_choice=not capacity)
    probes = [Probe(m, reader)]
    if capacity:
        assert experts is not None
        probes.append(Probe(experts, sr.OlmoCapacityReader(E, K)))
    bias = _tensor_getter(m, "score_bias", E)
    jitter = reader.noisy(m)
    base = ("counts", "drops") if capacity else ("counts",)
    measures = _measures(*base, *(() if jitter else ("distribution", "logits")), probes=probes, bias=bias)
    factor = getattr(experts, "capacity_factor", None)
    return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, bias=bias, kind="olmo_core",
                                 capacity_factor=float(factor) if isinstance(factor, (int, float)) else None,
                                 measures=measures,
                                 note=("capacity: drops = batch_size_per_expert beyond expert_capacity"
                                       if capacity else "dropless") + ("; jitter: no logits while training"
                                                                       if jitter else "")),
                      _block_of(name))


def _nemo(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if not _is(m, "nemo_automodel", "Gate"):
        return None
    E, K = int(m.n_experts), int(m.topk)
    score_func = str(m.score_func)
    bias = _tensor_getter(m, "e_score_correction_bias", E)
    probes = [Probe(m, sr.NemoGateReader(E, K, score_func))]
    return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, bias=bias, kind="nemo_automodel",
                                 measures=_measures("counts", "distribution", "logits", probes=probes, bias=bias),
                                 note=f"score_func={score_func}; logits: the gate's projection re-run on its input"),
                      _block_of(name))


def _litgpt(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if _is(m, "litgpt", "GroupedTopkRouter"):
        E, K = int(m.config.n_expert), int(m.config.n_expert_per_token)
        bias = _tensor_getter(m, "e_score_correction_bias", E)
        probes = [Probe(m, sr.LitGPTGroupedReader(E, K))]
        return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, bias=bias, kind="litgpt",
                                     measures=_measures("counts", "distribution", "logits", probes=probes, bias=bias),
                                     note="grouped top-k (sigmoid); logits re-run on the router's input"),
                          _block_of(name))
    if (isinstance(m, nn.Linear) and parent is not None and getattr(parent, "gate", None) is m
            and _is(parent, "litgpt", "LLaMAMoE")):
        E, K = int(m.out_features), int(parent.config.n_expert_per_token)
        probes = [Probe(m, sr.LitGPTGateReader(E, K))]
        return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, kind="litgpt",
                                     measures=_measures("counts", "distribution", "logits", probes=probes),
                                     note="choice: torch.topk of the gate's output, the op LLaMAMoE runs on it"),
                          _block_of(name))
    return None


def _lucidrains(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if _is(m, "st_moe_pytorch", "TopNGating"):
        E, K = int(m.num_gates), int(m.top_n)
        stash = sr.LogitsStash()
        probes = [Probe(m.to_gates, stash), Probe(m, sr.STMoEGatingReader(E, K, stash))]
        factor = getattr(m, "capacity_factor_train", None)
        return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, kind="st_moe",
                                     capacity_factor=float(factor) if isinstance(factor, (int, float)) else None,
                                     measures=_measures("counts", "drops", "distribution", "logits", probes=probes),
                                     note="drops: first expert only (further experts are routed at random); "
                                          "tokens = routed assignments / K"),
                          _block_of(name))
    if _is(m, "mixture_of_experts", "Top2Gating"):
        E = int(m.num_gates)
        factor = getattr(m, "capacity_factor_train", None)
        probes = [Probe(m, sr.Top2GatingReader(E))]
        return StackMatch(RouterSpec(name=name, num_experts=E, top_k=2, probes=probes, kind="mixture_of_experts",
                                     capacity_factor=float(factor) if isinstance(factor, (int, float)) else None,
                                     measures=_measures("counts", "drops", "distribution", "logits", probes=probes),
                                     note="second-expert drops under the 'all'/'threshold' policies only; "
                                          "tokens = routed assignments / 2"),
                          _block_of(name))
    return None


def _megatron(name: str, m: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    if not _is(m, "megatron.core", "TopKRouter"):
        return None
    cfg = m.config
    E, K = int(cfg.num_moe_experts), int(m.topk)
    scoring = "sigmoid" if str(getattr(m, "score_function", "softmax")) == "sigmoid" else "softmax"
    bias = _tensor_getter(m, "expert_bias", E)
    factor = getattr(cfg, "moe_expert_capacity_factor", None)
    reader = sr.MegatronRouterReader(E, K, scoring)
    probes = [Probe(m, reader)]
    return StackMatch(RouterSpec(name=name, num_experts=E, top_k=K, probes=probes, bias=bias, kind="megatron",
                                 capacity_factor=float(factor) if isinstance(factor, (int, float)) else None,
                                 measures=_measures("counts", *(("drops",) if factor is not None else ()),
                                                    *(() if reader.noisy(m) else ("distribution", "logits")),
                                                    probes=probes, bias=bias),
                                 note="choice from routing_map (after token dropping); logits: its gating re-run"),
                      _block_of(name))


BUILDERS: tuple[Callable[[str, nn.Module, nn.Module | None], StackMatch | None], ...] = (
    _torchtitan, _deepspeed, _olmo_core, _nemo, _litgpt, _lucidrains, _megatron)

# Package prefixes of the stacks above: a module from any other package is skipped without trying the builders.
PACKAGES = ("torchtitan", "deepspeed", "olmo_core", "nemo_automodel", "litgpt", "st_moe_pytorch", "mixture_of_experts",
            "megatron")


def stack_spec(name: str, module: nn.Module, parent: nn.Module | None) -> StackMatch | None:
    """The spec of `module` if it is a known training stack's router (see the module docstring), else None."""
    if not any(c.__module__.split(".")[0] in PACKAGES for c in type(module).__mro__ + type(parent).__mro__):
        return None
    for build in BUILDERS:
        try:
            match = build(name, module, parent)
        except (AttributeError, TypeError, ValueError) as e:  # a class of that name that is not the router we know
            log.debug("moewatch: %s (%s) looks like a %s router but is not readable as one: %s", name,
                      type(module).__name__, build.__name__.strip("_"), e)
            continue
        if match is not None:
            return match
    return None


def stack_routers(tree: Tree) -> list[StackMatch]:
    """Every training-stack router in a model (`tree`: qualified name -> (module, parent))."""
    out = []
    for name, (m, parent) in tree.items():
        if name and (match := stack_spec(name, m, parent)) is not None:
            out.append(match)
    return out
