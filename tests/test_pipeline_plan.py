"""The pipeline partition planner (vllm_e3/pipeline.py) on hand-priced costs.

The costs: 8 layers, a layer on m rows a + b m with a = 1 ms, b = 0.1 ms,
10 rows a step (a layer on every row: 2 ms), the LM head 0.3 ms a row (3 ms
on the last rank), an exit boundary 0.5 ms, no KV fill or rest. Worked by
hand below each test.
"""
import itertools
import json
import os

import pytest

from vllm_e3.pipeline import (PARTITION_ENV, best_partition, bottleneck, even_partition, parse_partition,
                              plan_pp, rank_times)

MS = 1e-3


def costs(**kw):
    c = {"num_layers": 8, "layer": {1: 1.1 * MS, 64: 7.4 * MS}, "exit_s": 0.5 * MS, "fill_s": 0.0,
         "head_s": 0.3 * MS, "step_s": 0.0, "row_s": 0.0}
    c.update(kw)
    return c


def test_even_partition_is_vllms():
    """vLLM's own default split, read from vLLM with the variable unset."""
    from vllm.distributed.utils import get_pp_indices

    old = os.environ.pop(PARTITION_ENV, None)
    try:
        for L, pp in itertools.product((8, 30, 31, 32, 7), (2, 3, 4)):
            want = [e - s for s, e in (get_pp_indices(L, r, pp) for r in range(pp))]
            assert even_partition(L, pp) == want, (L, pp)
    finally:
        if old is not None:
            os.environ[PARTITION_ENV] = old


def test_parse_partition_names_the_problem():
    assert parse_partition("5,3", 8, 2) == [5, 3]
    for bad, what in (("5,4", "adding up to 8"), ("8", "want 2"), ("a,b", "not a comma-separated"),
                      ("8,0", "positive")):
        with pytest.raises(ValueError, match=what):
            parse_partition(bad, 8, 2)


def test_vanilla_best_split_carries_the_head():
    """Vanilla: rank 0 with n layers 2n ms, rank 1 2(8-n) + 3 ms: n = 4 gives
    8 | 11, n = 5 gives 10 | 9, n = 6 12 | 7: 5,3 at 10 ms, the even split 11."""
    c = costs()
    assert best_partition(c, 2, [], {}, 10, "full") == [5, 3]
    assert bottleneck(c, [5, 3], [], {}, 10, "full") == pytest.approx(10 * MS)
    assert bottleneck(c, [4, 4], [], {}, 10, "full") == pytest.approx(11 * MS)


def test_exits_move_the_cut_forward():
    """80% of the rows leave at exit 2: layers 0-1 run 10 rows (2 ms each),
    layers 2-7 two rows (1.2 ms), the boundary 0.5 ms on the rank deciding
    it. Rank 0 with n >= 2 layers: 4.5 + 1.2 (n - 2); rank 1: 1.2 (8 - n) + 3.
    n = 4: 6.9 | 7.8; n = 5: 8.1 | 6.6; n = 3: 5.7 | 9.0. Best 4,4 at 7.8 ms:
    10 / 7.8 against vanilla's best split, 11 / 7.8 against its even split."""
    c = costs()
    t = rank_times(c, [4, 4], [2], {2: 0.8}, 10)
    assert [x["total"] for x in t] == pytest.approx([6.9 * MS, 7.8 * MS])
    assert t[0]["exits"] == pytest.approx(0.5 * MS) and t[1]["exits"] == 0.0
    assert t[1]["head"] == pytest.approx(3 * MS) and t[0]["head"] == 0.0
    r = plan_pp(c, [2], {2: 0.8}, 10, 2)
    assert (r["policy"], r["exits"], r["partition"]) == ("token", [2], [4, 4])
    assert r["vanilla_best_partition"] == [5, 3] and r["even_partition"] == [4, 4]
    assert r["step_s"] == pytest.approx(7.8 * MS)
    assert r["vs_vanilla_best"] == pytest.approx(10 / 7.8)
    assert r["vs_vanilla_even"] == pytest.approx(11 / 7.8)


def test_a_users_partition_is_kept():
    """The user's 5,3: rank 0 8.1 ms, rank 1 6.6 ms."""
    r = plan_pp(costs(), [2], {2: 0.8}, 10, 2, partition=[5, 3])
    assert r["partition"] == [5, 3]
    assert r["step_s"] == pytest.approx(8.1 * MS)


def test_kv_fill_counts_on_the_rank_that_owns_the_layer():
    """fill 0.1 ms a row-layer: 8 rows left at exit 2 cost 0.8 ms on every
    layer from 2 on, on whichever rank holds it: rank 0 at 4,4 is 4.5 +
    2 x 2.0 = 8.5, rank 1 4 x 2.0 + 3 = 11."""
    t = rank_times(costs(fill_s=0.1 * MS), [4, 4], [2], {2: 0.8}, 10)
    assert [x["fill"] for x in t] == pytest.approx([1.6 * MS, 3.2 * MS])
    assert [x["total"] for x in t] == pytest.approx([8.5 * MS, 11 * MS])


def test_full_when_no_exit_pays():
    """A 20 ms boundary: nothing with exits beats vanilla's best split."""
    r = plan_pp(costs(exit_s=20 * MS), [2], {2: 0.8}, 10, 2)
    assert (r["policy"], r["exits"], r["partition"]) == ("full", [], [5, 3])
    assert r["vs_vanilla_best"] == pytest.approx(1.0)


def test_sync_stops_a_batch_only_when_every_row_leaves():
    """At 10 rows and a rate of 0.8, a batch stops at exit 2 with
    probability 0.8^10: sync keeps nearly every row and loses to token."""
    t = rank_times(costs(), [4, 4], [2], {2: 0.8}, 10, "sync")
    S = 1 - 0.8 ** 10
    layer = lambda m: 1.0 + 0.1 * m
    assert t[0]["layers"] == pytest.approx((2 * 2.0 + 2 * layer(10 * S)) * MS)
    assert plan_pp(costs(), [2], {2: 0.8}, 10, 2, policies=("token", "sync"))["policy"] == "token"


def test_dynamic_program_is_the_exact_minimax():
    """Against every split of the shipped engine costs' 30 layers over 3
    ranks, middle profile, 32 rows."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = json.load(open(os.path.join(here, "artifacts", "smollm2-135m", "e3", "engine_costs.json")))
    exits, fr = [8, 15, 22], {8: 0.3, 15: 0.25, 22: 0.2}
    parts = best_partition(c, 3, exits, fr, 32)
    brute = min(bottleneck(c, [a, b, 30 - a - b], exits, fr, 32) for a in range(1, 29) for b in range(1, 30 - a))
    assert sum(parts) == 30 and bottleneck(c, parts, exits, fr, 32) == pytest.approx(brute, rel=1e-12)


def test_one_group_in_flight_takes_turns():
    """One group of requests in flight (a closed batch admitted in one step):
    a step is the sum of the ranks, whatever the split. At 4,4 above 6.9 +
    7.8 ms, at 5,3 8.1 + 6.6: both 14.7; vanilla 8 x 2 + 3 = 19 ms either way."""
    from vllm_e3.pipeline import period

    assert period([6.9, 7.8], 1) == pytest.approx(14.7) and period([6.9, 7.8], 2) == pytest.approx(7.8)
    c = costs()
    for parts in ([4, 4], [5, 3], [2, 6]):
        assert bottleneck(c, parts, [2], {2: 0.8}, 10, in_flight=1) == pytest.approx(14.7 * MS)
    r = plan_pp(c, [2], {2: 0.8}, 10, 2, in_flight=1)
    assert r["vs_vanilla_best"] == pytest.approx(19 / 14.7) == pytest.approx(r["vs_vanilla_even"])


def _vllm_config(pp, max_num_seqs, layers=8):
    from types import SimpleNamespace

    return SimpleNamespace(parallel_config=SimpleNamespace(pipeline_parallel_size=pp),
                           scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs),
                           model_config=SimpleNamespace(hf_config=SimpleNamespace(num_hidden_layers=layers)))


@pytest.fixture()
def priced_model(tmp_path):
    """A model directory whose e3/ holds only the hand-priced engine costs.
    The start-up plan sets VLLM_PP_LAYER_PARTITION in this process: it is
    restored after the test, or every later engine of the session would
    start with a 2-rank partition."""
    (tmp_path / "e3").mkdir()
    (tmp_path / "e3" / "engine_costs.json").write_text(json.dumps(costs()))
    old = os.environ.pop(PARTITION_ENV, None)
    yield str(tmp_path)
    os.environ.pop(PARTITION_ENV, None)
    if old is not None:
        os.environ[PARTITION_ENV] = old


def test_startup_plan_sets_the_partition_unless_the_user_did(priced_model, monkeypatch):
    """20 requests over 2 ranks: 10 rows a step, the case worked above (4,4,
    token at exit 2). The ranks set VLLM_PP_LAYER_PARTITION in their own
    environment; a user's own value is kept, with a log line, and the plan
    picks the exits for it."""
    from vllm_e3 import pipeline
    from vllm_e3.config import E3Config

    said = []
    monkeypatch.setattr(pipeline.logger, "info", lambda msg, *a: said.append(msg % a))
    cfg = E3Config.from_dict({"policy": "token", "exits": [2, 6], "force_exit": {"2": 0.8}, "plan": True})
    got = pipeline.startup_pp_plan(cfg, priced_model, _vllm_config(2, 20))
    assert os.environ[PARTITION_ENV] == "4,4"
    # exit 6 has no rate and no threshold: kept as a stage boundary, as the one-process plan does
    assert (got.policy, got.exits, got.plan, got.force_exit) == ("token", (2, 6), False, {2: 0.8})
    os.environ[PARTITION_ENV] = "6,2"              # the user's (the fixture restores the variable)
    said.clear()
    got = pipeline.startup_pp_plan(cfg, priced_model, _vllm_config(2, 20))
    assert os.environ[PARTITION_ENV] == "6,2" and got.policy == "token"
    assert any("VLLM_PP_LAYER_PARTITION=6,2 is set: the pipeline keeps it (the plan would choose 4,4)" in s
               for s in said)
    os.environ[PARTITION_ENV] = "6,3"
    with pytest.raises(ValueError, match="adding up to 8"):
        pipeline.startup_pp_plan(cfg, priced_model, _vllm_config(2, 20))


def test_startup_plan_needs_the_engine_costs(tmp_path):
    from vllm_e3.config import E3Config, E3ConfigError
    from vllm_e3.pipeline import startup_pp_plan

    cfg = E3Config.from_dict({"policy": "token", "exits": [2], "force_exit": {"2": 0.8}, "plan": True})
    with pytest.raises(E3ConfigError, match="engine_costs.json is missing: run `vllm-e3 profile`"):
        startup_pp_plan(cfg, str(tmp_path), _vllm_config(2, 20))


def test_plan_cli_prints_the_partition_and_the_line_that_applies_it(priced_model):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "vllm_e3.cli", "plan", priced_model, "--pp", "2", "--exits", "2",
                          "--profile", '{"2": 0.8}', "--batch", "10"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "policy token, exits [2], partition 4,4" in out.stdout
    assert "1.410x vanilla PP=2 at its even split 4,4, 1.282x at vanilla's best split 5,3" in out.stdout
    assert f"{PARTITION_ENV}=4,4 vllm serve {priced_model} --model-impl e3 --pipeline-parallel-size 2" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "vllm_e3.cli", "plan", priced_model, "--pp", "9", "--exits", "2",
                          "--profile", '{"2": 0.8}'], capture_output=True, text=True)
    assert bad.returncode == 2 and "cannot split 8 layers over 9 pipeline ranks" in bad.stderr


def test_startup_plan_without_exits_takes_vanillas_best_split(priced_model):
    """Policy full under a plan: no exits, vanilla's graph at 5,3 (the head's rank lighter)."""
    from vllm_e3.config import E3Config
    from vllm_e3.pipeline import startup_pp_plan

    got = startup_pp_plan(E3Config.from_dict({"policy": "full", "plan": True}), priced_model, _vllm_config(2, 20))
    assert os.environ[PARTITION_ENV] == "5,3" and (got.policy, got.exits, got.plan) == ("full", (), False)


def test_no_partition_is_left_in_this_process():
    """Runs after the start-up plan tests above: the engines the rest of the
    session starts must see no partition of ours."""
    assert PARTITION_ENV not in os.environ
