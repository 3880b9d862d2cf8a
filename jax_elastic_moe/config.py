"""Model configuration: one frozen dataclass, built from a Hugging Face config.json or a preset YAML.

Every family-specific switch of the model is a field here, so the model code reads `cfg` only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")


class ConfigError(ValueError):
    """A model config is malformed or asks for something the engine does not support."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int          # dense MLP layers
    moe_intermediate_size: int      # each routed expert
    num_experts: int                # logical routed experts
    num_experts_per_tok: int
    moe_layers: tuple[bool, ...]    # per layer: MoE (True) or dense MLP (False)
    # router
    router: str = "softmax"         # "softmax" | "sigmoid_grouped" (DeepSeek-V3)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # shared experts
    shared_intermediate_size: int = 0   # 0 = none
    shared_expert_gate: bool = False    # Qwen2-MoE: sigmoid gate on the shared expert
    # attention
    attention: str = "gqa"          # "gqa" | "mla"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm on each q / k head
    sliding_window: int | None = None
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # positions
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None   # frozen dict items (yarn)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    eos_token_id: tuple[int, ...] = ()
    bos_token_id: int | None = None

    @property
    def num_moe_layers(self) -> int:
        return sum(self.moe_layers)

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None


def _req(d: dict, *names, default=None, required=True):
    for n in names:
        if d.get(n) is not None:
            return d[n]
    if required and default is None:
        raise ConfigError(f"config is missing {' / '.join(names)}")
    return default


def _positive_int(name, v):
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ConfigError(f"config field {name} must be a positive integer, got {v!r}")
    return v


def from_hf_dict(d: dict) -> ModelConfig:
    """Normalises a Hugging Face config dict (config.json or a preset) into a ModelConfig."""
    if not isinstance(d, dict):
        raise ConfigError(f"a model config must be a mapping, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in FAMILIES:
        raise ConfigError(f"unknown model_type {mt!r}; supported: {', '.join(FAMILIES)}")
    hidden = _positive_int("hidden_size", _req(d, "hidden_size"))
    layers = _positive_int("num_hidden_layers", _req(d, "num_hidden_layers"))
    heads = _positive_int("num_attention_heads", _req(d, "num_attention_heads"))
    kv_heads = _positive_int("num_key_value_heads", _req(d, "num_key_value_heads", default=heads))
    if heads % kv_heads:
        raise ConfigError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    experts = _positive_int("num_experts", _req(d, "num_local_experts", "num_experts", "n_routed_experts"))
    topk = _positive_int("num_experts_per_tok", _req(d, "num_experts_per_tok"))
    if topk > experts:
        raise ConfigError(f"num_experts_per_tok={topk} exceeds the {experts} experts")
    inter = _positive_int("intermediate_size", _req(d, "intermediate_size"))
    moe_inter = _positive_int("moe_intermediate_size", _req(d, "moe_intermediate_size", default=inter))
    head_dim = d.get("head_dim") or hidden // heads

    rope = dict(d.get("rope_parameters") or {})
    if d.get("rope_scaling"):
        rope.update(d["rope_scaling"])
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (default, yarn)")
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    scaling = None
    if rope_type == "yarn":
        keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor", "truncate")
        scaling = tuple(sorted((k, rope[k]) for k in keep if rope.get(k) is not None))
        if "factor" not in dict(scaling) or "original_max_position_embeddings" not in dict(scaling):
            raise ConfigError("yarn rope scaling needs factor and original_max_position_embeddings")

    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    common = dict(
        model_type=mt, vocab_size=_positive_int("vocab_size", _req(d, "vocab_size")), hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=int(head_dim),
        intermediate_size=inter, moe_intermediate_size=moe_inter, num_experts=experts,
        num_experts_per_tok=topk, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
        rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=float(d.get("initializer_range", 0.02)), eos_token_id=eos,
        bos_token_id=d.get("bos_token_id"))

    if mt == "mixtral":
        return ModelConfig(**common, moe_layers=(True,) * layers, router="softmax", norm_topk_prob=True,
                           sliding_window=d.get("sliding_window"))
    if mt in ("qwen2_moe", "qwen3_moe"):
        if d.get("use_sliding_window"):
            raise ConfigError(f"{mt}: use_sliding_window=true is not supported")
        step = int(d.get("decoder_sparse_step", 1))
        if step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {step}")
        mlp_only = set(d.get("mlp_only_layers") or [])
        moe_layers = tuple((i not in mlp_only) and (i + 1) % step == 0 for i in range(layers))
        extra = dict(norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        if mt == "qwen2_moe":
            extra.update(qkv_bias=bool(d.get("qkv_bias", True)),
                         shared_intermediate_size=int(d.get("shared_expert_intermediate_size") or 0),
                         shared_expert_gate=bool(d.get("shared_expert_intermediate_size")))
        else:
            extra.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                         qk_norm=True)
        return ModelConfig(**common, moe_layers=moe_layers, router="softmax", **extra)
    # deepseek_v3
    first_dense = int(d.get("first_k_dense_replace", 0))
    n_group, topk_group = int(d.get("n_group") or 1), int(d.get("topk_group") or 1)
    if experts % n_group:
        raise ConfigError(f"n_routed_experts={experts} is not a multiple of n_group={n_group}")
    if topk_group > n_group:
        raise ConfigError(f"topk_group={topk_group} exceeds n_group={n_group}")
    if topk > topk_group * (experts // n_group):
        raise ConfigError(f"num_experts_per_tok={topk} exceeds the experts in topk_group={topk_group} groups")
    q_lora = d.get("q_lora_rank")
    return ModelConfig(
        **{**common, "head_dim": int(_req(d, "qk_nope_head_dim")) + int(_req(d, "qk_rope_head_dim"))},
        moe_layers=tuple(i >= first_dense for i in range(layers)),
        router="sigmoid_grouped", norm_topk_prob=bool(d.get("norm_topk_prob", True)),
        routed_scaling_factor=float(d.get("routed_scaling_factor", 1.0)), n_group=n_group, topk_group=topk_group,
        shared_intermediate_size=moe_inter * int(d.get("n_shared_experts") or 0),
        attention="mla", qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
        q_lora_rank=int(q_lora) if q_lora else None, kv_lora_rank=_positive_int("kv_lora_rank", _req(d, "kv_lora_rank")),
        qk_nope_head_dim=int(_req(d, "qk_nope_head_dim")), qk_rope_head_dim=int(_req(d, "qk_rope_head_dim")),
        v_head_dim=int(_req(d, "v_head_dim")), rope_interleave=bool(d.get("rope_interleave", True)))


def load_config_file(path: str | os.PathLike) -> ModelConfig:
    """Reads config.json or a preset .yaml / .yml file."""
    d = read_config_dict(path)
    try:
        return from_hf_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{os.fspath(path)}: {e}") from None


def read_config_dict(path: str | os.PathLike) -> dict:
    """The raw mapping of config.json or a preset YAML."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            if path.endswith((".yaml", ".yml")):
                import yaml
                d = yaml.safe_load(f)
            else:
                d = json.load(f)
        except Exception as e:  # parse errors of either format
            raise ConfigError(f"cannot parse {path}: {e}") from e
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: a model config must be a mapping, got {type(d).__name__}")
    return d


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}   # engine dtype names
# presets: package data of an installed wheel (CMake installs configs/ there), else the checkout's configs/
CONFIG_DIRS = (os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"),
               os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs"))


def preset_dirs() -> list[str]:
    """The folders holding the named presets, package data first."""
    from importlib import resources
    dirs = [str(resources.files("jax_elastic_moe") / "configs")] + list(CONFIG_DIRS)
    return list(dict.fromkeys(d for d in dirs if os.path.isdir(d)))


def resolve_preset(name: str) -> str:
    """A preset path, or a bare name ("tiny") looked up among the presets."""
    if os.path.exists(name):
        return name
    for folder in preset_dirs():
        for cand in (os.path.join(folder, name), os.path.join(folder, name + ".yaml")):
            if os.path.exists(cand):
                return cand
    raise ConfigError(f"config preset not found: {name} (looked in . and {', '.join(preset_dirs()) or CONFIG_DIRS[0]})")
