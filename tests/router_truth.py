"""Independent routing counts for the trainer-integration tests, and the check of a recorded run against them.

Each Mixtral router's own top-k indices are counted by a forward hook, independently of moewatch; the framework
callback that owns a :class:`RouterCounts` cuts them into steps where its trainer ends an optimizer step.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

NUM_EXPERTS = 4  # the tests' tiny Mixtral


class RouterCounts:
    """Per router: (expert counts, tokens, forward calls) of training forwards, gathered into ``steps[n]``."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.current: dict[str, tuple] = {}
        self.steps: dict[int, dict[str, tuple]] = {}
        self.eval_calls = 0
        for name, m in module.named_modules():
            if isinstance(m, MixtralTopKRouter):
                m.register_forward_hook(partial(self._hook, name))

    def _hook(self, name, module, args, output) -> None:
        if not (module.training and torch.is_grad_enabled()):
            self.eval_calls += 1
            return
        _, _, indices = output
        counts, tokens, calls = self.current.get(name, (np.zeros(NUM_EXPERTS, np.int64), 0, 0))
        self.current[name] = (counts + torch.bincount(indices.flatten(), minlength=NUM_EXPERTS).numpy(),
                              tokens + indices.shape[0], calls + 1)

    def cut(self, step: int) -> None:
        """Everything counted since the last cut belongs to optimizer step ``step``."""
        self.steps[step] = self.current
        self.current = {}


def assert_run_matches(run, truth: RouterCounts, layers: list[str], steps: list[int], tokens: list[int],
                       calls: list[int]) -> None:
    """The recorded run has, per layer and step, the expected tokens and forward calls and the truth's counts."""
    for layer in layers:
        rows = run.layers[run.layers.layer == layer].sort_values("step")
        assert rows.tokens.tolist() == tokens
        assert rows.tokens.tolist() == [truth.steps[s][layer][1] for s in steps]
        assert rows.calls.tolist() == calls
        for step in steps:
            got = run.experts[(run.experts.layer == layer) & (run.experts.step == step)].sort_values("expert")
            np.testing.assert_array_equal(got.tokens.to_numpy(), truth.steps[step][layer][0])
