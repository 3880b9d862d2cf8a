"""The non-elastic jax.distributed baseline (runtime/distributed.py): 2 processes over gloo give the
tokens of the one-device engine, and every process is gone afterwards."""
import numpy as np
import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.config import from_hf_dict, read_config_dict
from jax_elastic_moe.config import resolve_preset
from jax_elastic_moe.placement import rebalance
from jax_elastic_moe.runtime.distributed import run_baseline
from runtime_support import time_limit

PROMPTS = [[3, 4, 5, 6], [10, 20, 30, 40], [7, 8, 9, 1]]
NEW = 5


@pytest.mark.parametrize("redundant", [2])
def test_baseline_matches_one_device(redundant):
    with jem.Engine.from_config("tiny", num_ranks=1, seed=0) as eng:
        want = [r.token_ids for r in eng.generate(PROMPTS, max_new_tokens=NEW, stop_token_ids=[])]
    cfg = from_hf_dict(read_config_dict(resolve_preset("tiny")))
    ranks = 2
    placement = rebalance(np.ones((cfg.num_moe_layers, cfg.num_experts)), ranks,
                          (cfg.num_experts + redundant) // ranks)
    with time_limit(400, "jax.distributed baseline"):
        result = run_baseline("tiny", "float32", ranks, placement, 0, PROMPTS, NEW, repeats=1, timeout=380)
    assert result["outputs"] == want
    assert [r.get("same", True) for r in result["runs"]] == [True, True]
    assert result["runs"][1]["tokens_per_s"] > 0
