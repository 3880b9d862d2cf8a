"""Broken configs and checkpoints get a clear error naming the field or the tensor."""
import json
import pathlib

import numpy as np
import pytest
import yaml

import jax_elastic_moe as jem
from jax_elastic_moe.config import ConfigError, resolve_preset


def tiny_with(tmp_path, **changes):
    with open(resolve_preset("tiny")) as f:
        cfg = yaml.safe_load(f)
    cfg.update(changes)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.parametrize("changes, match", [
    (dict(rms_norm_eps=-1.0), "rms_norm_eps must be > 0, got -1.0"),
    (dict(head_dim=12.7), "head_dim must be an integer, got 12.7"),
    (dict(eos_token_id=5000), "eos_token_id 5000 is outside the vocabulary \\[0, 256\\)"),
    (dict(rope_theta="fast"), "rope_theta must be a finite number, got 'fast'"),
    (dict(max_position_embeddings=0), "max_position_embeddings must be >= 1"),
    (dict(num_experts=True), "num_experts must be an integer, got True"),
    (dict(decoder_sparse_step=0.5), "decoder_sparse_step must be an integer"),
])
def test_bad_config_fields_are_named(tmp_path, changes, match):
    with pytest.raises(ConfigError, match=match):
        jem.Engine.from_config(tiny_with(tmp_path, **changes))


@pytest.mark.parametrize("dtype", [np.int32, np.bool_])
def test_non_float_expert_tensor_is_refused(hf_checkpoints, tmp_path, dtype):
    from safetensors.numpy import load_file, save_file
    src = pathlib.Path(hf_checkpoints["qwen3_moe"])
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text((src / "config.json").read_text())
    tensors = {}
    for f in src.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    name = next(k for k in sorted(tensors) if "experts" in k and "down_proj" in k)
    tensors[name] = np.ones(tensors[name].shape, dtype)
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(jem.CheckpointError, match=f"tensor {name} has dtype {np.dtype(dtype)}"):
        jem.Engine.from_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen3_moe"
