"""`--model-impl e3` under vLLM's pipeline parallelism (PP = 2, one core
per rank), compiled: vLLM 0.32 CPU runs PP only compiled (eager fails in
`sync_and_gather_intermediate_tensors` on rank 1).

The random 8-layer Llama of tests/helpers.py (`tiny_llama`), planted ramps
at exits 2, 4, 6, float32. The E3 engine starts with `"plan": true` and
hand-priced engine costs (COSTS) in the model's e3/, so the ranks choose the
partition themselves (vllm_e3.pipeline): 3 + 5 layers (vanilla's even split
is 4 + 4), and rank 0 decides exit 2, rank 1 exits 4 and 6. Rows that exit
on rank 0 travel to rank 1 in the intermediate tensors with their head input
and exit layer, and rank 1 writes their K/V for layers 3..7 (the KV fill of a
layer happens on the rank that owns it). Ids are compared with compiled
vanilla PP = 2 at its even split (rate 0) and with the plain-PyTorch float32
reference (helpers.assert_same_ids: a divergence passes only where the
reference's top-2 logit margin is below MARGIN).
"""

import pytest

import json
import os

from tiny_parallel import E3, EXITS, MAX_TOKENS, MIDDLE, THRESHOLD, check, run_cases

pytestmark = pytest.mark.slow

MS = 1e-3
# a layer on m rows 0.1 + 0.1 m ms, an exit boundary 0.05 ms, no head or fill: at 8 rows a
# step (16 requests in two groups) and the middle profile the later layers are cheap enough
# that 3 + 5 balances best (tests/test_pipeline_plan.py works such costs by hand)
COSTS = {"num_layers": 8, "layer": {"1": 0.2 * MS, "64": 6.5 * MS}, "exit_s": 0.05 * MS, "fill_s": 0.0,
         "head_s": 0.0, "step_s": 0.0, "row_s": 0.0, "compiled": True}
PLANNED = [3, 5]


@pytest.fixture(scope="module")
def tiny(tiny_planted):
    return tiny_planted[0]


@pytest.fixture(scope="module")
def runs(tiny):
    """Vanilla at its even split, E3 planning its own split at start-up."""
    from vllm_e3.pipeline import PARTITION_ENV

    assert PARTITION_ENV not in os.environ
    path = os.path.join(tiny, "e3", "engine_costs.json")
    json.dump(COSTS, open(path, "w"))
    try:
        return run_cases(tiny, {**E3, "force_exit": {str(e): r for e, r in MIDDLE.items()}, "plan": True},
                         pipeline_parallel_size=2)
    finally:
        os.unlink(path)
        assert PARTITION_ENV not in os.environ         # set in the workers only


def _filled(lo: int, hi: int, exited: dict) -> int:
    """Row-layers of KV fill a rank [lo, hi) writes for `exited` {exit: rows}."""
    return sum(n * max(0, hi - max(e, lo)) for e, n in exited.items())


def test_the_ranks_run_the_planned_split(runs):
    from vllm_e3.pipeline import plan_pp

    from vllm_e3.config import load_e3_config
    from vllm_e3.planner import exit_profile

    fractions = exit_profile(load_e3_config("/nonexistent", {**E3, "force_exit": MIDDLE}), "/nonexistent")
    assert plan_pp(COSTS, EXITS, fractions, 8, 2)["partition"] == PLANNED
    assert runs["layers"] == [[0, 3], [3, 8]]
    assert all(c["policy"] == "token" and c["exits"] == EXITS and not c["plan"] for c in runs["config"])


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
    n2, n4, n6 = r0["exited"][2], r1["exited"][4], r1["exited"][6]
    assert set(r0["exited"]) == {2} and set(r1["exited"]) == {4, 6} and min(n2, n4, n6) > 0
    # the KV fill of a layer on the rank that owns it: rank 0 layer 2 for
    # exit 2; rank 1 layers 3-7 for the rows that crossed, 4-7 and 6-7 for its own
    exited = {2: n2, 4: n4, 6: n6}
    assert r0["kv_fill_rows"] == _filled(0, 3, exited) == n2
    assert r1["kv_fill_rows"] == _filled(3, 8, exited) == 5 * n2 + 4 * n4 + 2 * n6
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
