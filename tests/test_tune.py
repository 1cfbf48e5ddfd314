"""`vllm-e3 tune` on a model the project did not ship: a tiny random Qwen2
(q/k/v biases, which Llama lacks; float32; the embedded model's tokenizer and
chat template) made here, nothing downloaded. One tune run with small sizes,
profiling eager; then the `vllm serve` line it prints answers over HTTP, and
the response's exit statistics agree with what the summary chose. The
resumability rules run on stand-in steps (no engines).
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from servers import complete, get, root, vllm_server

LAYERS, HIDDEN = 8, 128
# small everywhere; 240 held-out rows verify a 0.95 target (the default 0.99 needs ~900)
SIZES = ["--exits", "4,6", "--rank", "8", "--max-prompts", "8", "--max-tokens", "16", "--mse-steps", "30",
         "--steps", "20", "--train-batch", "64", "--humaneval", "0", "--max-heldout", "16",
         "--free-prompts", "2", "--free-tokens", "8", "--cost-rows", "16", "--target-agreement", "0.95",
         "--batch", "4", "--requests", "8", "--prompt-len", "16", "--output-len", "16", "--enforce-eager"]
E3_FILES = ("ramps.safetensors", "train_report.json", "calibration.json", "config.json", "report.json",
            "tune_state.json", "tune_summary.json")


@pytest.fixture(scope="module")
def tiny_qwen(prepared_model_dir, tmp_path_factory):
    """A random 8-layer Qwen2 (hidden 128, 4 heads / 2 KV heads, tied head) with
    the embedded model's tokenizer files, so its vocabulary is that size."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    d = tmp_path_factory.mktemp("tiny-qwen2") / "model"
    tok = AutoTokenizer.from_pretrained(prepared_model_dir)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=2 * HIDDEN,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    model = Qwen2ForCausalLM(cfg)
    assert model.model.layers[0].self_attn.q_proj.bias is not None      # what Llama lacks
    model.save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(os.path.join(prepared_model_dir, name), d)
    return str(d)


def _tune(model_dir, cache, *extra):
    cmd = [os.path.join(os.path.dirname(sys.executable), "vllm-e3"), "tune", model_dir, *SIZES,
           "--cache-dir", str(cache), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def tuned(tiny_qwen, tmp_path_factory):
    cache = tmp_path_factory.mktemp("tune-cache")
    out = _tune(tiny_qwen, cache, "--no-progress")
    summary = json.load(open(os.path.join(tiny_qwen, "e3", "tune_summary.json")))
    return tiny_qwen, cache, out, summary


@pytest.mark.slow
def test_tune_writes_every_file_and_a_summary_that_matches_them(tuned):
    model_dir, _, out, s = tuned
    e3 = os.path.join(model_dir, "e3")
    for name in E3_FILES:
        assert s["files"][name] == os.path.join(e3, name)
        if name.endswith(".json"):
            json.load(open(os.path.join(e3, name)))
    # one line per step, with the time left
    for i, step in enumerate(("train", "calibrate", "profile", "plan"), 1):
        assert f"[tune {i}/4] {step}" in out.stderr
    assert "est." in out.stderr and "s left)" in out.stderr
    # the frontier is calibration.json's, row for row
    cal = json.load(open(os.path.join(e3, "calibration.json")))
    assert [r["target"] for r in s["frontier"]] == [r["target_agreement"] for r in cal["table"]]
    assert [r["policy"] for r in s["frontier"]] == [r["policy"] for r in cal["table"]]
    for r in s["frontier"]:
        if r["policy"] != "full":
            assert r["agreement"] >= r["target"] and 0.0 < r["layers_skipped"] < 1.0
    # what the summary says is deployed is what config.json holds, and the plan chose it
    cfg = json.load(open(os.path.join(e3, "config.json")))
    assert s["deployed"]["policy"] == cfg["policy"] == s["plan"]["policy"]
    assert s["exits_pay"] == (cfg["policy"] != "full")
    if s["exits_pay"]:
        assert s["modelled_speedup"] > 1.0 and cfg["exits"] and all(x is not None for x in cfg["thresholds"])
    else:
        assert s["modelled_speedup"] == 1.0
    if "skipped" not in s["plan"]:              # profiled and planned: the engine's costs are there
        costs = json.load(open(os.path.join(e3, "engine_costs.json")))
        assert costs["compiled"] is False and costs["num_layers"] == LAYERS
    serve = shlex.split(s["serve"])
    assert serve[:5] == ["vllm", "serve", model_dir, "--model-impl", "e3"]
    assert "--enforce-eager" in serve and "--dtype" not in serve       # the checkpoint is float32
    assert s["serve"] in out.stdout and "verified frontier" in out.stdout


@pytest.mark.slow
def test_a_rerun_skips_every_step_that_is_done(tuned):
    model_dir, cache, first, s = tuned
    state = os.path.join(model_dir, "e3", "tune_state.json")
    before = open(state).read()
    again = _tune(model_dir, cache, "--no-progress")
    for i, step in enumerate(("train", "calibrate", "profile", "plan"), 1):
        assert f"[tune {i}/4] {step}: up to date, skipped" in again.stderr
    assert open(state).read() == before
    assert json.load(open(os.path.join(model_dir, "e3", "tune_summary.json")))["serve"] == s["serve"]


@pytest.mark.slow
def test_the_served_statistics_agree_with_the_summary(tuned, tmp_path):
    model_dir, _, _, s = tuned
    args = shlex.split(s["serve"])[3:] + ["--served-model-name", "m"]
    with vllm_server(model_dir, args, tmp_path / "server.log", {"VLLM_PLUGINS": "e3,e3_http"}) as (url, _):
        status, body = complete(url, "Write one sentence about the ocean.", max_tokens=12)
        assert status == 200 and body["usage"]["completion_tokens"] == 12, body
        status, st = get(f"{root(url)}/v1/e3/requests/{body['id']}")
    assert status == 200, st
    if s["exits_pay"]:
        # the first token comes from the prefill, which runs every layer
        assert st["tokens"] == 11 and st["layers_full"] == 11 * LAYERS
        assert st["layers_run"] < st["layers_full"]
        assert st["exited"] and {int(e) for e in st["exited"]} <= set(s["deployed"]["exits"])
    else:
        # policy full is vanilla's forward: nothing exits, so nothing is skipped
        assert st["layers_run"] == st["layers_full"] and not st["exited"]


# ---- resumability, on stand-in steps --------------------------------------------------------
def test_steps_rerun_from_the_first_whose_inputs_or_files_changed(tmp_path, monkeypatch):
    from vllm_e3.tools import tune

    ran = []

    def fake(step):
        def run(t):
            ran.append(step)
            for name in tune.OUTPUTS[step]:
                with open(t.path(name), "a") as f:      # each run writes something new
                    f.write(f"{step} {len(ran)}\n")
            return {}
        return run

    monkeypatch.setattr(tune, "RUN", {s: fake(s) for s in tune.STEPS})
    monkeypatch.setattr("vllm_e3.ramps.model_hash", lambda d: "model")
    args = argparse.Namespace(force=False, prompts=None, **{k: 1 for ks in tune.INPUTS.values() for k in ks})
    os.makedirs(tmp_path / "e3")
    est = tune.Estimate({s: 1.0 for s in tune.STEPS}, {})

    def run(**change):
        ran.clear()
        t = tune.Tuning(argparse.Namespace(**{**vars(args), **change}), str(tmp_path), str(tmp_path / "e3"),
                        json.load(open(tmp_path / "e3" / tune.STATE_FILENAME))
                        if os.path.isfile(tmp_path / "e3" / tune.STATE_FILENAME) else {"steps": {}})
        tune.run_steps(t, est)
        return list(ran)

    assert run() == list(tune.STEPS)
    assert run() == []
    assert run(cost_rows=2) == ["calibrate", "profile", "plan"]             # a calibrate argument
    assert run(cost_rows=2, output_len=3) == ["profile", "plan"]
    # plan rewrote config.json after calibrate: that is not a change, an edit of it is
    assert run(cost_rows=2, output_len=3) == []
    with open(tmp_path / "e3" / "config.json", "a") as f:
        f.write("edited\n")
    assert run(cost_rows=2, output_len=3) == ["calibrate", "profile", "plan"]
    os.remove(tmp_path / "e3" / "ramps.safetensors")
    assert run(cost_rows=2, output_len=3) == list(tune.STEPS)
    assert run(cost_rows=2, output_len=3, force=True) == list(tune.STEPS)
