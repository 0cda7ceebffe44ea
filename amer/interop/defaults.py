"""What each importable class assumes for a setting its ``config.json`` leaves out, where that differs from the
fallback a converter would otherwise use, and which classes read the settings only some of them read.

``save_pretrained`` writes every setting, but trimmed and hand-written configs (many on the Hub) leave settings
to the class, and transformers then fills in the class's own default: Phi-3 and OLMo 2 norms use eps 1e-5 where
Llama's use 1e-6, Gemma 2 soft-caps its logits at 30, Qwen3-Next rotates a quarter of each head. A converter that
filled in its own value would import a different function without a word, so :class:`~amer.interop.source.Source`
lays these defaults under the config before any converter reads it. ``tests/test_import_config.py`` checks every
value, and the aliases below, against the class's config in the installed transformers.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CLASS_DEFAULTS", "ALIASES", "LEGACY", "PARTIAL_ROTARY", "SLIDING_WINDOW", "NEVER_TIED", "MLP_BIAS",
           "NO_ATTENTION_BIAS", "TEXT_MODELS"]

# multimodal classes whose language model an import reads as its causal-LM class: (that class, where its weights
# sit in the folder -> where the causal-LM class keeps them, the prefixes of the weights it leaves, such as the vision
# tower). Their config.json nests the language model's settings under text_config; the head's tying is the top
# level's. Gemma 3's folders are written in the older layout (language_model.model.*) or the newer one.
_QWEN3_5_VL = ({"model.language_model.": "model."}, ("model.visual.",))
_GEMMA3_VL = ({"model.language_model.": "model.", "language_model.model.": "model.",
               "language_model.lm_head.": "lm_head."},
              ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector."))
TEXT_MODELS: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {
    "Qwen3_5ForConditionalGeneration": ("Qwen3_5ForCausalLM", *_QWEN3_5_VL),
    "Qwen3_5MoeForConditionalGeneration": ("Qwen3_5MoeForCausalLM", *_QWEN3_5_VL),
    "Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", *_GEMMA3_VL),
}

# each class's attribute_map: a setting a config may spell by another name (alias -> the name the class keeps), folded
# onto its kept name before the defaults go under it, so a default never hides a value given by its alias
_LAYERS = {"layer_types": "layers_block_type"}
ALIASES: dict[str, dict[str, str]] = {
    "BambaForCausalLM": _LAYERS,
    "DeepseekV3ForCausalLM": {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
    "FalconH1ForCausalLM": _LAYERS,
    "GraniteMoeHybridForCausalLM": {"layers_block_type": "layer_types"},
    "JambaForCausalLM": {"num_local_experts": "num_experts"},
    "KimiLinearForCausalLM": {"max_position_embeddings": "model_max_length", "norm_topk_prob": "moe_renormalize",
                              "n_group": "num_expert_group", "num_local_experts": "num_experts",
                              "num_experts_per_tok": "num_experts_per_token", "n_shared_experts": "num_shared_experts"},
    "Lfm3ForCausalLM": {"rms_norm_eps": "norm_eps"},
    "MiniMaxForCausalLM": {"num_experts": "num_local_experts"},
    "MixtralForCausalLM": {"num_experts": "num_local_experts"},
    "NemotronHForCausalLM": {**_LAYERS, "num_local_experts": "n_routed_experts"},
    "OlmoeForCausalLM": {"num_local_experts": "num_experts"},
    "Qwen3MoeForCausalLM": {"num_experts": "num_local_experts"},
    "RecurrentGemmaForCausalLM": {"sliding_window": "attention_window_size", **_LAYERS},
    "Zamba2ForCausalLM": {**_LAYERS, "head_dim": "attention_head_dim"},
    "ZambaForCausalLM": {**_LAYERS, "head_dim": "attention_head_dim"},
}

# older names a class still reads on loading, and which win over the current name (Nemotron-H's config pops them
# in its __post_init__): old name -> current name
LEGACY: dict[str, dict[str, str]] = {
    "NemotronHForCausalLM": {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel", "mamba_expand": "expand",
                             "mamba_chunk_size": "chunk_size", "mamba_conv_bias": "use_conv_bias",
                             "mamba_dt_limit": "time_step_limit"},
}

_EPS5 = {"rms_norm_eps": 1e-5}
_MOE = {"router_aux_loss_coef": 0.001}
# Bamba's and Granite-4.0-H's Mamba-2 layers ("auto": the head width that fills expand x hidden_size)
_MAMBA = {"mamba_n_heads": 128, "mamba_d_head": "auto", "mamba_d_state": 256, "mamba_d_conv": 4, "mamba_expand": 2,
          "mamba_n_groups": 1, "mamba_chunk_size": 256}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "BambaForCausalLM": {**_EPS5, **_MAMBA},  # (its rotary fraction: Source.rope)
    "DeepseekV3ForCausalLM": {"n_group": 8, "topk_group": 4, "n_shared_experts": 1, "norm_topk_prob": True,
                              "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "v_head_dim": 128,
                              "first_k_dense_replace": 3, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
                              "kv_lora_rank": 512, "q_lora_rank": 1536},
    "FalconH1ForCausalLM": _EPS5,
    "FalconMambaForCausalLM": {"layer_norm_epsilon": 1e-5, "state_size": 16},
    "Gemma2ForCausalLM": {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "head_dim": 256,
                          "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                          "sliding_window": 4096},
    "Gemma3ForCausalLM": {"head_dim": 256, "query_pre_attn_scalar": 256, "hidden_activation": "gelu_pytorch_tanh",
                          "sliding_window": 4096},
    "GraniteMoeHybridForCausalLM": {**_MOE, **_MAMBA, "attention_multiplier": 1.0, "num_local_experts": 8,
                                    "num_experts_per_tok": 2},
    "JambaForCausalLM": _MOE,
    # (Kimi's config stores these under the names its attribute_map points to)
    "KimiLinearForCausalLM": {**_EPS5, "routed_scaling_factor": 2.446, "num_experts_per_token": 8,
                              "num_shared_experts": 1, "moe_renormalize": True, "v_head_dim": 128,
                              "qk_rope_head_dim": 64, "kv_lora_rank": 512},
    "LaraMiniForCausalLM": {**_MOE, "num_experts": 128, "num_experts_per_tok": 4, "head_dim": 128,
                            "num_key_value_heads": 4, "sliding_window": 512, "linear_num_key_heads": 8,
                            "linear_num_value_heads": 16, "tie_word_embeddings": True},
    "Lfm2ForCausalLM": {"norm_eps": 1e-5, "rope_theta": 1e6},
    "Lfm2MoeForCausalLM": {"norm_eps": 1e-5, "rope_theta": 1e6, "num_experts_per_tok": 4},
    "Lfm3ForCausalLM": {"norm_eps": 1e-5, "conv_L_cache": 7, "sliding_window": 256, "head_dim": 128,
                        "num_key_value_heads": 4, "rope_parameters": {
                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "proportional", "rope_theta": 1000000.0,
                                               "partial_rotary_factor": 0.5}}},
    "Mamba2ForCausalLM": {"layer_norm_epsilon": 1e-5, "n_groups": 8, "conv_kernel": 4},
    "MambaForCausalLM": {"layer_norm_epsilon": 1e-5, "state_size": 16},
    "MiniMaxForCausalLM": {**_EPS5, "rope_theta": 1e6, "num_local_experts": 8},
    "MistralForCausalLM": {"sliding_window": 4096},
    "MixtralForCausalLM": {**_EPS5, **_MOE, "rope_theta": 1e6, "num_local_experts": 8},
    "NemotronHForCausalLM": {"layer_norm_epsilon": 1e-5, "n_groups": 8, "chunk_size": 128, "head_dim": 128,
                             "moe_shared_expert_intermediate_size": 7688, "n_routed_experts": 8, "conv_kernel": 4,
                             "mamba_head_dim": 64},
    "Olmo2ForCausalLM": _EPS5,
    "OlmoHybridForCausalLM": {"rope_theta": 10000.0},  # only an explicit null turns RoPE off
    "OlmoeForCausalLM": {**_EPS5, "num_experts_per_tok": 8, "router_aux_loss_coef": 0.01},
    "Phi3ForCausalLM": _EPS5,
    "Qwen2ForCausalLM": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28},
    "Qwen2MoeForCausalLM": {**_MOE, "num_experts_per_tok": 4, "use_sliding_window": False, "sliding_window": 4096,
                            "max_window_layers": 28},
    "Qwen3ForCausalLM": {"use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
                         "head_dim": 128},
    "Qwen3MoeForCausalLM": {**_MOE, "num_experts_per_tok": 8, "use_sliding_window": False, "sliding_window": 4096},
    "Qwen3NextForCausalLM": {**_MOE, "num_experts_per_tok": 10, "head_dim": 256, "partial_rotary_factor": 0.25,
                             "num_key_value_heads": 2},
    "Qwen3_5ForCausalLM": {"head_dim": 256, "partial_rotary_factor": 0.25, "num_key_value_heads": 4},
    "Qwen3_5MoeForCausalLM": {**_MOE, "num_experts": 256, "num_experts_per_tok": 8, "head_dim": 256,
                              "partial_rotary_factor": 0.25, "num_key_value_heads": 2},
    "RecurrentGemmaForCausalLM": {"partial_rotary_factor": 0.5, "logits_soft_cap": 30.0,
                                  "attention_window_size": 2048},
    "Zamba2ForCausalLM": {**_EPS5, "num_mem_blocks": 1},
    "ZambaForCausalLM": _EPS5,
}

# the classes whose rotary embedding reads partial_rotary_factor: every other one turns the whole head whatever
# the config says (the factor is a shared RoPE setting in transformers 5, so it turns up in configs of classes
# that never read it)
PARTIAL_ROTARY = frozenset({"BambaForCausalLM", "Phi3ForCausalLM", "Qwen3NextForCausalLM", "Qwen3_5ForCausalLM",
                            "Qwen3_5MoeForCausalLM", "RecurrentGemmaForCausalLM"})
# the Llama-style classes whose attention reads sliding_window (Phi-3 on every layer, whatever layer_types says)
SLIDING_WINDOW = frozenset({"MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM"})
# the classes whose dense MLP reads mlp_bias (Nemotron-H's MoE layers too: their shared expert and latent
# projections); another class ignores one its config names
MLP_BIAS = frozenset({"LlamaForCausalLM", "GraniteForCausalLM", "BambaForCausalLM", "FalconH1ForCausalLM",
                      "NemotronHForCausalLM"})
# the classes whose attention projections never have biases, whatever attention_bias says (Qwen2's and Qwen2-MoE's
# have q/k/v biases of their own; their converters set them)
NO_ATTENTION_BIAS = frozenset({"MistralForCausalLM", "MixtralForCausalLM", "Phi3ForCausalLM", "Lfm2ForCausalLM",
                               "Lfm2MoeForCausalLM", "JambaForCausalLM", "NemotronHForCausalLM", "MiniMaxForCausalLM",
                               "ZambaForCausalLM", "Zamba2ForCausalLM"})
# classes whose LM head is never the embedding: tie_word_embeddings in their config changes nothing
NEVER_TIED = frozenset({"KimiLinearForCausalLM", "NemotronHForCausalLM"})
