"""A small decoder-only transformer with Mixture-of-Experts feed-forward layers, written to be read.

One file, nanoGPT-style: a frozen config, a router, an MoE layer, a transformer block, the model.
Every MoE feed-forward layer routes each token to ``top_k`` of ``n_experts`` small MLPs. The router can be
balanced by any combination of:

- nothing at all (lets collapse happen),
- the Switch/GShard auxiliary loss          ``aux_loss_coef``     E * sum_i f_i * P_i
- the ST-MoE router z-loss                  ``z_loss_coef``       mean_t logsumexp(logits_t)^2
- DeepSeek-V3 auxiliary-loss-free balancing ``bias_update_rate``  a per-expert logit bias for *selection only*
- router noise                              ``router_noise``      "jitter" or "noisy_topk"
- a capacity factor                         ``capacity_factor``   capacity = ceil(C * T * k / E)

The router implements moewatch's router protocol (integer ``num_experts`` and ``top_k``, a buffer
``e_score_correction_bias`` of shape E, a forward returning ``RouterOutput(logits, probs, indices,
dropped)``), so ``moewatch.attach`` finds it without registration; its ``combine_weights`` and ``selection_scores``
give moewatch the gate weights and the scores it ranked. docs/reference.md explains each method.

Shape legend (suffixes on tensor names):
    B batch, S sequence length, T tokens in one router call (B*S), V vocabulary,
    D model width, H expert hidden width, E experts, K experts chosen per token (top-k),
    A assignments (T*K), L MoE layers
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ROUTER_NOISE = ("none", "jitter", "noisy_topk")
DISPATCH = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True)
class MoEConfig:
    vocab_size: int = 256  # byte-level
    block_size: int = 64  # longest sequence the position table covers
    n_layer: int = 2  # transformer blocks; every block's feed-forward is an MoE layer
    n_head: int = 4
    d_model: int = 64
    n_experts: int = 8
    top_k: int = 2
    d_expert: int = 128  # hidden width of each expert MLP
    shared_expert: bool = False  # an always-on dense MLP beside the routed experts (Qwen2-MoE/DeepSeek style)
    norm_topk_prob: bool = True  # renormalize the k gate weights to sum 1 (Mixtral); ignored when top_k == 1
    capacity_factor: float | None = None  # None = no capacity limit, nothing is dropped
    aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss weight; 0 = off
    z_loss_coef: float = 0.0  # ST-MoE router z-loss weight; 0 = off
    bias_update_rate: float = 0.0  # DeepSeek-V3 aux-loss-free bias step per update; 0 = off
    router_noise: str = "none"  # "none" | "jitter" | "noisy_topk"
    noise_std: float = 1e-2  # jitter: inputs scaled by U(1-std, 1+std); noisy_topk: initial noise std
    router_init_std: float = 0.02  # std of the router weight at init
    init_std: float = 0.02  # std of every other weight at init
    dropout: float = 0.0
    dispatch: str = "auto"  # "grouped_mm" | "loop" | "auto" (grouped_mm where the op supports the input)
    seed: int = 0  # weight init is drawn from its own generator seeded with this

    def __post_init__(self) -> None:
        positive = (
            "vocab_size",
            "block_size",
            "n_layer",
            "n_head",
            "d_model",
            "n_experts",
            "top_k",
            "d_expert",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"MoEConfig.d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.top_k > self.n_experts:
            raise ValueError(f"MoEConfig.top_k ({self.top_k}) must be <= n_experts ({self.n_experts})")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"MoEConfig.capacity_factor must be None or > 0, got {self.capacity_factor!r}")
        for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "noise_std"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"MoEConfig.{name} must be a finite number >= 0, got {value!r}")
        for name in ("router_init_std", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"MoEConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.router_noise not in ROUTER_NOISE:
            raise ValueError(
                f"MoEConfig.router_noise must be one of {ROUTER_NOISE}, got {self.router_noise!r}"
            )
        if self.router_noise != "none" and self.noise_std == 0:
            raise ValueError(f"MoEConfig.noise_std must be > 0 when router_noise={self.router_noise!r}")
        if self.router_noise == "jitter" and self.noise_std >= 1:
            raise ValueError(
                f"MoEConfig.noise_std must be < 1 for jitter (inputs scale by 1±std), got {self.noise_std}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"MoEConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.dispatch not in DISPATCH:
            raise ValueError(f"MoEConfig.dispatch must be one of {DISPATCH}, got {self.dispatch!r}")


class RouterOutput(NamedTuple):
    """What a router call returns: moewatch's router protocol."""

    logits: (
        torch.Tensor
    )  # (T, E) float32 raw router logits: after jitter on the input, before noisy-top-k noise
    probs: torch.Tensor  # (T, E) float32 softmax of the logits the choice was made from (noisy in training)
    indices: torch.Tensor  # (T, K) int64 experts actually chosen, best first
    dropped: torch.Tensor  # (T, K) bool, True where the assignment was refused by capacity


class MoEOutput(NamedTuple):
    logits: torch.Tensor  # (B, S, V)
    loss: (
        torch.Tensor | None
    )  # lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss; None without targets
    lm_loss: torch.Tensor | None  # next-token cross-entropy
    aux_loss: (
        torch.Tensor
    )  # unweighted load-balancing loss, mean over MoE layers (computed even when its coef is 0)
    z_loss: torch.Tensor  # unweighted router z-loss, mean over MoE layers


# ------------------------------------------------------------------------------------------------------------
# Pure routing math: small functions, each tested against a float64 reference.


def expert_counts(
    indices_TK: torch.Tensor, num_experts: int, mask_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Assignments per expert, (E,) float32. scatter_add, not bincount: bincount reads the max on the host."""
    ones_TK = torch.ones(indices_TK.shape, dtype=torch.float32, device=indices_TK.device)
    if mask_TK is not None:
        ones_TK = ones_TK * mask_TK
    counts_E = torch.zeros(num_experts, dtype=torch.float32, device=indices_TK.device)
    return counts_E.scatter_add_(0, indices_TK.reshape(-1), ones_TK.reshape(-1))


def load_balancing_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss E * sum_i f_i * P_i; 1.0 when perfectly balanced.

    f_i is expert i's fraction of the T*K assignments the router chose (before any capacity drop; it carries
    no gradient), P_i the mean router probability of expert i over the tokens (this carries the gradient).
    """
    T, E = probs_TE.shape
    f_E = expert_counts(indices_TK, E) / indices_TK.numel()
    P_E = probs_TE.float().mean(dim=0)
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2.

    It keeps the logits small, so the softmax stays out of its saturated, numerically fragile range.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Assignments one expert accepts per router call: ceil(C * T * k / E)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def capacity_drops(indices_TK: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(T, K) bool: True for assignments past their expert's capacity.

    Priority (GShard): every token's first choice is served before any token's second choice; within one
    choice rank, earlier tokens come first. A stable sort of the slot-major assignment list by expert gives
    each assignment its place in its expert's queue without a host sync.
    """
    T, K = indices_TK.shape
    flat_A = indices_TK.t().reshape(-1)  # slot-major: all first choices, then all second choices, ...
    order_A = torch.sort(flat_A, stable=True).indices
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=flat_A.device)
    counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A))
    starts_E = counts_E.cumsum(0) - counts_E
    place_sorted_A = torch.arange(flat_A.numel(), device=flat_A.device) - starts_E[flat_A[order_A]]
    place_A = torch.empty_like(place_sorted_A).scatter_(0, order_A, place_sorted_A)
    return (place_A >= capacity).view(K, T).t()


# ------------------------------------------------------------------------------------------------------------
# Modules


class Router(nn.Module):
    """Softmax top-k router over fp32 logits, with optional noise, selection bias and capacity."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        E, D = config.n_experts, config.d_model
        self.num_experts = E
        self.top_k = config.top_k
        self.capacity_factor = config.capacity_factor
        self.bias_update_rate = config.bias_update_rate
        self.norm_topk_prob = config.norm_topk_prob
        self.router_noise = config.router_noise
        self.noise_std = config.noise_std
        # A bare Parameter, not nn.Linear: a Linear named like a gate would also match moewatch's classic
        # heuristic.
        self.weight = nn.Parameter(torch.randn(E, D) * config.router_init_std)  # MoEGPT re-draws it, seeded
        if config.router_noise == "noisy_topk":
            # Shazeer et al. 2017: per-token, per-expert noise std = softplus(x W_noise + b); b starts so std
            # = noise_std.
            self.noise_weight = nn.Parameter(torch.zeros(E, D))
            self.noise_bias = nn.Parameter(torch.full((E,), math.log(math.expm1(config.noise_std))))
        # DeepSeek-V3's bias: shifts which experts are *selected*, never the gate weights; not a parameter, so
        # the optimizer and the gradient never touch it; update_bias() moves it after each optimizer step.
        self.register_buffer("e_score_correction_bias", torch.zeros(E))
        # On-device running counters (no host sync): selections since the last bias update, and kept / dropped
        # assignments since the last MoEGPT.pop_router_stats(), for cheap progress reporting.
        self.register_buffer("load_E", torch.zeros(E), persistent=False)
        self.register_buffer("tokens_E", torch.zeros(E), persistent=False)
        self.register_buffer("dropped_E", torch.zeros(E), persistent=False)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        # Routing decisions are fragile in bf16 (ties, overflowing logits), so the router always runs in fp32.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.router_noise == "jitter":
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.noise_std, 1.0 + self.noise_std)
            logits_TE = F.linear(x_TD, self.weight.float())
            routed_TE = logits_TE
            if self.training and self.router_noise == "noisy_topk":
                std_TE = F.softplus(F.linear(x_TD, self.noise_weight.float(), self.noise_bias.float()))
                routed_TE = logits_TE + torch.randn_like(logits_TE) * std_TE
            probs_TE = routed_TE.softmax(dim=-1)
            # Selection only: top-k of (logits + bias), i.e. of the probabilities scaled by exp(bias). The
            # bias goes on the logits, not on the probabilities as DeepSeek-V3 does with its sigmoid scores: a
            # softmax router's probabilities saturate towards one-hot, where an additive bias does nothing
            # until it flips every token.
            indices_TK = (routed_TE.detach() + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices
            if self.capacity_factor is None:
                dropped_TK = torch.zeros(indices_TK.shape, dtype=torch.bool, device=indices_TK.device)
            else:
                T = indices_TK.shape[0]
                capacity = expert_capacity(T, self.num_experts, self.top_k, self.capacity_factor)
                dropped_TK = capacity_drops(indices_TK, self.num_experts, capacity)
        if self.training:
            with torch.no_grad():
                chosen_E = expert_counts(indices_TK, self.num_experts)
                dropped_E = expert_counts(indices_TK, self.num_experts, dropped_TK)
                self.load_E += chosen_E
                self.tokens_E += chosen_E - dropped_E
                self.dropped_E += dropped_E
        return RouterOutput(logits_TE, probs_TE, indices_TK, dropped_TK)

    def combine_weights(self, route: RouterOutput) -> torch.Tensor:
        """The gate weights of the chosen experts (T, K): their probabilities, renormalized to sum 1 when
        ``norm_topk_prob`` (and top_k > 1), 0 where capacity refused the assignment. The MoE layer combines the
        expert outputs with these, and moewatch's reader records their sum per expert (``gate_mass``)."""
        weights_TK = route.probs.gather(1, route.indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        # A dropped assignment contributes nothing: the token keeps only the residual (and its other experts).
        return weights_TK.masked_fill(route.dropped, 0.0)

    def selection_scores(self, route: RouterOutput) -> tuple[torch.Tensor, str, torch.Tensor] | None:
        """What the last forward ranked to choose, for moewatch's routing margin and override: (logits + bias,
        "logits", logits). None in training with ``noisy_topk``: the noisy logits it ranked are not kept."""
        if self.training and self.router_noise == "noisy_topk":
            return None
        logits_TE = route.logits.detach()
        return logits_TE + self.e_score_correction_bias, "logits", logits_TE

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 aux-loss-free step: bias_i += rate * sign(mean_load - load_i), then forget the load.

        The load is the selections (before capacity drops) counted by training forwards since the last update,
        so gradient accumulation sums its micro-batches. An overloaded expert's bias goes down, an idle one's
        up.
        """
        if self.bias_update_rate > 0:
            self.e_score_correction_bias += self.bias_update_rate * torch.sign(
                self.load_E.mean() - self.load_E
            )
        self.load_E.zero_()


class MLP(nn.Module):
    """Dense feed-forward, used for the shared expert."""

    def __init__(self, d_model: int, d_hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, d_hidden, bias=False)
        self.proj = nn.Linear(d_hidden, d_model, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x_TD)))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, compiling: bool = False) -> bool:
    """Whether torch.nn.functional.grouped_mm takes inputs of this dtype on this device."""
    if not hasattr(F, "grouped_mm"):  # added in torch 2.8
        return False
    if compiling and dtype != torch.bfloat16:
        return False  # the op's meta kernel, which torch.compile traces with, accepts only bf16 (torch 2.13)
    if device.type == "cpu":
        return dtype in (torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":  # the CUDA kernels are bf16-only and need sm80+
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (8, 0)
    return False


class MoE(nn.Module):
    """Routed experts (E two-layer GELU MLPs) plus an optional shared expert."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        E, D, H = config.n_experts, config.d_model, config.d_expert
        self.num_experts = E
        self.top_k = config.top_k
        self.norm_topk_prob = config.norm_topk_prob
        self.dispatch = config.dispatch
        self.router = Router(config)
        # Stacked expert weights, laid out for x @ w: one (D, H) and one (H, D) matrix per expert.
        self.w_in_EDH = nn.Parameter(torch.randn(E, D, H) * config.init_std)  # MoEGPT re-draws these, seeded
        self.w_out_EHD = nn.Parameter(torch.randn(E, H, D) * config.init_std)
        self.shared = MLP(D, H) if config.shared_expert else None

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (output (B, S, D), aux_loss, z_loss); the losses are scalars, unweighted."""
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        route = self.router(x_TD)
        # Gate weights come from the unbiased probabilities: the selection bias only decides *which* experts.
        weights_TK = self.router.combine_weights(route)
        y_TD = self.experts(x_TD, route.indices, weights_TK)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        aux_loss = load_balancing_loss(route.probs, route.indices)
        z_loss = router_z_loss(route.logits)
        return y_TD.view(B, S, D), aux_loss, z_loss

    def experts(self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert_{indices[t, k]}(x[t]) for every token t, (T, D)."""
        dtype = x_TD.dtype
        if torch.is_autocast_enabled(x_TD.device.type):
            dtype = torch.get_autocast_dtype(x_TD.device.type)
        use_grouped = self.dispatch == "grouped_mm" or (
            self.dispatch == "auto"
            and grouped_mm_supported(x_TD.device, dtype, torch.compiler.is_compiling())
        )
        if use_grouped:
            return self._experts_grouped_mm(x_TD, indices_TK, weights_TK, dtype)
        return self._experts_loop(x_TD, indices_TK, weights_TK)

    def _experts_grouped_mm(
        self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor, dtype: torch.dtype
    ) -> torch.Tensor:
        # Sort the T*K assignments by expert so each expert's rows are contiguous; grouped_mm then runs every
        # expert's matmul in one call, the group boundaries given by the cumulative counts (on device, no
        # sync).
        T, K = indices_TK.shape
        flat_A = indices_TK.reshape(-1)  # token-major: assignment a belongs to token a // K
        order_A = torch.sort(flat_A, stable=True).indices
        token_A = order_A // K
        counts_E = torch.zeros(self.num_experts, dtype=torch.int32, device=flat_A.device)
        counts_E.scatter_add_(0, flat_A, torch.ones_like(flat_A, dtype=torch.int32))
        offs_E = counts_E.cumsum(0, dtype=torch.int32)
        x_AD = x_TD[token_A].to(dtype)
        h_AH = F.gelu(F.grouped_mm(x_AD, self.w_in_EDH.to(dtype), offs=offs_E))
        y_AD = F.grouped_mm(h_AH, self.w_out_EHD.to(dtype), offs=offs_E)
        y_AD = y_AD.float() * weights_TK.reshape(-1)[order_A].unsqueeze(-1)
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        return out_TD.index_add_(0, token_A, y_AD).to(x_TD.dtype)

    def _experts_loop(
        self, x_TD: torch.Tensor, indices_TK: torch.Tensor, weights_TK: torch.Tensor
    ) -> torch.Tensor:
        # The plain way (Mixtral's reference code): one gather, two matmuls and one scatter per expert.
        # torch.where has a data-dependent size, so on a GPU every expert costs a host sync; this is the
        # fallback and baseline.
        out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
        for e in range(self.num_experts):
            token_N, slot_N = torch.where(indices_TK == e)
            h_NH = F.gelu(x_TD[token_N] @ self.w_in_EDH[e].to(x_TD.dtype))
            y_ND = h_NH @ self.w_out_EHD[e].to(x_TD.dtype)
            out_TD.index_add_(0, token_N, y_ND.float() * weights_TK[token_N, slot_N].unsqueeze(-1))
        return out_TD.to(x_TD.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)
        self.dropout = config.dropout

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(x_BSD).split(D, dim=-1)
        # (B, S, D) -> (B, n_head, S, D / n_head)
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.moe = MoE(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_BSD = x_BSD + self.drop(self.attn(self.ln_1(x_BSD)))
        y_BSD, aux_loss, z_loss = self.moe(self.ln_2(x_BSD))
        return x_BSD + self.drop(y_BSD), aux_loss, z_loss


class MoEGPT(nn.Module):
    """Decoder-only byte-level language model whose feed-forward layers are all MoE layers."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying, as in GPT-2
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        # Own generator: the same config.seed gives the same weights whatever the global RNG has been through.
        gen = torch.Generator().manual_seed(self.config.seed)
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layer)  # GPT-2: outputs added to the residual stream
        for name, p in self.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, self.config.router_init_std, generator=gen)
            elif "noise_" in name:
                continue  # set in Router.__init__
            elif name.endswith(("proj.weight", "w_out_EHD")):
                p.normal_(0.0, residual_std, generator=gen)
            elif p.dim() >= 2:
                p.normal_(0.0, std, generator=gen)
            elif name.endswith("weight"):  # LayerNorm gains
                p.fill_(1.0)
            else:
                p.zero_()

    def forward(self, idx_BS: torch.Tensor, targets_BS: torch.Tensor | None = None) -> MoEOutput:
        B, S = idx_BS.shape
        if S > self.config.block_size:
            raise ValueError(f"sequence length {S} exceeds MoEConfig.block_size={self.config.block_size}")
        pos_S = torch.arange(S, device=idx_BS.device)
        x_BSD = self.drop(self.tok_emb(idx_BS) + self.pos_emb(pos_S))
        aux_loss = z_loss = x_BSD.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x_BSD, aux_l, z_l = block(x_BSD)
            aux_loss = aux_loss + aux_l
            z_loss = z_loss + z_l
        # Mean over layers, so a coefficient means the same thing at any depth.
        aux_loss = aux_loss / len(self.blocks)
        z_loss = z_loss / len(self.blocks)
        logits_BSV = self.lm_head(self.ln_f(x_BSD))
        if targets_BS is None:
            return MoEOutput(logits_BSV, None, None, aux_loss, z_loss)
        lm_loss = F.cross_entropy(logits_BSV.float().view(B * S, -1), targets_BS.reshape(B * S))
        return MoEOutput(logits_BSV, self.total_loss(lm_loss, aux_loss, z_loss), lm_loss, aux_loss, z_loss)

    def total_loss(self, lm_loss: torch.Tensor, aux_loss: torch.Tensor, z_loss: torch.Tensor,
                   aux_loss_coef: float | None = None) -> torch.Tensor:
        """lm_loss + aux_loss_coef * aux_loss + z_loss_coef * z_loss, with the config's coefficients unless
        ``aux_loss_coef`` overrides it (a schedule); a term whose coefficient is 0 is left out."""
        aux_coef = self.config.aux_loss_coef if aux_loss_coef is None else aux_loss_coef
        loss = lm_loss
        if aux_coef > 0:
            loss = loss + aux_coef * aux_loss
        if self.config.z_loss_coef > 0:
            loss = loss + self.config.z_loss_coef * z_loss
        return loss

    def routers(self) -> list[Router]:
        return [block.moe.router for block in self.blocks]

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Call after each optimizer step: the aux-loss-free bias update of every router (no-op at rate 0)."""
        for router in self.routers():
            router.update_bias()

    @torch.no_grad()
    def pop_router_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens_LE, dropped_LE): kept and dropped assignments per layer and expert since the last pop.

        Stays on the model's device; the caller decides when to pay for the copy to the host.
        """
        tokens_LE = torch.stack([r.tokens_E.clone() for r in self.routers()])
        dropped_LE = torch.stack([r.dropped_E.clone() for r in self.routers()])
        for r in self.routers():
            r.tokens_E.zero_()
            r.dropped_E.zero_()
        return tokens_LE, dropped_LE

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
