"""What moewatch found in a model, said out loud: `inspect(model)`, `Watch.routers` entries and the one-line summary
that `attach` logs.

`RouterInfo` is a ``str`` (the router's layer name, so ``watch.routers`` still compares with a list of names) that
also carries the router's kind, expert count, top-k and what its probes can measure (`types.MEASURES`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from torch import nn

from moewatch.capture.types import MEASURES, RouterSpec


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

    def __new__(cls, spec: RouterSpec) -> RouterInfo:
        self = super().__new__(cls, spec.name)
        self.name = spec.name
        self.kind = spec.kind
        self.num_experts = spec.num_experts
        self.top_k = spec.top_k
        measures = tuple(spec.measures)
        if spec.bias is not None and "bias" not in measures:
            measures = (*measures, "bias")
        self.measures = tuple(m for m in MEASURES if m in measures) + tuple(m for m in measures if m not in MEASURES)
        self.capacity = spec.capacity
        self.capacity_factor = spec.capacity_factor
        self.note = spec.note
        return self

    def describe(self) -> str:
        """``name  kind  E=.. K=..  measures [; note]`` on one line."""
        note = f"  ({self.note})" if self.note else ""
        return f"{self.name}  {self.kind}  E={self.num_experts} K={self.top_k}  {', '.join(self.measures)}{note}"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_experts": self.num_experts, "top_k": self.top_k, "capacity": self.capacity,
                "capacity_factor": self.capacity_factor, "kind": self.kind, "measures": list(self.measures),
                "note": self.note}

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
    """``moewatch: 4 routers (torchtitan x4: E=8 K=2; counts, distribution, logits, bias)`` for `attach`'s log."""
    where = f" in {model_name}" if model_name else ""
    if not infos:
        return f"moewatch: no router{where}"
    groups = Counter((i.kind, i.num_experts, i.top_k, i.measures) for i in infos)
    parts = [f"{kind} x{n}: E={E} K={K}; {', '.join(measures)}" for (kind, E, K, measures), n in groups.items()]
    noun = "router" if len(infos) == 1 else "routers"
    return f"moewatch: {len(infos)} {noun}{where} ({' | '.join(parts)})"


def inspect(model: nn.Module, routers: Mapping[str, nn.Module | RouterSpec] | None = None) -> Inspection:
    """List the routers moewatch would record in `model` (nothing is hooked): kind, experts, top-k, what it measures.

    ``print(moewatch.inspect(model))`` shows a table; the result is a list of `RouterInfo` with ``.unrouted`` (MoE
    blocks holding no router found) and ``.error`` (the no-router message, when nothing was found).
    """
    from moewatch.capture.discovery import NoRouterFoundError, discover, moe_looking_modules

    try:
        specs = discover(model, routers)
    except NoRouterFoundError as e:
        return Inspection([], moe_looking_modules(model, []), str(e))
    return Inspection([RouterInfo(s) for s in specs], moe_looking_modules(model, specs))
