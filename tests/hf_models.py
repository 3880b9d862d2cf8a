"""Tiny random Hugging Face models of each supported family, built locally with save_pretrained."""
from __future__ import annotations

import os

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v3_noqlora", "deepseek_v32", "glm4_moe",
            "gpt_oss")

# Shapes the new families' tests rely on: prompts longer than gpt-oss's window and V3.2's index_topk.
GPT_OSS_WINDOW = 4
V32_INDEX_TOPK = 6
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.15, max_position_embeddings=512, rms_norm_eps=1e-6,
              tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=0)


def build(family: str, path: str, seed: int = 0) -> str:
    """Writes a tiny random checkpoint of `family` into `path`; returns the path."""
    import torch
    import transformers as tf
    torch.manual_seed(seed)
    if family == "mixtral":
        cfg = tf.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2)
        model = tf.MixtralForCausalLM(cfg)
    elif family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**COMMON, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                shared_expert_intermediate_size=24, norm_topk_prob=False, decoder_sparse_step=1,
                                mlp_only_layers=[1])
        model = tf.Qwen2MoeForCausalLM(cfg)
    elif family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                head_dim=12, norm_topk_prob=True, decoder_sparse_step=2, mlp_only_layers=[])
        model = tf.Qwen3MoeForCausalLM(cfg)
    elif family.startswith("deepseek_v3"):
        cfg = tf.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            moe_intermediate_size=16, q_lora_rank=None if family.endswith("noqlora") else 24, kv_lora_rank=16,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, n_group=4, topk_group=2,
            first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
        model = tf.DeepseekV3ForCausalLM(cfg)
        with torch.no_grad():   # a non-zero correction bias, so the test sees it used
            for layer in model.model.layers[1:]:
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    elif family == "deepseek_v32":
        cfg = tf.DeepseekV32Config(
            **{**COMMON, "num_key_value_heads": 4}, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
            moe_intermediate_size=16, q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=12, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
            index_n_heads=8, index_head_dim=16, index_topk=V32_INDEX_TOPK,
            rope_parameters={**YARN, "rope_theta": 10000.0})
        model = tf.DeepseekV32ForCausalLM(cfg)
        _randomize(model, "e_score_correction_bias", 0.1, torch)
        _randomize(model, "indexer.k_norm", 0.3, torch, add=True)   # LayerNorm weight and bias away from 1 / 0
    elif family == "glm4_moe":
        cfg = tf.Glm4MoeConfig(**COMMON, head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                               moe_intermediate_size=16, n_group=4, topk_group=2, first_k_dense_replace=1,
                               routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "partial_rotary_factor": 0.5})
        model = tf.Glm4MoeForCausalLM(cfg)
        _randomize(model, "e_score_correction_bias", 0.1, torch)
        _randomize(model, "self_attn.q_proj.bias", 0.1, torch)
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**{**COMMON, "intermediate_size": 24}, head_dim=12, num_local_experts=6,
                              num_experts_per_tok=2, sliding_window=GPT_OSS_WINDOW, swiglu_limit=1.0,
                              rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                               "truncate": False, "original_max_position_embeddings": 128,
                                               "rope_theta": 150000.0})
        model = tf.GptOssForCausalLM(cfg)
        _randomize(model, "bias", 0.1, torch)      # experts' biases start at zero; the test must see them
        _randomize(model, "sinks", 1.0, torch)
    else:
        raise ValueError(family)
    model.eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def _randomize(model, name_part: str, std: float, torch, add: bool = False):
    """Sets (or shifts) every parameter and buffer whose name contains `name_part` to random values."""
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name_part in name and t.is_floating_point():
                noise = torch.randn(t.shape) * std
                t.copy_(t + noise if add else noise)


def hf_model(path: str):
    import transformers as tf
    return tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32").eval()
