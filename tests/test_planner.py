"""The planner (`vllm-e3 plan`): its cost model against hand-computed values on
synthetic stage costs, the choices it makes from them (token where batches do
not matter, e3 only where parked requests have slots to wait in and regrouping
beats one bigger batch of as many requests in flight, full where
no exit pays), and the CLI on the real model writing what it chose."""
import json
import os
import subprocess
import sys

import pytest

from vllm_e3.planner import per_token_cost, plan

MS = 1e-3


def _costs(step_time, decision=0.0, fill=0.0, head=0.0, batches=(16, 32, 64, 128)):
    """Synthetic costs: one decoder layer takes step_time(b) seconds at batch b."""
    return {"num_layers": 30, "batches": list(batches),
            "layer": {b: step_time(b) for b in batches},
            "decision_per_row": {"forced": 0.0, "max_prob": decision},
            "fill_per_row_layer": fill, "head_per_row": head}


FLAT = _costs(lambda b: b * MS, fill=0.1 * MS, head=2 * MS)            # 1 ms per token at any batch
# a layer step costs the same up to batch 64 (per-token cost halves with the batch), then grows
STEEP = _costs(lambda b: max(b, 64) * MS)


def _saturated(k, batches=(16, 32, 64, 128)):
    """A layer step costs k ms up to batch k, then 1.5 ms more per row: past
    its saturation batch a bigger batch costs more per row, where regrouping
    at k beats one bigger batch."""
    return _costs(lambda b: (k + 1.5 * (b - k) if b > k else k) * MS, batches=batches)


SAT64 = _saturated(64)


def test_cost_model_values():
    assert per_token_cost(FLAT, [], {}, 64, "forced", "full") == pytest.approx(32 * MS)
    # 10 layers for all, 20 for half, KV fill of 20 layers for the half that leaves, head
    assert per_token_cost(FLAT, [10], {10: 0.5}, 64, "forced", "token") == pytest.approx(23 * MS)
    # steep: the continuing half runs stage 1 at batch 32, twice the per-token cost
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "token") == pytest.approx(30 * MS)
    # e3, target 64, with 128 slots: the half waits one step on average (0.5 parked per
    # running request), the first stage keeps 64 (128 / 1.5 > 64), stage 1 runs at 64
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "e3", 64, slots=128) == \
        pytest.approx(20 * MS)
    # per-exit targets: 0 never parks, the same as token
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "e3", [0], slots=128) == \
        pytest.approx(30 * MS)
    # with 64 slots the parked requests take the first stage's places: worse than token
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "e3", 64) > 30 * MS


def test_plan_picks_what_pays():
    # per-token cost independent of the batch: regrouping cannot pay, token does
    p = plan(FLAT, [10], {10: 0.5}, 64, "forced")
    assert (p["policy"], p["exits"]) == ("token", [10])
    assert p["relative_cost"] == pytest.approx(23 / 32)
    # at equal in-flight (128 slots: token runs the 128 as one batch) regrouping pays only
    # past the saturation batch. STEEP: token at 128 is 10 x 128/128 + 20 x 0.5 x 64/64 =
    # 20 ms, e3 at 64 with the half parked also 20 ms: a tie, and e3 is not taken
    p = plan(STEEP, [10], {10: 0.5}, 64, "forced", slots=128)
    assert (p["policy"], p["cost"], p["in_flight"]) == ("token", pytest.approx(20 * MS), 128)
    # SAT64: token at 128 rows pays 160/128 ms a row in stage 0: 12.5 + 10 = 22.5 ms; e3 20 ms
    assert per_token_cost(SAT64, [10], {10: 0.5}, 128, "forced", "token") == pytest.approx(22.5 * MS)
    p = plan(SAT64, [10], {10: 0.5}, 64, "forced", slots=128)
    assert (p["policy"], p["target_batch"], p["cost"]) == ("e3", [64], pytest.approx(20 * MS))
    # with no spare slots e3's parked requests take the first stage's places
    assert plan(SAT64, [10], {10: 0.5}, 64, "forced")["policy"] != "e3"
    # a decision that costs more than the layers it saves: no exit, never slower than full
    dear = _costs(lambda b: b * MS, decision=20 * MS)
    p = plan(dear, [10, 20], {10: 0.5, 20: 0.2}, 64, "max_prob")
    assert (p["policy"], p["exits"], p["relative_cost"]) == ("full", [], 1.0)


def test_tpot_model_and_bound():
    # e3 above: 20 ms per token at B0 = 64 tokens per step, and a token waits
    # 0.5 steps on average (half the tokens wait one): 20 * 64 * 1.5 ms; token:
    # 30 ms * 64 tokens per step, no wait -- the same latency, more throughput
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "e3", 64, slots=128, tpot=True) == \
        pytest.approx(1920 * MS)
    assert per_token_cost(STEEP, [10], {10: 0.5}, 64, "forced", "token", tpot=True) == \
        pytest.approx(1920 * MS)
    # E3's setting at batch 16, 32 slots, saturation at 16. At equal in-flight token's
    # requests wait as long as e3's do (32 in flight, by Little's law), so where e3 wins
    # its modelled TPOT is below token's: 0.787 here, and a bound of 1.0 takes nothing away
    sat16 = _saturated(16, batches=(8, 16, 32, 64, 128))
    fr = {8: 0.3, 15: 0.25, 22: 0.2}
    free = plan(sat16, [8, 15, 22], fr, 16, "forced", slots=32)
    assert free["policy"] == "e3" and free["tpot_vs_token"] == pytest.approx(0.78685, abs=1e-4)
    assert free["relative_cost"] == pytest.approx(0.524)
    for bound in (1.2, 1.0):
        p = plan(sat16, [8, 15, 22], fr, 16, "forced", slots=32, max_tpot_ratio=bound)
        assert (p["policy"], p["relative_cost"]) == ("e3", free["relative_cost"])
    # a bound below what e3 gives is honoured: token's own choice instead
    p = plan(sat16, [8, 15, 22], fr, 16, "forced", slots=32, max_tpot_ratio=0.5)
    assert p["policy"] != "e3" and p["relative_cost"] > free["relative_cost"]


@pytest.mark.parametrize("value", [0.5, "2", True, float("inf")])
def test_max_tpot_ratio_is_checked(value):
    from vllm_e3.config import E3Config, E3ConfigError

    with pytest.raises(E3ConfigError, match="max_tpot_ratio"):
        E3Config.from_dict({"policy": "e3", "exits": [8], "max_tpot_ratio": value})
    assert E3Config.from_dict({"policy": "e3", "exits": [8], "max_tpot_ratio": 1.5}).max_tpot_ratio == 1.5


def test_plan_cli_writes_full_when_the_head_decides(model_dir, tmp_path):
    """On the real model the full-vocabulary head as the exit decision costs
    ~8 layers a row: no exit of the middle profile pays, the plan is full."""
    from vllm_e3.prepare import model_view

    d = model_view(model_dir, str(tmp_path / "m"))
    os.makedirs(os.path.join(d, "e3"))
    with open(os.path.join(d, "e3", "config.json"), "w") as f:
        json.dump({"policy": "token", "exits": [8, 15, 22], "thresholds": [0.9, 0.9, 0.9]}, f)
    args = [sys.executable, "-m", "vllm_e3.cli", "plan", d, "--profile",
            '{"8": 0.3, "15": 0.25, "22": 0.2}', "--batch", "64"]
    out = subprocess.run(args + ["--confidence", "max_prob", "--write"], capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "plan: policy full" in out.stdout
    cfg = json.load(open(os.path.join(d, "e3", "config.json")))
    assert (cfg["policy"], cfg["exits"], cfg["thresholds"]) == ("full", [], [])


# ---- the exit profile a plan reads, and the plan at start-up ---------------------------------
def test_exit_profile_from_force_exit_and_from_calibration(deployed_model_dir):
    from vllm_e3.config import E3Config, load_e3_config
    from vllm_e3.planner import exit_profile

    # conditional rates of the tokens reaching each exit -> fractions of all tokens
    cfg = E3Config.from_dict({"policy": "token", "exits": [8, 15, 22],
                              "force_exit": {"8": 0.3, "15": 0.357, "22": 0.444}})
    got = exit_profile(cfg, deployed_model_dir)
    assert got == pytest.approx({8: 0.3, 15: 0.7 * 0.357, 22: 0.7 * 0.643 * 0.444})
    # thresholds of a verified choice in the shipped calibration (the 0.99 row's gate, which
    # the table did not deploy: it does not pay in the engine): its verified fractions
    raw = json.load(open(os.path.join(deployed_model_dir, "e3", "calibration.json")))
    row = next(r for r in raw["table"] if r["target_agreement"] == 0.99)
    gate = row["per_measure"]["gate"]
    cfg = E3Config.from_dict({"policy": "token", "exits": raw["exits"], "thresholds": gate["thresholds"],
                              "confidence": "gate"})
    assert exit_profile(cfg, deployed_model_dir) == dict(zip(raw["exits"], gate["verify"]["exit_fraction"]))
    # the shipped config deploys no thresholds, and thresholds nothing verified: no profile
    assert exit_profile(load_e3_config(deployed_model_dir), deployed_model_dir) is None
    odd = E3Config.from_dict({**cfg.to_dict(), "thresholds": [0.5] + [None] * (len(raw["exits"]) - 1)})
    assert exit_profile(odd, deployed_model_dir) is None


def _vllm_config(max_num_seqs, active=None):
    from types import SimpleNamespace

    import torch

    return SimpleNamespace(scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs,
                                                            max_num_active_seqs=active),
                           model_config=SimpleNamespace(dtype=torch.float32))


def test_startup_plan_choices(monkeypatch, model_dir):
    """startup_plan on synthetic stage costs (the measurement itself is the
    CLI test's): the policy never stronger than configured, exits without a
    threshold kept as stage boundaries, full when nothing pays."""
    import vllm_e3.planner as planner
    from vllm_e3.config import E3Config

    cfg = E3Config.from_dict({"policy": "e3", "exits": [10, 20], "force_exit": {"10": 0.5}})
    monkeypatch.setattr(planner, "measure_costs", lambda *a, **k: SAT64)
    got = planner.startup_plan(cfg, model_dir, _vllm_config(128, 64))
    # exit 10 pays under e3 with slots; 20 has no rate and no threshold: a boundary only
    assert (got.policy, got.exits, got.target_batch, got.plan) == ("e3", (10, 20), (64, 0), False)
    assert got.force_exit == {10: 0.5}
    got = planner.startup_plan(cfg, model_dir, _vllm_config(64))           # no spare slots
    assert got.policy != "e3"
    as_token = E3Config.from_dict({**cfg.to_dict(), "policy": "token"})
    assert planner.startup_plan(as_token, model_dir, _vllm_config(128, 64)).policy != "e3"
    monkeypatch.setattr(planner, "measure_costs", lambda *a, **k: FLAT)
    assert planner.startup_plan(as_token, model_dir, _vllm_config(64)).policy == "token"
    nothing = E3Config.from_dict({**cfg.to_dict(), "force_exit": {"10": 0.0}})
    got = planner.startup_plan(nothing, model_dir, _vllm_config(64))
    assert (got.policy, got.exits) == ("full", ())
    with pytest.raises(Exception, match="no exit profile"):
        planner.startup_plan(E3Config.from_dict({"policy": "e3", "exits": [10], "thresholds": [0.9],
                                                 "plan": True}), model_dir, _vllm_config(64))


@pytest.mark.slow
def test_plan_at_engine_start(model_dir):
    """`plan: true` in an engine's E3 config: the model measures at load and
    runs what pays. A profile where nothing exits cannot pay on any machine,
    so the engine runs the full model (the parent's forward: no E3 steps).
    Served for policy e3 (8 slots, 2 active), the plan prices full at the
    slots' in-flight, and the scheduler then admits all 8 at once: every
    request has its first token before the first one finishes (with 2
    active, the last two would start after six had finished)."""
    from vllm import LLM, SamplingParams

    from helpers import free_engine

    llm = LLM(model_dir, model_impl="e3", dtype="float32", enforce_eager=True, max_num_seqs=8,
              max_num_active_seqs=2, seed=0, disable_log_stats=False,
              additional_config={"e3": {"policy": "e3", "exits": [8, 15, 22],
                                        "force_exit": {"8": 0.0}, "plan": True}})
    try:
        cfg = llm.collective_rpc("e3_config")[0]
        assert (cfg["policy"], cfg["exits"], cfg["plan"]) == ("full", [], False)
        out = llm.generate(["What is the capital of France?"] * 8,
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in out)
        assert max(o.metrics.first_token_ts for o in out) < min(o.metrics.last_token_ts for o in out)
        assert llm.collective_rpc("e3_exit_stats")[0]["steps"] == 0
    finally:
        free_engine(llm)


@pytest.mark.slow
def test_profile_cli_then_plan_simulates(model_dir, tmp_path):
    """`vllm-e3 profile` runs an engine under token with the config's exits,
    writes the costs it measured (layer time at the row counts its sweep ran,
    exit boundary, fill, head, the rest of a step), and `vllm-e3 plan` then
    plans by simulating them."""
    from vllm_e3.prepare import model_view

    d = model_view(model_dir, str(tmp_path / "m"))
    os.makedirs(os.path.join(d, "e3"))
    with open(os.path.join(d, "e3", "config.json"), "w") as f:
        json.dump({"policy": "e3", "exits": [8, 15, 22],
                   "force_exit": {"8": 0.3, "15": 0.357, "22": 0.444}}, f)
    prof = subprocess.run([sys.executable, "-m", "vllm_e3.cli", "profile", d, "--batch", "8",
                           "--requests", "8", "--output-len", "16", "--enforce-eager"],
                          capture_output=True, text=True, timeout=900)
    assert prof.returncode == 0, prof.stderr[-3000:]
    costs = json.load(open(os.path.join(d, "e3", "engine_costs.json")))
    assert {1, 2, 4, 8} <= {int(m) for m in costs["layer"]}      # the sweep's closed batches
    assert all(costs[k] > 0 for k in ("exit_s", "fill_s", "head_s"))
    assert costs["compiled"] is False and costs["workload"]["requests"] == 8
    plan = subprocess.run([sys.executable, "-m", "vllm_e3.cli", "plan", d, "--batch", "8",
                           "--slots", "16", "--requests", "24", "--output-len", "32"],
                          capture_output=True, text=True, timeout=600)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "simulating" in plan.stderr and "simulated" in plan.stdout


def test_saturation_of_the_layer_curve():
    """vllm_e3.profile.saturation: the row count from which a bigger batch
    buys nothing (cost per row within 5% of the least), on literal curves."""
    from vllm_e3.profile import saturation

    # a fixed 4 ms plus 0.1 ms a row until 128 rows, then 0.13 ms a row: per row
    # 4.1, 2.1, 1.1, 0.6, 0.35, 0.225, 0.1625, 0.131 (128), 0.13, 0.13, 0.13 ms
    curve = {m: (4 + 0.1 * m if m <= 128 else 0.13 * m) * MS for m in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)}
    assert saturation(curve) == 128
    assert saturation({m: (4 + 0.1 * m) * MS for m in (1, 8, 64, 512)}) is None    # still falling
    assert saturation({1: 1.0, 7: 2.0}) is None                                    # no two powers of two
