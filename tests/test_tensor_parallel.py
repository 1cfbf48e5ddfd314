"""`--model-impl e3` under vLLM's tensor parallelism (TP = 2, one core per
rank: VLLM_CPU_OMP_THREADS_BIND="0|1").

The embedded model has 9 attention heads and 3 KV heads, which 2 does not
divide (vLLM refuses it), so these run a random 8-layer Llama with 4 heads
and 2 KV heads (tests/helpers.py `tiny_llama`), planted low-rank ramps at
exits 2, 4, 6, float32, eager (the compiled stages are the same code,
covered in test_compiled_stages.py). Two engines, vanilla TP = 2 and E3
TP = 2 (the cases per request); TP = 1 is the plain-PyTorch float32
reference (helpers.CachedReference), which a TP = 1 engine matches
(test_token_exits.py).

What TP breaks without vllm_e3.parallel: each rank scores its exits on its
own half of the vocabulary, so ranks exit different rows (measured: 0 of 8
prompts as at TP = 1, exit counts differing between the ranks).
"""

import pytest


from helpers import (CachedReference, assert_same_ids, free_engine, one_core_per_rank, overrides, plant_ramps,
                     tiny_llama, tiny_prompt_ids)

EXITS = [2, 4, 6]
MIDDLE = {2: 0.3, 4: 0.357, 6: 0.444}
THRESHOLD = 0.6
MAX_TOKENS = 16
MARGIN = 1e-4
CASES = {"zero": overrides(policy="token", force_exit={e: 0.0 for e in EXITS}),
         "middle": overrides(policy="token", force_exit=MIDDLE),
         "max_prob": overrides(policy="token")}       # the planted ramps and the engine's thresholds


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tiny_llama(tmp_path_factory.mktemp("tiny-tp"))
    plant_ramps(d, EXITS)
    return d


def _engine(model, tp, e3):
    from vllm import LLM

    kw = dict(dtype="float32", max_model_len=256, max_num_seqs=16, seed=0, skip_tokenizer_init=True,
              enforce_eager=True, tensor_parallel_size=tp)
    if e3:
        kw.update(model_impl="e3", additional_config={"e3": {
            "policy": "token", "exits": EXITS, "thresholds": [THRESHOLD] * len(EXITS),
            "test_overrides": True}})
    return LLM(model, **kw)


def _gen(llm, extra=None):
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": p} for p in tiny_prompt_ids(8, lo=3, hi=12)]
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, extra_args=extra)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.fixture(scope="module")
def runs(tiny):
    out = {}
    with one_core_per_rank():
        llm = _engine(tiny, 2, e3=False)
        out["vanilla"] = _gen(llm)
        free_engine(llm)
        llm = _engine(tiny, 2, e3=True)
        for name, extra in CASES.items():
            llm.collective_rpc("e3_reset_exit_stats")
            out[name] = _gen(llm, extra)
            out[name, "stats"] = llm.collective_rpc("e3_exit_stats")    # one per rank
        free_engine(llm)
    return out


@pytest.fixture(scope="module")
def ref(tiny):
    return CachedReference.with_ramps_of(tiny, MAX_TOKENS)


def _check(runs, ref, case, **kw) -> dict[int, int]:
    """TP = 2 ids against the reference; returns the reference's exits {exit: tokens}."""
    prompts = tiny_prompt_ids(8, lo=3, hi=12)
    want = [ref.generate(ids, **kw) for ids in prompts]
    assert_same_ids(case, runs[case], [w[0] for w in want], prompts, ref, MARGIN, **kw)
    where = [x for w in want for x in w[1] if x is not None]
    return {e: where.count(e) for e in sorted(set(where))}


def test_rate_zero_is_vanilla_tp2(runs):
    assert runs["zero"] == runs["vanilla"]
    assert all(not s["exited"] for s in runs["zero", "stats"])


def test_middle_profile_tp2_is_tp1(runs, ref):
    exits = _check(runs, ref, "middle", exits=EXITS, force_exit=MIDDLE)
    assert runs["middle"] != runs["zero"]                # the profile changed the output
    s0, s1 = runs["middle", "stats"]
    assert s0["exited"] == s1["exited"] and len(s0["exited"]) == 3
    if runs["middle"] == [w[0] for w in (ref.generate(p, exits=EXITS, force_exit=MIDDLE)
                                          for p in tiny_prompt_ids(8, lo=3, hi=12))]:
        assert s0["exited"] == exits


def test_max_prob_decisions_are_the_same_on_every_rank(runs, ref):
    """The shard-aware confidence: both ranks exit the same rows, as TP = 1
    does. Run to completion is the no-hang check: a rank keeping rows the
    other dropped stalls in the next stage's all-reduce. Decisions near the
    threshold could flip between TP = 1 and 2 (the hidden states differ in
    the last bits); assert_same_ids would show it."""
    s0, s1 = runs["max_prob", "stats"]
    assert {k: v for k, v in s0.items() if k != "rank"} == {k: v for k, v in s1.items() if k != "rank"}
    assert (s0["rank"]["tp"], s1["rank"]["tp"]) == (0, 1)
    exits = _check(runs, ref, "max_prob", exits=EXITS, thresholds=[THRESHOLD] * len(EXITS))
    assert s0["exited"] == exits and sum(exits.values()) >= 8 and len(exits) == 3
    assert runs["max_prob"] != runs["zero"]
