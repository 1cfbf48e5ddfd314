"""The planner's step simulation (vllm_e3.simulate), the cost fit from step
records (vllm_e3.profile.fit_costs) and the simulated plan, against values
worked out by hand. The simulation against real engines is a benchmark
(benchmarks/bench_policies.py prints predicted beside measured)."""
import pytest

from vllm_e3.planner import plan_simulated
from vllm_e3.profile import StepProfile, fit_costs
from vllm_e3.simulate import layer_curve, rates_of, simulate_once

# every cost a different power of ten, so each sum below names its parts
COSTS = {"num_layers": 4, "layer": {1: 0.001, 2: 0.002}, "prompt_s": 0.01, "exit_s": 0.1,
         "fill_s": 1.0, "head_s": 10.0, "step_s": 100.0, "row_s": 1000.0, "prompt_rest_s": 1e-4}


def test_token_steps_priced_part_by_part():
    # 2 requests, 1-token prompts, 3 tokens each; every decode token leaves at exit 2 of 4
    r = simulate_once(COSTS, policy="token", exits=[2], rates={2: 1.0}, batch=2, slots=2,
                      requests=2, prompt_len=1, output_len=3)
    # step 1, prefill: both stages on 2 prompt rows (2 layers x 2 x 0.01 each), 2 heads,
    # the rest of a step with 2 requests, 2 prompt rows
    prefill = 2 * 2 * 0.01 * 2 + 2 * 10.0 + 100.0 + 2 * 1000.0 + 2 * 1e-4
    # steps 2, 3: stage 0 on 2 rows, one exit boundary, both leave: 2 x 2 layers filled
    decode = 2 * 0.002 + 0.1 + 4 * 1.0 + 2 * 10.0 + 100.0 + 2 * 1000.0
    assert r["steps"] == 3 and r["parked"] == 0
    assert r["seconds"] == pytest.approx(prefill + 2 * decode)
    assert r["tpot_p50"] == pytest.approx(decode)
    assert r["stage_batch"] == {0: 2.0}


def test_e3_parks_and_the_scheduler_admits_past_the_cap():
    # batch 1, 2 slots, 3 requests of 2 tokens, target 2 at exit 2, nothing exits.
    # step 1: request 0 prefills.  2: it parks at exit 2 (1 row < 2; requests wait, a slot is
    # free).  3: the cap is 1 + 1 parked, request 1 is admitted (prefill: nothing parks) and
    # request 0 resumes at stage 2 and finishes.  4: request 1 parks.  5: request 2 admitted,
    # request 1 finishes.  6: request 2 runs alone (nothing waits: no parking) and finishes.
    r = simulate_once(COSTS, policy="e3", exits=[2], rates={2: 0.0}, batch=1, slots=2,
                      requests=3, prompt_len=1, output_len=2, target=2)
    assert r["steps"] == 6 and r["parked"] == 2
    assert r["in_flight_mean"] == pytest.approx((1 + 1 + 2 + 1 + 2 + 1) / 6)
    # the same without parking: 3 requests one after another, 2 steps each
    t = simulate_once(COSTS, policy="token", exits=[2], rates={2: 0.0}, batch=1, slots=2,
                      requests=3, prompt_len=1, output_len=2)
    assert t["steps"] == 6 and t["parked"] == 0 and t["in_flight_mean"] == 1.0


def test_layer_time_between_and_beyond_measured_rows():
    layer = layer_curve({1: 1.0, 2: 2.0, 4: 3.0, 8: 5.0})
    assert layer(3) == pytest.approx(2.5) and layer(4) == 3.0 and layer(0) == 1.0
    # beyond 8: the least-squares line through rows 4 and 8 (slope 0.5)
    assert layer(12) == pytest.approx(7.0)


def test_rates_from_fractions():
    assert rates_of([8, 15], {8: 0.5, 15: 0.25}) == pytest.approx({8: 0.5, 15: 0.5})


def _record(reqs, stages, exits=(), fill=(0, 0.0), head=(0, 0.0), prompt_rows=0, period=None):
    st = {"t0": 0.0, "reqs": reqs, "rows": reqs + prompt_rows, "prompt_rows": prompt_rows,
          "parked": 0, "stages": stages, "exits": list(exits), "fill": list(fill),
          "head": list(head)}
    if period is not None:
        timed = sum(s[-1] for s in stages) + sum(exits) + fill[1] + head[1]
        st["period"] = timed + period
    return st


def test_fit_costs_recovers_known_costs():
    layer = lambda m: 0.002 + 0.0001 * m                     # seconds per layer on m rows
    steps = []
    for reqs in (4, 8, 16, 8, 4, 16):
        stages = [(0, 8, reqs, 8 * layer(reqs)), (8, 30, reqs // 2, 22 * layer(reqs // 2))]
        steps.append(_record(reqs, stages, exits=[0.0005], fill=(reqs * 11, reqs * 11 * 2e-5),
                             head=(reqs, reqs * 1e-3), period=0.01 + 0.0002 * reqs))
    steps.append(_record(4, [(0, 30, 4, 30 * layer(4))], period=10.0))   # idle time: dropped
    # a prefill step: 64 prompt rows at 5e-5 per row-layer beyond 4 decode rows
    # (its exit boundary, with 68 rows through it, is not a decode step's: left out of exit_s)
    steps.append(_record(4, [(0, 30, 68, 30 * (layer(4) + 64 * 5e-5))], prompt_rows=64, exits=[0.05]))
    c = fit_costs(steps, 30)
    assert c["layer"][4] == pytest.approx(layer(4)) and c["layer"][16] == pytest.approx(layer(16))
    assert c["exit_s"] == pytest.approx(0.0005) and c["fill_s"] == pytest.approx(2e-5)
    assert c["head_s"] == pytest.approx(1e-3) and c["prompt_s"] == pytest.approx(5e-5)
    assert c["step_s"] == pytest.approx(0.01) and c["row_s"] == pytest.approx(0.0002)
    assert c["fit_steps"] == 6


def test_step_profile_records_a_step():
    prof = StepProfile()
    prof.begin()
    with prof.timed("stage", 0, 8, 5):
        pass
    with prof.timed("exit"):
        pass
    with prof.timed("head", 5):
        pass
    prof.cur.update(reqs=5, rows=5)
    prof.end()
    prof.begin()                      # the next step closes the last one's period
    (st,) = prof.steps
    assert [s[:3] for s in st["stages"]] == [(0, 8, 5)] and len(st["exits"]) == 1
    assert st["head"][0] == 5 and st["period"] >= st["exec"] >= 0


def test_simulated_plan_takes_e3_only_where_it_pays_and_within_the_tpot_bound():
    # every policy at 16 requests in flight (equal in-flight): token and full run them as one
    # batch, e3 runs 8 with the rest parked. A layer costs the same at 1 and 8 rows and five
    # times that at 16: past 8 rows a bigger batch costs more per row, so regrouping at 8 pays
    sat = {**COSTS, "num_layers": 30, "layer": {1: 0.01, 8: 0.01, 16: 0.05}, "fill_s": 1e-5,
           "head_s": 1e-4, "step_s": 0.001, "row_s": 1e-5, "exit_s": 1e-4, "prompt_s": 1e-5}
    work = {"requests": 32, "prompt_len": 4, "output_len": 16}
    frac = {8: 0.5}
    best = plan_simulated(sat, [8], frac, 8, 16, work, seeds=1)
    assert (best["policy"], best["exits"], best["in_flight"]) == ("e3", [8], 16)
    assert best["sim"]["tok_s"] > best["token_sim"]["tok_s"]
    ratio = best["tpot_vs_token"]
    assert ratio == pytest.approx(best["sim"]["tpot_p50"] / best["token_sim"]["tpot_p50"])
    capped = plan_simulated(sat, [8], frac, 8, 16, work, max_tpot_ratio=0.99 * ratio, seeds=1)
    # without e3, token at 16 in flight: its later stage runs 8 rows for less than full's 16
    assert capped["policy"] == "token"
    assert capped["sim"]["tok_s"] == pytest.approx(best["token_sim"]["tok_s"])
    # a layer costing the same at any batch: one batch of 16 beats regrouping, and exits
    # (half-empty later stages at the same price) beat nothing: full
    flat = {**sat, "layer": {1: 0.01, 64: 0.0101}}
    assert plan_simulated(flat, [8], frac, 8, 16, work, seeds=1)["policy"] == "full"
    # a layer's cost proportional to its rows: no exit saves enough to pay an
    # exit boundary that costs a full layer at batch 8
    prop = {**flat, "layer": {1: 0.001, 64: 0.064}, "exit_s": 0.2}
    assert plan_simulated(prop, [8], {8: 0.05}, 8, 8, work, policies=("token",), seeds=1)["policy"] == "full"


def test_kv_blocks_run_out_and_the_newest_request_is_preempted():
    # blocks of 2 tokens, 5 of them; 3 requests of 2 prompt tokens, 3 tokens each.
    # 1: all three prefill (1 block each).  2: requests 0 and 1 take a second block,
    # none is left for request 2, which is preempted (the newest; no admission in a step
    # that preempts).  3: 0 and 1 finish; request 2 still needs 2 blocks, 1 is free.
    # 4: it is readmitted and recomputes its prompt and token (3 prompt rows).  5: done.
    r = simulate_once(COSTS, policy="token", exits=[2], rates={2: 0.0}, batch=3, slots=3,
                      requests=3, prompt_len=2, output_len=3, kv_blocks=5, block_size=2)
    assert r["preempted"] == 1 and r["steps"] == 5
    assert r["in_flight_mean"] == pytest.approx((3 + 2 + 2 + 1 + 1) / 5)
    roomy = simulate_once(COSTS, policy="token", exits=[2], rates={2: 0.0}, batch=3, slots=3,
                          requests=3, prompt_len=2, output_len=3, kv_blocks=9, block_size=2)
    assert roomy["preempted"] == 0 and roomy["steps"] == 3
