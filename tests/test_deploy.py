"""The shipped artifact: `vllm-e3 prepare` installs the committed ramps,
calibration and E3 config (artifacts/smollm2-135m/e3, package data of
`vllm_e3.artifacts`) into <model_dir>/e3/ after checking the base-model hash,
idempotently; an engine started on that folder with no E3 flags uses them.

The other engine tests run on `model_dir`, a view with no e3/ folder
(tests/conftest.py), so they do not depend on what is shipped."""
import filecmp
import json
import os

import pytest

from helpers import free_engine
from vllm_e3.config import E3ConfigError, load_e3_config
from vllm_e3.prepare import DEPLOYED, _sha256, artifact_dir, deploy_artifact, model_view, prepare

FILES = ("config.json", "ramps.safetensors", "calibration.json")


def _shipped(name: str) -> str:
    return os.path.join(artifact_dir(), name)


def test_deploy_installs_once_keeps_the_users_files_and_updates_its_own(prepared_model_dir, tmp_path):
    d = model_view(prepared_model_dir, str(tmp_path / "model"))
    e3 = deploy_artifact(d)
    assert all(filecmp.cmp(_shipped(n), os.path.join(e3, n), shallow=False) for n in FILES)
    mtimes = {n: os.stat(os.path.join(e3, n)).st_mtime_ns for n in FILES}
    # prepare: the manifest matches (no rebuild) and the deploy has nothing to do
    assert prepare(d) == d
    assert {n: os.stat(os.path.join(e3, n)).st_mtime_ns for n in FILES} == mtimes

    cfg = os.path.join(e3, "config.json")
    with open(cfg, "w") as f:
        json.dump({"policy": "full"}, f)                 # the user's own config: kept
    deploy_artifact(d)
    assert json.load(open(cfg)) == {"policy": "full"}
    deploy_artifact(d, replace=True)                     # --replace-e3
    assert filecmp.cmp(_shipped("config.json"), cfg, shallow=False)

    with open(cfg, "w") as f:                            # a file an earlier deploy installed ...
        json.dump({"policy": "full"}, f)
    rec = json.load(open(os.path.join(e3, DEPLOYED)))
    rec["files"]["config.json"] = _sha256(cfg)
    with open(os.path.join(e3, DEPLOYED), "w") as f:
        json.dump(rec, f)
    deploy_artifact(d)                                   # ... is updated to the shipped one
    assert filecmp.cmp(_shipped("config.json"), cfg, shallow=False)


def test_deploy_refuses_other_weights(prepared_model_dir, tmp_path):
    d = model_view(prepared_model_dir, str(tmp_path / "model"))
    os.unlink(os.path.join(d, "config.json"))            # other weights: a changed config.json
    cfg = json.load(open(os.path.join(prepared_model_dir, "config.json")))
    cfg["rope_theta"] = cfg.get("rope_theta", 10000.0) * 2
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(E3ConfigError, match="does not belong to the weights.*trained for base model .* hash to .*make ramps"):
        deploy_artifact(d)
    assert not os.path.exists(os.path.join(d, "e3"))


@pytest.mark.slow
def test_engine_on_the_deployed_model_uses_the_shipped_config(deployed_model_dir):
    """One engine, no E3 flags: the exits, thresholds and measure are the
    shipped config.json's, tokens leave only there, and it still answers."""
    from vllm import LLM, SamplingParams

    from vllm_e3.tools.data import builtin_prompts

    shipped = json.load(open(_shipped("config.json")))
    cfg = load_e3_config(deployed_model_dir)
    assert (cfg.policy, list(cfg.exits), cfg.confidence) == (shipped["policy"], shipped["exits"],
                                                             shipped["confidence"])
    assert list(cfg.thresholds) == shipped.get("thresholds", [None] * len(cfg.exits))
    llm = LLM(deployed_model_dir, model_impl="e3", dtype="float32", enforce_eager=True, seed=0,
              max_num_seqs=32, max_model_len=1024)
    try:
        greedy = lambda n: SamplingParams(temperature=0, max_tokens=n)
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy(20),
                       use_tqdm=False)
        assert "Paris" in out[0].outputs[0].text
        # the calibration's held-out built-in prompts: some tokens leave early
        llm.chat([[{"role": "user", "content": p}] for p in builtin_prompts("heldout")], greedy(48),
                 use_tqdm=False)
        stats = llm.collective_rpc("e3_exit_stats")[0]
    finally:
        free_engine(llm)
    exited = {int(e): n for e, n in stats["exited"].items() if n}
    if shipped["policy"] == "full":
        assert exited == {}
    else:
        assert exited and set(exited) <= set(shipped["exits"]), exited
        assert stats["layers_run"] < stats["layers_full"]
