"""Per-token exits (policies `token` and `sync`) inside vLLM against a plain
PyTorch reference of the same semantics, in float32 so numerics can neither
mask nor fake a difference. The session's shared eager E3 engine
(conftest.shared_e3) serves every case through the test-only per-request
overrides (vllm_e3.knobs); vanilla's ids are the session's
(conftest.vanilla_eager)."""
import pytest
import torch

from helpers import EXITS, MAX_TOKENS, MIDDLE, PROMPTS, overrides

pytestmark = pytest.mark.slow


def _gen(llm, prompts, extra=None, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, extra_args=extra, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, sp, use_tqdm=False)]


def _token(**fields) -> dict:
    return overrides(policy="token", **fields)


@pytest.fixture(scope="module")
def runs(shared_e3, vanilla_eager):
    """Every vLLM output of this module."""
    llm = shared_e3
    out = {"vanilla": vanilla_eager["ignore_eos_24"]}
    tok = llm.get_tokenizer()
    out["prompt_ids"] = [tok(p)["input_ids"] for p in PROMPTS]
    out["eos"] = tok.eos_token_id
    llm.collective_rpc("e3_reset_exit_stats")
    out["middle"] = _gen(llm, PROMPTS, _token(force_exit=MIDDLE))
    out["middle_stats"] = llm.collective_rpc("e3_exit_stats")[0]
    out["middle_nofill"] = _gen(llm, PROMPTS, _token(force_exit=MIDDLE, kv_fill=False))
    out["zero"] = _gen(llm, PROMPTS, _token(force_exit={8: 0.0, 15: 0.0, 22: 0.0}))
    out["one15"] = _gen(llm, PROMPTS, _token(force_exit={15: 1.0}))
    # sync: a batch stops at an exit only if every row exits there. Alone in
    # its batch, a request follows the per-token semantics exactly.
    out["sync_alone"] = [_gen(llm, [p], overrides(policy="sync", force_exit=MIDDLE))[0]
                         for p in PROMPTS[:4]]
    out["sync_one8"] = [_gen(llm, [p], overrides(policy="sync", force_exit={8: 1.0}))[0]
                        for p in PROMPTS[4:6]]
    # In a batch, a step with prompt rows (LLM.generate feeds the engine while
    # it runs) or a staying row exits nobody: fewer tokens differ from vanilla
    # than under `token`.
    out["sync_batch"] = _gen(llm, PROMPTS, overrides(policy="sync", force_exit=MIDDLE))
    return out


@pytest.fixture(scope="module")
def ref(reference):
    return reference


def test_rate_zero_is_vanilla(runs):
    assert runs["zero"] == runs["vanilla"]


def test_token_matches_reference(runs, ref):
    exits_seen = set()
    for ids, got in zip(runs["prompt_ids"], runs["middle"]):
        want, where = ref.generate(ids, exits=EXITS, force_exit=MIDDLE)
        exits_seen.update(w for w in where if w is not None)
        assert got == want
    assert exits_seen == set(EXITS)          # rows left at every exit
    stats = runs["middle_stats"]
    assert set(stats["exited"]) == set(EXITS)
    assert stats["mixed_exit_steps"] > 0       # ... at different exits in one step
    assert stats["layers_run"] < stats["layers_full"]
    assert runs["middle"] != runs["vanilla"]  # and it changed the output


def test_missing_kv_fill_is_caught(runs, ref):
    wants = [ref.generate(ids, exits=EXITS, force_exit=MIDDLE)[0]
             for ids in runs["prompt_ids"]]
    assert runs["middle"] == wants
    assert runs["middle_nofill"] != wants


def test_rate_one_is_truncated_model(runs, ref):
    """Rate 1.0 at exit 15 with identity ramps: from the second token on, the
    model truncated to its first 15 layers + final norm + head."""
    import copy

    trunc = copy.deepcopy(ref.impl.model)
    trunc.model.layers = trunc.model.layers[:15]
    trunc.config.num_hidden_layers = 15
    for ids, got in zip(runs["prompt_ids"], runs["one15"]):
        first = runs["vanilla"][runs["prompt_ids"].index(ids)][0]
        assert got[0] == first
        inp = torch.tensor([ids + [first]])
        with torch.no_grad():
            gen = trunc.generate(inp, max_new_tokens=MAX_TOKENS - 1, do_sample=False,
                                 min_new_tokens=MAX_TOKENS - 1)
        assert got[1:] == gen[0, inp.shape[1]:].tolist()


def test_sync_semantics(runs, ref):
    for ids, got in zip(runs["prompt_ids"], runs["sync_alone"]):
        assert got == ref.generate(ids, exits=EXITS, force_exit=MIDDLE)[0]
    # every decode row exits at 8 -> the whole batch stops there
    for ids, got in zip(runs["prompt_ids"][4:6], runs["sync_one8"]):
        assert got == ref.generate(ids, exits=EXITS, force_exit={8: 1.0})[0]
    # a batch of 16 under the middle profile almost never has every row
    # exiting at once, so sync stays (nearly) the full model
    same_sync = sum(a == b for a, b in zip(runs["sync_batch"], runs["vanilla"]))
    same_token = sum(a == b for a, b in zip(runs["middle"], runs["vanilla"]))
    assert same_sync > same_token
