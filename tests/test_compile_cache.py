"""Compiled starts reuse their cache (patch 7, patches/patch_compile_cache.py)
and its key covers what the stage graphs bake in, `e3/config.json` included.

Three compiled starts of the tiny planted Llama on one VLLM_CACHE_ROOT:
1. config A (max_prob at exits 2/4/6): every stage compiles and saves its
   artifact;
2. A again: every artifact loads -- none is written again (vLLM re-saves an
   artifact it failed to load) -- and the ids are the first start's;
3. config B, only e3/config.json changed (the shortlist measure): the three
   deciding stages compile anew (their class names the measure), the last
   stage, whose graph is the same, loads; B's ids are the plain-PyTorch
   reference's for B and differ from A's.
"""
import json
import os

import pytest

from helpers import assert_same_ids, free_engine
from tiny_parallel import EXITS, MAX_TOKENS, PROMPTS, THRESHOLD

pytestmark = pytest.mark.slow

K = 64


def _artifacts(root: str) -> dict[str, float]:
    out = {}
    for base, _, files in os.walk(os.path.join(root, "torch_compile_cache", "torch_aot_compile")):
        for f in files:
            if f == "model":
                p = os.path.join(base, f)
                out[p] = os.stat(p).st_mtime_ns
    return out


def _start_and_generate(model: str) -> list[list[int]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model, model_impl="e3", max_model_len=256, max_num_seqs=8, seed=0, skip_tokenizer_init=True)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    free_engine(llm)
    return [list(o.outputs[0].token_ids) for o in outs]


def _config(model: str, **e3) -> None:
    with open(os.path.join(model, "e3", "config.json"), "w") as f:
        json.dump({"policy": "token", "exits": EXITS, "thresholds": [THRESHOLD] * len(EXITS), **e3}, f)


@pytest.fixture(scope="module")
def starts(tiny_planted, tmp_path_factory, monkeypatch_module):
    """(ids, artifacts after the start) of the three starts, and the model."""
    import shutil

    src, ref = tiny_planted
    model = str(tmp_path_factory.mktemp("cache-model") / "tiny")
    shutil.copytree(src, model)
    cache = str(tmp_path_factory.mktemp("vllm-cache"))
    monkeypatch_module.setenv("VLLM_CACHE_ROOT", cache)
    shortlist = list(range(3, 3 + K))
    with open(os.path.join(model, "e3", "calibration.json"), "w") as f:
        json.dump({"exits": EXITS, "table": [], "shortlist": shortlist}, f)
    out = {}
    _config(model, confidence="max_prob")
    for name in ("cold", "warm"):
        out[name] = (_start_and_generate(model), _artifacts(cache))
    _config(model, confidence=f"shortlist@{K}")
    out["other"] = (_start_and_generate(model), _artifacts(cache))
    return out, model, shortlist


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_a_warm_start_loads_every_artifact(starts):
    runs, _, _ = starts
    (cold, cold_art), (warm, warm_art) = runs["cold"], runs["warm"]
    assert len(cold_art) == len(EXITS) + 1                     # one per stage
    assert warm_art == cold_art                                # loaded, none written again
    assert warm == cold


def test_another_e3_config_compiles_what_it_changes(starts, tiny_planted):
    runs, model, shortlist = starts
    _, ref = tiny_planted
    (cold, cold_art), (other, other_art) = runs["cold"], runs["other"]
    assert {p: t for p, t in other_art.items() if p in cold_art} == cold_art
    assert len(other_art) == len(cold_art) + len(EXITS)       # the deciding stages compiled anew
    kw = dict(exits=EXITS, thresholds=[THRESHOLD] * len(EXITS), shortlist=shortlist)
    want = [ref.generate(p, **kw)[0] for p in PROMPTS]
    assert_same_ids("shortlist", other, want, PROMPTS, ref, 1e-4, **kw)
    assert other != cold                                       # the configurations differ, so it can fail
