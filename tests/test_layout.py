"""E3's multi-device layout by simulation (`vllm_e3/layout.py`):
layouts and throughputs hand-computed on synthetic cost curves, the latency
bound and hop costs changing the choice, N = 1 reducing to the single-device
plan, and the `vllm-e3 layout` command. No engines."""
import json
import os

import pytest

from vllm_e3.layout import (LLAMA_7B, SMOLLM2_135M, Layout, compare, evaluate, layer_macs,
                            scale_costs, scale_profile, search, uniform_boundaries)
from vllm_e3.planner import plan

MS = 1e-3
CURVES = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                      "curves_smollm2_135m_fp32.json")

# A knee at 64: one layer takes 1 ms for any batch up to 64, then b/64 ms (linear between the
# measured 64 and 128, extrapolated proportionally past 128). No head, fill or decision cost.
KNEE = {"num_layers": 4, "batches": [1, 64, 128], "layer": {1: 1 * MS, 64: 1 * MS, 128: 2 * MS},
        "decision_per_row": {}, "fill_per_row_layer": 0.0, "head_per_row": 0.0}
PROFILE = {2: 0.75}        # three quarters of the tokens leave after layer 1


def test_knee_layout_by_hand():
    """N = 4, 64 sequences per device (load 256), one exit at 2 taking 75%.

    DP, no exits: 4 layers at 64 rows = 4 ms per step -> 256 / 4 ms = 64000 tok/s, TPOT 4 ms.
    DP + exit: layers 0-1 at 64 (2 ms) + layers 2-3 at 16 rows (still 1 ms each: 2 ms) = 4 ms,
      no gain: the survivors run far below the knee.
    E3, split at 2, replicas (3, 1): S = [1, 0.25], n0 = 256 / 1.25 = 204.8 tokens enter per
      round; stage 0 replica 204.8 / 3 = 68.27 rows -> 2 x 68.27/64 = 2.1333 ms; stage 1 gets
      the 51.2 survivors of all three -> 2 x 1 = 2 ms. T = 2.1333 ms, 204.8 / T = 96000 tok/s
      (1.5x DP). 25% of tokens run both stages: p99 = 2 rounds = 4.2667 ms (<= 2 x 4 ms).
      (2, 2): stage 0 at 102.4 rows = 3.2 ms -> 64000; without the exit, (2, 2) is 64000 too.
    """
    got = search(KNEE, [2], PROFILE, devices=4, load=256)
    assert got["layout"] == Layout((2,), (3, 1), (2,))
    assert got["throughput"] == pytest.approx(96000)
    assert got["period_s"] == pytest.approx(2.1333333 * MS)
    assert got["tpot_p99_s"] == pytest.approx(4.2666667 * MS)
    assert got["tpot_mean_s"] == pytest.approx(256 / 96000)       # Little: 1.25 rounds
    assert [s["batch"] for s in got["stages"]] == pytest.approx([68.266667, 51.2])
    assert got["vanilla_tpot_s"] == pytest.approx(4 * MS)

    res = compare(KNEE, [2], PROFILE, devices=4, batch=64)
    assert res["dp"]["throughput"] == pytest.approx(64000)
    assert res["dp_exits"]["throughput"] == pytest.approx(64000)
    assert res["e3"]["vs_dp"] == pytest.approx(1.5)
    # uniform PP as vLLM runs it (every token visits all 4 stages): n0 = 256 / 4 = 64 per
    # round, one layer per device, 1 ms rounds, 64000 tok/s, p99 4 rounds = 4 ms; with the exit
    # stages 2-3 run 16 rows, still 1 ms: no gain, the plain layout is kept (a tie)
    assert uniform_boundaries(4, 4) == (1, 2, 3)
    assert res["pp"]["throughput"] == pytest.approx(64000)
    assert res["pp"]["tpot_p99_s"] == pytest.approx(4 * MS)
    assert res["pp_exits"]["throughput"] == pytest.approx(64000)
    assert res["pp_exits"]["layout"].exits == ()
    # as vLLM's DP x PP (equal replicas, no early return): (2, 2) split at 2 with the exit has
    # n0 = 256 / 2 = 128, stage 0 at 64 rows = 2 ms, stage 1 at 16 survivors = 2 ms -> 64000,
    # a tie with plain DP, found first
    assert res["e3_dp_pp"]["layout"] == Layout((), (4,), ())
    assert res["e3_dp_pp"]["throughput"] == pytest.approx(64000)


def test_early_return_and_head_placement():
    """KNEE plus a head of 1/64 ms per row, split at 2 with (3, 1) replicas, load 256.
    Early return: n0 = 204.8; stage 0 (68.27 rows) runs the head for its 51.2 leaving rows:
    2.1333 + 0.8 = 2.9333 ms; stage 1, the 51.2 survivors' layers and head: 2 + 0.8 = 2.8 ms;
    204.8 / 2.9333 ms = 69818 tok/s. Without (vLLM PP: logits on the last rank for all): every
    token visits both stages, n0 = 128; stage 0 at 42.67 rows = 2 ms; stage 1: 32 survivors
    2 ms + head for all 128 rows 2 ms = 4 ms -> 32000 tok/s, p99 2 rounds = 8 ms."""
    headed = {**KNEE, "head_per_row": MS / 64}
    lay = Layout((2,), (3, 1), (2,))
    got = evaluate(headed, lay, PROFILE, 256)
    assert [s["step_s"] for s in got["stages"]] == pytest.approx([2.9333333 * MS, 2.8 * MS])
    assert got["throughput"] == pytest.approx(204.8 / 2.9333333e-3)
    got = evaluate(headed, lay, PROFILE, 256, early_return=False)
    assert [s["step_s"] for s in got["stages"]] == pytest.approx([2 * MS, 4 * MS])
    assert got["throughput"] == pytest.approx(32000)
    assert got["tpot_p99_s"] == pytest.approx(8 * MS)


def test_evaluate_values_by_hand():
    # the (2, 2) split with the exit: stage 0 at 102.4 rows = 3.2 ms, stage 1 at 25.6 = 2 ms
    got = evaluate(KNEE, Layout((2,), (2, 2), (2,)), PROFILE, 256)
    assert [s["step_s"] for s in got["stages"]] == pytest.approx([3.2 * MS, 2 * MS])
    assert got["throughput"] == pytest.approx(64000)
    # hops: 0.5 ms fixed + 0.01 ms per row sent; stage 0 sends its 102.4 rows (exited ones too,
    # for the KV fill and logits downstream): 3.2 + 0.5 + 1.024 = 4.724 ms; the last stage
    # returns the sampled ids: 2 + 0.5 ms
    got = evaluate(KNEE, Layout((2,), (2, 2), (2,)), PROFILE, 256, hop_cost=0.01 * MS,
                   hop_latency=0.5 * MS)
    assert [s["hop_s"] for s in got["stages"]] == pytest.approx([1.524 * MS, 0.5 * MS])
    assert got["period_s"] == pytest.approx(4.724 * MS)


def test_latency_bound_excludes_the_pipeline():
    """E3's (3, 1) layout has p99 4.2667 ms = 1.0667x vanilla's 4 ms. Under a bound of 1.06 it
    is excluded; every other layout at 64000 tok/s within 4 ms ties, and the first found (DP,
    no exits) is kept. A bound of 1.07 admits it again."""
    tight = search(KNEE, [2], PROFILE, devices=4, load=256, latency_bound=1.06)
    assert tight["layout"] == Layout((), (4,), ())
    assert tight["throughput"] == pytest.approx(64000)
    loose = search(KNEE, [2], PROFILE, devices=4, load=256, latency_bound=1.07)
    assert loose["layout"] == Layout((2,), (3, 1), (2,))
    # nothing meets a bound below vanilla's own TPOT
    assert search(KNEE, [2], PROFILE, devices=4, load=256, latency_bound=0.5) is None


def test_hop_cost_makes_the_split_lose():
    """0.5 ms per hop + 0.01 ms per row: (3, 1) stage 0 = 2.1333 + 0.5 + 0.6827 = 3.316 ms, so
    204.8 / 3.316 ms = 61760 tok/s < DP's 64000 (DP has no hops): DP is chosen."""
    got = evaluate(KNEE, Layout((2,), (3, 1), (2,)), PROFILE, 256, hop_cost=0.01 * MS,
                   hop_latency=0.5 * MS)
    assert got["throughput"] == pytest.approx(204.8 / (3.316 * MS), rel=1e-4)
    best = search(KNEE, [2], PROFILE, devices=4, load=256, hop_cost=0.01 * MS, hop_latency=0.5 * MS)
    assert best["layout"] == Layout((), (4,), ())


def test_single_device_is_the_plan():
    """N = 1: one stage, no hops; the exits chosen and 1 / throughput equal
    planner.plan's token policy (what `vllm-e3 plan` runs without spare slots)
    on the recorded SmolLM2 curves and on a synthetic steep one."""
    from vllm_e3.layout import normalise_costs

    smol = normalise_costs(json.load(open(CURVES)))
    steep = {"num_layers": 30, "batches": [16, 32, 64, 128],
             "layer": {b: max(b, 64) * MS for b in (16, 32, 64, 128)},
             "decision_per_row": {"max_prob": 0.5 * MS}, "fill_per_row_layer": 0.1 * MS,
             "head_per_row": 2 * MS}
    middle = {8: 0.3, 15: 0.25, 22: 0.2}
    cases = [(smol, middle, "forced"), (smol, middle, "max_prob"), (smol, {16: 0.0285}, "gate"),
             (steep, {10: 0.5, 20: 0.2}, "forced"), (steep, {10: 0.5, 20: 0.2}, "max_prob")]
    seen = set()
    for costs, prof, measure in cases:
        for B in (16, 64):
            ref = plan(costs, sorted(prof), prof, B, measure, policies=("token",))
            got = search(costs, sorted(prof), prof, devices=1, load=B, measure=measure)
            assert list(got["layout"].exits) == ref["exits"], (measure, B)
            assert got["layout"].boundaries == () and got["layout"].replicas == (1,)
            assert 1 / got["throughput"] == pytest.approx(ref["cost"], rel=1e-9)
            seen.add(ref["policy"])
    assert seen == {"token", "full"}       # both kinds of answer were compared


def test_uniform_pp_split_is_vllms():
    # vLLM get_pp_indices: equal parts, the remainder to the partitions before the last
    assert uniform_boundaries(30, 2) == (15,)
    assert uniform_boundaries(30, 4) == (7, 15, 23)                  # 7, 8, 8, 7
    assert uniform_boundaries(30, 8) == (3, 7, 11, 15, 19, 23, 27)    # 3, 4 x 6, 3
    assert uniform_boundaries(32, 8) == (4, 8, 12, 16, 20, 24, 28)


def test_scaling_to_a_7b_profile():
    # Llama-2-7B: q/o 2 x 4096^2 + k/v 2 x 4096^2 + MLP 3 x 4096 x 11008 = 202,375,168 MACs a
    # layer; SmolLM2-135M: 2 x 576^2 + 2 x 576 x 192 + 3 x 576 x 1536 = 3,538,944
    assert layer_macs(LLAMA_7B)["layer"] == 202_375_168
    assert layer_macs(SMOLLM2_135M)["layer"] == 3_538_944
    from vllm_e3.layout import normalise_costs

    smol = normalise_costs(json.load(open(CURVES)))
    big = scale_costs(smol, SMOLLM2_135M, LLAMA_7B)
    assert big["num_layers"] == 32
    assert big["layer"][64] == pytest.approx(smol["layer"][64] * 202_375_168 / 3_538_944)
    # head 4096 x 32000 against 576 x 49152 MACs
    assert big["head_per_row"] == pytest.approx(smol["head_per_row"] * 131_072_000 / 28_311_552)
    assert big["decision_per_row"]["max_prob"] == pytest.approx(big["head_per_row"])
    assert scale_profile({8: 0.3, 15: 0.25, 22: 0.2}, 30, 32) == {9: 0.3, 16: 0.25, 23: 0.2}


def test_layout_cli(tmp_path, capsys):
    from vllm_e3.cli import main

    curves = tmp_path / "knee.json"
    curves.write_text(json.dumps(KNEE))
    out = tmp_path / "res.json"
    assert main(["layout", "--curves", str(curves), "--devices", "4", "--profile", '{"2": 0.75}',
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "e3        stages [2] x[3, 1], exits [2]" in text
    res = json.load(open(out))
    assert res["e3"]["throughput"] == pytest.approx(96000)
    assert res["e3"]["layout"] == {"boundaries": [2], "replicas": [3, 1], "exits": [2]}
    # the force_exit form: 0.75 of the tokens reaching 2 is the same profile here
    assert main(["layout", "--curves", str(curves), "-N", "4", "--profile", '{"2": 0.75}',
                 "--rates", "--latency-bound", "1.06"]) == 0
    assert "e3        stages [] x[4], exits []" in capsys.readouterr().out
    assert main(["layout", "-N", "2", "--profile", "{}"]) == 2      # no curves, no model
