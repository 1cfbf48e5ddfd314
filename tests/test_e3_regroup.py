"""Policy e3 (parking and regrouping) against policy token: the same greedy
tokens for requests of varied lengths arriving at different times (float32:
batch compositions differ), nothing ever stuck, waits bounded. The session's
shared engine (conftest.shared_e3) has 32 runner slots and admits 16
requests (`max_num_active_seqs`); the E3 scheduler admits beyond 16 while
requests are parked."""
import pytest

from helpers import EXITS, MIDDLE, PROMPTS, SHARED_E3, free_engine, overrides

pytestmark = pytest.mark.slow
MAX_PARK = SHARED_E3["max_park_steps"]
ACTIVE = 16


def _prompts(n=32):
    return [f"{PROMPTS[i % len(PROMPTS)]} ({i})" for i in range(n)]


def _params(i, policy, extra=None):
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=8 + (i * 7) % 29, ignore_eos=True,
                          extra_args=overrides(policy=policy, force_exit=MIDDLE, **(extra or {})))


def _run_staggered(llm, prompts, policy, abort=()):
    """Requests arrive 4 at a time every 2 engine steps; returns token ids."""
    engine = llm.llm_engine
    pending = list(enumerate(prompts))
    done, steps = {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and steps % 2 == 0:
            for i, p in pending[:4]:
                engine.add_request(f"{policy}-{i}", p, _params(i, policy))
            pending = pending[4:]
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
        steps += 1
        for i in abort:
            if steps == 12:
                engine.abort_request([f"{policy}-{i}"])
        assert steps < 2000, "engine stuck"
    return done


@pytest.fixture(scope="module")
def llm(shared_e3):
    return shared_e3


def test_e3_equals_token_and_bounds_waits(llm):
    prompts = _prompts(32)
    llm.collective_rpc("e3_reset_exit_stats")
    want = _run_staggered(llm, prompts, "token")
    token_stats = llm.collective_rpc("e3_exit_stats")[0]
    llm.collective_rpc("e3_reset_exit_stats")
    got = _run_staggered(llm, prompts, "e3")
    stats = llm.collective_rpc("e3_exit_stats")[0]
    # token never parks: vLLM's admission cap holds; e3 admits past it while
    # requests are parked (they hold slots but skip the first stage), never
    # past the runner's slots
    assert token_stats["parked"] == 0 and token_stats["step_reqs_max"] == ACTIVE
    assert ACTIVE < stats["step_reqs_max"] <= 32
    assert len(got) == 32
    for i in range(32):
        assert len(got[i]) == 8 + (i * 7) % 29
        assert got[i] == want[i], f"request {i}"
    assert stats["parked"] > 0 and stats["resumed"] > 0      # regrouping happened
    assert max(stats["park_wait_hist"]) <= MAX_PARK          # no token waited longer
    assert llm.collective_rpc("e3_parked_count") == [0]


def test_aborts_while_parked_leave_nothing_stuck(llm):
    prompts = _prompts(24)
    got = _run_staggered(llm, prompts, "e3", abort=(0, 3, 5, 9))
    assert set(got) == set(range(24)) - {0, 3, 5, 9} | {i for i in (0, 3, 5, 9) if i in got}
    assert all(len(got[i]) == 8 + (i * 7) % 29 for i in got if i not in (0, 3, 5, 9))
    # the engine still serves: a request after the aborts completes
    out = llm.generate(["Hello"], _params(1, "e3"), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 15
    assert llm.collective_rpc("e3_parked_count") == [0]


def test_park_when_refill(llm):
    """park_when "refill" (the default) parks only while requests wait and
    slots are free: never for a batch the engine admits whole, and for a
    queue longer than the admission cap until it has drained; tokens as
    token's."""
    refill = {"park_when": "refill"}
    for n in (ACTIVE // 2, 3 * ACTIVE):
        prompts = _prompts(n)
        want = llm.generate(prompts, [_params(i, "token") for i in range(n)], use_tqdm=False)
        llm.collective_rpc("e3_reset_exit_stats")
        got = llm.generate(prompts, [_params(i, "e3", refill) for i in range(n)], use_tqdm=False)
        stats = llm.collective_rpc("e3_exit_stats")[0]
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
        if n <= ACTIVE:
            assert stats["parked"] == 0
        else:
            assert stats["parked"] > 0 and stats["step_reqs_max"] > ACTIVE
    assert llm.collective_rpc("e3_parked_count") == [0]


def test_preemption_under_a_small_kv_cache(model_dir):
    """Few KV blocks force preemption of running (and parked) requests; every
    request still completes, with the right length, and no state is left.
    (Tokens are not compared: a preempted request is recomputed by a prefill
    through the full model, so its KV of skipped layers changes from filled
    to computed, under token and e3 alike, at points that differ by run.)"""
    from vllm import LLM

    engine = LLM(model_dir, model_impl="e3", dtype="float32", enforce_eager=True, max_num_seqs=16,
                 seed=0, num_gpu_blocks_override=12, block_size=32, max_model_len=256,
                 disable_log_stats=False,
                 additional_config={"e3": {"policy": "e3", "exits": EXITS, "target_batch": 8,
                                           "max_park_steps": MAX_PARK, "park_when": "always",
                                           "test_overrides": True}})
    try:
        prompts = _prompts(16)
        engine.collective_rpc("e3_reset_exit_stats")
        outs = engine.generate(prompts, [_params(i, "e3") for i in range(16)], use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [8 + (i * 7) % 29 for i in range(16)]
        stats = engine.collective_rpc("e3_exit_stats")[0]
        assert stats["parked"] > 0
        assert engine.collective_rpc("e3_parked_count") == [0]
        preemptions = sum(m.value for m in engine.get_metrics() if m.name == "vllm:num_preemptions")
        assert preemptions > 0
    finally:
        free_engine(engine)
