"""What the TP and PP tests share: the random 8-layer Llama of helpers.py
with planted ramps at exits 2, 4, 6, one vanilla and one E3 engine at the
same parallelism, the cases run per request, and the comparison with the
plain-PyTorch float32 reference (helpers.assert_same_ids)."""
from helpers import (CachedReference, assert_same_ids, free_engine, one_core_per_rank, overrides, plant_ramps,
                     tiny_llama, tiny_prompt_ids)

EXITS = [2, 4, 6]
MIDDLE = {2: 0.3, 4: 0.357, 6: 0.444}
THRESHOLD = 0.6
MAX_TOKENS = 16
MARGIN = 1e-4
PROMPTS = tiny_prompt_ids(8, lo=3, hi=12)
CASES = {"zero": overrides(policy="token", force_exit={e: 0.0 for e in EXITS}),
         "middle": overrides(policy="token", force_exit=MIDDLE),
         # the planted ramps and the engine's thresholds (no forced profile, whatever the config's)
         "max_prob": overrides(policy="token", force_exit={})}
E3 = {"policy": "token", "exits": EXITS, "thresholds": [THRESHOLD] * len(EXITS), "test_overrides": True}


def planted_tiny(tmp_path_factory, name: str) -> str:
    d = tiny_llama(tmp_path_factory.mktemp(name))
    plant_ramps(d, EXITS)
    return d


def _gen(llm, extra=None):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], [o.request_id for o in outs]


def run_cases(model: str, e3: dict = E3, **parallel) -> dict:
    """Vanilla, then E3 with config `e3` (every case), at the parallelism
    `parallel` (LLM keyword arguments), one core per rank: ids, the E3
    engine's config and layers per worker, and per case its counters and
    request counters, one entry per worker."""
    from vllm import LLM

    common = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, skip_tokenizer_init=True,
                  **parallel)
    out = {}
    with one_core_per_rank():
        llm = LLM(model, **common)
        out["vanilla"] = _gen(llm)[0]
        free_engine(llm)
        llm = LLM(model, model_impl="e3", **common, additional_config={"e3": e3})
        out["mode"] = llm.llm_engine.vllm_config.compilation_config.mode
        out["config"] = llm.collective_rpc("e3_config")
        out["layers"] = llm.collective_rpc("e3_layers")
        for name, extra in CASES.items():
            llm.collective_rpc("e3_reset_exit_stats")
            out[name], ids = _gen(llm, extra)
            out[name, "stats"] = llm.collective_rpc("e3_exit_stats")
            out[name, "requests"] = llm.collective_rpc("e3_request_stats", args=(ids,))
        free_engine(llm)
    return out


def reference(model: str) -> CachedReference:
    return CachedReference.with_ramps_of(model, MAX_TOKENS)


def check(runs: dict, ref: CachedReference, case: str, **kw) -> list:
    """The case's ids against the reference's; returns the reference's exit
    of every token (None: ran to the end)."""
    want = [ref.generate(ids, **kw) for ids in PROMPTS]
    assert_same_ids(case, runs[case], [w[0] for w in want], PROMPTS, ref, MARGIN, **kw)
    return [x for w in want for x in w[1]]


def exit_counts(where: list) -> dict[int, int]:
    """{exit: tokens} of `check`'s list."""
    left = [x for x in where if x is not None]
    return {e: left.count(e) for e in sorted(set(left))}
