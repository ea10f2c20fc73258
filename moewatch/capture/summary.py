"""What moewatch found in a model, said out loud: `inspect(model)`, `Watch.routers` entries and the one-line summary
that `attach` logs.

`RouterInfo` is a ``str`` (the router's layer name, so ``watch.routers`` still compares with a list of names) that
also carries the router's kind, expert count, top-k and what its probes can measure (`types.MEASURES`): the counts,
drops, distribution, logits and bias its spec lists, the routing diagnostics its readers declare (``gate_mass``,
``margin``, ``override``) and, from `inspect`, ``grad_norm`` where the experts' parameters are found
(`moewatch.capture.grads.find_expert_params`, the lookup `attach(grads=True)` makes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import nn

from moewatch.capture.types import RouterSpec, ordered


class RouterInfo(str):
    """One router as moewatch reads it: ``str(info)`` is its layer name; attributes describe it."""

    name: str
    kind: str
    num_experts: int
    top_k: int
    measures: tuple[str, ...]
    capacity: int | None
    capacity_factor: float | None
    note: str
    expert_params: str | None
    no_grad_norm: str | None

    def __new__(cls, spec: RouterSpec, experts: tuple[str | None, str | None] | None = None) -> RouterInfo:
        """`experts`: the result of looking for the router's expert parameters, ``(where they are, None)`` or
        ``(None, why grad_norm will not be recorded)``; None when not looked for (``grad_norm`` as the spec says)."""
        self = super().__new__(cls, spec.name)
        self.name = spec.name
        self.kind = spec.kind
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        self.expert_params, self.no_grad_norm = experts if experts is not None else (None, None)
        measures = [m for m in spec.measures if experts is None or m != "grad_norm"]
        if spec.bias is not None:
            measures.append("bias")
        if self.expert_params is not None:
            measures.append("grad_norm")
        self.measures = ordered(measures)
        self.capacity = spec.capacity
        self.capacity_factor = spec.capacity_factor
        self.note = spec.note
        return self

    def describe(self) -> str:
        """``name  kind  E=.. K=..  measures  (note; no grad_norm: why)`` on one line."""
        notes = [n for n in (self.note, f"no grad_norm: {self.no_grad_norm}" if self.no_grad_norm else "") if n]
        note = f"  ({'; '.join(notes)})" if notes else ""
        return f"{self.name}  {self.kind}  E={self.num_experts} K={self.top_k}  {', '.join(self.measures)}{note}"

    def as_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "num_experts": self.num_experts, "top_k": self.top_k, "capacity": self.capacity,
               "capacity_factor": self.capacity_factor, "kind": self.kind, "measures": list(self.measures),
               "note": self.note}
        if self.expert_params is not None or self.no_grad_norm is not None:  # looked for (inspect)
            out.update(expert_params=self.expert_params, no_grad_norm=self.no_grad_norm)
        return out

    def __repr__(self) -> str:
        return (f"RouterInfo({self.name!r}, kind={self.kind!r}, num_experts={self.num_experts}, top_k={self.top_k}, "
                f"measures={self.measures!r})")


class Inspection(list):
    """`inspect`'s answer: a list of `RouterInfo`, plus ``unrouted`` (modules that look like MoE blocks but hold no
    router found) and ``error`` (why nothing was found, if so). ``str()`` gives a table."""

    def __init__(self, infos: list[RouterInfo], unrouted: list[str], error: str | None = None):
        super().__init__(infos)
        self.unrouted = unrouted
        self.error = error

    def __str__(self) -> str:
        lines = [summary_line(self)] + [f"  {info.describe()}" for info in self]
        if self.unrouted:
            lines.append(f"  no router found in MoE-looking modules: {', '.join(self.unrouted)}")
        if self.error:
            lines.append(self.error)
        return "\n".join(lines)


def summary_line(infos: list[RouterInfo], model_name: str | None = None) -> str:
    """``moewatch: 4 routers (torchtitan x4: E=8 K=2; counts, distribution, logits, bias, gate_mass, override)`` for
    `attach`'s log."""
    where = f" in {model_name}" if model_name else ""
    if not infos:
        return f"moewatch: no router{where}"
    groups = Counter((i.kind, i.num_experts, i.top_k, i.measures) for i in infos)
    parts = [f"{kind} x{n}: E={E} K={K}; {', '.join(measures)}" for (kind, E, K, measures), n in groups.items()]
    noun = "router" if len(infos) == 1 else "routers"
    return f"moewatch: {len(infos)} {noun}{where} ({' | '.join(parts)})"


def expert_lookup(model: nn.Module, spec: RouterSpec, others: list[str]) -> tuple[str | None, str | None]:
    """Whether `attach(grads=True)` would record the router's expert gradient norms: ``(where its experts'
    parameters are, None)``, or ``(None, why not)`` in the words of run.json's ``expert_params_not_found`` problem.

    The lookup is `moewatch.capture.grads.find_expert_params`, as `attach` makes it (`others`: every router's name);
    experts whose parameters all have ``requires_grad=False`` are found but never get a gradient."""
    from moewatch.capture.grads import find_expert_params

    try:
        found, reason = find_expert_params(model, spec.name, spec.num_experts, others=others)
    except Exception as e:  # as attach: a lookup that fails costs the grad norms, never the inspection
        return None, f"could not look for the experts' parameters ({type(e).__name__}: {e})"
    return expert_result(model, found, reason)


def expert_result(model: nn.Module, found: Any, reason: str | None) -> tuple[str | None, str | None]:
    """`expert_lookup`'s answer from what `find_expert_params` returned (``found`` an ExpertParams, or None and
    ``reason``): the one wording for `inspect` and the Watch's `routers` / run.json."""
    if found is None:
        return None, f"the experts were not found: {reason}"
    try:
        frozen = not any(model.get_parameter(t.name).requires_grad for t in found.tensors)
    except (AttributeError, TypeError):
        frozen = False
    if frozen:
        return None, f"the experts' parameters (in {found.block or '<model>'}) are frozen: none requires grad"
    return found.describe(), None


def inspect(model: nn.Module, routers: Mapping[str, nn.Module | RouterSpec] | None = None) -> Inspection:
    """List the routers moewatch would record in `model` (nothing is hooked): kind, experts, top-k, what it measures.

    ``measures`` (`types.MEASURES`) name what moewatch records for the router in a training forward: counts, drops,
    distribution, logits, bias, the routing diagnostics (``gate_mass``, ``margin``, ``override``: each exactly where
    its reader fills the column, null elsewhere) and ``grad_norm`` where the experts' parameters are found (the
    lookup `attach` makes; ``RouterInfo.no_grad_norm`` says why not, and ``attach(grads=False)`` turns it off).
    ``print(moewatch.inspect(model))`` shows a table; the result is a list of `RouterInfo` with ``.unrouted`` (MoE
    blocks holding no router found) and ``.error`` (the no-router message, when nothing was found).
    """
    from moewatch.capture.discovery import NoRouterFoundError, discover, moe_looking_modules

    try:
        specs = discover(model, routers)
    except NoRouterFoundError as e:
        return Inspection([], moe_looking_modules(model, []), str(e))
    names = [s.name for s in specs]
    return Inspection([RouterInfo(s, expert_lookup(model, s, names)) for s in specs], moe_looking_modules(model, specs))
