"""Weights: Hugging Face checkpoints (config.json + *.safetensors, sharded or not) and random init,
both as one flat dict {param path: array} with routed experts in logical layout [E, ...]."""
from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from ..config import ConfigError, ModelConfig, load_config_file
from .decoder import MoEModel

EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, holds one of the wrong shape, or cannot be read."""


def is_expert_path(path: tuple) -> bool:
    return path[-1] in EXPERT_PARAMS


def param_shapes(cfg: ModelConfig, dtype) -> dict[tuple, tuple]:
    """{path: shape} of every parameter, experts in logical layout [E, ...]."""
    abstract = nnx.eval_shape(lambda: MoEModel(cfg, cfg.num_experts, dtype))
    return {path: tuple(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def random_params(cfg: ModelConfig, dtype, seed: int) -> dict[tuple, np.ndarray]:
    """Random weights (normal(0, initializer_range), norms at one), experts logical [E, ...]."""
    model = jax.jit(lambda: nnx.split(MoEModel(cfg, cfg.num_experts, dtype, nnx.Rngs(seed)), nnx.Param)[1])()
    return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(model)}


def _hf_names(cfg: ModelConfig, path: tuple) -> list[str] | str:
    """The checkpoint tensor name(s) holding our parameter `path` (a list: one per expert)."""
    if path == ("embed",):
        return "model.embed_tokens.weight"
    if path == ("norm", "scale"):
        return "model.norm.weight"
    if path == ("lm_head", "w"):
        return "lm_head.weight"
    _, i, part, *rest = path
    pre = f"model.layers.{i}."
    if part in ("input_norm", "post_norm"):
        return pre + {"input_norm": "input_layernorm", "post_norm": "post_attention_layernorm"}[part] + ".weight"
    if part == "attn":
        mod, leaf = rest
        names = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "q_norm": "q_norm",
                 "k_norm": "k_norm", "q_a": "q_a_proj", "q_a_norm": "q_a_layernorm", "q_b": "q_b_proj",
                 "kv_a": "kv_a_proj_with_mqa", "kv_a_norm": "kv_a_layernorm", "kv_b": "kv_b_proj"}
        return pre + f"self_attn.{names[mod]}." + ("bias" if leaf == "b" else "weight")
    mlp = "block_sparse_moe" if cfg.model_type == "mixtral" and cfg.moe_layers[i] else "mlp"
    leaf = rest[-1]
    if leaf in EXPERT_PARAMS:
        sub = ({"w_gate": "w1", "w_up": "w3", "w_down": "w2"} if cfg.model_type == "mixtral"
               else {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"})[leaf]
        return [pre + f"{mlp}.experts.{e}.{sub}.weight" for e in range(cfg.num_experts)]
    if leaf == "router":
        return pre + f"{mlp}.gate.weight"
    if leaf == "router_bias":
        return pre + f"{mlp}.gate.e_score_correction_bias"
    proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    if rest[0] == "shared_gate":
        return pre + "mlp.shared_expert_gate.weight"
    if rest[0] == "shared":
        shared = "shared_experts" if cfg.model_type == "deepseek_v3" else "shared_expert"
        return pre + f"mlp.{shared}.{proj[rest[1]]}.weight"
    return pre + f"mlp.{proj[rest[0]]}.weight"


class _TensorIndex:
    """Lazy reader over the safetensors files of a checkpoint directory."""

    def __init__(self, path: str):
        from safetensors import safe_open
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no weight_map")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(os.path.basename(p) for p in glob.glob(os.path.join(path, "*.safetensors")))
            if not files:
                raise CheckpointError(f"no *.safetensors files in {path}")
            weight_map = None
        self.handles, self.where, self.keys = {}, {}, {}
        for name in files:
            full = os.path.join(path, name)
            if not os.path.exists(full):
                raise CheckpointError(f"checkpoint shard {name} listed in the index is missing from {path}")
            try:
                h = safe_open(full, framework="flax")
            except Exception as e:
                raise CheckpointError(f"cannot read {full}: {e}") from e
            self.handles[name] = h
            self.keys[name] = set(h.keys())
            for key in self.keys[name]:
                self.where[key] = name
        if weight_map:
            for key, name in weight_map.items():
                self.where.setdefault(key, name)

    def _shard(self, key: str) -> str | None:
        return self.where.get(key) or self.where.get(key.removeprefix("model."))

    def has(self, key: str) -> bool:
        """Whether the checkpoint names `key` (without reading it)."""
        return self._shard(key) is not None

    def get(self, key: str) -> np.ndarray | None:
        name = self._shard(key)
        if name is None:
            return None
        k = key if key in self.keys[name] else key.removeprefix("model.")
        return np.asarray(self.handles[name].get_tensor(k))


def _convert(cfg: ModelConfig, path: tuple, idx: _TensorIndex, shape: tuple) -> np.ndarray:
    names = _hf_names(cfg, path)
    leaf = path[-1]
    if isinstance(names, list):
        fused = names[0].rsplit(".experts.", 1)[0] + ".experts."
        if not idx.has(names[0]) and idx.has(fused + "down_proj"):
            return _fused_experts(cfg, path, idx, fused)
        mats = []
        want = tuple(shape[1:][::-1])      # torch layout [out, in]
        for n in names:
            t = idx.get(n)
            if t is None:
                raise CheckpointError(f"missing tensor {n}")
            if tuple(t.shape) != want:
                raise CheckpointError(f"tensor {n} has shape {tuple(t.shape)}, expected {want}")
            mats.append(t.T)
        return np.stack(mats)
    else:
        arr = idx.get(names)
        if arr is None:
            if path == ("lm_head", "w") and cfg.tie_word_embeddings:
                return None
            raise CheckpointError(f"missing tensor {names}")
        if leaf in ("w", "router"):
            arr = arr.T
        elif leaf == "b" and arr.ndim != 1:
            raise CheckpointError(f"tensor {names} has shape {arr.shape}, expected {shape}")
    if tuple(arr.shape) != tuple(shape):
        shown = arr.shape[::-1] if leaf in ("w", "router") else arr.shape
        raise CheckpointError(f"tensor {names} has shape {tuple(shown)}, expected "
                              f"{tuple(shape[::-1]) if leaf in ('w', 'router') else tuple(shape)}")
    return arr


def _fused_experts(cfg, path, idx, prefix):
    """Experts stored fused (transformers >= 5 in memory): gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    i = cfg.moe_intermediate_size
    if path[-1] == "w_down":
        arr = np.swapaxes(idx.get(prefix + "down_proj"), 1, 2)
        if arr.shape != (cfg.num_experts, i, cfg.hidden_size):
            raise CheckpointError(f"tensor {prefix}down_proj has shape {arr.shape}, expected "
                                  f"{(cfg.num_experts, cfg.hidden_size, i)}")
        return arr
    gate_up = idx.get(prefix + "gate_up_proj")
    if gate_up is None:
        raise CheckpointError(f"missing tensor {prefix}gate_up_proj")
    if gate_up.shape != (cfg.num_experts, 2 * i, cfg.hidden_size):
        raise CheckpointError(f"tensor {prefix}gate_up_proj has shape {gate_up.shape}, expected "
                              f"{(cfg.num_experts, 2 * i, cfg.hidden_size)}")
    part = gate_up[:, :i] if path[-1] == "w_gate" else gate_up[:, i:]
    return np.swapaxes(part, 1, 2)


def load_checkpoint(path: str, dtype) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """Reads a Hugging Face checkpoint directory. Returns (config, {param path: array in `dtype`})."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no config.json")
    cfg = load_config_file(cfg_path)
    idx = _TensorIndex(path)
    np_dtype = ml_dtypes.bfloat16 if jnp.dtype(dtype) == jnp.bfloat16 else np.dtype(dtype)
    params = {}
    for p, shape in param_shapes(cfg, dtype).items():
        arr = _convert(cfg, p, idx, shape)
        if arr is None:
            continue
        params[p] = arr.astype(jnp.float32 if p[-1] in ("router", "router_bias") and
                               cfg.router == "sigmoid_grouped" else np_dtype)
    return cfg, params


__all__ = ["CheckpointError", "ConfigError", "load_checkpoint", "random_params", "param_shapes",
           "is_expert_path", "EXPERT_PARAMS"]
