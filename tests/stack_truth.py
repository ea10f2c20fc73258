"""Independent references for the training-stack tests: per step and router, float64 counts, drops and distribution
statistics computed by the test from the framework's own outputs (its own hooks, not moewatch's), and the check of a
recorded run against them.

A stack test registers its own forward hooks that call `StackTruth.add` with what the framework computed (the
chosen expert ids, the kept assignments, its scores or probabilities, its logits), calls `cut(step)` where the
training loop ends a step, and finally `assert_run_matches(run, truth)`.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class _Acc:
    tokens_E: np.ndarray
    dropped_E: np.ndarray
    prob_sum_E: np.ndarray
    prob_tokens: int = 0
    entropy_sum: float = 0.0
    lse_sq_sum: float = 0.0
    logit_tokens: int = 0
    calls: int = 0


@dataclass
class StackTruth:
    """Per layer and step: exact counts and drops, and float64 distribution/logit sums."""

    num_experts: int
    current: dict[str, _Acc] = field(default_factory=dict)
    steps: dict[int, dict[str, _Acc]] = field(default_factory=dict)

    def _acc(self, layer: str) -> _Acc:
        E = self.num_experts
        if layer not in self.current:
            self.current[layer] = _Acc(np.zeros(E, np.int64), np.zeros(E, np.int64), np.zeros(E, np.float64))
        return self.current[layer]

    def add(self, layer: str, *, kept_E=None, dropped_E=None, dist_TE=None, logits_TE=None, call: bool = True,
            token_mask_T=None) -> None:
        """Add one router call: per-expert kept and dropped assignment counts, the router's distribution (rows
        summing to 1, or non-negative scores normalized here), its raw logits; all converted to float64 here."""
        a = self._acc(layer)
        if kept_E is not None:
            a.tokens_E += np.asarray(torch.as_tensor(kept_E).detach().cpu(), dtype=np.int64)
        if dropped_E is not None:
            a.dropped_E += np.asarray(torch.as_tensor(dropped_E).detach().cpu(), dtype=np.int64)
        keep = None if token_mask_T is None else token_mask_T.detach().cpu().reshape(-1).bool()
        if dist_TE is not None:
            p = dist_TE.detach().double().cpu().reshape(-1, self.num_experts)
            if keep is not None:
                p = p[keep]
            p = p / p.sum(-1, keepdim=True)
            a.prob_sum_E += p.sum(0).numpy()
            a.prob_tokens += p.shape[0]
            a.entropy_sum += float(-(torch.special.xlogy(p, p)).sum())
        if logits_TE is not None:
            x = logits_TE.detach().double().cpu().reshape(-1, self.num_experts)
            if keep is not None:
                x = x[keep]
            a.lse_sq_sum += float(torch.logsumexp(x, -1).square().sum())
            a.logit_tokens += x.shape[0]
        if call:
            a.calls += 1

    def cut(self, step: int) -> None:
        self.steps[step] = self.current
        self.current = {}


def bincount(ids: torch.Tensor, num_experts: int) -> np.ndarray:
    """Per-expert counts of integer ids (ids outside [0, E) ignored), on the host, for references only."""
    flat = ids.detach().reshape(-1).long().cpu()
    flat = flat[(flat >= 0) & (flat < num_experts)]
    return torch.bincount(flat, minlength=num_experts).numpy()


def assert_run_matches(run, truth: StackTruth, *, logits: bool = True, distribution: bool = True,
                       rel: float = 1e-5, tokens_per_step: dict[int, int] | None = None) -> None:
    """Exact per-expert tokens and drops, and distribution/logit columns within `rel`, for every step and layer of
    `truth` (and no other layer in the run). `logits=False`: the logit columns must be null."""
    layers = sorted({layer for acc in truth.steps.values() for layer in acc})
    assert sorted(run.layers.layer.unique()) == layers
    for step, accs in truth.steps.items():
        for layer, a in accs.items():
            rows = run.experts[(run.experts.layer == layer) & (run.experts.step == step)].sort_values("expert")
            np.testing.assert_array_equal(rows.tokens.to_numpy(), a.tokens_E, err_msg=f"{layer} step {step}")
            np.testing.assert_array_equal(rows.dropped.to_numpy(), a.dropped_E, err_msg=f"{layer} step {step}")
            lrow = run.layers[(run.layers.layer == layer) & (run.layers.step == step)].iloc[0]
            if tokens_per_step is not None:
                assert lrow.tokens == tokens_per_step[step]
            if distribution:
                np.testing.assert_allclose(rows.prob_mean.to_numpy(), a.prob_sum_E / a.prob_tokens, rtol=rel,
                                           atol=1e-7)
                assert lrow.entropy == _approx(a.entropy_sum / a.prob_tokens, rel)
                assert lrow.entropy_norm == _approx(a.entropy_sum / a.prob_tokens / math.log(truth.num_experts), rel)
            else:
                assert rows.prob_mean.isna().all() and math.isnan(lrow.entropy)
            if logits:
                assert lrow.z_loss == _approx(a.lse_sq_sum / a.logit_tokens, rel)
            else:
                assert math.isnan(lrow.z_loss) and math.isnan(lrow.logit_std) and math.isnan(lrow.logit_abs_max)


# Where each measure `moewatch.inspect` lists shows in a recorded run: (table, columns), non-null where recorded.
MEASURE_COLUMNS = {
    "distribution": ("layers", ("entropy",)),
    "logits": ("layers", ("z_loss", "logit_std")),
    "gate_mass": ("experts", ("gate_mass",)),
    "margin": ("layers", ("margin_mean", "near_tie_frac")),
    "override": ("layers", ("override_frac",)),
    "grad_norm": ("experts", ("grad_norm",)),
}


def recorded_measures(run, layer: str) -> set[str]:
    """The measures of `MEASURE_COLUMNS` whose columns hold a value for `layer` in `run` (all of them, or none:
    a measure whose columns disagree fails)."""
    out = set()
    for measure, (table, columns) in MEASURE_COLUMNS.items():
        frame = getattr(run, table)
        rows = frame[frame.layer == layer]
        assert len(rows), f"{layer} recorded no {table} row"
        seen = {c: bool(rows[c].notna().any()) for c in columns}
        assert len(set(seen.values())) == 1, f"{layer}: the columns of {measure} disagree: {seen}"
        if all(seen.values()):
            out.add(measure)
    return out


def assert_measures_recorded(infos, run) -> None:
    """Every router's `inspect` measures are true of the recorded run: each measure of `MEASURE_COLUMNS` is listed
    iff its columns hold values (grad_norm needs an optimizer step per watch step)."""
    for info in infos:
        listed = {m for m in info.measures if m in MEASURE_COLUMNS}
        assert listed == recorded_measures(run, str(info)), f"{info}: listed {info.measures}"


def assert_bias_matches(run, biases: dict[tuple[int, str], torch.Tensor]) -> None:
    """The recorded bias column equals the stack's own bias buffer at each (step, layer) in ``biases``."""
    for (step, layer), bias in biases.items():
        rows = run.experts[(run.experts.layer == layer) & (run.experts.step == step)].sort_values("expert")
        np.testing.assert_allclose(rows.bias.to_numpy(), bias.numpy(), rtol=1e-6)


def _approx(x: float, rel: float):
    import pytest

    return pytest.approx(x, rel=rel, abs=1e-7)


@contextmanager
def one_process_group() -> Iterator:
    """A new group of rank 0 in a one-process gloo world (started here, and ended after, unless one is running):
    what stacks that take their process groups explicitly (Megatron-Core) are built with on CPU."""
    import torch.distributed as dist

    created = not dist.is_initialized()
    if created:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield dist.new_group([0])
    finally:
        if created:
            dist.destroy_process_group()
