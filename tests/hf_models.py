"""Tiny random Hugging Face models of each supported family, built locally with save_pretrained."""
from __future__ import annotations

import os

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v3_noqlora")

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
    else:
        raise ValueError(family)
    model.eval()
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    return path


def hf_model(path: str):
    import transformers as tf
    return tf.AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32").eval()
