"""Confidence `shortlist@K` in the engine: the exit decision is the max
probability over the K head rows of the calibration's shortlist (the engine
gathers them once), against the plain-PyTorch reference of the same rule, in
float32, exact ids; and the start-up errors when the shortlist is missing or
short."""
import pytest
import torch

from helpers import PROMPTS, free_engine
from servers import planted_model_dir

EXIT, K, THRESHOLD, MAX_TOKENS = 22, 512, 0.6, 24


@pytest.fixture(scope="module")
def setup(model_dir, tmp_path_factory):
    """The shortlist: the tokens the full model serves on PROMPTS, most
    frequent first, then by id (vllm_e3.tools.selection.shortlist_from), planted in
    a calibration.json beside identity ramps."""
    from vllm_e3.tools.selection import shortlist_from
    from vllm_e3.tools.reference import ReferenceE3

    torch.set_num_threads(1)
    ref = ReferenceE3(model_dir, dtype=torch.float32)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    full = [ref.generate(p, MAX_TOKENS)[0] for p in ids]
    shortlist = shortlist_from(full, ref.cfg.vocab_size, K).tolist()
    d = planted_model_dir(model_dir, str(tmp_path_factory.mktemp("shortlist") / "model"),
                          config={"policy": "token", "exits": [EXIT], "thresholds": [THRESHOLD],
                                  "confidence": f"shortlist@{K}"},
                          calibration={"exits": [EXIT], "table": [], "shortlist": shortlist})
    return ref, ids, shortlist, d


@pytest.mark.slow
def test_shortlist_exits_match_the_reference(setup):
    from vllm import LLM, SamplingParams

    ref, ids, shortlist, d = setup
    llm = LLM(d, model_impl="e3", dtype="float32", enforce_eager=True, max_num_seqs=32, seed=0)
    try:
        sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        got = [list(o.outputs[0].token_ids)
               for o in llm.generate([{"prompt_token_ids": p} for p in ids], sp, use_tqdm=False)]
        stats = llm.collective_rpc("e3_exit_stats")[0]
    finally:
        free_engine(llm)
    want, where = zip(*(ref.generate(p, MAX_TOKENS, exits=[EXIT], thresholds=[THRESHOLD], shortlist=shortlist)
                        for p in ids))
    assert got == list(want)
    left = sum(w == EXIT for ws in where for w in ws)
    assert stats["exited"] == {EXIT: left} and left > 0
    # the shortlist decided: over the whole vocabulary the same threshold exits other tokens
    _, where_full = zip(*(ref.generate(p, MAX_TOKENS, exits=[EXIT], thresholds=[THRESHOLD]) for p in ids))
    assert list(where_full) != list(where)


def test_a_missing_or_short_shortlist_stops_start_up(model_dir, tmp_path):
    from vllm.engine.arg_utils import EngineArgs

    d = planted_model_dir(model_dir, str(tmp_path / "model"),
                          config={"policy": "token", "exits": [EXIT], "thresholds": [THRESHOLD],
                                  "confidence": f"shortlist@{K}"},
                          calibration={"exits": [EXIT], "table": [], "shortlist": list(range(K))})
    start = lambda m, **e3: EngineArgs(model=m, model_impl="e3", dtype="float32", enforce_eager=True,
                                       additional_config={"e3": e3}).create_engine_config()
    with pytest.raises(Exception, match=f"needs {K + 1} shortlist tokens.*has {K}"):
        start(d, confidence=f"shortlist@{K + 1}")
    bare = planted_model_dir(d, str(tmp_path / "none"))
    with pytest.raises(Exception, match="reads the shortlist of .*calibration.json, and there is none"):
        start(bare, policy="token", exits=[EXIT], thresholds=[THRESHOLD], confidence=f"shortlist@{K}")
