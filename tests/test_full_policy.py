"""Policy `full` (and a model without e3/) is vanilla vLLM token for token:
an E3 engine under policy `full` with exits configured gives the session's
vanilla eager ids (conftest.vanilla_eager)."""
import pytest

from helpers import EXITS, PROMPTS, free_engine

pytestmark = pytest.mark.slow


def _ids(llm, max_tokens=32):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens)
    return [list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, sp, use_tqdm=False)]


def test_full_policy_equals_vanilla(model_dir, vanilla_eager):
    from vllm import LLM

    # float32: exact ids across engines (vLLM 0.32 CPU bf16 is not even stable
    # run to run on AVX-512/AMX: near-ties flip)
    want = vanilla_eager["eos_32"]
    # exits configured, identity ramps, but policy full: nothing exits
    e3 = LLM(model_dir, model_impl="e3", enforce_eager=True, max_num_seqs=32, seed=0, dtype="float32",
             additional_config={"e3": {"policy": "full", "exits": EXITS}})
    assert e3.collective_rpc("e3_model_class") == ["E3LlamaForCausalLM"]
    got = _ids(e3)
    assert e3.collective_rpc("e3_exit_stats")[0]["exited"] == {}
    free_engine(e3)
    assert len(want) == 16 and all(len(w) > 0 for w in want)
    assert got == want
