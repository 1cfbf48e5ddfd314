"""vLLM features with exits firing: each is either correct (a check here that
fails if it is not) or refused at start-up with a message. The feature table
in docs/serving.md cites these tests.

The session's shared eager float32 engine serves the module
(conftest.shared_e3): each request asks for policy `token` with the forced
"middle" profile (identity ramps at 8/15/22), so decode tokens leave at every
exit whatever their confidence. Per-request `e3_enabled: 0` runs the full
model on the same engine, whose own config forces the same profile: the
policy-`full` side of a comparison. The transformers model in float32 is the
independent reference for which head produced a logprob.
"""
import math

import pytest
import torch

from helpers import EXITS, MIDDLE, overrides

E3 = {"policy": "token", "exits": list(EXITS), "force_exit": {str(e): r for e, r in MIDDLE.items()}}
TOKEN = overrides(policy="token", force_exit=MIDDLE)     # per request: the profile this module runs
FULL = {"e3_enabled": 0}       # per request: the full model (vllm_e3.knobs)
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def llm(shared_e3):
    return shared_e3


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _exited(llm) -> int:
    return sum(llm.collective_rpc("e3_exit_stats")[0]["exited"].values())


def _run(llm, prompt, sp, extra=TOKEN):
    """(outputs of one request, tokens that exited while it ran)."""
    sp.extra_args = dict(extra)
    before = _exited(llm)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    return out, _exited(llm) - before


def _prompt_ids(llm, text=PROMPT) -> list[int]:
    return llm.get_tokenizer().encode(text)


@pytest.mark.slow
def test_temperature_top_p_sampling(llm):
    """Seeded sampling is reproducible, differs with the seed and from greedy."""
    from vllm import SamplingParams

    def sample(seed):
        sp = SamplingParams(temperature=0.9, top_p=0.9, seed=seed, max_tokens=32, ignore_eos=True)
        out, exited = _run(llm, PROMPT, sp)
        return out.outputs[0].token_ids, exited

    a, exited = sample(1234)
    b, _ = sample(1234)
    c, _ = sample(99)
    greedy, _ = _run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    assert exited > 0
    assert list(a) == list(b)
    assert list(a) != list(c)
    assert list(a) != list(greedy.outputs[0].token_ids)


@pytest.mark.slow
def test_n_greater_than_one(llm):
    """n=3 through the sampling path with top_k=1 (vLLM refuses n > 1 with
    greedy): three copies, each the greedy n=1 output, each exiting alike."""
    from vllm import SamplingParams

    one, exited1 = _run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    sp = SamplingParams(n=3, temperature=1.0, top_k=1, seed=5, max_tokens=24, ignore_eos=True)
    three, exited3 = _run(llm, PROMPT, sp)
    assert exited1 > 0 and exited3 == 3 * exited1
    want = list(one.outputs[0].token_ids)
    assert len(three.outputs) == 3
    assert [list(o.token_ids) for o in three.outputs] == [want] * 3
    # sampled copies (top_k off) run side by side and each is a valid sample
    sp = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=24, ignore_eos=True)
    again = [list(o.token_ids) for o in _run(llm, PROMPT, sp)[0].outputs]
    assert again == [list(o.token_ids) for o in _run(llm, PROMPT, sp)[0].outputs]


@pytest.mark.slow
def test_logprobs_greedy_token_is_the_max(llm):
    from vllm import SamplingParams

    out, exited = _run(llm, PROMPT, SamplingParams(temperature=0, max_tokens=24, logprobs=5, ignore_eos=True))
    assert exited > 0
    o = out.outputs[0]
    assert len(o.logprobs) == len(o.token_ids) == 24
    for tok, lps in zip(o.token_ids, o.logprobs):
        assert lps[tok].rank == 1
        assert lps[tok].logprob == max(lp.logprob for lp in lps.values())


def _first_exit(prompt_len: int, tokens: list[int]) -> tuple[int, int]:
    """(index in `tokens`, exit) of the first generated token the forced
    profile makes leave early (the prefill's token, index 0, never does)."""
    from vllm_e3.models.draws import forced_exit_u

    for i in range(1, len(tokens)):
        pos, inp = prompt_len + i - 1, tokens[i - 1]
        for e in EXITS:
            if forced_exit_u(0, e, pos, inp) < MIDDLE[e]:
                return i, e
    raise AssertionError("the forced profile exits no token of this output")


@torch.no_grad()
def _hf_logprobs(hf, ids: list[int], e: int | None) -> torch.Tensor:
    """log_softmax of the next-token logits after `ids`: the full model, or
    the exit head at `e` (identity ramp: final norm of the state after layers
    0..e-1, through the shared LM head)."""
    res = hf(torch.tensor([ids]), output_hidden_states=e is not None)
    if e is None:
        logits = res.logits[0, -1]
    else:
        logits = hf.lm_head(hf.model.norm(res.hidden_states[e][0, -1]))
    return logits.float().log_softmax(-1)


@pytest.mark.slow
def test_logprobs_of_an_exited_token_come_from_its_exit_head(llm, hf):
    """Up to the first exited token every token ran the full model; that
    token's logprobs are its exit's head input through the shared LM head
    (here the logit lens at its exit), not the full model's."""
    from vllm import SamplingParams

    ids = _prompt_ids(llm)
    out, _ = _run(llm, {"prompt_token_ids": ids},
                  SamplingParams(temperature=0, max_tokens=24, logprobs=5, ignore_eos=True))
    toks, lps = list(out.outputs[0].token_ids), out.outputs[0].logprobs
    k, e = _first_exit(len(ids), toks)
    for i in range(k + 1):
        ref = _hf_logprobs(hf, ids + toks[:i], e if i == k else None)
        got = {t: lp.logprob for t, lp in lps[i].items()}
        want = {t: float(ref[t]) for t in got}
        assert max(abs(got[t] - want[t]) for t in got) < 2e-3, (i, k, e, got, want)
        if i == k:   # the full model's logprobs differ there: the check tells the heads apart
            full = _hf_logprobs(hf, ids + toks[:i], None)
            assert max(abs(got[t] - float(full[t])) for t in got) > 0.05


@pytest.mark.slow
def test_prompt_logprobs_are_the_full_models(llm, hf):
    """Prompt positions never exit: prompt_logprobs with exits equal those of
    a full-model run of the same request, and the transformers model's."""
    from vllm import SamplingParams

    ids = _prompt_ids(llm, "Once upon a time, in a small village by the sea, there lived")

    def prompt_lps(extra):
        sp = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=3, ignore_eos=True)
        out, exited = _run(llm, {"prompt_token_ids": ids}, sp, extra)
        return out.prompt_logprobs, exited

    with_exits, exited = prompt_lps(TOKEN)
    full, exited_full = prompt_lps(FULL)
    assert exited > 0 and exited_full == 0
    assert with_exits[0] is None and len(with_exits) == len(ids)
    for a, b in zip(with_exits[1:], full[1:]):
        assert a.keys() == b.keys()
        assert all(math.isclose(a[t].logprob, b[t].logprob, abs_tol=1e-5) for t in a)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for i in range(1, len(ids)):
        assert abs(with_exits[i][ids[i]].logprob - float(ref[i - 1, ids[i]])) < 2e-3


@pytest.mark.slow
def test_structured_output(llm):
    """A regex long enough that decode tokens exit still matches exactly."""
    import re

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    pattern = r"(yes|no)(, (yes|no)){11}"
    sp = SamplingParams(temperature=0, max_tokens=64,
                        structured_outputs=StructuredOutputsParams(regex=pattern))
    out, exited = _run(llm, "Answer yes or no twelve times, separated by commas:", sp)
    assert exited > 0
    assert re.fullmatch(pattern, out.outputs[0].text), out.outputs[0].text

    choices = ["red, green and blue", "cyan, magenta and yellow"]
    sp = SamplingParams(temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(choice=choices))
    assert _run(llm, PROMPT, sp)[0].outputs[0].text in choices


# ---- refused at start-up, no engine started ---------------------------------------------------------
def _args(model_dir, e3=E3, **kw):
    import vllm_e3
    from vllm.engine.arg_utils import EngineArgs

    vllm_e3.register()   # the wrapper, as vLLM's plugin loader would install it
    return EngineArgs(model=model_dir, model_impl="e3", dtype="float32", enforce_eager=True,
                      additional_config={"e3": e3}, **kw)


def test_speculative_decoding_refused(model_dir):
    spec = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}
    with pytest.raises(ValueError, match="with exits does not support speculative decoding"):
        _args(model_dir, speculative_config=spec).create_engine_config()


def test_lora_refused(model_dir):
    with pytest.raises(ValueError, match="with exits does not support LoRA"):
        _args(model_dir, enable_lora=True).create_engine_config()


def test_auto_dtype_is_float32_with_exits(tmp_path):
    """--dtype auto with exits on CPU runs float32 (vLLM 0.32 CPU's compiled
    bf16 is wrong); policy full keeps vLLM's default. On a checkpoint whose
    config says bfloat16 (a tiny one made here: the prepared model declares
    float32, where both cases would read float32 and prove nothing)."""
    from helpers import tiny_llama

    d = tiny_llama(tmp_path / "bf16", layers=4, dtype="bfloat16")
    args = _args(d, e3={"policy": "token", "exits": [2]})
    args.dtype = "auto"
    assert args.create_engine_config().model_config.dtype == torch.float32
    args = _args(d, e3={"policy": "full", "exits": [2]})
    args.dtype = "auto"
    assert args.create_engine_config().model_config.dtype == torch.bfloat16
