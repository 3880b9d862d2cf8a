"""The model against Hugging Face transformers (PyTorch, CPU) on tiny random checkpoints."""
import numpy as np
import pytest

import jax_elastic_moe as jem
from hf_models import FAMILIES, hf_model

torch = pytest.importorskip("torch")


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(hf_checkpoints, family):
    path = hf_checkpoints[family]
    ref = hf_model(path)
    rng = np.random.RandomState(1)
    with jem.Engine.from_pretrained(path, num_ranks=2, redundant_experts=2, dtype="float32") as eng:
        for batch, seq in [(1, 1), (3, 7), (2, 19)]:
            ids = rng.randint(0, 96, (batch, seq))
            got = eng.score(ids)
            want = hf_logits(ref, ids)
            assert got.shape == want.shape
            assert np.abs(got - want).max() <= 1e-4, (family, batch, seq, np.abs(got - want).max())


@pytest.mark.parametrize("family", ["deepseek_v32", "glm4_moe", "gpt_oss"])
def test_four_ranks_with_redundant_experts_equal_one_rank(hf_checkpoints, family):
    path = hf_checkpoints[family]
    ids = np.random.RandomState(4).randint(0, 96, (4, 23))     # past the window and index_topk
    num_experts = jem.config.load_config_file(f"{path}/config.json").num_experts
    redundant = (-num_experts) % 4 or 4          # slots divide over 4 ranks, with spare replicas
    with jem.Engine.from_pretrained(path, num_ranks=1) as one, \
            jem.Engine.from_pretrained(path, num_ranks=4, redundant_experts=redundant) as four:
        want, got = one.score(ids), four.score(ids)
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_transformers(hf_checkpoints, family):
    path = hf_checkpoints[family]
    ref = hf_model(path)
    prompts = [[5, 17, 33], [9, 2, 44, 61, 7, 8, 90], [70]]
    num_experts = jem.config.load_config_file(f"{path}/config.json").num_experts
    redundant = (-num_experts) % 4 or 4          # slots divide over 4 ranks, with spare replicas
    with jem.Engine.from_pretrained(path, num_ranks=4, redundant_experts=redundant, dtype="float32") as eng:
        outs = eng.generate(prompts, max_new_tokens=16, temperature=0.0, stop_token_ids=[])
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            seq = ref.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
        assert out.token_ids == seq[0, len(prompt):].tolist(), family
        assert out.finish_reason == "length"


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "glm4_moe", "deepseek_v32"])
def test_bfloat16_as_close_to_float32_as_transformers_bfloat16(hf_checkpoints, family):
    # A bf16 rounding that flips a routing (or indexer) choice moves a token's logits a lot, in
    # transformers too, and not at the same tokens: most tokens stay close, and the worst one is no
    # further from float32 than transformers' own bfloat16 run gets.
    import transformers as tf
    path = hf_checkpoints[family]
    ids = np.random.RandomState(2).randint(0, 96, (2, 9))
    with jem.Engine.from_pretrained(path, num_ranks=2, dtype="bfloat16") as e16:
        got = e16.score(ids)
    assert got.dtype == np.float32
    with torch.no_grad():
        f32 = hf_logits(hf_model(path), ids)
        hf16 = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()(
            torch.tensor(ids)).logits.float().numpy()
    scale = np.abs(f32).max()
    err = np.abs(got - f32).max(-1)                   # per token
    assert np.median(err) <= 0.03 * scale
    assert err.max() <= max(0.05 * scale, 1.25 * np.abs(hf16 - f32).max())
    assert (got.argmax(-1) == f32.argmax(-1)).mean() >= 0.8
