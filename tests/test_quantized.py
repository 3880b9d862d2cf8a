"""Quantized checkpoints as published: FP8 block-scaled (a tiny DeepSeek-V3 whose weights are quantized
here, block-wise, with numpy) and gpt-oss MXFP4 experts."""
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.config import ConfigError
from jax_elastic_moe.model.loader import CheckpointError, is_expert_path, load_checkpoint
from jax_elastic_moe.model.quant import dequantize_mxfp4

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

BLOCK = (128, 128)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}


def quantize_blocks(w: np.ndarray, block=BLOCK):
    """w [out, in] float32 -> (float8_e4m3fn weight, weight_scale_inv [ceil(out/b0), ceil(in/b1)], the
    dequantized float32 weight): each block scaled so its largest magnitude maps to 448, FP8's max."""
    out, inn = w.shape
    r, c = -(-out // block[0]), -(-inn // block[1])
    tiles = np.zeros((r * block[0], c * block[1]), np.float32)
    tiles[:out, :inn] = w
    tiles = tiles.reshape(r, block[0], c, block[1])
    amax = np.abs(tiles).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = (tiles / scale[:, None, :, None]).reshape(r * block[0], c * block[1])[:out, :inn].astype(F8)
    deq = q.astype(np.float32) * np.kron(scale, np.ones(block, np.float32))[:out, :inn]
    return q, scale, deq


def _torch(a: np.ndarray):
    if a.dtype == F8:
        return torch.from_numpy(a.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    return torch.from_numpy(np.ascontiguousarray(a))


def _write(path, tensors: dict, config: dict):
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    save_file({k: _torch(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    return str(path)


def _numpy(t) -> np.ndarray:
    if t.dtype == torch.float8_e4m3fn:
        return t.view(torch.uint8).numpy().view(F8)
    return t.numpy()


def _read(path) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    with open(os.path.join(path, "config.json")) as f:
        return {k: _numpy(t) for k, t in load_file(os.path.join(path, "model.safetensors")).items()}, json.load(f)


@pytest.fixture(scope="module")
def fp8(tmp_path_factory):
    """{"orig": float32 model, "fp8": its FP8 block-quantized checkpoint, "deq": the same weights
    dequantized to float32} and the transformers model of "orig"."""
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(vocab_size=96, hidden_size=160, intermediate_size=320, moe_intermediate_size=192,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
                              n_shared_experts=1, num_experts_per_tok=3, q_lora_rank=64, kv_lora_rank=32,
                              qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16, n_group=4, topk_group=2,
                              first_k_dense_replace=1, routed_scaling_factor=2.5, initializer_range=0.1,
                              max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=0)
    model = tf.DeepseekV3ForCausalLM(cfg).eval()
    root = tmp_path_factory.mktemp("fp8")
    model.save_pretrained(root / "orig")
    state, config = _read(root / "orig")
    quantized, dequantized = {}, {}
    for name, w in state.items():
        # as published: every linear weight of the layers but the router's; embeddings, norms, lm_head kept
        if name.endswith(".weight") and w.ndim == 2 and ".layers." in name and ".mlp.gate." not in name:
            q, s, d = quantize_blocks(w.astype(np.float32))
            quantized[name], quantized[name + "_scale_inv"], dequantized[name] = q, s, d
        else:
            quantized[name] = dequantized[name] = w
    paths = {"orig": str(root / "orig"),
             "fp8": _write(root / "fp8", quantized, {**config, "quantization_config": FP8_CONFIG}),
             "deq": _write(root / "deq", dequantized, config)}
    return paths, model


def _expert_bytes(eng) -> int:
    return sum(arr.nbytes for key, arr in eng._runtime.runner.params.items() if is_expert_path(tuple(key.split("/"))))


def test_fp8_checkpoint_loads_as_published_and_matches_the_dequantized_model(fp8):
    paths, hf = fp8
    cfg, params = load_checkpoint(paths["fp8"], np.float32)
    assert cfg.expert_dtype == "float8_e4m3fn" and cfg.quant_block == BLOCK
    assert params[("layers", 1, "mlp", "w_gate")].dtype == F8                     # experts stay FP8
    assert params[("layers", 1, "mlp", "expert_scale", "w_down")].shape == (8, 2, 2)  # [E, in 192, out 160]
    _, deq = load_checkpoint(paths["deq"], np.float32)
    np.testing.assert_array_equal(params[("layers", 0, "attn", "q_b", "w")], deq[("layers", 0, "attn", "q_b", "w")])
    ids = np.random.RandomState(3).randint(0, 96, (3, 11))
    with jem.Engine.from_pretrained(paths["fp8"], num_ranks=2, redundant_experts=2) as e8, \
            jem.Engine.from_pretrained(paths["deq"], num_ranks=2, redundant_experts=2) as e32:
        got, want = e8.score(ids), e32.score(ids)
    assert np.abs(got - want).max() <= 1e-4
    # transformers on the dequantized weights gives the same logits; against the unquantized model both
    # differ by the same amount: FP8 rounding of the weights, nothing of the engine's own
    from hf_models import hf_model
    with torch.no_grad():
        hf_deq = hf_model(paths["deq"])(torch.tensor(ids)).logits.numpy()
        orig = hf(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - hf_deq).max() <= 1e-4
    assert np.abs(got - orig).max() > 1e-3                     # the rounding is there to see
    np.testing.assert_allclose(got - orig, hf_deq - orig, atol=1e-4, rtol=0)


def test_fp8_expert_memory_is_about_half_of_bfloat16(fp8):
    paths, _ = fp8
    ids = np.random.RandomState(4).randint(0, 96, (2, 9))
    cfg16, params16 = load_checkpoint(paths["fp8"], np.dtype(ml_dtypes.bfloat16), fp8_experts="dequantize")
    with jem.Engine.from_pretrained(paths["fp8"], num_ranks=2, redundant_experts=2, dtype="bfloat16") as e8, \
            jem.Engine(cfg16, params16, num_ranks=2, redundant_experts=2, dtype="bfloat16") as e16:
        b8, b16 = _expert_bytes(e8), _expert_bytes(e16)
        backup8 = sum(a.nbytes for a in e8._backup.values())
        backup16 = sum(a.nbytes for a in e16._backup.values())
        a, b = e8.score(ids), e16.score(ids)       # FP8 tiles scaled in float32 vs weights rounded to bf16
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max() and (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
    print(f"expert bytes on the ranks: FP8 {b8} vs bfloat16 {b16} ({b8 / b16:.4f}); "
          f"host backup: {backup8} vs {backup16}")
    assert 0.5 <= b8 / b16 <= 0.51 and 0.5 <= backup8 / backup16 <= 0.51


def test_fp8_model_survives_a_rank_failure_with_identical_tokens(fp8):
    paths, _ = fp8
    prompts = [[5, 17, 33], [9, 2, 44, 61, 7, 8, 90], [70], [3, 3, 4]]
    with jem.Engine.from_pretrained(paths["fp8"], num_ranks=1) as one:
        want = [r.token_ids for r in one.generate(prompts, max_new_tokens=10, stop_token_ids=[])]
    with jem.Engine.from_pretrained(paths["fp8"], num_ranks=4, redundant_experts=4) as eng:
        assert all(a.dtype == F8 for p, a in eng._backup.items() if p[-2] == "mlp")   # host backup: FP8 bytes
        eng.fail_rank(2, at_step=4)
        out = eng.generate(prompts, max_new_tokens=10, stop_token_ids=[])
        assert [r.token_ids for r in out] == want
        rec = eng.stats()["recoveries"][0]
        assert rec["failed_ranks"] == [2] and rec["moved_experts"] > 0
        slots = {k: a for k, a in eng._runtime.runner.params.items() if k.endswith("mlp/w_up")}
        assert slots and all(a.dtype == F8 for a in slots.values())


def test_quantization_errors_name_the_field_or_tensor(fp8, tmp_path):
    paths, _ = fp8
    tensors, config = _read(paths["fp8"])
    bad = _write(tmp_path / "gptq", tensors, {**config, "quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ConfigError, match="quant_method 'gptq' is not supported"):
        jem.Engine.from_pretrained(bad)
    block = {**config, "quantization_config": {**FP8_CONFIG, "weight_block_size": [128]}}
    with pytest.raises(ConfigError, match="weight_block_size"):
        load_checkpoint(_write(tmp_path / "block", tensors, block), np.float32)
    for name in ("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv",
                 "model.layers.0.self_attn.q_b_proj.weight_scale_inv"):
        path = _write(tmp_path / name, {k: v for k, v in tensors.items() if k != name}, config)
        with pytest.raises(CheckpointError, match=f"missing tensor {name}"):
            load_checkpoint(path, np.float32)
    wrong = dict(tensors, **{"model.layers.0.mlp.down_proj.weight_scale_inv": np.ones((1, 1), np.float32)})
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.down_proj.weight_scale_inv has shape \(1, 1\)"):
        load_checkpoint(_write(tmp_path / "shape", wrong, config), np.float32)
    plain = {k: v for k, v in config.items() if k != "quantization_config"}
    with pytest.raises(CheckpointError, match="float8_e4m3fn but config.json has no quantization_config"):
        load_checkpoint(_write(tmp_path / "noqc", tensors, plain), np.float32)


def test_mxfp4_dequantization_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    rng = np.random.RandomState(0)
    blocks = rng.randint(0, 256, (3, 10, 2, 16)).astype(np.uint8)
    scales = rng.randint(120, 131, (3, 10, 2)).astype(np.uint8)
    want = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    np.testing.assert_array_equal(dequantize_mxfp4(blocks, scales), want.numpy())


def test_mxfp4_gpt_oss_checkpoint_matches_transformers(tmp_path):
    """Experts set to MXFP4-representable weights; the checkpoint stores them as blocks + scales."""
    import transformers as tf
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    torch.manual_seed(0)
    rng = np.random.RandomState(1)
    cfg = tf.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                          num_experts_per_tok=2, sliding_window=4, initializer_range=0.1, max_position_embeddings=256)
    model = tf.GptOssForCausalLM(cfg).eval()
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name, out, inn in (("gate_up_proj", 64, 64), ("down_proj", 64, 32)):
                blocks = rng.randint(0, 256, (4, out, inn // 32, 16)).astype(np.uint8)
                scales = rng.randint(121, 126, (4, out, inn // 32)).astype(np.uint8)
                w = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
                getattr(layer.mlp.experts, name).copy_(w)
                packed[f"model.layers.{i}.mlp.experts.{name}"] = (blocks, scales)
    model.save_pretrained(tmp_path / "float")
    tensors, config = _read(tmp_path / "float")
    for name, (blocks, scales) in packed.items():
        del tensors[name]
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
    path = _write(tmp_path / "mxfp4", tensors, {**config, "quantization_config": {"quant_method": "mxfp4"}})
    ids = np.random.RandomState(2).randint(0, 96, (2, 9))
    with jem.Engine.from_pretrained(path, num_ranks=2, redundant_experts=2) as eng:
        got = eng.score(ids)
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    assert np.abs(got - want).max() <= 1e-4
    shutil.rmtree(tmp_path / "float")
    missing = _write(tmp_path / "noscales", {k: v for k, v in tensors.items()
                                             if k != "model.layers.1.mlp.experts.down_proj_scales"},
                     {**config, "quantization_config": {"quant_method": "mxfp4"}})
    with pytest.raises(CheckpointError, match="missing tensor model.layers.1.mlp.experts.down_proj_scales"):
        load_checkpoint(missing, np.float32)
