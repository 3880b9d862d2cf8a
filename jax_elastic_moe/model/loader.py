"""Weights: Hugging Face checkpoints (config.json + *.safetensors, sharded or not) and random init,
both as one flat dict {param path: array} with routed experts in logical layout [E, ...].

Quantized checkpoints load as published: FP8 block-scaled (quant_method "fp8") weights outside the
routed experts are dequantized here; routed experts stay FP8 with their block scales (expert params
ending in the matrix's name under `expert_scale`) unless fp8_experts="dequantize". gpt-oss MXFP4
experts are dequantized here (to the model's dtype: 4x the bytes of the MXFP4 payload in bfloat16)."""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import numpy as np
from flax import nnx

from ..config import ConfigError, ModelConfig, load_config_file
from .decoder import MoEModel
from .quant import FP8, dequantize_fp8, dequantize_mxfp4, scale_shape

# The expert matrices. A parameter is an expert parameter (leading axis = physical slot, moved with
# its slot) when its path ends in one of these: the matrices themselves and the per-slot arrays that go
# with them (mlp/expert_bias/w_gate: gpt-oss biases; mlp/expert_scale/w_gate: FP8 block scales).
EXPERT_PARAMS = ("w_gate", "w_up", "w_down")


class CheckpointError(ValueError):
    """A checkpoint is missing a tensor, holds one of the wrong shape, or cannot be read."""


def is_expert_path(path: tuple) -> bool:
    return path[-1] in EXPERT_PARAMS


def param_shapes(cfg: ModelConfig, dtype) -> dict[tuple, tuple]:
    """{path: shape} of every parameter, experts in logical layout [E, ...]."""
    return {path: shape for path, (shape, _) in param_specs(cfg, dtype).items()}


def param_specs(cfg: ModelConfig, dtype) -> dict[tuple, tuple[tuple, np.dtype]]:
    """{path: (shape, dtype)} of every parameter, experts in logical layout [E, ...]."""
    abstract = nnx.eval_shape(lambda: MoEModel(cfg, cfg.num_experts, dtype))
    return {path: (tuple(v.shape), np.dtype(v.dtype))
            for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


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
        if rest == ["sinks"]:
            return pre + "self_attn.sinks"
        if rest[0] == "indexer":
            mod, leaf = rest[1:]
            return pre + f"self_attn.indexer.{mod}." + ("bias" if leaf == "bias" else "weight")
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
        suffix = "weight_scale_inv" if rest[0] == "expert_scale" else "weight"
        return [pre + f"{mlp}.experts.{e}.{sub}.{suffix}" for e in range(cfg.num_experts)]
    router = "router" if cfg.model_type == "gpt_oss" else "gate"
    if leaf == "router":
        return pre + f"{mlp}.{router}.weight"
    if leaf == "router_bias":
        return pre + f"{mlp}.{router}." + ("bias" if cfg.model_type == "gpt_oss" else "e_score_correction_bias")
    proj = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    if rest[0] == "shared_gate":
        return pre + "mlp.shared_expert_gate.weight"
    if rest[0] == "shared":
        shared = "shared_experts" if cfg.router == "sigmoid_grouped" else "shared_expert"
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
        self.path = path
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
        dtype = self.handles[name].get_slice(k).get_dtype()
        if dtype.startswith("F8"):       # safetensors' numpy/flax readers cannot make float8 arrays
            return self._read_fp8(name, k, dtype)
        return np.asarray(self.handles[name].get_tensor(k))

    def _read_fp8(self, name: str, key: str, dtype: str) -> np.ndarray:
        if dtype != "F8_E4M3":
            raise CheckpointError(f"tensor {key} has dtype {dtype}; FP8 checkpoints here are float8_e4m3fn (F8_E4M3)")
        full = os.path.join(self.path, name)
        with open(full, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(header_len))[key]
            start, end = entry["data_offsets"]
            f.seek(8 + header_len + start)
            raw = np.frombuffer(f.read(end - start), np.uint8)
        return raw.view(FP8).reshape(entry["shape"])


def _weight(cfg: ModelConfig, idx: "_TensorIndex", name: str, keep_fp8: bool = False) -> np.ndarray:
    """The tensor `name`; an FP8 weight is dequantized with its block scales unless keep_fp8."""
    t = idx.get(name)
    if t is None:
        raise CheckpointError(f"missing tensor {name}")
    if not jax.numpy.issubdtype(t.dtype, jax.numpy.floating):
        raise CheckpointError(f"tensor {name} has dtype {t.dtype}; weights must be floating point (float32, "
                              f"bfloat16, float16), or float8_e4m3fn with block scales")
    if t.dtype != FP8:
        return t
    if cfg.quant_method != "fp8":
        raise CheckpointError(f"tensor {name} is float8_e4m3fn but config.json has no quantization_config "
                              f"with quant_method 'fp8'")
    if keep_fp8:
        return t
    return dequantize_fp8(t, _scales(cfg, idx, name, t.shape), cfg.quant_block)


def _scales(cfg: ModelConfig, idx: "_TensorIndex", name: str, shape: tuple) -> np.ndarray:
    """weight_scale_inv of the FP8 weight `name` [out, in], checked against the block grid."""
    sname = name + "_scale_inv"
    s = idx.get(sname)
    if s is None:
        raise CheckpointError(f"missing tensor {sname}: the FP8 weight {name} needs its block scales")
    want = scale_shape(shape[-2], shape[-1], cfg.quant_block)
    if tuple(s.shape[-2:]) != want:
        raise CheckpointError(f"tensor {sname} has shape {tuple(s.shape)}, expected {want} for {name} "
                              f"{tuple(shape)} in blocks of {cfg.quant_block}")
    return s.astype(np.float32)


def _convert(cfg: ModelConfig, path: tuple, idx: _TensorIndex, shape: tuple) -> np.ndarray:
    leaf = path[-1]
    if cfg.model_type == "gpt_oss" and is_expert_path(path):
        return _gpt_oss_experts(cfg, path, idx, shape)
    names = _hf_names(cfg, path)
    if isinstance(names, list):
        if path[-2] == "expert_scale":     # FP8 experts kept: their scales, transposed like the matrices
            h, i = cfg.hidden_size, cfg.moe_intermediate_size
            torch_shape = (h, i) if leaf == "w_down" else (i, h)          # the weight's [out, in]
            return np.stack([_scales(cfg, idx, n.removesuffix("_scale_inv"), torch_shape).T for n in names])
        fused = names[0].rsplit(".experts.", 1)[0] + ".experts."
        if not idx.has(names[0]) and idx.has(fused + "down_proj"):
            return _fused_experts(cfg, path, idx, fused)
        mats = []
        want = tuple(shape[1:][::-1])      # torch layout [out, in]
        for n in names:
            t = _weight(cfg, idx, n, keep_fp8=cfg.expert_dtype is not None)
            if tuple(t.shape) != want:
                raise CheckpointError(f"tensor {n} has shape {tuple(t.shape)}, expected {want}")
            if cfg.expert_dtype is not None and t.dtype != FP8:
                raise CheckpointError(f"tensor {n} is {t.dtype}, expected float8_e4m3fn (FP8 experts kept as "
                                      f"published; load with fp8_experts='dequantize' to mix formats)")
            mats.append(t.T)
        return np.stack(mats)
    else:
        if not idx.has(names):
            if path == ("lm_head", "w") and cfg.tie_word_embeddings:
                return None
            raise CheckpointError(f"missing tensor {names}")
        arr = _weight(cfg, idx, names)
        if leaf in ("w", "router"):
            arr = arr.T
        elif leaf == "b" and arr.ndim != 1:
            raise CheckpointError(f"tensor {names} has shape {arr.shape}, expected {shape}")
    if tuple(arr.shape) != tuple(shape):
        shown = arr.shape[::-1] if leaf in ("w", "router") else arr.shape
        raise CheckpointError(f"tensor {names} has shape {tuple(shown)}, expected "
                              f"{tuple(shape[::-1]) if leaf in ('w', 'router') else tuple(shape)}")
    return arr


def _gpt_oss_experts(cfg: ModelConfig, path: tuple, idx: _TensorIndex, shape: tuple) -> np.ndarray:
    """gpt-oss experts, fused as published: gate_up_proj [E, H, 2I] (gate and up interleaved column by
    column) with gate_up_proj_bias [E, 2I], down_proj [E, I, H] with down_proj_bias [E, H]; or MXFP4
    (gate_up_proj_blocks / _scales ...), dequantized here."""
    pre = f"model.layers.{path[1]}.mlp.experts."
    base = "down_proj" if path[-1] == "w_down" else "gate_up_proj"
    if path[-2] == "expert_bias":
        name = pre + base + "_bias"
        arr = idx.get(name)
    elif idx.has(pre + base) or not idx.has(pre + base + "_blocks"):
        name = pre + base
        arr = idx.get(name)
    else:
        name = pre + base + "_blocks"
        scales = idx.get(pre + base + "_scales")
        if scales is None:
            raise CheckpointError(f"missing tensor {pre + base}_scales: the MXFP4 weight {name} needs its scales")
        try:
            arr = dequantize_mxfp4(idx.get(name), scales)
        except ValueError as e:
            raise CheckpointError(f"tensor {name}: {e}") from None
    if arr is None:
        raise CheckpointError(f"missing tensor {name}")
    if base == "gate_up_proj":
        arr = arr[..., 0::2] if path[-1] == "w_gate" else arr[..., 1::2]
    if tuple(arr.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name} gives {path[-1]} of shape {tuple(arr.shape)}, expected {tuple(shape)}")
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


def load_checkpoint(path: str, dtype, fp8_experts: str = "keep") -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """Reads a Hugging Face checkpoint directory. Returns (config, {param path: array}): weights in
    `dtype`, DeepSeek-style routers in float32, and, for an FP8 checkpoint, routed experts in
    float8_e4m3fn with float32 block scales (fp8_experts="keep") or dequantized to `dtype`
    (fp8_experts="dequantize": twice the expert memory of FP8 in bfloat16, four times in float32)."""
    if fp8_experts not in ("keep", "dequantize"):
        raise ValueError(f"fp8_experts must be 'keep' or 'dequantize', got {fp8_experts!r}")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory not found: {path}")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise CheckpointError(f"{path} has no config.json")
    cfg = load_config_file(cfg_path)
    if fp8_experts == "dequantize":
        cfg = dataclasses.replace(cfg, expert_dtype=None)
    idx = _TensorIndex(path)
    params = {}
    for p, (shape, want) in param_specs(cfg, dtype).items():
        arr = _convert(cfg, p, idx, shape)
        if arr is None:
            continue
        params[p] = arr.astype(want)
    return cfg, params


__all__ = ["CheckpointError", "ConfigError", "load_checkpoint", "random_params", "param_shapes", "param_specs",
           "is_expert_path", "EXPERT_PARAMS"]
