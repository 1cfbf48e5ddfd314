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

What TP breaks without vllm_e3.models.parallel: each rank scores its exits on its
own half of the vocabulary, so ranks exit different rows (measured: 0 of 8
prompts as at TP = 1, exit counts differing between the ranks).
"""

import pytest

from tiny_parallel import EXITS, MIDDLE, PROMPTS, THRESHOLD, check, exit_counts, run_cases

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_planted):
    return tiny_planted[0]


@pytest.fixture(scope="module")
def runs(tiny):
    return run_cases(tiny, tensor_parallel_size=2, enforce_eager=True)


@pytest.fixture(scope="module")
def ref(tiny_planted):
    return tiny_planted[1]


def test_rate_zero_is_vanilla_tp2(runs):
    assert runs["zero"] == runs["vanilla"]
    assert all(not s["exited"] for s in runs["zero", "stats"])


def test_middle_profile_tp2_is_tp1(runs, ref):
    exits = exit_counts(check(runs, ref, "middle", exits=EXITS, force_exit=MIDDLE))
    assert runs["middle"] != runs["zero"]                # the profile changed the output
    s0, s1 = runs["middle", "stats"]
    assert s0["exited"] == s1["exited"] and len(s0["exited"]) == 3
    if runs["middle"] == [ref.generate(p, exits=EXITS, force_exit=MIDDLE)[0] for p in PROMPTS]:
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
    exits = exit_counts(check(runs, ref, "max_prob", exits=EXITS, thresholds=[THRESHOLD] * len(EXITS)))
    assert s0["exited"] == exits and sum(exits.values()) >= 8 and len(exits) == 3
    assert runs["max_prob"] != runs["zero"]
