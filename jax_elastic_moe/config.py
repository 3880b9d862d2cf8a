"""Model configuration: one frozen dataclass, built from a Hugging Face config.json or a preset YAML.

Every family-specific switch of the model is a field here, so the model code reads `cfg` only."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3", "deepseek_v32", "glm4_moe", "gpt_oss")
QUANT_METHODS = ("fp8", "mxfp4")    # quantization_config.quant_method of checkpoints the loader reads


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
    router: str = "softmax"         # "softmax" | "sigmoid_grouped" (DeepSeek-V3) | "topk_softmax" (gpt-oss)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    # shared experts
    shared_intermediate_size: int = 0   # 0 = none
    shared_expert_gate: bool = False    # Qwen2-MoE: sigmoid gate on the shared expert
    # routed experts
    expert_act: str = "swiglu"      # "swiglu" | "clamped_swiglu" (gpt-oss)
    expert_bias: bool = False       # gpt-oss: biases on the experts' matrices
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    expert_dtype: str | None = None     # "float8_e4m3fn": experts held in FP8 with block scales
    quant_block: tuple[int, int] = (128, 128)   # FP8 weight_block_size [out, in] of the checkpoint
    quant_method: str | None = None     # the checkpoint's quantization_config.quant_method
    # attention
    attention: str = "gqa"          # "gqa" | "mla"
    qkv_bias: bool = False
    o_bias: bool = False
    qk_norm: bool = False           # Qwen3: RMSNorm on each q / k head
    sliding_window: int | None = None
    sliding_layers: tuple[bool, ...] | None = None   # gpt-oss layer_types; None: every layer if a window
    attn_sinks: bool = False        # gpt-oss: a learned per-head logit in every softmax
    rotary_dim: int = 0             # GQA: rotated dims of each head (0: all); GLM's partial rotary
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False
    # DeepSeek-V3.2 lightning indexer (0: dense MLA)
    index_n_heads: int = 0
    index_head_dim: int = 0
    index_topk: int = 0
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
        return self.qk_rope_head_dim if self.attention == "mla" else (self.rotary_dim or self.head_dim)

    def window(self, layer: int) -> int | None:
        """The sliding window of attention layer `layer` (None: full attention)."""
        if self.sliding_layers is not None and not self.sliding_layers[layer]:
            return None
        return self.sliding_window

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
    return _int(name, v, 1)


def _int(name: str, v, minimum: int = 0) -> int:
    """An int field (not a bool, not a float such as 12.7) >= minimum, or a ConfigError naming it."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise ConfigError(f"config field {name} must be an integer, got {v!r}")
    if v < minimum:
        raise ConfigError(f"config field {name} must be >= {minimum}, got {v!r}")
    return v


def _float(name: str, v, minimum: float | None = None, positive: bool = False) -> float:
    """A finite number field (> 0 when positive, >= minimum), or a ConfigError naming it."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ConfigError(f"config field {name} must be a finite number, got {v!r}")
    if (positive and v <= 0) or (minimum is not None and v < minimum):
        raise ConfigError(f"config field {name} must be {'> 0' if positive else f'>= {minimum}'}, got {v!r}")
    return float(v)


# gpt-oss's rope when its config names none (transformers' GptOssConfig defaults).
GPT_OSS_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 4096, "rope_theta": 150000.0}


def _quantization(d: dict, mt: str) -> dict:
    """ModelConfig fields of the checkpoint's quantization_config (none: {})."""
    qc = d.get("quantization_config")
    if not qc:
        return {}
    if not isinstance(qc, dict):
        raise ConfigError(f"quantization_config must be a mapping, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise ConfigError(f"quantization_config.quant_method {method!r} is not supported; supported: fp8 "
                          f"(block-scaled float8_e4m3fn with weight_scale_inv), mxfp4 (gpt_oss experts)")
    if method == "mxfp4":
        if mt != "gpt_oss":
            raise ConfigError(f"quantization_config.quant_method 'mxfp4' is supported for gpt_oss only, not {mt}")
        return {"quant_method": "mxfp4"}
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"quantization_config.fmt {qc.get('fmt')!r} is not supported (fp8 checkpoints: e4m3)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ConfigError(f"quantization_config.activation_scheme {qc.get('activation_scheme')!r} is not "
                          f"supported (dynamic only: activations are not quantized here)")
    block = qc.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"quantization_config.weight_block_size must be two positive integers [out, in], "
                          f"got {block!r}")
    return {"quant_method": "fp8", "expert_dtype": "float8_e4m3fn", "quant_block": (int(block[0]), int(block[1]))}


def _sigmoid_grouped(d: dict, mt: str, layers: int, experts: int, topk: int, moe_inter: int) -> dict:
    """Router, shared experts and dense first layers of DeepSeek-V3 / V3.2 and GLM-4.5."""
    n_group, topk_group = _int("n_group", d.get("n_group") or 1, 1), _int("topk_group", d.get("topk_group") or 1, 1)
    if experts % n_group:
        raise ConfigError(f"n_routed_experts={experts} is not a multiple of n_group={n_group}")
    if topk_group > n_group:
        raise ConfigError(f"topk_group={topk_group} exceeds n_group={n_group}")
    if topk > topk_group * (experts // n_group):
        raise ConfigError(f"num_experts_per_tok={topk} exceeds the experts in topk_group={topk_group} groups")
    kinds = d.get("mlp_layer_types")
    if kinds is not None:
        if len(kinds) != layers or set(kinds) - {"dense", "sparse"}:
            raise ConfigError(f"mlp_layer_types must list 'dense' or 'sparse' for each of the {layers} layers, "
                              f"got {kinds!r}")
        moe_layers = tuple(k == "sparse" for k in kinds)
    else:
        first_dense = _int("first_k_dense_replace", d.get("first_k_dense_replace", 0))
        moe_layers = tuple(i >= first_dense for i in range(layers))
    shared = d.get("n_shared_experts", 1 if mt == "glm4_moe" else 0)
    return dict(moe_layers=moe_layers, router="sigmoid_grouped", norm_topk_prob=bool(d.get("norm_topk_prob", True)),
                routed_scaling_factor=_float("routed_scaling_factor", d.get("routed_scaling_factor", 1.0), positive=True), n_group=n_group,
                topk_group=topk_group, shared_intermediate_size=moe_inter * _int("n_shared_experts", shared or 0))


def _mla(d: dict, mt: str) -> dict:
    """Multi-head latent attention fields (DeepSeek-V3 / V3.2), with V3.2's indexer."""
    q_lora = d.get("q_lora_rank")
    out = dict(attention="mla", qkv_bias=bool(d.get("attention_bias", False)),
               o_bias=bool(d.get("attention_bias", False)), q_lora_rank=_positive_int("q_lora_rank", q_lora) if q_lora else None,
               kv_lora_rank=_positive_int("kv_lora_rank", _req(d, "kv_lora_rank")),
               qk_nope_head_dim=_positive_int("qk_nope_head_dim", _req(d, "qk_nope_head_dim")),
               qk_rope_head_dim=_positive_int("qk_rope_head_dim", _req(d, "qk_rope_head_dim")),
               v_head_dim=_positive_int("v_head_dim", _req(d, "v_head_dim")), rope_interleave=bool(d.get("rope_interleave", True)))
    if mt == "deepseek_v32":
        if not q_lora:
            raise ConfigError("deepseek_v32 needs q_lora_rank (its indexer reads the query latent)")
        out.update(rope_interleave=True,
                   index_n_heads=_positive_int("index_n_heads", _req(d, "index_n_heads")),
                   index_head_dim=_positive_int("index_head_dim", _req(d, "index_head_dim")),
                   index_topk=_positive_int("index_topk", _req(d, "index_topk")))
        if out["index_head_dim"] < out["qk_rope_head_dim"]:
            raise ConfigError(f"index_head_dim={out['index_head_dim']} is smaller than "
                              f"qk_rope_head_dim={out['qk_rope_head_dim']}")
    return out


def _gpt_oss(d: dict, layers: int) -> dict:
    kinds = d.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if len(kinds) != layers or set(kinds) - {"sliding_attention", "full_attention"}:
        raise ConfigError(f"layer_types must list 'sliding_attention' or 'full_attention' for each of the "
                          f"{layers} layers, got {kinds!r}")
    sliding = tuple(k == "sliding_attention" for k in kinds)
    window = d.get("sliding_window")
    if any(sliding):
        window = _positive_int("sliding_window", window)
    bias = bool(d.get("attention_bias", True))
    return dict(moe_layers=(True,) * layers, router="topk_softmax", norm_topk_prob=True, qkv_bias=bias,
                o_bias=bias, sliding_window=window, sliding_layers=sliding, attn_sinks=True,
                expert_act="clamped_swiglu", expert_bias=True, swiglu_alpha=_float("swiglu_alpha", d.get("swiglu_alpha", 1.702), positive=True),
                swiglu_limit=_float("swiglu_limit", d.get("swiglu_limit", 7.0), positive=True))


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
    topk = _positive_int("num_experts_per_tok", _req(d, "num_experts_per_tok", "experts_per_token"))
    if topk > experts:
        raise ConfigError(f"num_experts_per_tok={topk} exceeds the {experts} experts")
    inter = _positive_int("intermediate_size", _req(d, "intermediate_size"))
    moe_inter = _positive_int("moe_intermediate_size", _req(d, "moe_intermediate_size", default=inter))
    head_dim = _positive_int("head_dim", d["head_dim"]) if d.get("head_dim") is not None else hidden // heads

    rope = dict(d.get("rope_parameters") or {})
    if d.get("rope_scaling"):
        rope.update(d["rope_scaling"])
    if mt == "gpt_oss" and not rope:
        rope = dict(GPT_OSS_ROPE)
    theta = _float("rope_theta", rope.get("rope_theta", d.get("rope_theta", 10000.0)), positive=True)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn"):
        raise ConfigError(f"rope type {rope_type!r} is not supported (default, yarn)")
    partial = _float("partial_rotary_factor", rope.get("partial_rotary_factor", d.get(
        "partial_rotary_factor", 0.5 if mt == "glm4_moe" else 1.0)), positive=True)
    rotary_dim = int(head_dim * partial)
    if partial != 1.0 and (mt not in ("glm4_moe", "mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss")
                           or not 0 < rotary_dim <= head_dim or rotary_dim % 2):
        raise ConfigError(f"partial_rotary_factor={partial} is not supported for {mt} with head_dim={head_dim}")
    scaling = None
    if rope_type == "yarn":
        keep = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                "mscale_all_dim", "attention_factor", "truncate")
        scaling = tuple(sorted((k, rope[k]) for k in keep if rope.get(k) is not None))
        if "factor" not in dict(scaling) or "original_max_position_embeddings" not in dict(scaling):
            raise ConfigError("yarn rope scaling needs factor and original_max_position_embeddings")

    vocab = _positive_int("vocab_size", _req(d, "vocab_size"))
    eos = d.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
    for t in eos:
        if _int("eos_token_id", t) >= vocab:
            raise ConfigError(f"config field eos_token_id {t} is outside the vocabulary [0, {vocab})")
    common = dict(
        model_type=mt, vocab_size=vocab, hidden_size=hidden,
        num_layers=layers, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=inter, moe_intermediate_size=moe_inter, num_experts=experts,
        num_experts_per_tok=topk, rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=_positive_int("max_position_embeddings", d.get("max_position_embeddings", 4096)),
        rms_norm_eps=_float("rms_norm_eps", d.get("rms_norm_eps", 1e-6), positive=True),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        initializer_range=_float("initializer_range", d.get("initializer_range", 0.02), 0.0), eos_token_id=eos,
        bos_token_id=d.get("bos_token_id"), rotary_dim=rotary_dim if partial != 1.0 else 0,
        **_quantization(d, mt))

    if mt == "mixtral":
        return ModelConfig(**common, moe_layers=(True,) * layers, router="softmax", norm_topk_prob=True,
                           sliding_window=d.get("sliding_window"))
    if mt in ("qwen2_moe", "qwen3_moe"):
        if d.get("use_sliding_window"):
            raise ConfigError(f"{mt}: use_sliding_window=true is not supported")
        step = _int("decoder_sparse_step", d.get("decoder_sparse_step", 1))
        if step < 1:
            raise ConfigError(f"decoder_sparse_step must be >= 1, got {step}")
        mlp_only = set(d.get("mlp_only_layers") or [])
        moe_layers = tuple((i not in mlp_only) and (i + 1) % step == 0 for i in range(layers))
        extra = dict(norm_topk_prob=bool(d.get("norm_topk_prob", False)))
        if mt == "qwen2_moe":
            extra.update(qkv_bias=bool(d.get("qkv_bias", True)),
                         shared_intermediate_size=_int("shared_expert_intermediate_size", d.get("shared_expert_intermediate_size") or 0),
                         shared_expert_gate=bool(d.get("shared_expert_intermediate_size")))
        else:
            extra.update(qkv_bias=bool(d.get("attention_bias", False)), o_bias=bool(d.get("attention_bias", False)),
                         qk_norm=True)
        return ModelConfig(**common, moe_layers=moe_layers, router="softmax", **extra)
    if mt == "gpt_oss":
        return ModelConfig(**{**common, "moe_intermediate_size": inter}, **_gpt_oss(d, layers))
    routing = _sigmoid_grouped(d, mt, layers, experts, topk, moe_inter)
    if mt == "glm4_moe":
        return ModelConfig(**common, **routing, qkv_bias=bool(d.get("attention_bias", False)),
                           qk_norm=bool(d.get("use_qk_norm", False)))
    # deepseek_v3, deepseek_v32
    mla = _mla(d, mt)
    return ModelConfig(**{**common, "head_dim": mla["qk_nope_head_dim"] + mla["qk_rope_head_dim"]}, **routing, **mla)


def check_mooncake_support(cfg: ModelConfig) -> None:
    """Raises ConfigError when the multi-process (mooncake) runtime cannot serve `cfg` yet: its worker
    packs exactly three same-size expert matrices per slot in the model's dtype, so experts with
    biases (gpt_oss) or held in FP8 with block scales are not carried there. spmd mode serves both."""
    if cfg.expert_bias:
        raise ConfigError(f"mode='mooncake' does not support {cfg.model_type} yet: its experts have biases "
                          f"(per-slot arrays the mooncake worker does not pack); use mode='spmd'")
    if cfg.expert_dtype is not None:
        raise ConfigError(f"mode='mooncake' does not support FP8-resident experts ({cfg.expert_dtype} with block "
                          f"scales) yet; use mode='spmd'")


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
