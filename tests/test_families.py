"""The families added for wide expert parallelism (deepseek_v32, glm4_moe, gpt_oss), on tiny presets
with random weights: 4 ranks with redundant experts score like 1 rank; a rank failure keeps every
token and moves the experts' per-slot arrays (biases, FP8 scales) with their matrices; V3.2's indexer
keys live in the layer's cache like the latent; bad configs get clear errors."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jax_elastic_moe as jem
from jax_elastic_moe.config import ConfigError, check_mooncake_support, from_hf_dict, load_config_file
from jax_elastic_moe.engine import resolve_preset
from jax_elastic_moe.model import EPContext, MoEModel
from jax_elastic_moe.model.loader import is_expert_path, random_params

TINY = ("tiny_glm4_moe", "tiny_gpt_oss", "tiny_deepseek_v32")
# longer than tiny_gpt_oss's window (8) and tiny_deepseek_v32's index_topk (8), batched with short ones
PROMPTS = [[3, 4, 5], list(range(10, 31)), [7], [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110]]


def expert_slots_match_backup(eng):
    """Every expert parameter (matrices, biases, scales) of every live slot holds the named expert's."""
    run, checked = eng._runtime.runner, set()
    for key, arr in run.params.items():
        path = tuple(int(p) if p.isdigit() else p for p in key.split("/"))
        if not is_expert_path(path):
            continue
        checked.add(path[3:])
        logical, got = eng._backup[path], np.asarray(arr)
        for s, e in enumerate(run.placement.phy2log[run.moe_index(path)]):
            want = logical[e] if e >= 0 else np.zeros_like(logical[0])
            assert np.array_equal(got[s], want), (key, s, e)
    return checked


@pytest.mark.parametrize("preset", TINY)
def test_four_ranks_with_redundant_experts_score_like_one(preset):
    ids = np.random.RandomState(0).randint(0, 256, (4, 21))
    with jem.Engine.from_config(preset, num_ranks=1, seed=0) as one, \
            jem.Engine.from_config(preset, num_ranks=4, redundant_experts=4, seed=0) as four:
        assert np.abs(four.score(ids) - one.score(ids)).max() <= 1e-5


@pytest.mark.parametrize("preset", TINY)
def test_rank_failure_keeps_tokens_and_moves_every_expert_array(preset):
    with jem.Engine.from_config(preset, num_ranks=1, seed=0) as one:
        want = [r.token_ids for r in one.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])]
    with jem.Engine.from_config(preset, num_ranks=4, redundant_experts=4, seed=0) as eng:
        eng.fail_rank(1, at_step=5)
        out = eng.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
        assert [r.token_ids for r in out] == want
        rec = eng.stats()["recoveries"][0]
        assert rec["failed_ranks"] == [1] and rec["moved_experts"] > 0
        checked = expert_slots_match_backup(eng)
    cfg = load_config_file(resolve_preset(preset))
    if cfg.expert_bias:
        assert ("expert_bias", "w_down") in checked
    if cfg.expert_dtype:
        assert ("expert_scale", "w_down") in checked


def _single_rank_ctx(cfg, tokens):
    n = tokens.size
    log2phy = jnp.broadcast_to(jnp.arange(cfg.num_experts, dtype=jnp.int32)[None, :, None],
                               (cfg.num_moe_layers, cfg.num_experts, 1))
    return EPContext(log2phy=log2phy, active=jnp.ones(1, jnp.int32), token_index=jnp.arange(n, dtype=jnp.int32),
                     valid=jnp.ones(n, bool), num_ranks=1, slots_per_rank=cfg.num_experts, axis_name=None,
                     backend="jax")


def test_indexer_keys_are_cached_like_the_latent_through_prefill_and_decode():
    cfg = load_config_file(resolve_preset("tiny_deepseek_v32"))
    params = random_params(cfg, jnp.float32, 0)
    graphdef, state = nnx.split(MoEModel(cfg, cfg.num_experts, jnp.float32), nnx.Param)
    flat = [(p, v.replace(jnp.asarray(params[p]))) for p, v in nnx.to_flat_state(state)]
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    b, s, length = 2, 20, 24                       # 20 > index_topk = 8: the indexer really picks
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 256, (b, s)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    cache = model.empty_cache(b, length)
    assert all(c["index_k"].shape == (b, length, cfg.index_head_dim) for c in cache)
    full, full_cache, _ = model(tokens, positions, cache, _single_rank_ctx(cfg, tokens))
    # the same tokens as a 12-token prefill, then one token at a time
    part, cache, _ = model(tokens[:, :12], positions[:, :12], model.empty_cache(b, length),
                           _single_rank_ctx(cfg, tokens[:, :12]))
    outs = [part]
    for t in range(12, s):
        h, cache, _ = model(tokens[:, t:t + 1], positions[:, t:t + 1], cache, _single_rank_ctx(cfg, tokens[:, :1]))
        outs.append(h)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), atol=2e-5, rtol=0)
    for a, c in zip(full_cache, cache):
        np.testing.assert_allclose(np.asarray(c["index_k"]), np.asarray(a["index_k"]), atol=1e-5, rtol=0)
        assert np.abs(np.asarray(a["index_k"])[:, :s]).sum(-1).min() > 0      # written at every position
        assert not np.asarray(a["index_k"])[:, s:].any()                      # and nowhere else
    # positions past the cache are dropped, as for the latent
    _, dropped, _ = model(tokens[:, :1], jnp.full((b, 1), length, jnp.int32), model.empty_cache(b, length),
                          _single_rank_ctx(cfg, tokens[:, :1]))
    assert not any(np.asarray(c["index_k"]).any() or np.asarray(c["latent"]).any() for c in dropped)


def _raw(**over):
    d = dict(model_type="deepseek_v32", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
             qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
             index_n_heads=2, index_head_dim=16, index_topk=4)
    d.update(over)
    return {k: v for k, v in d.items() if v is not None}


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="q_lora_rank"):
        from_hf_dict(_raw(q_lora_rank=None))
    with pytest.raises(ConfigError, match="index_topk"):
        from_hf_dict(_raw(index_topk=0))
    with pytest.raises(ConfigError, match="index_head_dim=4 is smaller"):
        from_hf_dict(_raw(index_head_dim=4))
    oss = dict(model_type="gpt_oss", vocab_size=64, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    with pytest.raises(ConfigError, match="layer_types"):
        from_hf_dict({**oss, "layer_types": ["sliding_attention", "chunked_attention"]})
    with pytest.raises(ConfigError, match="sliding_window"):
        from_hf_dict({**oss, "sliding_window": None})
    assert from_hf_dict({**oss, "sliding_window": 4}).window(1) is None          # full layer
    assert from_hf_dict({**oss, "sliding_window": 4}).window(0) == 4
    glm = dict(model_type="glm4_moe", vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, n_routed_experts=4,
               num_experts_per_tok=2)
    assert from_hf_dict(glm).rope_dim == 4                                        # GLM's default: half
    with pytest.raises(ConfigError, match="partial_rotary_factor=0.1"):
        from_hf_dict({**glm, "partial_rotary_factor": 0.1})          # rotates int(0.8) = 0 dims


def test_mooncake_support_is_checked_per_family():
    for preset in ("tiny_glm4_moe", "tiny"):
        check_mooncake_support(load_config_file(resolve_preset(preset)))
    with pytest.raises(ConfigError, match="gpt_oss.*biases"):
        check_mooncake_support(load_config_file(resolve_preset("tiny_gpt_oss")))
    with pytest.raises(ConfigError, match="FP8"):
        check_mooncake_support(load_config_file(resolve_preset("tiny_deepseek_v32")))


@pytest.mark.parametrize("preset", ["tiny_glm4_moe", "tiny_deepseek_v32"])
def test_mooncake_mode_serves_glm_and_v32_through_a_rank_kill(preset, tmp_path):
    pytest.importorskip("mooncake.engine", reason="needs the elastic extras")
    pytest.importorskip("zmq")
    import yaml
    from runtime_support import time_limit
    with open(resolve_preset(preset)) as f:
        raw = yaml.safe_load(f)
    raw.pop("quantization_config", None)           # FP8 experts are spmd-only (check_mooncake_support)
    path = tmp_path / "preset.yaml"
    path.write_text(yaml.safe_dump(raw))
    with jem.Engine.from_config(str(path), num_ranks=1, seed=0) as one:
        want = [r.token_ids for r in one.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])]
    with time_limit(600, "mooncake engine"):
        with jem.Engine.from_config(str(path), num_ranks=3, redundant_experts=4, seed=0, mode="mooncake") as eng:
            eng.fail_rank(1, how="kill", at_step=3)
            out = eng.generate(PROMPTS, max_new_tokens=10, stop_token_ids=[])
            assert [r.token_ids for r in out] == want
            assert eng.stats()["recoveries"][0]["failed_ranks"] == [1]


def test_full_size_presets_read_for_planning():
    from jax_elastic_moe.placement import planner
    v32, glm, oss = (load_config_file(resolve_preset(p)) for p in ("deepseek_v32", "glm4_5", "gpt_oss_120b"))
    assert (v32.index_topk, v32.expert_dtype, v32.quant_block, v32.num_moe_layers) == (2048, "float8_e4m3fn",
                                                                                       (128, 128), 58)
    assert (glm.rope_dim, glm.num_experts, glm.num_moe_layers, glm.qk_norm) == (64, 160, 89, True)
    assert (oss.num_experts, oss.sliding_layers.count(True), oss.window(0), oss.window(1)) == (128, 18, 128, None)
    assert dict(oss.rope_scaling)["factor"] == 32.0
    for preset, moe_layers in (("deepseek_v32", 58), ("glm4_5", 89), ("gpt_oss_120b", 36)):
        assert planner.read_model_shape(resolve_preset(preset)).num_moe_layers == moe_layers
