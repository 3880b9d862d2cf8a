"""The serving core: continuous batching over per-rank KV-cache slots, chunked prefill, per-request
settings, only the dead rank's requests re-queued after a failure, no compilation after warm-up.

The scheduler alone (no JAX) first, then the spmd engine on 4 fake devices against one device."""
import numpy as np
import pytest

import jax_elastic_moe as jem
from jax_elastic_moe.runtime.step import out_rows
from jax_elastic_moe.scheduler import Request, SamplingParams, Scheduler, chunk_buckets
from runtime_support import COUNTER


def req(i, n_prompt, new=4, stops=()):
    return Request(i, list(range(2, 2 + n_prompt)), SamplingParams(new, stop_token_ids=frozenset(stops)))


def step_fake(sched):
    """One step of a fake model whose next token is always 7: (kind, ids prefilled, ids decoded)."""
    batch = sched.next_batch()
    sched.commit(batch, np.full(len(sched.live) * out_rows(batch.shape), 7))
    return (batch.shape.kind, {it[1].id for it in batch.requests if len(it) == 3},
            {it[1].id for it in batch.requests if len(it) == 2})


def run_fake(sched, until=1000):
    """Drives the scheduler with the fake model to the end; returns its steps (step_fake)."""
    steps = []
    for _ in range(until):
        if not sched.unfinished():
            return steps
        steps.append(step_fake(sched))
    raise AssertionError("the scheduler did not finish")


def test_chunk_buckets():
    assert chunk_buckets(256) == (32, 64, 128, 256)
    assert chunk_buckets(100) == (32, 64, 100)
    assert chunk_buckets(16) == (16,)


def test_continuous_admits_as_requests_finish_and_static_waits_for_all():
    def admitted_while_running(admission):
        s = Scheduler([0, 1], seqs_per_rank=1, prefill_rows=1, max_chunk=16, cache_len=64, admission=admission)
        s.add([req(0, 3, new=2), req(1, 3, new=9), req(2, 3, new=2)])
        steps = run_fake(s)
        # request 2 waits for a slot; was it prefilled while request 1 still decoded?
        first_prefill_of_2 = next(i for i, (_, pre, _) in enumerate(steps) if 2 in pre)
        last_decode_of_1 = max(i for i, (_, _, dec) in enumerate(steps) if 1 in dec)
        return first_prefill_of_2 <= last_decode_of_1
    assert admitted_while_running("continuous")
    assert not admitted_while_running("static")


def test_long_prompt_is_prefilled_in_chunks_while_others_decode():
    s = Scheduler([0], seqs_per_rank=2, prefill_rows=1, max_chunk=16, cache_len=128)
    s.add([req(0, 3, new=8), req(1, 50, new=2)])
    steps = run_fake(s)
    prefills_of_1 = [(kind, dec) for kind, pre, dec in steps if 1 in pre]
    assert len(prefills_of_1) == 4                         # 50 tokens in chunks of at most 16
    # request 0 (prefilled first, alone) decodes in the same steps as each chunk of request 1
    assert all(kind == "prefill" and 0 in dec for kind, dec in prefills_of_1)
    assert len(steps) == 1 + 7                             # its 8 tokens, the first with its prefill


def test_finish_by_stop_token_or_own_length_frees_the_slot_at_once():
    s = Scheduler([0], seqs_per_rank=1, prefill_rows=1, max_chunk=16, cache_len=64)
    a, b = req(0, 3, new=10, stops=[7]), req(1, 3, new=3)
    s.add([a, b])
    run_fake(s)
    assert (a.out, a.finish_reason) == ([7], "stop")
    assert (b.out, b.finish_reason) == ([7, 7, 7], "length")


def test_a_failure_requeues_only_the_dead_ranks_requests():
    s = Scheduler([0, 1, 2], seqs_per_rank=2, prefill_rows=2, max_chunk=16, cache_len=64)
    reqs = [req(i, 3, new=5) for i in range(6)]
    s.add(reqs)
    assert [step_fake(s)[0] for _ in range(2)] == ["prefill", "decode"]
    on_1 = [r for r in reqs if r.rank == 1]
    kept = {r.id: (r.rank, r.slot, r.cached) for r in reqs if r.rank != 1}
    gone = s.set_live([0, 2])
    assert sorted(r.id for r in gone) == sorted(r.id for r in on_1) and len(gone) == 2
    assert all(r.cached == 0 and r.out == [7, 7] for r in gone)
    assert {r.id: (r.rank, r.slot, r.cached) for r in reqs if r.id in kept} == kept
    run_fake(s)
    assert all(r.out == [7] * 5 for r in reqs)


def test_rows_are_laid_out_by_rank_and_padding_is_dropped():
    s = Scheduler([3, 5], seqs_per_rank=2, prefill_rows=1, max_chunk=16, cache_len=32)
    s.add([req(0, 20)])
    b = s.next_batch()
    assert b.shape.chunk == 16 and b.rows["tokens"].shape == (2, 16)
    assert b.rows["valid"][0].all() and not b.rows["valid"][1].any()
    assert (b.rows["positions"][1] == 32).all() and b.rows["slot"][1] == 2      # writes dropped
    # the decode group: one row per slot of each rank, all padding (nothing runs yet)
    assert b.rows["decode_tokens"].shape == (4, 1) and not b.rows["decode_valid"].any()
    assert (b.rows["decode_positions"] == 32).all() and list(b.rows["decode_slot"]) == [0, 1, 0, 1]
    for _ in range(2):                                     # the chunks of 16 and 4 tokens; 0 comes next
        s.commit(b, np.arange(2 * out_rows(b.shape)))
        b = s.next_batch()
    d = b                                                  # rank 3's slot 0 decodes: next row 0
    assert d.shape.kind == "decode" and [it[0] for it in d.requests] == [0] and d.rows["tokens"][0, 0] == 0


# -- the engine ------------------------------------------------------------------------------------

KW = dict(seed=0, max_model_len=96, prefill_chunk=16)
MIXED = [list(range(3, 3 + n)) for n in (5, 40, 2, 17, 9, 33, 1, 12, 26, 3)]
NEW = [12, 3, 9, 1, 14, 5, 10, 7, 2, 11]


@pytest.fixture(scope="module")
def one():
    with jem.Engine.from_config("tiny", num_ranks=1, seqs_per_rank=1, **KW) as eng:
        yield eng


@pytest.fixture(scope="module")
def four():
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=4, seqs_per_rank=2, **KW) as eng:
        yield eng


def tokens(outs):
    return [o.token_ids for o in outs]


def test_mixed_lengths_continuous_equals_one_device_and_static(one, four):
    want = tokens(one.generate(MIXED, max_new_tokens=NEW, stop_token_ids=[]))
    assert [len(t) for t in want] == NEW
    got = tokens(four.generate(MIXED, max_new_tokens=NEW, stop_token_ids=[]))
    assert got == want
    reqs = four.last_requests
    # 10 requests for 8 slots: some request was admitted after another finished, while others ran
    first = {r.id: r.token_times[0] for r in reqs}
    done = {r.id: r.token_times[-1] for r in reqs}
    late = [i for i in first if first[i] > min(done.values())]
    assert late and any(done[j] > first[i] for i in late for j in done if j != i)
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=4, seqs_per_rank=2, admission="static",
                                **KW) as static:
        assert tokens(static.generate(MIXED, max_new_tokens=NEW, stop_token_ids=[])) == want


def test_per_request_sampling_settings_do_not_depend_on_batching(one, four):
    # token i of request k is drawn from (seed_k, k, i): the same on 4 ranks with 8 slots as on one
    # rank with one slot (requests run one after the other), and each setting is per request
    temps, seeds, tops = [0.0, 1.0, 0.7, 1.3], [1, 2, 3, 2 ** 32 - 1], [1.0, 0.9, 0.5, 1.0]
    stops = [[], [], [MIXED[2][0]], []]
    kw = dict(max_new_tokens=[6, 4, 8, 5], temperature=temps, top_p=tops, seed=seeds, stop_token_ids=stops)
    together = tokens(four.generate(MIXED[:4], **kw))
    assert together == tokens(one.generate(MIXED[:4], **kw))
    assert [len(t) for t in together] == [6, 4, 8, 5] or together[2][-1] == MIXED[2][0]
    greedy = tokens(four.generate(MIXED[:4], max_new_tokens=[6, 4, 8, 5], stop_token_ids=[]))
    assert together[0] == greedy[0] and together[1] != greedy[1]
    reseeded = tokens(four.generate(MIXED[:4], **{**kw, "seed": [1, 5, 3, 2 ** 32 - 1]}))
    assert reseeded[1] != together[1] and reseeded[3] == together[3]


def test_no_compilation_after_warm_up(four):
    four.generate(MIXED[:3], max_new_tokens=2, stop_token_ids=[])        # warm-up (already done: a no-op)
    before = COUNTER.count
    four.generate(MIXED, max_new_tokens=NEW, stop_token_ids=[])
    four.generate([list(range(5, 85))] * 9, max_new_tokens=4, temperature=0.5, stop_token_ids=[])
    four.generate([[1]], max_new_tokens=1, stop_token_ids=[])
    assert COUNTER.count == before


def test_failure_during_chunked_prefill_and_during_decode(one):
    long = [list(range(4, 4 + n)) for n in (70, 55, 3, 64, 8, 41, 66, 2)]
    want = tokens(one.generate(long, max_new_tokens=8, stop_token_ids=[]))
    with jem.Engine.from_config("tiny", num_ranks=4, redundant_experts=8, seqs_per_rank=2, **KW) as eng:
        eng.fail_rank(1, at_step=2)                 # prompts of 55-70 tokens take 4-5 chunks of 16
        assert tokens(eng.generate(long, max_new_tokens=8, stop_token_ids=[])) == want
        rec = eng.stats()["recoveries"][0]
        assert rec["cache_kept"] and rec["requests_requeued"] == 2
        eng.fail_rank(3, at_step=9)                 # decoding by then
        assert tokens(eng.generate(long, max_new_tokens=8, stop_token_ids=[])) == want
        rec = eng.stats()["recoveries"][1]
        assert rec["failed_ranks"] == [3] and rec["cache_kept"] and 1 <= rec["requests_requeued"] <= 3
        assert all(len(r.out) == 8 for r in eng.last_requests)        # none lost, none answered twice


def test_prompt_that_cannot_fit_is_refused_before_compute(four):
    with pytest.raises(ValueError, match="prompt 1 has 90 tokens.*max_model_len=96"):
        four.generate([[1, 2], [3] * 90], max_new_tokens=10)
    with pytest.raises(ValueError, match="max_new_tokens has 3 values for 2 prompts"):
        four.generate([[1, 2], [3]], max_new_tokens=[1, 2, 3])
