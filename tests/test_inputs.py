"""Bad arguments get a clear error naming the setting (and the prompt), before any compute; the CLI
prints one line and exits 2."""
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

import jax_elastic_moe as jem


@pytest.fixture(scope="module")
def eng():
    with jem.Engine.from_config("tiny", num_ranks=1, seed=0, max_model_len=64, seqs_per_rank=2) as e:
        yield e


@pytest.mark.parametrize("prompts, kind, match", [
    ([[1.5, 2.7]], TypeError, "prompt 0: token ids must be ints, got 1.5"),
    ([[True, False]], TypeError, "prompt 0: token ids must be ints, got True"),
    ([[[1, 2], [3]]], TypeError, "token ids must be ints"),
    ([1, 2, 3], TypeError, "flat list of ints"),
    (None, TypeError, "prompts must be a list"),
    ("hello", TypeError, "prompts must be a list"),
    ([[1], []], ValueError, "prompt 1 is empty"),
    ([[1, 300]], ValueError, "prompt 0: token id 300 is outside the vocabulary"),
])
def test_bad_prompts(eng, prompts, kind, match):
    with pytest.raises(kind, match=match):
        eng.generate(prompts)


@pytest.mark.parametrize("kw, kind, match", [
    (dict(max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (dict(max_new_tokens=10 ** 9), ValueError, "more than max_model_len=64"),
    (dict(max_new_tokens=[1, 2]), ValueError, "max_new_tokens has 2 values for 1 prompts"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number"),
    (dict(temperature=-1), ValueError, "temperature must be"),
    (dict(top_p=0.0), ValueError, "top_p must be a finite number in \\(0"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(seed=2 ** 63), ValueError, "seed must be in \\[0, 4294967296\\)"),
    (dict(seed=-1), ValueError, "seed must be in"),
    (dict(seed=1.0), TypeError, "seed must be an int"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids must be a list"),
    (dict(stop_token_ids=[-5]), ValueError, "stop_token_ids must be in \\[0, 256\\)"),
    (dict(stop_token_ids=[10 ** 6]), ValueError, "stop_token_ids must be in"),
])
def test_bad_generate_settings(eng, kw, kind, match):
    with pytest.raises(kind, match=match):
        eng.generate([[1, 2, 3]], **kw)


def test_numpy_prompts_and_per_prompt_stop_lists_are_accepted(eng):
    outs = eng.generate([np.array([5, 6, 7]), [8, 9]], max_new_tokens=3, stop_token_ids=[[], None])
    assert [len(o.token_ids) for o in outs] == [3, len(outs[1].token_ids)] and len(outs[1].token_ids) <= 3


@pytest.mark.parametrize("kw, match", [
    (dict(num_ranks=0), "num_ranks must be an int >= 1, got 0"),
    (dict(num_ranks=-1), "num_ranks must be an int >= 1"),
    (dict(redundant_experts=-2), "redundant_experts must be an int >= 0"),
    (dict(seqs_per_rank=0), "seqs_per_rank must be an int >= 1"),
    (dict(max_model_len=10 ** 6), "exceeds the model's max_position_embeddings"),
    (dict(mode="nccl"), "mode must be one of"),
    (dict(admission="fifo"), "admission must be one of"),
    (dict(dtype="int8"), "dtype must be one of"),
])
def test_engine_settings_are_checked_before_any_weight(kw, match):
    with mock.patch("jax_elastic_moe.engine.random_params", side_effect=AssertionError("weights built")):
        with pytest.raises(ValueError, match=match):
            jem.Engine.from_config("tiny", **kw)


def test_closed_engine_refuses_everything():
    e = jem.Engine.from_config("tiny", num_ranks=1, seed=0, max_model_len=32)
    e.close()
    for call in (lambda: e.fail_rank(0), lambda: e.fail_rank(0, at_step=1), lambda: e.generate([[1]])):
        with pytest.raises(RuntimeError, match="closed"):
            call()


@pytest.mark.parametrize("args, match", [
    (["generate", "--ranks", "0"], "--ranks: 0 is not >= 1"),
    (["generate", "--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
    (["generate", "--config", "tiny", "--ranks", "1", "--redundant", "0", "--prompt-len", "2000"],
     "more than max_model_len"),
    (["bench", "throughput", "--batch", "-3"], "--batch: -3 is not >= 1"),
])
def test_cli_bad_arguments_one_line_exit_2(args, match):
    out = subprocess.run([sys.executable, "-m", "jax_elastic_moe.cli", *args], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()[-1]) > 0
    assert pytest.importorskip("re").search(match, out.stderr), out.stderr
