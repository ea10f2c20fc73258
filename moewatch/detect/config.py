"""The detector's thresholds: one frozen dataclass, validated on construction, loadable from TOML and CLI pairs.

Every default is explained in docs/detector.md; keep the two in step. Thresholds that depend on a layer's shape
(expert count E, top-k) are turned into per-layer numbers by :class:`LayerThresholds`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI (pip install tomli)
    import tomli as tomllib


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds and windows of the collapse detector.

    Windows are counted in *recorded* steps (rows of the run), hysteresis in windows. A window widens past
    ``window_steps`` until an expert is expected to see ``min_window_load`` assignments in it, so tiny batches are
    judged on enough tokens to tell imbalance from sampling noise.
    """

    # --- windows and hysteresis
    window_steps: int = 20
    min_window_load: float = 50.0
    max_window_steps: int = 1000
    fire_windows: int = 2
    clear_windows: int = 3
    # --- warm-up grace: a router starts unbalanced; an alert that begins and ends before this step is dropped
    warmup_steps: int = 100
    # --- load balance (CV of per-expert loads over a window, sampling noise removed)
    cv_warning: float = 0.5
    cv_critical: float = 1.0
    cv_max_fraction: float = 0.6
    # --- dominant expert: share of all assignments one expert may take; 0 derives it from the CV thresholds
    dominant_warning: float = 0.0
    dominant_critical: float = 0.0
    # --- dead experts: below this fraction of the fair share over a window
    dead_share: float = 0.1
    dead_warning_windows: int = 5
    dead_critical_fraction: float = 0.25
    # --- router entropy (mean per-token entropy / ln E)
    entropy_warning: float = 0.2
    entropy_critical: float = 0.05
    entropy_trend_below: float = 0.5
    # --- capacity drops (dropped / (tokens * top_k))
    drop_warning: float = 0.05
    drop_critical: float = 0.2
    # --- router logits
    logit_floor: float = 10.0
    logit_abs_warning: float = 100.0
    logit_min_growth: float = 0.25
    # --- aux-free bias balancing
    bias_min_growth: float = 0.2
    # --- expert parallelism: busiest device's load / mean device load over a window (1.5: a third of the layer's
    # expert throughput lost waiting on it; 2.0: half)
    ep_warning: float = 1.5
    ep_critical: float = 2.0
    # --- expert learning: an expert whose gradient norm stays under this fraction of its layer's median expert's
    # for stall_windows windows in a row has stopped learning
    stall_fraction: float = 0.05
    stall_windows: int = 5
    # --- routing margin: share of tokens whose chosen set is within epsilon (docs/format.md) of flipping. A balanced
    # router is uncertain by design (0.3-0.6 on the reference model) and a collapsing one grows confident, so only
    # a router that cannot tell its experts apart for most tokens is flagged
    fragile_warning: float = 0.9
    fragile_trend_floor: float = 0.8
    # --- balancer override: share of assignments a selection-only correction bias changed
    override_warning: float = 0.25
    override_trend_floor: float = 0.05
    # --- trends: robust (Theil-Sen) slope over trend_windows points, at several time scales
    trend_windows: int = 8
    trend_scales: tuple[int, ...] = (1, 4, 16, 64)
    trend_horizon: float = 2.0
    trend_consistency: float = 0.7
    trend_min_level: float = 0.5
    trend_min_rise: float = 0.05

    def __post_init__(self) -> None:
        # TOML and CLI give ints where floats are meant and lists where tuples are; normalise before checking.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "float" and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
            elif f.type == "tuple[int, ...]" and isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"DetectorConfig.{f.name} must be an integer, got {value!r}")
            if f.type == "float" and (not isinstance(value, float) or not math.isfinite(value)):
                raise ValueError(f"DetectorConfig.{f.name} must be a finite number, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"DetectorConfig.warmup_steps must be >= 0, got {self.warmup_steps}")
        positive_ints = ("window_steps", "max_window_steps", "fire_windows", "clear_windows", "dead_warning_windows",
                         "stall_windows")
        for name in positive_ints:
            if getattr(self, name) < 1:
                raise ValueError(f"DetectorConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_window_steps < self.window_steps:
            raise ValueError(
                f"DetectorConfig.max_window_steps ({self.max_window_steps}) must be >= window_steps "
                f"({self.window_steps})"
            )
        if self.trend_windows < 3:
            raise ValueError(f"DetectorConfig.trend_windows must be >= 3, got {self.trend_windows}")
        scales = self.trend_scales
        if (
            not scales
            or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in scales)
            or list(scales) != sorted(set(scales))
        ):
            raise ValueError(
                f"DetectorConfig.trend_scales must be increasing positive integers, got {self.trend_scales!r}"
            )
        for name in ("min_window_load", "trend_horizon", "logit_floor", "logit_min_growth", "bias_min_growth"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DetectorConfig.{name} must be > 0, got {getattr(self, name)}")
        unit = (
            "cv_max_fraction",
            "dead_share",
            "dead_critical_fraction",
            "entropy_warning",
            "entropy_critical",
            "entropy_trend_below",
            "drop_warning",
            "drop_critical",
            "trend_consistency",
            "trend_min_level",
            "stall_fraction",
            "fragile_warning",
            "fragile_trend_floor",
            "override_warning",
            "override_trend_floor",
        )
        for name in unit:
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"DetectorConfig.{name} must be in (0, 1], got {value}")
        for name in ("dominant_warning", "dominant_critical"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"DetectorConfig.{name} must be in [0, 1] (0: derived per layer), got {getattr(self, name)}")
        if 0 < self.dominant_critical <= self.dominant_warning:
            raise ValueError(
                f"DetectorConfig.dominant_warning ({self.dominant_warning}) must be below dominant_critical "
                f"({self.dominant_critical})"
            )
        if self.trend_min_rise < 0:
            raise ValueError(f"DetectorConfig.trend_min_rise must be >= 0, got {self.trend_min_rise}")
        ordered = (
            ("cv_warning", "cv_critical"),
            ("drop_warning", "drop_critical"),
            ("entropy_critical", "entropy_warning"),
            ("logit_floor", "logit_abs_warning"),
            ("ep_warning", "ep_critical"),
        )
        if self.ep_warning <= 1.0:
            raise ValueError(f"DetectorConfig.ep_warning must be > 1 (a ratio to the mean device load), got "
                             f"{self.ep_warning}")
        for low, high in ordered:
            if not 0 < getattr(self, low) < getattr(self, high):
                raise ValueError(
                    f"DetectorConfig.{low} ({getattr(self, low)}) must be > 0 and below {high} ({getattr(self, high)})"
                )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def with_overrides(self, overrides: dict[str, Any]) -> DetectorConfig:
        """A copy with ``overrides`` applied; values may be strings as typed on a command line (``"0.7"``)."""
        known = {f.name: f for f in fields(self)}
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise ValueError(
                f"unknown detector setting(s) {', '.join(unknown)}; known settings: {', '.join(known)}"
            )
        parsed = {name: _parse(name, known[name].type, value) for name, value in overrides.items()}
        return replace(self, **parsed)

    @classmethod
    def from_toml(cls, path: str | Path) -> DetectorConfig:
        """Defaults overridden by a TOML file: top-level keys, or keys under a ``[detector]`` table."""
        path = Path(path)
        try:
            with path.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ValueError(f"detector config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"detector config file {path} is not valid TOML: {exc}") from None
        if isinstance(data.get("detector"), dict):
            data = data["detector"]
        try:
            return cls().with_overrides(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def parse_pairs(pairs: list[str]) -> dict[str, str]:
    """``["cv_warning=0.4", ...]`` (CLI ``--set``) to a dict; a pair without ``=`` is an error that shows it."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects key=value, got {pair!r}")
        out[key.strip()] = value.strip()
    return out


def _parse(name: str, type_name: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        if type_name == "int":
            return int(value)
        if type_name == "float":
            return float(value)
        if type_name == "tuple[int, ...]":
            return tuple(int(v) for v in value.strip("()[] ").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"DetectorConfig.{name} expects {type_name}, got {value!r}") from None
    return value


@dataclass(frozen=True)
class LayerThresholds:
    """The config's shape-relative thresholds resolved for one layer with E experts and top-k."""

    cv_warning: float
    cv_critical: float
    dominant_warning: float
    dominant_critical: float
    dead_share: float
    dead_critical: int

    @classmethod
    def resolve(cls, config: DetectorConfig, num_experts: int, top_k: int) -> LayerThresholds:
        e, k = max(num_experts, 1), max(min(top_k, num_experts), 1)
        # The largest CV a layer can show is when k experts take everything: sqrt(E/k - 1). Small layers (E=4,
        # k=2 tops out at 1.0) would never reach an absolute threshold, so cap it at a fraction of that ceiling.
        cv_ceiling = math.sqrt(max(e / k - 1.0, 0.0))
        crit = min(config.cv_critical, config.cv_max_fraction * cv_ceiling) if cv_ceiling > 0 else math.inf
        warn = crit * config.cv_warning / config.cv_critical
        return cls(
            cv_warning=warn,
            cv_critical=crit,
            dominant_warning=config.dominant_warning or _lone_share(e, k, warn),
            dominant_critical=config.dominant_critical or _lone_share(e, k, crit),
            dead_share=config.dead_share / e,
            dead_critical=max(1, math.ceil(config.dead_critical_fraction * e)),
        )


def _lone_share(e: int, k: int, cv: float) -> float:
    """The share one expert needs, the others sharing the rest equally, to push the layer's CV to ``cv``.

    So a dominant-expert alert means one expert alone explains that level of imbalance, whatever E and k are.
    Solves E*(p^2 + (1-p)^2/(E-1)) - 1 = cv^2 for p. With many experts per token (E=64, top-8) one expert cannot
    reach that CV even taking every token (share 1/k), so the share is capped at 90% of 1/k.
    """
    if e < 2 or not math.isfinite(cv):
        return math.inf
    r = e / (e - 1)
    a, b, c = e + r, -2 * r, r - 1 - cv * cv
    p = (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    return min(p, 0.9 / k)
