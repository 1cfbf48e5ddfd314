"""`--model-impl e3` under vLLM's pipeline parallelism (PP = 2, one core
per rank), compiled: vLLM 0.32 CPU runs PP only compiled (eager fails in
`sync_and_gather_intermediate_tensors` on rank 1).

The random 8-layer Llama of tests/helpers.py (`tiny_llama`), planted ramps
at exits 2, 4, 6, float32. vLLM splits the layers 4 + 4: rank 0 decides exits
2 and 4 (4 is its last layer's output), rank 1 decides 6. Rows that exit on
rank 0 travel to rank 1 in the intermediate tensors with their head input
and exit layer, and rank 1 writes their K/V for layers 4..7 (the KV fill of a
layer happens on the rank that owns it). Ids are compared with compiled
vanilla PP = 2 (rate 0) and with the plain-PyTorch float32 reference
(helpers.assert_same_ids: a divergence passes only where the reference's
top-2 logit margin is below MARGIN).
"""

import pytest

from tiny_parallel import EXITS, MAX_TOKENS, MIDDLE, THRESHOLD, check, run_cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_planted):
    return tiny_planted[0]


@pytest.fixture(scope="module")
def runs(tiny):
    return run_cases(tiny, pipeline_parallel_size=2)


@pytest.fixture(scope="module")
def ref(tiny_planted):
    return tiny_planted[1]


def test_rate_zero_is_vanilla_pp2(runs):
    from vllm.config import CompilationMode

    assert runs["mode"] != CompilationMode.NONE
    assert runs["zero"] == runs["vanilla"]
    assert all(not s["exited"] for s in runs["zero", "stats"])


def test_middle_profile_matches_the_reference_across_ranks(runs, ref):
    where = check(runs, ref, "middle", exits=EXITS, force_exit=MIDDLE)
    assert {w for w in where if w is not None} == set(EXITS)
    r0, r1 = runs["middle", "stats"]
    assert (r0["rank"]["pp"], r1["rank"]["pp"]) == (0, 1)
    n2, n4, n6 = r0["exited"][2], r0["exited"][4], r1["exited"][6]
    assert set(r0["exited"]) == {2, 4} and set(r1["exited"]) == {6} and min(n2, n4, n6) > 0
    # the KV fill of a layer on the rank that owns it: rank 0 layers 2-3 for
    # exit 2; rank 1 layers 4-7 for the rows that crossed, 6-7 for its own
    assert r0["kv_fill_rows"] == 2 * n2
    assert r1["kv_fill_rows"] == 4 * (n2 + n4) + 2 * n6
    # step and token counters on the last rank; the engine's adds the ranks
    from vllm_e3.stats import engine_stats

    eng = engine_stats(runs["middle", "stats"])
    assert r0["decode_tokens"] == 0 and r1["decode_tokens"] == 8 * (MAX_TOKENS - 1)
    assert eng["exited"] == {2: n2, 4: n4, 6: n6}
    assert eng["layers_full"] - eng["layers_run"] == 6 * n2 + 4 * n4 + 2 * n6
    # per-request counters: the last rank's
    per_rank = runs["middle", "requests"]
    assert per_rank[0] == {} and sum(r["tokens"] for r in per_rank[1].values()) == 8 * (MAX_TOKENS - 1)


def test_max_prob_matches_the_reference(runs, ref):
    """Rank 0 decides its exits with its own copies of the final norm and LM
    head (PPMissingLayer there in vLLM)."""
    where = check(runs, ref, "max_prob", exits=EXITS, thresholds=[THRESHOLD] * len(EXITS))
    assert len({w for w in where if w is not None}) >= 2
    assert runs["max_prob"] != runs["zero"]
