"""Integrations with the training stacks people already use; each lives in its own module and is imported explicitly.

- `moewatch.integrations.hf.MoEWatchCallback`: a `transformers.TrainerCallback` (extra `moewatch[hf]`).
- `moewatch.integrations.lightning.MoEWatchCallback`: a Lightning `Callback` (extra `moewatch[lightning]`).
- `moewatch.integrations.tensorboard.TensorBoardBridge`: per-layer scalars and expert-load histograms in a TensorBoard
  log directory, written from moewatch's writer thread (extra `moewatch[tensorboard]`).
- `moewatch.integrations.wandb.WandbBridge`, `moewatch.integrations.mlflow.MLflowBridge`,
  `moewatch.integrations.trackio.TrackioBridge`: the same scalars (and histograms where the tracker has them), alerts
  and, for W&B and MLflow, the HTML report, in Weights & Biases, MLflow or trackio (extras `moewatch[wandb]`,
  `moewatch[mlflow]`, `moewatch[trackio]`).
- `moewatch.integrations.bridge`: what those bridges share (the scalars' names and values, histogram binning,
  rate-limited alert delivery, warn-once-and-disable); `moewatch.integrations.session`: the callbacks' lifecycle.

This package imports none of those libraries, so `import moewatch` stays free of optional dependencies.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def require(module: str, extra: str, what: str) -> ModuleType:
    """Import an optional dependency, or raise an ImportError that names the moewatch extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # Name the extra first; keep the original reason, since an installed but broken package fails here too.
        raise ImportError(
            f"{what} needs the `{module.split('.')[0]}` package: pip install 'moewatch[{extra}]' "
            f"(importing {module} failed: {e})"
        ) from e
