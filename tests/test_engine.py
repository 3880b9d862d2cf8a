"""Expert parallelism: results independent of ranks, placement and active mask; no recompilation;
bad input rejected before any compute."""
import json
import os

import numpy as np
import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.placement import Placement, rebalance
from runtime_support import COUNTER

TINY = "tiny"




@pytest.fixture(scope="module")
def engines():
    one = jem.Engine.from_config(TINY, num_ranks=1, seed=0)
    four = jem.Engine.from_config(TINY, num_ranks=4, redundant_experts=4, seed=0)
    yield one, four
    one.close()
    four.close()


def random_placement(rng, num_layers, num_experts, num_ranks, slots_per_rank, max_replicas):
    """A random valid placement: every expert once, the spare slots random experts or empty."""
    phy2log = np.full((num_layers, num_ranks * slots_per_rank), -1, np.int32)
    for layer in range(num_layers):
        slots = rng.permutation(num_ranks * slots_per_rank)
        phy2log[layer, slots[:num_experts]] = np.arange(num_experts)
        for s in slots[num_experts:]:
            e = rng.randint(-1, num_experts)
            if e < 0 or (phy2log[layer] == e).sum() < max_replicas:
                phy2log[layer, s] = e
    return Placement.from_phy2log(phy2log, num_experts, num_ranks, max_replicas)


def test_four_ranks_equal_one_rank(engines):
    one, four = engines
    ids = np.random.RandomState(0).randint(0, 256, (5, 13))
    base = one.score(ids)
    assert np.abs(four.score(ids) - base).max() <= 1e-5


def test_random_placements_and_masks_same_logits_without_recompiling(engines):
    one, four = engines
    ids = np.random.RandomState(1).randint(0, 256, (4, 9))
    base = one.score(ids)
    rng = np.random.RandomState(2)
    p0 = four.placement
    four.score(ids)                     # the step compiles once for this shape,
    four.set_placement(p0)              # the weight mover once per expert weight shape
    before = COUNTER.count
    for _ in range(3):
        p = random_placement(rng, p0.num_layers, p0.num_logical, 4, p0.slots_per_rank, four.max_replicas)
        four.set_placement(p)
        assert four.placement == p.with_max_replicas(four.max_replicas)
        assert np.abs(four.score(ids) - base).max() <= 1e-5
    # a mask that leaves every expert a live replica: round robin over 4 ranks x 3 slots with 8 experts
    four.set_placement(rebalance(np.ones((p0.num_layers, 8)), 4, 3, max_replicas=four.max_replicas))
    four.set_active([1, 1, 1, 1])
    with pytest.raises(jem.PlacementError, match="no replica on an active rank"):
        four.set_active([1, 0, 1, 1])   # rank 1 holds the only copies of experts 4 and 5
    p_alive = rebalance(np.ones((p0.num_layers, 8)), 4, 3, alive=[1, 1, 1, 0], max_replicas=four.max_replicas)
    four.set_placement(p_alive)
    four.set_active([1, 1, 1, 0])
    assert np.abs(four.score(ids) - base).max() <= 1e-5
    four.set_active([1, 1, 1, 1])
    assert COUNTER.count == before, "placement or mask changes compiled again"


def test_generate_same_tokens_for_any_rank_count(engines):
    one, four = engines
    prompts = [[3, 4, 5], [10, 20, 30, 40, 50, 60], [7]]
    a = one.generate(prompts, max_new_tokens=10, stop_token_ids=[])
    b = four.generate(prompts, max_new_tokens=10, stop_token_ids=[])
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert all(len(r.token_ids) == 10 and r.finish_reason == "length" for r in a)


def test_sampling_is_seeded_and_top_p_one_token_is_greedy(engines):
    _, four = engines
    prompts = [[1, 2, 3], [4, 5]]
    s1 = four.generate(prompts, max_new_tokens=8, temperature=1.0, seed=7, stop_token_ids=[])
    s2 = four.generate(prompts, max_new_tokens=8, temperature=1.0, seed=7, stop_token_ids=[])
    s3 = four.generate(prompts, max_new_tokens=8, temperature=1.0, seed=8, stop_token_ids=[])
    assert [r.token_ids for r in s1] == [r.token_ids for r in s2]
    assert [r.token_ids for r in s1] != [r.token_ids for r in s3]
    greedy = four.generate(prompts, max_new_tokens=8, stop_token_ids=[])
    tiny_p = four.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=3, stop_token_ids=[])
    assert [r.token_ids for r in tiny_p] == [r.token_ids for r in greedy]


def test_stop_tokens_end_a_sequence(engines):
    _, four = engines
    free = four.generate([[1, 2, 3]], max_new_tokens=8, stop_token_ids=[])[0].token_ids
    stop = free[2]
    first = free.index(stop)
    out = four.generate([[1, 2, 3]], max_new_tokens=8, stop_token_ids=[stop])[0]
    assert out.token_ids == free[:first + 1]
    assert out.finish_reason == "stop"


def test_expert_loads_count_routed_tokens(engines):
    _, four = engines
    four.generate([[1, 2, 3, 4]], max_new_tokens=2, stop_token_ids=[])
    loads = four.expert_loads()
    assert loads.shape == (2, 8)
    # each real token picks top-2 experts per MoE layer: 4 prompt tokens + 1 decode step, at least
    assert (loads.sum(1) % 2 == 0).all() and loads.sum(1).min() >= 10


def test_bad_input_is_rejected_clearly(engines, tmp_path):
    _, four = engines
    with pytest.raises(ValueError, match="outside the vocabulary"):
        four.score([[1, 2, 999]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        four.generate([[1, -1]])
    with pytest.raises(ValueError, match="no prompts"):
        four.generate([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        four.generate([[1], []])
    with pytest.raises(ValueError, match="tokenizer"):
        four.generate(["hello"])
    with pytest.raises(ValueError, match="divide evenly"):
        jem.Engine.from_config(TINY, num_ranks=4, redundant_experts=3)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_type: gpt2\nhidden_size: 8\n")
    with pytest.raises(jem.ConfigError, match="unknown model_type 'gpt2'"):
        jem.Engine.from_config(str(bad))
    with pytest.raises(jem.ConfigError, match="not found"):
        jem.Engine.from_config("no_such_preset")


def test_checkpoint_errors_name_the_tensor(hf_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    src = hf_checkpoints["mixtral"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    cfg = json.load(open(os.path.join(src, "config.json")))

    def write(name, ts):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        save_file(ts, str(d / "model.safetensors"))
        return str(d)

    missing = dict(tensors)
    del missing["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(jem.CheckpointError, match=r"missing tensor model\.layers\.1\.self_attn\.k_proj\.weight"):
        jem.Engine.from_pretrained(write("missing", missing))
    shaped = dict(tensors)
    shaped["model.layers.0.block_sparse_moe.experts.3.w2.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(jem.CheckpointError, match=r"experts\.3\.w2\.weight has shape"):
        jem.Engine.from_pretrained(write("shaped", shaped))
    with pytest.raises(jem.CheckpointError, match="no config.json"):
        jem.Engine.from_pretrained(str(tmp_path))


def test_sharded_checkpoint_with_index(hf_checkpoints, tmp_path):
    from safetensors.numpy import load_file, save_file
    src = hf_checkpoints["qwen3_moe"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    names = sorted(tensors)
    halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    (tmp_path / "config.json").write_text(open(os.path.join(src, "config.json")).read())
    ids = np.array([[1, 2, 3, 4]])
    with jem.Engine.from_pretrained(src) as a, jem.Engine.from_pretrained(str(tmp_path)) as b:
        assert np.array_equal(a.score(ids), b.score(ids))


def test_string_prompts_with_tokenizer(hf_checkpoints, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import shutil
    d = tmp_path / "tok"
    shutil.copytree(hf_checkpoints["qwen3_moe"], d)
    vocab = {f"w{i}": i for i in range(96)}
    vocab["[UNK]"] = 95
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.decoder = tokenizers.decoders.WordPiece()
    tok.save(str(d / "tokenizer.json"))
    with jem.Engine.from_pretrained(str(d)) as eng:
        by_text = eng.generate(["w5 w17 w33"], max_new_tokens=4, stop_token_ids=[])[0]
        by_ids = eng.generate([[5, 17, 33]], max_new_tokens=4, stop_token_ids=[])[0]
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text.split() == [f"w{t}" if t != 95 else "[UNK]" for t in by_ids.token_ids]


def test_rebalance_from_measured_loads_keeps_results(engines):
    one, four = engines
    prompts = [[int(t) for t in np.random.RandomState(i).randint(0, 256, 12)] for i in range(6)]
    want = [r.token_ids for r in one.generate(prompts, max_new_tokens=6, stop_token_ids=[])]
    four.generate(prompts, max_new_tokens=6, stop_token_ids=[])
    loads = four.expert_loads()
    before = four.placement.imbalance(loads).max()
    p = four.rebalance()
    assert four.placement == p
    # the hottest expert of each layer gets at least as many replicas as the coldest
    hot, cold = loads.argmax(1), loads.argmin(1)
    assert all(p.logcnt[l, hot[l]] >= p.logcnt[l, cold[l]] for l in range(loads.shape[0]))
    assert p.imbalance(loads).max() <= before
    assert [r.token_ids for r in four.generate(prompts, max_new_tokens=6, stop_token_ids=[])] == want
