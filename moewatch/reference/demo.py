"""The moewatch demo: train the reference MoE under several balancing scenarios with moewatch attached.

Every scenario shares the model size, data, seed and optimizer; they differ only in how (and whether) the
router is balanced. The optimizer settings are deliberately aggressive (high learning rate, small batches),
the regime in which an unbalanced router collapses: one expert gets better first, is picked more, trains more,
and the rest starve. The balanced scenarios show each method holding the same model together. Nothing is
staged: the collapse is whatever the router really did, as counted by moewatch.

``run_demo`` trains each scenario into ``out_dir/<name>`` and returns a summary per scenario; ``moewatch
demo`` calls it and prints ``format_summary_table``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from moewatch.detect.evaluate import COLLAPSE_LABELS, LABELS, observed_collapse_step
from moewatch.reference.data import BatchSampler, Corpus, build_corpus
from moewatch.reference.model import MoEConfig, MoEGPT

# Model and optimizer shared by every scenario: small enough that all five train in about two minutes on two
# CPU cores. Top-1 routing with the gate weight equal to the router probability is the Switch Transformer's
# recipe, and the one whose collapse is easiest to see (a top-1 router can send every token to a single
# expert). Sixteen experts make a collapse unmistakable: most of them end with no token at all.
BASE_CONFIG = MoEConfig(
    vocab_size=256,
    block_size=32,
    n_layer=2,
    n_head=4,
    d_model=64,
    n_experts=16,
    top_k=1,
    d_expert=64,
)
DEFAULT_STEPS = 400
DEFAULT_CORPUS_BYTES = 1_000_000
# AdamW at 1e-2 on a model this small moves the router weights fast enough for one expert's early lead to
# compound: the regime where balancing matters. Every scenario trains with it.
DEFAULT_LR = 1e-2
# 16 windows of 32 bytes rather than 8 of 64: the same 512 tokens a step, but from twice as many places in the
# corpus, so one step's expert load is less dominated by what a few windows happen to contain.
DEFAULT_BATCH_SIZE = 16


@dataclass(frozen=True)
class Scenario:
    """One demo run: a model config (which carries the balancing settings) and the optimizer settings."""

    name: str
    description: str
    config: MoEConfig
    lr: float = DEFAULT_LR
    batch_size: int = DEFAULT_BATCH_SIZE
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    warmup_steps: int = 0  # linear learning-rate warmup from lr / warmup_steps, then constant
    # (start, end) as fractions of the run's steps: the aux-loss coefficient holds at config.aux_loss_coef until
    # start, falls linearly to zero at end and stays there: balancing annealed away (or lost on a resume) mid-run.
    aux_decay: tuple[float, float] | None = None
    # A fraction of the run's steps from which the aux-free bias is no longer updated (frozen where it stands), as
    # when a resume or a refactor loses the balancer's update hook: what the bias was holding back is let go.
    bias_stop: float | None = None
    # What the detector should say about this run (its evaluation reads it from run.json meta): "healthy" (no
    # warning or critical), "degraded" (warnings are fair, a critical is not), "collapse" (flag it before the
    # collapse, which the recorded counts date after the balancing is annealed away), "collapse_at_start" (collapses
    # in its first steps: called critical from then), or None (not evaluated).
    label: str | None = None

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"Scenario.name must be a non-empty directory name, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"Scenario.lr must be > 0, got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"Scenario.batch_size must be >= 1, got {self.batch_size!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"Scenario.grad_clip must be None or > 0, got {self.grad_clip!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"Scenario.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.aux_decay is not None:
            start, end = self.aux_decay
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(
                    f"Scenario.aux_decay must be (start, end) fractions of the run, 0 <= start < end <= 1, "
                    f"got {self.aux_decay!r}"
                )
            if self.config.aux_loss_coef <= 0:
                raise ValueError("Scenario.aux_decay needs a config with aux_loss_coef > 0 to decay from")
        if self.bias_stop is not None:
            if not 0.0 <= self.bias_stop < 1.0:
                raise ValueError(f"Scenario.bias_stop must be a fraction of the run in [0, 1), got {self.bias_stop!r}")
            if self.config.bias_update_rate <= 0:
                raise ValueError("Scenario.bias_stop needs a config with bias_update_rate > 0 to stop")
        if self.label not in (None, *LABELS):
            raise ValueError(f"Scenario.label must be None or one of {', '.join(LABELS)}, got {self.label!r}")

    def collapse_after(self, steps: int) -> int:
        """The step from which a collapse counts as this scenario's: where its balancing starts to go."""
        if self.bias_stop is not None:
            return int(self.bias_stop * steps)
        return int(self.aux_decay[0] * steps) if self.aux_decay is not None else 0

    def aux_coef_at(self, step: int, steps: int) -> float:
        """The aux-loss coefficient in effect at ``step`` (0-based) of a ``steps``-step run."""
        coef = self.config.aux_loss_coef
        if self.aux_decay is None:
            return coef
        start, end = (f * steps for f in self.aux_decay)
        return coef * min(1.0, max(0.0, (end - step) / (end - start)))


def default_scenarios(base: MoEConfig = BASE_CONFIG) -> dict[str, Scenario]:
    """The demo's scenarios, built on ``base`` (pass a smaller base for a quicker run)."""
    r = dataclasses.replace
    scenarios = [
        Scenario("collapse", "no balancing at all: the router is free to collapse", base, label="collapse_at_start"),
        Scenario("aux-loss", "Switch/GShard load-balancing loss, coef 0.1", r(base, aux_loss_coef=0.1),
                 label="healthy"),
        Scenario(
            "z-loss+aux",
            "ST-MoE: router z-loss (coef 1e-3) plus the load-balancing loss (coef 0.1)",
            r(base, aux_loss_coef=0.1, z_loss_coef=1e-3),
            label="healthy",
        ),
        Scenario(
            "aux-free-bias",
            "DeepSeek-V3 auxiliary-loss-free balancing: selection bias on the logits, 0.1 per step",
            r(base, bias_update_rate=0.1),
            # the bias starts at zero and needs ~150 steps to catch up with the router: imbalanced until then
            label="degraded",
        ),
        Scenario(
            "aux-annealed",
            "load-balancing loss (coef 0.1) annealed to zero from 25% to 50% of the run: a slow collapse",
            r(base, aux_loss_coef=0.1),
            aux_decay=(0.25, 0.5),
            label="collapse",
        ),
        Scenario(
            "aux-free-lost",
            "aux-free balancing (0.1 per step, 100 warm-up steps) whose bias stops updating at 50% of the run, as when "
            "a resume loses the balancer's update hook: the collapse the bias was holding back",
            r(base, bias_update_rate=0.1),
            warmup_steps=100,
            bias_stop=0.5,
            # the override share (60-90% of choices) warns from the start; the counts look fine until the bias stops
            label="collapse",
        ),
        Scenario(
            "capacity-1.0",
            "capacity factor 1.0 with the load-balancing loss (coef 0.1): overflow is dropped",
            r(base, capacity_factor=1.0, aux_loss_coef=0.1),
        ),
    ]
    return {s.name: s for s in scenarios}


SCENARIOS = default_scenarios()


@dataclass(frozen=True)
class ScenarioSummary:
    """How a scenario ended. Routing figures are from the final training step, per MoE layer."""

    name: str
    steps: int
    final_loss: float  # LM loss (cross-entropy, nats) of the final step
    cv: tuple[float, ...]  # population std / mean of the per-expert assignment counts
    max_share: tuple[float, ...]  # largest expert's share of the assignments
    dead: tuple[int, ...]  # experts with no assignment
    drop_rate: float  # dropped / routed assignments over all layers (capacity); 0 without a capacity factor
    num_experts: int
    seconds: float
    run_dir: str | None

    @property
    def collapsed(self) -> bool:
        """The demo's collapse criterion: some layer has max share >= 0.8 or half its experts dead."""
        return max(self.max_share) >= 0.8 or max(self.dead) >= self.num_experts / 2


def routing_stats(tokens_LE: torch.Tensor) -> tuple[list[float], list[float], list[int]]:
    """Per layer: CV (population std / mean), max share and dead experts of assignment counts (L, E)."""
    counts = tokens_LE.detach().to("cpu", torch.float64)
    mean_L = counts.mean(dim=1)
    total_L = counts.sum(dim=1)
    cv_L = torch.where(mean_L > 0, counts.std(dim=1, unbiased=False) / mean_L, torch.zeros_like(mean_L))
    share_L = torch.where(total_L > 0, counts.max(dim=1).values / total_L, torch.zeros_like(total_L))
    dead_L = (counts == 0).sum(dim=1)
    return cv_L.tolist(), share_L.tolist(), [int(d) for d in dead_L.tolist()]


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train_scenario(
    scenario: Scenario,
    steps: int = DEFAULT_STEPS,
    device: str | torch.device = "auto",
    seed: int = 0,
    run_dir: str | Path | None = None,
    corpus: Corpus | None = None,
    progress: bool = True,
    log_every: int = 10,
    meta: dict | None = None,
    cpu_threads: int | None = 1,
) -> ScenarioSummary:
    """Train one scenario for ``steps`` optimizer steps; with ``run_dir``, moewatch records it there.

    On a CPU the training runs on ``cpu_threads`` threads (None: torch's setting), restored afterwards. One
    thread is the default: for matrices this small a second thread gains nothing (the same step time on an idle
    2-core machine, 2-3x slower when other processes share the cores), and a fixed thread count makes a run's
    numbers the same on any machine with the same kernels (the summation order, and so the rounding, depends on
    the thread count, and a collapse amplifies such differences).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device = resolve_device(device)
    threads_before = torch.get_num_threads()
    if device.type == "cpu" and cpu_threads is not None:
        torch.set_num_threads(cpu_threads)
    try:
        return _train(scenario, steps, device, seed, run_dir, corpus, progress, log_every, meta)
    finally:
        torch.set_num_threads(threads_before)


def _train(
    scenario: Scenario,
    steps: int,
    device: torch.device,
    seed: int,
    run_dir: str | Path | None,
    corpus: Corpus | None,
    progress: bool,
    log_every: int,
    meta: dict | None,
) -> ScenarioSummary:
    corpus = corpus if corpus is not None else build_corpus(DEFAULT_CORPUS_BYTES, seed)
    config = dataclasses.replace(scenario.config, seed=seed)
    model = MoEGPT(config).to(device)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=scenario.lr, weight_decay=scenario.weight_decay, betas=(0.9, 0.95)
    )
    batches = BatchSampler(corpus, scenario.batch_size, config.block_size, seed=seed, device=device)
    # bf16 autocast on a GPU only: on a CPU it is slower than fp32 for matrices this small.
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    watch = None
    if run_dir is not None:
        import moewatch  # imported here: moewatch's own package imports must not depend on the demo

        run_meta = {
            "scenario": scenario.name,
            "description": scenario.description,
            "config": dataclasses.asdict(config),
            "optimizer": {
                "name": "AdamW",
                "lr": scenario.lr,
                "weight_decay": scenario.weight_decay,
                "betas": [0.9, 0.95],
                "grad_clip": scenario.grad_clip,
                "warmup_steps": scenario.warmup_steps,
            },
            **({"aux_decay": list(scenario.aux_decay)} if scenario.aux_decay else {}),
            **({"bias_stop": scenario.bias_stop} if scenario.bias_stop is not None else {}),
            "batch_size": scenario.batch_size,
            "steps": steps,
            "seed": seed,
            "device": str(device),
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "data": corpus.description,
            "produced_by": "moewatch.reference.demo.run_demo",
            **({"label": scenario.label} if scenario.label else {}),
            **(meta or {}),
        }
        watch = moewatch.attach(model, str(run_dir), meta=run_meta)

    from tqdm.auto import tqdm

    bar = tqdm(total=steps, desc=f"{scenario.name:>14}", disable=not progress, leave=True, dynamic_ncols=True)
    start = time.perf_counter()
    model.pop_router_stats()
    try:
        for step in range(steps):
            report = (progress and (step + 1) % log_every == 0) or step == steps - 1
            if report:
                # So that what is reported covers exactly this step, as moewatch records it.
                model.pop_router_stats()
            if scenario.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = scenario.lr * min(1.0, (step + 1) / scenario.warmup_steps)
            x_BS, y_BS = batches.next()
            with autocast:
                out = model(x_BS, y_BS)
            loss = out.loss
            if scenario.aux_decay is not None:
                loss = model.total_loss(out.lm_loss, out.aux_loss, out.z_loss, scenario.aux_coef_at(step, steps))
            loss.backward()
            if scenario.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), scenario.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if scenario.bias_stop is None or step < scenario.bias_stop * steps:
                model.update_router_biases()
            if watch is not None:
                watch.step()
            bar.update(1)
            # Reading numbers back forces the device to catch up, so only every log_every steps.
            if report and step < steps - 1:
                tokens_LE, _ = model.pop_router_stats()
                cv_L, share_L, _ = routing_stats(tokens_LE)
                bar.set_postfix(
                    loss=f"{out.lm_loss.item():.3f}", cv=f"{max(cv_L):.2f}", max_share=f"{max(share_L):.2f}"
                )
        tokens_LE, dropped_LE = model.pop_router_stats()
        final_loss = out.lm_loss.item()
        cv_L, share_L, dead_L = routing_stats(tokens_LE)
        routed = float(tokens_LE.sum() + dropped_LE.sum())
        drop_rate = float(dropped_LE.sum()) / routed if routed > 0 else 0.0
        bar.set_postfix(loss=f"{final_loss:.3f}", cv=f"{max(cv_L):.2f}", max_share=f"{max(share_L):.2f}")
    finally:
        bar.close()
        if watch is not None:
            watch.close()
    if watch is not None and scenario.label in COLLAPSE_LABELS:
        _record_collapse_step(Path(run_dir), scenario.collapse_after(steps))
    return ScenarioSummary(
        name=scenario.name,
        steps=steps,
        final_loss=final_loss,
        cv=tuple(cv_L),
        max_share=tuple(share_L),
        dead=tuple(dead_L),
        drop_rate=drop_rate,
        num_experts=config.n_experts,
        seconds=time.perf_counter() - start,
        run_dir=None if run_dir is None else str(run_dir),
    )


def _record_collapse_step(run_dir: Path, after: int) -> None:
    """Write the observed collapse step (the evaluation's ground truth) into the finished run's run.json meta.

    Judged from the recorded counts alone (``observed_collapse_step``), never from the detector. A collapse
    scenario whose router held on this time loses its label (not evaluated): the label says what happened.
    """
    import moewatch
    from moewatch.store.manifest import read_manifest, write_manifest

    view = moewatch.load(run_dir).global_view()
    step = observed_collapse_step(view.layers, view.experts, after=after)
    manifest = read_manifest(run_dir)
    meta = manifest.setdefault("meta", {})
    meta["collapse_step"] = step
    if step is None:
        meta["label"] = None
        meta["label_note"] = "a collapse scenario whose collapse did not complete in this run: not evaluated"
    write_manifest(run_dir, manifest, heartbeat=False)


def run_demo(
    out_dir: str | Path = "runs/demo",
    steps: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    scenarios: list[str | Scenario] | None = None,
    progress: bool = True,
    corpus_bytes: int = DEFAULT_CORPUS_BYTES,
    cpu_threads: int | None = 1,
) -> list[ScenarioSummary]:
    """Train each scenario (names from ``SCENARIOS`` or Scenario objects) into ``out_dir/<name>``.

    ``steps`` None means ``DEFAULT_STEPS``. Returns one summary per scenario, in order. An existing run directory is resumed by moewatch (its steps are
    replaced by the new ones), so pass a fresh ``out_dir`` for a clean set.
    """
    chosen: list[Scenario] = []
    for item in scenarios if scenarios is not None else list(SCENARIOS):
        if isinstance(item, Scenario):
            chosen.append(item)
        elif item in SCENARIOS:
            chosen.append(SCENARIOS[item])
        else:
            raise ValueError(f"unknown scenario {item!r}; choose from {', '.join(SCENARIOS)}")
    names = [s.name for s in chosen]
    if len(set(names)) != len(names):
        raise ValueError(f"scenario names must be unique, got {names}")
    steps = DEFAULT_STEPS if steps is None else steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    corpus = build_corpus(corpus_bytes, seed)
    out = Path(out_dir)
    return [
        train_scenario(
            s,
            steps=steps,
            device=device,
            seed=seed,
            run_dir=out / s.name,
            corpus=corpus,
            progress=progress,
            cpu_threads=cpu_threads,
        )
        for s in chosen
    ]


def format_summary_table(summaries: list[ScenarioSummary], statuses: dict[str, str] | None = None) -> str:
    """A plain-text table, one row per scenario: CV and max share of the worst layer and dead experts per layer at
    the final step, and the detector's status of the run (``statuses``: scenario name -> status, from
    :func:`judge`; the same word `moewatch report` prints), or, without one, the final-step collapse criterion."""
    columns = ("loss", "CV", "max share", "dead/layer", "drop rate", "time")
    widths = (6, 6, 9, 12, 9, 7)
    header = f"{'scenario':<14} " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths, strict=True))
    header += "  status" if statuses is not None else ""
    rows = [header, "-" * len(header)]
    for s in summaries:
        dead = ",".join(str(d) for d in s.dead)
        if statuses is not None:
            flag = f"  {statuses.get(s.name, '-')}"
        else:
            flag = "  <- collapsed at the final step" if s.collapsed else ""
        rows.append(
            f"{s.name:<14} {s.final_loss:>6.3f} {max(s.cv):>6.2f} {max(s.max_share):>9.2f} {dead:>12} "
            f"{s.drop_rate:>9.1%} {s.seconds:>6.1f}s{flag}"
        )
    return "\n".join(rows)


def judge(summaries: list[ScenarioSummary]) -> dict[str, str]:
    """The detector's status of each scenario's recorded run (healthy, warning, recovered, critical, collapsed)."""
    from moewatch.detect import DetectorConfig
    from moewatch.report import ReportInputError, build_report

    out = {}
    for s in summaries:
        if s.run_dir is None:
            continue
        try:
            out[s.name] = build_report(Path(s.run_dir), DetectorConfig()).status
        except ReportInputError:
            out[s.name] = "-"
    return out
