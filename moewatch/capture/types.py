"""The data types that capture passes around: one router call's observation and how a router is probed.

Shape legend used across moewatch's tensor code:
    T  tokens in one router call (batch * sequence, flattened)
    E  experts in the layer
    K  experts chosen per token (top-k)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn


@dataclass
class Routing:
    """What one router call shows. Every field is optional; each contributes the stats it can.

    - ``logits_TE``: raw router logits (pre-softmax / pre-sigmoid). Feeds logit magnitude, z-loss and, when
      ``probs_TE`` is missing, the router distribution (softmax, or normalized sigmoid when ``scoring`` says so).
    - ``probs_TE``: the router's distribution over experts for each token. Non-negative scores that do not sum to 1
      (sigmoid routers) are normalized per token before use.
    - ``indices_TK``: the experts actually chosen (integer). A value ``>= E`` (or negative) marks a slot with no expert
      (e.g. transformers' index-equals-E sentinel): it counts as dropped in the layer's ``drop_rate`` only.
    - ``dropped_TK``: bool, True where the assignment in ``indices_TK`` was refused by capacity; the drop is
      attributed to that expert and the assignment does not count in ``tokens``.
    - ``scoring``: ``"softmax"`` or ``"sigmoid"``: how to turn logits into a distribution when ``probs_TE`` is None.
    - ``token_mask_T``: optional bool mask of real (non-padding) tokens; masked tokens are ignored everywhere.

    Routing diagnostics, each read together with ``indices_TK`` (the choice they describe) and recorded only when
    given (a reader that cannot see one exactly leaves it None: the column is then null, never estimated):

    - ``weights_TK``: the combine weights of the chosen slots, as the router hands them to the experts (after its
      renormalization and scaling). Their sum per expert over the assignments it received is ``gate_mass``.
    - ``select_TE``: the scores the router ranks to choose, in its own selection space: the logits for routers that
      take the top-k of logits or of their softmax; sigmoid scores plus the correction bias for DeepSeek-V3-style
      routers; ``-inf`` for experts the router could not choose (masked, or outside the allowed groups of a
      group-limited router). Gives the routing margin (`moewatch.metrics`).
    - ``select_space``: ``"logits"`` or ``"sigmoid"``: the units of ``select_TE``, which set the margin's scale.
    - ``unbiased_TE``: the scores the router would rank without its selection-only correction bias (with the groups
      it would then allow, ``-inf`` outside them). The share of assignments whose expert falls below the k-th
      largest of them is ``override_frac``. Only for routers with such a bias.
    """

    logits_TE: torch.Tensor | None = None
    probs_TE: torch.Tensor | None = None
    indices_TK: torch.Tensor | None = None
    dropped_TK: torch.Tensor | None = None
    scoring: str = "softmax"
    token_mask_T: torch.Tensor | None = None
    weights_TK: torch.Tensor | None = None
    select_TE: torch.Tensor | None = None
    select_space: str = "logits"
    unbiased_TE: torch.Tensor | None = None


# A reader turns a hooked module's forward call into an observation (or None to ignore the call). It may return
# several observations of the same call (e.g. the choice from one source and the distribution from another); each
# is added to the layer's step. Arguments: (module, args, kwargs, output). Readers must not sync the host: no
# .item(), .tolist(), .cpu(), no data-dependent shapes (boolean indexing, nonzero, unique). A reader that cannot
# make sense of an output raises `UnreadableOutput`: the watch warns once and records the problem in run.json.
#
# A reader may also say which routing diagnostics (`SIGNALS`) its observations carry: a method
# ``signals(module) -> tuple[str, ...]`` answering for a training forward of `module`, decided by the same code and
# conditions that fill the `Routing` fields (see `probe_signals`). The spec builders list them in `RouterSpec.measures`.
Reader = Callable[[nn.Module, tuple, dict, Any], Union["Routing", Sequence["Routing"], None]]


class UnreadableOutput(ValueError):
    """A reader could not find the routing in a module's output; the message says what it saw."""


# What a router's spec can measure (`RouterSpec.measures`), in the order listed by `moewatch.inspect`: the one list
# of these names (summary, discovery, stacks and the readers all use it).
MEASURES = {
    "counts": "tokens per expert from the router's actual choice",
    "counts_topk": "tokens per expert from top-k of the logits (the router's choice is not visible)",
    "drops": "capacity drops per expert",
    "distribution": "the router's distribution over experts (entropy, prob_mean, aux_loss)",
    "logits": "raw logits (logit_abs_max, logit_std, z_loss, nonfinite)",
    "bias": "the router's selection bias",
    "gate_mass": "the combine weights each expert received (gate_mass; from Routing.weights_TK)",
    "margin": "the routing margin (margin_mean, near_tie_frac, margin_hist; from Routing.select_TE)",
    "override": "the share of assignments a selection-only bias overrode (override_frac; from Routing.unbiased_TE)",
    "grad_norm": "per-expert gradient and parameter norms (grad_norm, param_norm): the experts' parameters were found",
}
# The routing diagnostics a reader declares (its ``signals(module)``), each recorded from one `Routing` field.
SIGNALS = ("gate_mass", "margin", "override")


def ordered(measures: Iterable[str]) -> tuple[str, ...]:
    """`measures` without repeats, in `MEASURES` order (names not in it last, in their own order)."""
    seen = list(dict.fromkeys(measures))
    return tuple(m for m in MEASURES if m in seen) + tuple(m for m in seen if m not in MEASURES)


@dataclass(frozen=True)
class Probe:
    """One forward hook: ``read`` is called with the ``module``'s call and its observation goes to ``layer``."""

    module: nn.Module
    read: Reader


def probe_signals(probes: Iterable[Probe]) -> tuple[str, ...]:
    """The routing diagnostics (`SIGNALS`) that `probes`' readers declare for their modules, in `MEASURES` order.

    A reader declares them with a ``signals(module)`` method (see `Reader`); one without (a plain function) declares
    none, so a hand-written reader's diagnostics are listed only if it says so."""
    out: list[str] = []
    for p in probes:
        declare = getattr(p.read, "signals", None)
        if callable(declare):
            out.extend(s for s in declare(p.module) if s in SIGNALS)
    return ordered(out)


@dataclass
class RouterSpec:
    """One router (= one row key ``layer`` in the run's tables) and how to observe it.

    ``name`` is the qualified name of the module that computes the routing logits. ``probes`` are the hooks that
    observe it: usually one on the router itself; two when the choice is only visible elsewhere (e.g. on the experts
    module's input). ``bias`` returns the router's correction bias (shape E) or None; it is read once per step.
    ``kind`` names the family (``transformers``, ``torchtitan``, ``deepspeed``, ...); ``measures`` lists what its
    probes can measure (keys of `MEASURES`; ``bias`` is added when ``bias`` is set; the built-in builders take the
    routing diagnostics from their readers' declarations, `probe_signals`) and ``note`` says what they cannot, for
    `moewatch.inspect` and run.json. ``grad_norm`` is not a probe's: `moewatch.inspect` adds it where the experts'
    parameters are found.
    """

    name: str
    num_experts: int
    top_k: int
    probes: list[Probe] = field(default_factory=list)
    capacity: int | None = None
    capacity_factor: float | None = None
    bias: Callable[[], torch.Tensor | None] | None = None
    kind: str = "custom"
    measures: tuple[str, ...] = ("counts", "distribution", "logits")
    note: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("RouterSpec.name must be a non-empty module name")
        if self.num_experts < 1:
            raise ValueError(f"RouterSpec.num_experts must be >= 1 for router {self.name!r}, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"RouterSpec.top_k must be in [1, num_experts={self.num_experts}] for router {self.name!r}, "
                f"got {self.top_k}"
            )
