"""`vllm-e3 train` / `vllm-e3 calibrate` on a tiny random Llama (no vLLM engine).

The corpus generator is a stand-in (the train pipeline takes `generate=`):
fixed random continuations, teacher-forced like any text; the free-running
test uses the tiny model's greedy decode through transformers. Everything else
-- capture, training, gate, artifact, calibration math -- is the code the
commands run. One torch thread: tiny ops on a loaded 2-core machine run far
faster without OpenMP hand-offs.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from helpers import tiny_llama, tiny_prompt_ids
from vllm_e3.bounds import binom_cdf, cp_upper
from vllm_e3.config import E3Config, E3ConfigError
from vllm_e3.ramps import model_hash, read_ramps_header, validate_ramps
from vllm_e3.simulate import net_cost
from vllm_e3.tools.calibrate import load_ramps
from vllm_e3.tools.costs import Costs, EngineModel
from vllm_e3.tools.data import Corpus, FrozenHead, builtin_prompts, capture, load_base, ramp_eval, topk_kl
from vllm_e3.tools.reference import free_run, free_run_batched
from vllm_e3.tools.selection import Scores, calibrate_scores, evaluate
from vllm_e3.tools.train import Recipe, train, train_ramp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREPARED = os.path.expanduser(os.path.join(os.environ.get("VLLM_E3_HOME", "~/.cache/vllm-e3"),
                                           "SmolLM2-135M-Instruct"))
ARTIFACT = os.path.join(REPO, "artifacts", "smollm2-135m", "e3")
L_TINY, D_TINY, V_TINY = 4, 64, 512


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random 4-layer Llama (d=64, vocab 512, tied head) saved as a HF dir."""
    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"), layers=L_TINY, hidden=D_TINY, vocab=V_TINY,
                      tie=True)


def hf_greedy(model_dir, prompt_ids, max_tokens):
    """Greedy continuations with transformers: the test stand-in for vLLM."""
    model = load_base(model_dir)
    out = []
    for p in prompt_ids:
        ids = model.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        out.append(ids[0, len(p):].tolist())
    return out


def tiny_prompts(n, seed=0, lo=2, hi=6):
    return tiny_prompt_ids(n, V_TINY, seed, lo, hi)


def random_continuations(model_dir, prompt_ids, max_tokens):
    """Corpus stand-in: fixed pseudo-random continuations of each prompt."""
    return [tiny_prompts(1, seed=1000 + i, lo=max_tokens, hi=max_tokens + 1)[0] for i in range(len(prompt_ids))]


@pytest.fixture(scope="module")
def tiny_captured(tiny_dir):
    model = load_base(tiny_dir)
    pids = tiny_prompts(64)
    corpus = Corpus(pids, random_continuations(tiny_dir, pids, 40))
    return model, capture(model, corpus, [2, 3], progress=False)


# ---- training ------------------------------------------------------------------------------
def test_training_lowers_loss_and_beats_identity(tiny_captured):
    model, c = tiny_captured
    head = FrozenHead.of(model)
    valid = c.seq >= 48                                            # whole sequences held out
    tr, va = c.rows(~valid), c.rows(valid)
    e = 2
    ramp, hist = train_ramp(tr.states[e], tr.final, tr.top_lp, tr.top_ids, head, rank=32,
                            mse_steps=300, steps=200, batch=64, lr=1e-2, seed=0, progress=False)
    assert sum(hist["mse"][-10:]) < sum(hist["mse"][:10])
    assert sum(hist["kl"][-10:]) < sum(hist["kl"][:10])
    ident = ramp_eval(None, va.states[e], head, va.top_lp, va.top_ids)
    trained = ramp_eval(ramp, va.states[e], head, va.top_lp, va.top_ids)
    assert float(trained["kl"].mean()) < 0.85 * float(ident["kl"].mean())
    final = va.top_ids[:, 0]                       # random text: the teacher's top-1 is the reference
    agree_id = float((ident["argmax"] == final).float().mean())
    agree_tr = float((trained["argmax"] == final).float().mean())
    assert agree_tr > agree_id + 0.03, (agree_id, agree_tr)


def test_teacher_forced_rows_are_labelled_with_the_models_top1(tiny_dir):
    """Text that is not the model's output (Corpus.forced): a row's label is
    the full model's own top-1 there, not the text's next token."""
    model = load_base(tiny_dir)
    pids = tiny_prompts(6, seed=3)
    gens = random_continuations(tiny_dir, pids, 10)
    forced = capture(model, Corpus(pids, gens, forced=True), [2], progress=False)
    served = capture(model, Corpus(pids, gens), [2], progress=False)
    assert torch.equal(forced.served, forced.top_ids[:, 0])
    assert torch.equal(served.served, torch.tensor([t for g in gens for t in g[1:]]))
    assert not torch.equal(forced.served, served.served)
    assert Corpus(pids, gens, forced=True).data_hash() != Corpus(pids, gens).data_hash()
    both = served.cat(forced)
    assert both.num_rows == 2 * served.num_rows and int(both.seq.max()) == 2 * len(pids) - 1


def test_text_corpus_is_deterministic_and_keeps_out_what_it_is_told(prepared_model_dir):
    from transformers import AutoTokenizer

    from vllm_e3.tools.data import text_corpus

    tok = AutoTokenizer.from_pretrained(prepared_model_dir)
    c, prov = text_corpus(tok, 8, 32, [])
    assert len(c.gen_ids) == 8 and all(len(p) == 1 and len(g) == 31 for p, g in zip(c.prompt_ids, c.gen_ids))
    assert c.forced and "PSF License" in prov["source"] and prov["dropped_overlapping_heldout"] == 0
    again, _ = text_corpus(tok, 8, 32, [])
    assert again.data_hash() == c.data_hash()
    first = tok.decode(c.prompt_ids[0] + c.gen_ids[0])
    kept, prov2 = text_corpus(tok, 8, 32, [first])
    assert prov2["dropped_overlapping_heldout"] >= 1
    assert c.prompt_ids[0] + c.gen_ids[0] not in [p + g for p, g in zip(kept.prompt_ids, kept.gen_ids)]


def test_capture_rows_are_the_decode_rows(tiny_captured):
    model, c = tiny_captured
    # 64 sequences of 40 generated tokens -> 39 decode rows each; served[r] is the token after row r
    assert c.num_rows == 64 * 39
    assert c.served[:39].tolist() == random_continuations(None, [0], 40)[0][1:]
    assert c.final.shape == (c.num_rows, D_TINY) and c.states[2].dtype == torch.bfloat16
    # the last-layer state through the model's own norm + head gives the teacher
    head = FrozenHead.of(model)
    lp = torch.log_softmax(head.logits(head.head_in(c.final[:64].float())), -1)
    assert float(topk_kl(c.top_lp[:64], c.top_ids[:64], lp)) < 1e-2


def test_topk_kl_matches_full_kl_when_k_is_vocab():
    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 11, generator=g) * 3, -1)
    q = torch.log_softmax(torch.randn(5, 11, generator=g) * 3, -1)
    v, k = p.topk(11, -1)
    full = (p.exp() * (p - q)).sum(1).mean()
    assert torch.allclose(topk_kl(v, k, q), full, atol=1e-5)


def test_train_end_to_end_writes_a_valid_artifact(tiny_dir, tmp_path):
    out = tmp_path / "e3"
    recipe = Recipe(exits=[2, 3], rank=8, max_tokens=16, mse_steps=60, steps=30, batch=64, lr=1e-2)
    rep = train(tiny_dir, recipe, out_dir=str(out), prompt_ids=tiny_prompts(24, seed=1),
                cache_dir=str(tmp_path / "cache"), generate=random_continuations, progress=False)
    path = str(out / "ramps.safetensors")
    specs = validate_ramps(path, [2, 3], D_TINY)
    assert all(s.rank == 8 and s.has_gate for s in specs.values())
    meta, _ = read_ramps_header(path)
    assert meta["base_model_hash"] == model_hash(tiny_dir)
    assert json.loads(meta["exits"]) == [2, 3]
    assert json.loads(meta["recipe"])["rank"] == 8 and len(meta["data_hash"]) == 64
    assert set(rep["exits"]) == {"2", "3"}
    # resumable: a rerun finds the corpus and the captured states in the cache
    cached = sorted(os.listdir(tmp_path / "cache"))
    assert any(n.startswith("corpus-") for n in cached) and any(n.startswith("capture-") for n in cached)

    def no_generate(*a):
        raise AssertionError("corpus should come from the cache")

    train(tiny_dir, recipe, out_dir=str(out), prompt_ids=tiny_prompts(24, seed=1),
          cache_dir=str(tmp_path / "cache"), generate=no_generate, progress=False)


# ---- artifact round trip and errors -------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_artifact(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "e3"
    recipe = Recipe(exits=[1, 3], rank=4, max_tokens=8, mse_steps=10, steps=5, batch=32)
    train(tiny_dir, recipe, out_dir=str(out), prompt_ids=tiny_prompts(8, seed=2),
          cache_dir=str(out.parent / "cache"), generate=random_continuations, progress=False)
    return str(out / "ramps.safetensors")


def test_artifact_round_trips(tiny_artifact):
    from safetensors.torch import load_file

    raw = load_file(tiny_artifact)
    ramps, meta = load_ramps(tiny_artifact, D_TINY, 1e-6)
    assert sorted(ramps) == [1, 3]
    for e, ramp in ramps.items():
        for key, param in ramp.param_items(e):
            assert raw[key].dtype == torch.bfloat16
            assert torch.equal(param.data, raw[key].float())
    assert meta["format"] == "vllm-e3.ramps/1"


def test_wrong_hidden_size_is_a_clear_error(tiny_artifact):
    with pytest.raises(E3ConfigError, match="ramps.safetensors.*hidden size 128"):
        validate_ramps(tiny_artifact, [1, 3], 128)
    with pytest.raises(E3ConfigError, match="ramps.safetensors"):
        load_ramps(tiny_artifact, 128, 1e-6)


def test_corrupt_file_is_a_clear_error(tiny_artifact, tmp_path):
    bad = tmp_path / "ramps.safetensors"
    data = open(tiny_artifact, "rb").read()
    bad.write_bytes(data[: len(data) // 2])                        # truncated
    with pytest.raises(E3ConfigError, match=str(bad)):
        load_ramps(str(bad), D_TINY, 1e-6)
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(E3ConfigError, match=str(bad)):
        validate_ramps(str(bad), [1], D_TINY)


# ---- calibration on a planted distribution ---------------------------------------------------
COSTS = Costs(head=8.0, ramp=0.01, gate=0.001, kv_fill=0.05, layer_ms=1.0, rows=64, context=128, threads=1)


def planted(n_seq=400, per_seq=50, seed=0):
    """Two exits (10 and 14 of 16 layers). Exit 10: gate ~ U(0,1) and the ramp
    agrees with probability equal to the gate (calibrated), so exiting above t
    costs (1 - t)^2 / 2 disagreements per row. Exit 14 never agrees (its gate is
    uninformative), so using it can only hurt."""
    g = torch.Generator().manual_seed(seed)
    n = n_seq * per_seq
    c10 = torch.rand(n, generator=g)
    a10 = torch.rand(n, generator=g) < c10
    c14 = torch.rand(n, generator=g)
    a14 = torch.zeros(n, dtype=torch.bool)
    conf = torch.stack([c10, c14], 1)
    return Scores((10, 14), torch.stack([a10, a14], 1),
                  {"max_prob": conf, "margin": conf, "gate": conf},
                  torch.arange(n_seq, dtype=torch.int32).repeat_interleave(per_seq))


def test_cp_upper_bound():
    assert math.isclose(cp_upper(0, 100), 1 - 0.05 ** (1 / 100), rel_tol=1e-12)
    for k, n in ((1, 50), (5, 100), (40, 5000)):
        u = cp_upper(k, n)
        assert u > k / n and math.isclose(binom_cdf(k, n, u), 0.05, abs_tol=1e-6)
    # independent of the code under test: the exact binomial sum at the bound is alpha
    u = cp_upper(5, 100)
    assert sum(math.comb(100, i) * u**i * (1 - u) ** (100 - i) for i in range(6)) == pytest.approx(0.05, abs=1e-9)
    assert u == pytest.approx(0.1023, abs=1e-4)
    assert cp_upper(3, 3) == 1.0


def test_calibration_meets_target_on_planted_data():
    s = planted()
    cal = calibrate_scores(s, COSTS, 16, (0.95, 0.99))
    row = next(r for r in cal["table"] if r["target_agreement"] == 0.99)
    best = row["chosen"]
    assert row["policy"] == "token" and best["measure"] == "gate"   # the head (8 layers) never pays
    assert best["exits_kept"] == [10]                               # exit 14 only adds errors
    t = best["thresholds"][0]
    # true disagreement at t is (1 - t)^2 / 2 <= 1% iff t >= 1 - sqrt(0.02) = 0.8586; the
    # verify-split bound is met and the choice is not needlessly timid
    assert 0.8586 - 0.01 <= t <= 0.93
    assert (1 - t) ** 2 / 2 <= 0.0101
    assert best["verify"]["cp_upper_95"] <= 0.01
    # a fresh sample from the same distribution agrees >= 99% at the chosen thresholds
    fresh = evaluate(planted(seed=7), "gate", best["thresholds"], COSTS, 16)
    assert 1 - fresh.errors / fresh.n >= 0.99 - 0.002
    assert best["verify"]["expected_net_cost"] < 1.0
    # a looser target exits more
    loose = next(r for r in cal["table"] if r["target_agreement"] == 0.95)["chosen"]
    assert loose["verify"]["exit_fraction"][0] > best["verify"]["exit_fraction"][0]


def test_calibration_says_full_when_nothing_pays():
    s = planted()
    dear = Costs(head=8.0, ramp=3.0, gate=3.0, kv_fill=0.9, layer_ms=1.0, rows=64, context=128, threads=1)
    cal = calibrate_scores(s, dear, 16, (0.99,))
    assert cal["table"][0]["policy"] == "full" and cal["table"][0]["chosen"] is None


def engine_costs(exit_s, layer_fixed=1e-3):
    """A 16-layer engine: a layer costs `layer_fixed` + 0.1 ms per row, a step 2 ms plus
    0.01 ms per request, a row-layer of KV fill 0.02 ms, the head 0.05 ms per row; each exit
    boundary that decides costs `exit_s`."""
    return {"num_layers": 16, "layer": {m: layer_fixed + 1e-4 * m for m in (1, 2, 4, 8, 16, 32, 64)},
            "prompt_s": 1e-5, "prompt_rest_s": 1e-6, "exit_s": exit_s, "fill_s": 2e-5, "head_s": 5e-5,
            "step_s": 2e-3, "row_s": 1e-5}


def test_calibration_deploys_full_when_the_engine_says_exits_cannot_pay():
    # the per-row model says gate at exit 10 pays (test above); in an engine whose exit
    # boundary costs 50 ms a step (~3 decoder layers at 64 rows), a few percent exiting cannot
    s = planted()
    dear = EngineModel(engine_costs(0.05), "test")
    cal = calibrate_scores(s, COSTS, 16, (0.99,), engine=dear)
    row = cal["table"][0]
    assert row["policy"] == "full" and row["chosen"] is None
    assert "no exit pays" in row["reason"] and "gate" in row["reason"]
    gate = row["per_measure"]["gate"]
    assert gate["verify"]["expected_net_cost"] < 1.0 < min(gate["engine_net_cost"].values())
    # the recorded costs reproduce the modelled figure
    w64 = {"batch": 64, "prompt_len": 64, "output_len": 128}
    f = gate["verify"]["exit_fraction"][0]
    assert net_cost(cal["engine_model"]["costs"], [10, 14], {10: f}, check_s=dear.check_s(COSTS, "gate"),
                    **w64) == pytest.approx(gate["engine_net_cost"]["b64"], abs=1e-5)
    # with a cheap boundary and layers priced by their rows, the same choice pays
    cheap = EngineModel(engine_costs(1e-5, layer_fixed=0.0), "test")
    row = calibrate_scores(s, COSTS, 16, (0.99,), engine=cheap)["table"][0]
    assert row["policy"] == "token" and max(row["chosen"]["engine_net_cost"].values()) <= 1 - cheap.min_gain


def test_shipped_calibration_is_never_slower_than_full():
    """The shipped config's row, modelled in the engine with the costs calibration.json records,
    is no slower than `full`; every row the table deploys (a request's target) pays by its bar,
    and every row it leaves at full has no measure that does."""
    cal = json.load(open(os.path.join(ARTIFACT, "calibration.json")))
    cfg = json.load(open(os.path.join(ARTIFACT, "config.json")))
    eng = cal["engine_model"]
    assert eng is not None, "the shipped calibration was made without engine costs"
    costs = dict(eng["costs"], layer={int(k): v for k, v in eng["costs"]["layer"].items()})
    bar = 1.0 - eng["min_gain"]
    deployed = next(r for r in cal["table"] if r["target_agreement"] == cal["target_agreement"])
    assert cfg["policy"] == deployed["policy"]
    for r in cal["table"]:
        cands = [v for v in r["per_measure"].values() if isinstance(v, dict) and v["exits_kept"]]
        for v in cands:   # each measure's figure recomputed from the recorded costs and fractions
            fr = {e: f for e, f, t in zip(cal["exits"], v["verify"]["exit_fraction"], v["thresholds"])
                  if t is not None}
            chk = EngineModel(costs, "").check_s(Costs(**cal["costs_in_layers"]), v["measure"])
            for w in ({"batch": 16, "prompt_len": 64, "output_len": 128},
                      {"batch": 64, "prompt_len": 64, "output_len": 128}):
                got = net_cost(costs, cal["exits"], fr, check_s=chk, **w)
                assert got == pytest.approx(v["engine_net_cost"][f"b{w['batch']}"], abs=1e-4)
        if r["policy"] == "token":
            assert max(r["chosen"]["engine_net_cost"].values()) <= bar
        else:
            assert all(max(v["engine_net_cost"].values()) > bar for v in cands)
    if deployed["policy"] == "token":
        assert max(deployed["chosen"]["engine_net_cost"].values()) <= 1.0


def test_simulate_counts_costs():
    s = Scores((2,), torch.tensor([[True], [False], [True], [True]]),
               {m: torch.tensor([[0.9], [0.95], [0.1], [0.99]]) for m in ("max_prob", "margin", "gate")},
               torch.zeros(4, dtype=torch.int32))
    o = evaluate(s, "gate", [0.5], COSTS, 4)
    # rows 0, 1, 3 leave at 2 (row 1 disagrees); row 2 runs all 4 layers
    assert o.errors == 1 and o.exit_frac == [0.75]
    check = COSTS.ramp + COSTS.gate
    want = (3 * (2 + check + 2 * COSTS.kv_fill) + (4 + check)) / 4
    assert o.cost == pytest.approx(want) and o.layers_run == pytest.approx(2.5)


def test_calibrate_end_to_end_on_the_tiny_model(tiny_dir, tiny_artifact, tmp_path):
    """`vllm-e3 calibrate` on the tiny model, its corpus a stand-in: it deploys `full` and says
    why (nothing on this random model meets a target), records the engine costs it judged by,
    and the report carries every measure's AUC and check cost (the shortlist ones included)
    and the frontier. The engine's verdict itself: the planted test above."""
    import shutil

    from vllm_e3.config import SHORTLIST
    from vllm_e3.tools.calibrate import calibrate

    out = tmp_path / "e3"
    shutil.copytree(os.path.dirname(tiny_artifact), out)
    costs = dict(engine_costs(1.0), num_layers=L_TINY)          # a second per exit boundary
    path = tmp_path / "engine_costs.json"
    path.write_text(json.dumps(costs))
    rep = calibrate(tiny_dir, out_dir=str(out), n_humaneval=8, max_tokens=12, free_prompts=2, free_tokens=6,
                    cost_rows=8, cache_dir=str(tmp_path / "cache"), progress=False, engine_costs=str(path),
                    prompt_ids=tiny_prompts(16, seed=5), train_prompt_ids=tiny_prompts(8, seed=2),
                    generate=random_continuations, shortlist_ks=(16, 128))
    cal = json.load(open(out / "calibration.json"))
    cfg = json.load(open(out / "config.json"))
    assert cfg["policy"] == "full" and rep["config"] == cfg
    row = next(r for r in cal["table"] if r["target_agreement"] == 0.99)
    assert row["policy"] == "full" and row["reason"]
    assert cal["engine_model"]["source"] == str(path) and cal["engine_model"]["costs"]["exit_s"] == 1.0
    q = rep["confidence_quality"]
    assert {f"{SHORTLIST}16", f"{SHORTLIST}128", "max_prob", "margin", "gate"} <= set(q)
    for m, v in q.items():
        assert set(v["exits"]) == {"1", "3"} and v["check_layers"] > 0
        assert all(0.0 <= x["auc"] <= 1.0 or math.isnan(x["auc"]) for x in v["exits"].values())
    # (check costs are timed, so how they compare is a benchmark's business, not this test's:
    # on this 512-token vocabulary a 16-row and a 512-row check differ by less than the noise)
    assert set(rep["shortlist_coverage"]) == {16, 128}
    assert len(cal["shortlist"]) == 128 and len(set(cal["shortlist"])) == 128   # stored for the engine
    assert {r["measure"] for r in rep["frontier"]} >= {f"{SHORTLIST}16", "gate"}


def test_auc_and_shortlist_order_against_literal_values():
    from vllm_e3.tools.selection import auc, shortlist_from

    # two of four pairs ordered right, one tie counted half, one wrong: (2 + 0.5 + 0) / 4 ... by hand:
    # positives 0.35, 0.8 against negatives 0.1, 0.4: 0.35>0.1, 0.35<0.4, 0.8>0.1, 0.8>0.4 -> 3/4
    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([False, False, True, True])) == 0.75
    assert auc(torch.tensor([0.5, 0.5]), torch.tensor([True, False])) == 0.5
    assert auc(torch.tensor([0.5, 0.7]), torch.tensor([True, True])) == 0.5      # no negatives
    # by count, then unseen ids in order
    assert shortlist_from([[5, 5, 3], [3, 7, 5]], 10, 4).tolist() == [5, 3, 7, 0]


# ---- free-running loop -----------------------------------------------------------------------
def test_free_run_without_exits_is_greedy_and_with_kv_fill_runs(tiny_dir, tiny_artifact):
    model = load_base(tiny_dir)
    head = FrozenHead.of(model)
    ramps, _ = load_ramps(tiny_artifact, D_TINY, model.config.rms_norm_eps)
    p = tiny_prompts(2, seed=5)[0]
    toks, where = free_run(model, head, ramps, E3Config(policy="full"), p, 12, set())
    assert toks == hf_greedy(tiny_dir, [p], 12)[0] and set(where) == {L_TINY}
    always = E3Config.from_dict({"policy": "token", "exits": [1], "thresholds": [0.0], "confidence": "gate"})
    toks2, where2 = free_run(model, head, ramps, always, p, 12, set())
    assert len(toks2) == 12 and where2[0] == L_TINY and set(where2[1:]) == {1}


def test_batched_free_run_matches_the_per_row_loop(tiny_dir, tiny_artifact):
    """Left padding, per-row exits at two exits and the in-place KV fill of the
    batched loop give the per-row loop's tokens and exits, row for row."""
    model = load_base(tiny_dir)
    head = FrozenHead.of(model)
    ramps, _ = load_ramps(tiny_artifact, D_TINY, model.config.rms_norm_eps)
    prompts = tiny_prompts(5, seed=9, lo=2, hi=9)
    cfgs = [E3Config(policy="full"),
            E3Config.from_dict({"policy": "token", "exits": [1, 3], "thresholds": [0.5, 0.4],
                                "confidence": "gate"}),
            E3Config.from_dict({"policy": "token", "exits": [1, 3], "thresholds": [0.2, 0.1],
                                "confidence": "max_prob"})]
    exited_somewhere = 0
    for cfg in cfgs:
        toks_b, where_b = free_run_batched(model, head, ramps, cfg, prompts, 10, set())
        for p, tb, wb in zip(prompts, toks_b, where_b):
            t1, w1 = free_run(model, head, ramps, cfg, p, 10, set())
            assert (tb, wb) == (t1, w1)
            exited_somewhere += sum(1 for w in w1 if w < L_TINY)
    assert exited_somewhere > 0


# ---- the committed artifact -----------------------------------------------------------------------
def test_committed_artifact_matches_the_prepared_model():
    path = os.path.join(ARTIFACT, "ramps.safetensors")
    assert os.path.isfile(path), f"{path} is missing: make ramps"
    meta, _ = read_ramps_header(path)
    exits = json.loads(meta["exits"])
    validate_ramps(path, exits, 576)
    assert os.path.getsize(path) < 5e6
    cfg = E3Config.from_dict(json.load(open(os.path.join(ARTIFACT, "config.json"))))
    assert set(cfg.exits) <= set(exits)
    if not os.path.isdir(PREPARED):
        pytest.skip(f"prepared model dir {PREPARED} does not exist (run `vllm-e3 prepare`)")
    assert meta["base_model_hash"] == model_hash(PREPARED)


def test_builtin_prompt_splits_are_disjoint():
    tr, ho = builtin_prompts("train"), builtin_prompts("heldout")
    assert len(tr) >= 100 and len(ho) >= 25 and not set(tr) & set(ho)
