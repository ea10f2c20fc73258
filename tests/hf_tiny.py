"""Tiny transformers MoE models built from configs (random init, no downloads) for the discovery tests.

`CASES` lists one `Case` per MoE text architecture in transformers 5.x: the config and model classes, the class of
its router (looked up by name, independently of moewatch's discovery), how to count that router's actual choice
straight from its own outputs (`truth`), and config overrides. `build(case)` shrinks the default config (2 layers,
hidden 32, 4-8 experts, vocab 64) so each model builds and runs in well under a second on one CPU core.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

VOCAB = 64
SEQ = 8
BATCH = 2

# Common small sizes, applied where the default config has the field.
SMALL: dict[str, Any] = dict(
    hidden_size=32, d_model=32, intermediate_size=32, moe_intermediate_size=32, ffn_dim=32, d_ff=32, d_kv=16,
    expert_ffn_hidden_size=32, shared_intermediate_size=32, shared_expert_intermediate_size=32,
    num_hidden_layers=2, num_layers=2, n_layers=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2,
    num_attention_heads=2, n_heads=2, encoder_attention_heads=2, decoder_attention_heads=2, num_heads=2,
    num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64, max_seq_len=64,
    num_local_experts=4, num_experts=4, n_routed_experts=4, moe_num_experts=4,
    num_experts_per_tok=2, num_experts_per_token=2, moe_top_k=2, top_k_experts=2, moe_topk=2, moe_k=2,
    n_group=2, topk_group=1, num_expert_group=2, first_k_dense_replace=0, moe_layer_start_index=0,
    num_dense_layers=0, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1, pad_token_id=0, bos_token_id=0,
    eos_token_id=1, sliding_window=8, decoder_start_token_id=0, use_cache=False,
)


@dataclass
class Case:
    """One architecture: `module` is the transformers.models subpackage; classes are looked up by name there."""

    module: str
    config: str
    model: str
    router: str | tuple[str, ...]  # class name(s) of the routers, or ".suffix" of their qualified names
    truth: str = "indices"  # how the test counts the router's actual choice; see test_hf_models.truth_counts
    overrides: dict[str, Any] = field(default_factory=dict)
    routers: int = 2  # routers expected in the tiny model
    experts: int = 4
    top_k: int = 2

    @property
    def id(self) -> str:
        return self.module


def _mlp_sparse(values: list) -> list:
    sparse = next((v for v in values if isinstance(v, str) and v != "dense"), "sparse")
    return [sparse] * 2


def build(case: Case) -> nn.Module:
    cm = importlib.import_module(f"transformers.models.{case.module}.configuration_{case.module}")
    mm = importlib.import_module(f"transformers.models.{case.module}.modeling_{case.module}")
    Config = getattr(cm, case.config)
    defaults = Config().to_dict()
    kwargs = {k: v for k, v in SMALL.items() if k in defaults}
    for key, value in defaults.items():
        if key.endswith("layer_types") and isinstance(value, list) and value:
            # Keep the tail of attention patterns (the last layer is usually full attention); make MLPs sparse.
            kwargs[key] = _mlp_sparse(value) if key.startswith("mlp") else value[-2:]
    kwargs.update(case.overrides)
    config = Config(**kwargs)
    torch.manual_seed(0)
    model = getattr(mm, case.model)(config)
    model.train()
    return model


def inputs(case: Case) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (BATCH, SEQ), generator=g)
    kw: dict[str, Any] = {"input_ids": ids}
    if case.truth in ("switch", "nllb"):
        kw["decoder_input_ids"] = ids
    return kw


E8 = dict(num_local_experts=8, num_experts=8, n_routed_experts=8, moe_num_experts=8)

CASES: list[Case] = [
    Case("mixtral", "MixtralConfig", "MixtralForCausalLM", "MixtralTopKRouter"),
    Case("qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM", "Qwen2MoeTopKRouter"),
    Case("qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM", "Qwen3MoeTopKRouter"),
    Case("olmoe", "OlmoeConfig", "OlmoeForCausalLM", "OlmoeTopKRouter"),
    Case("deepseek_v3", "DeepseekV3Config", "DeepseekV3ForCausalLM", "DeepseekV3TopkRouter",
         overrides=dict(E8, n_group=4, topk_group=2), experts=8),
    Case("gpt_oss", "GptOssConfig", "GptOssForCausalLM", "GptOssTopKRouter"),
    Case("switch_transformers", "SwitchTransformersConfig", "SwitchTransformersModel", "SwitchTransformersTop1Router",
         truth="switch", overrides=dict(expert_capacity=2, encoder_sparse_step=1, decoder_sparse_step=1,
                                        num_sparse_encoder_layers=2, num_sparse_decoder_layers=2),
         routers=4, top_k=1),
    Case("dbrx", "DbrxConfig", "DbrxForCausalLM", "DbrxRouter", truth="experts_input",
         overrides=dict(ffn_config=dict(hidden_size=32, ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
                        attn_config=dict(kv_n_heads=2, rope_theta=1e4, clip_qkv=8.0))),  # unset: transformers bugs
    Case("llama4", "Llama4TextConfig", "Llama4ForCausalLM", "Llama4Router", truth="nonzero_scores",
         overrides=dict(interleave_moe_layer_step=1, intermediate_size_mlp=32, no_rope_layers=[1, 1],
                        attention_chunk_size=8)),
    Case("jetmoe", "JetMoeConfig", "JetMoeForCausalLM", "JetMoeTopKGating", truth="expert_size",
         overrides=dict(kv_channels=16), routers=4),
    # ---- every other MoE text architecture in transformers 5.x
    Case("afmoe", "AfmoeConfig", "AfmoeForCausalLM", "AfmoeTokenChoiceRouter"),
    Case("aria", "AriaTextConfig", "AriaTextModel", "AriaTextTopKRouter"),
    Case("axk1", "AXK1Config", "AXK1ForCausalLM", "AXK1TopkRouter"),
    Case("axk2", "AXK2Config", "AXK2ForCausalLM", "AXK2TopkRouter"),
    Case("bailing_hybrid", "BailingHybridConfig", "BailingHybridForCausalLM", "BailingHybridTopkRouter"),
    Case("beam", "BeamConfig", "BeamForCausalLM", "BeamTopKRouter"),
    Case("cohere2_moe", "Cohere2MoeConfig", "Cohere2MoeForCausalLM", "Cohere2MoeTopKRouter"),
    Case("deepseek_ocr2", "DeepseekOcr2TextConfig", "DeepseekOcr2TextModel", "DeepseekOcr2TextTopkRouter",
         overrides=dict(mlp_layer_types=["sparse", "sparse"])),
    Case("deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM", "DeepseekV2TopkRouter"),
    Case("deepseek_v32", "DeepseekV32Config", "DeepseekV32ForCausalLM", "DeepseekV32TopkRouter"),
    Case("deepseek_v4", "DeepseekV4Config", "DeepseekV4ForCausalLM", ("DeepseekV4TopKRouter", "DeepseekV4HashRouter"),
         overrides=dict(mlp_layer_types=["hash_moe", "moe"])),
    Case("diffusion_gemma", "DiffusionGemmaTextConfig", "DiffusionGemmaEncoderTextModel", "DiffusionGemmaTextRouter"),
    Case("doge", "DogeConfig", "DogeForCausalLM", ".mlp.router_gate", truth="embed_input",
         overrides=dict(is_moe=True)),
    Case("dots1", "Dots1Config", "Dots1ForCausalLM", "Dots1TopkRouter"),
    Case("dots3_note", "Dots3NoteTextConfig", "Dots3NoteTextModel", "Dots3NoteTextTopkRouter"),
    Case("ernie4_5_moe", "Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "Ernie4_5_MoeTopKRouter"),
    Case("ernie4_5_vl_moe", "Ernie4_5_VLMoeTextConfig", "Ernie4_5_VLMoeTextModel", "Ernie4_5_VLMoeMoeTopKRouter",
         overrides=dict(moe_intermediate_size=[32, 32], rope_parameters=dict(
             rope_theta=5e5, rope_type="default", mrope_section=[3, 3, 2])), routers=4),
    Case("exaone_moe", "ExaoneMoeConfig", "ExaoneMoeForCausalLM", "ExaoneMoeTopkRouter"),
    Case("flex_olmo", "FlexOlmoConfig", "FlexOlmoForCausalLM", "FlexOlmoTopKRouter"),
    Case("flint", "FlintConfig", "FlintForCausalLM", "FlintTopKRouter", overrides=dict(mlp_only_layers=[])),
    Case("gemma4", "Gemma4TextConfig", "Gemma4TextModel", "Gemma4TextRouter",
         overrides=dict(enable_moe_block=True, vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8)),
    Case("glm4_moe", "Glm4MoeConfig", "Glm4MoeForCausalLM", "Glm4MoeTopkRouter"),
    Case("glm4_moe_lite", "Glm4MoeLiteConfig", "Glm4MoeLiteForCausalLM", "Glm4MoeLiteTopkRouter"),
    Case("glm4v_moe", "Glm4vMoeTextConfig", "Glm4vMoeTextModel", "Glm4vMoeTextTopkRouter",
         overrides=dict(rope_parameters=dict(rope_theta=1e4, rope_type="default", partial_rotary_factor=0.5,
                                             mrope_section=[2, 1, 1]))),
    Case("glm5_next", "Glm5NextTextConfig", "Glm5NextTextModel", "Glm5NextTextTopkRouter",
         overrides=dict(qk_rope_head_dim=0, layer_types=["indexed_attention"] * 2)),
    Case("glm_moe_dsa", "GlmMoeDsaConfig", "GlmMoeDsaForCausalLM", "GlmMoeDsaTopkRouter"),
    Case("granitemoe", "GraniteMoeConfig", "GraniteMoeForCausalLM", "GraniteMoeTopKRouter"),
    Case("granitemoe_swa", "GraniteMoeSWAConfig", "GraniteMoeSWAForCausalLM", "GraniteMoeSWATopKRouter"),
    Case("granitemoehybrid", "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM", "GraniteMoeHybridTopKRouter",
         overrides=dict(mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=8)),
    Case("granitemoeshared", "GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM", "GraniteMoeSharedTopKRouter"),
    Case("hunyuan_v1_moe", "HunYuanMoEV1Config", "HunYuanMoEV1ForCausalLM", "HunYuanMoEV1Gate"),
    Case("hy_v3", "HYV3Config", "HYV3ForCausalLM", "HYV3TopKRouter"),
    Case("hy_v4", "HYV4Config", "HYV4ForCausalLM", "HYV4TopkRouter"),
    Case("inkling", "InklingTextConfig", "InklingTextModel", "InklingTopkRouter"),
    Case("inkling2", "Inkling2TextConfig", "Inkling2TextModel", "Inkling2TopKRouter"),
    Case("jamba", "JambaConfig", "JambaForCausalLM", "JambaTopKRouter",
         overrides=dict(expert_layer_period=1, expert_layer_offset=0)),
    Case("kimi_linear", "KimiLinearConfig", "KimiLinearForCausalLM", "KimiLinearTopkRouter",
         overrides=dict(layer_types=["full_attention"] * 2)),  # the linear-attention fallback takes seconds
    Case("kolibri1", "Kolibri1Config", "Kolibri1ForCausalLM", "Kolibri1TopKRouter"),
    Case("laguna", "LagunaConfig", "LagunaForCausalLM", "LagunaTopKRouter"),
    Case("lfm2_moe", "Lfm2MoeConfig", "Lfm2MoeForCausalLM", "Lfm2MoeTopKRouter",
         overrides=dict(layer_types=["conv", "full_attention"])),
    # LongCat's zero-compute experts are routable experts too: 4 routed + 2 zero experts.
    Case("longcat_flash", "LongcatFlashConfig", "LongcatFlashForCausalLM", "LongcatFlashTopkRouter",
         overrides=dict(zero_expert_num=2), experts=6),
    Case("mellum", "MellumConfig", "MellumForCausalLM", "MellumTopKRouter"),
    Case("mimo_v2_flash", "MiMoV2FlashConfig", "MiMoV2FlashForCausalLM", "MiMoV2FlashTopkRouter",
         overrides=dict(rope_parameters={t: dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5)
                                         for t in ("full_attention", "sliding_attention")},
                        num_attention_heads=4, num_key_value_heads=1)),  # sliding layers double the kv heads
    Case("minimax", "MiniMaxConfig", "MiniMaxForCausalLM", "MiniMaxTopKRouter"),
    Case("minimax_m2", "MiniMaxM2Config", "MiniMaxM2ForCausalLM", "MiniMaxM2TopKRouter"),
    Case("minimax_m3_vl", "MiniMaxM3VLTextConfig", "MiniMaxM3VLTextModel", "MiniMaxM3VLTopKRouter"),
    Case("mistral4", "Mistral4Config", "Mistral4ForCausalLM", "Mistral4TopkRouter", overrides=dict(head_dim=32)),
    Case("mistral_large4", "MistralLarge4TextConfig", "MistralLarge4TextModel", "MistralLarge4TextTopkRouter"),
    Case("muse_spark", "MuseSparkTextConfig", "MuseSparkTextModel", "MuseSparkTopkRouter"),
    Case("nemotron_h", "NemotronHConfig", "NemotronHForCausalLM", "NemotronHTopkRouter",
         overrides=dict(layers_block_type=["moe", "moe"])),
    Case("nllb_moe", "NllbMoeConfig", "NllbMoeModel", "NllbMoeTop2Router", truth="nllb", routers=4,
         overrides=dict(encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_sparse_step=1, decoder_sparse_step=1,
                        encoder_layerdrop=0.0, decoder_layerdrop=0.0, dropout=0.0, expert_capacity=3)),
    Case("openai_privacy_filter", "OpenAIPrivacyFilterConfig", "OpenAIPrivacyFilterModel",
         "OpenAIPrivacyFilterTopKRouter"),
    Case("phimoe", "PhimoeConfig", "PhimoeForCausalLM", "PhimoeTopKRouter"),
    Case("qwen3_5_moe", "Qwen3_5MoeTextConfig", "Qwen3_5MoeTextModel", "Qwen3_5MoeTopKRouter"),
    Case("qwen3_next", "Qwen3NextConfig", "Qwen3NextForCausalLM", "Qwen3NextTopKRouter"),
    Case("qwen3_omni_moe", "Qwen3OmniMoeTextConfig", "Qwen3OmniMoeThinkerTextModel",
         "Qwen3OmniMoeThinkerTextTopKRouter"),
    Case("qwen3_vl_moe", "Qwen3VLMoeTextConfig", "Qwen3VLMoeTextModel", "Qwen3VLMoeTextTopKRouter"),
    Case("qwen4_exp", "Qwen4ExpTextConfig", "Qwen4ExpTextModel", "Qwen4ExpTextTopKRouter",
         overrides=dict(layer_types=["linear_attention", "linear_attention"])),
    Case("solar_open", "SolarOpenConfig", "SolarOpenForCausalLM", "SolarOpenTopkRouter"),
    Case("step3p7", "Step3p7TextConfig", "Step3p7TextModel", "Step3p7TopKRouter"),
    Case("unlimited_ocr", "UnlimitedOcrTextConfig", "UnlimitedOcrTextModel", "UnlimitedOcrTextTopkRouter"),
    Case("zaya", "ZayaConfig", "ZayaForCausalLM", "ZayaRouter", truth="zaya", overrides=dict(num_experts_per_tok=1),
         experts=5, top_k=1),
]
