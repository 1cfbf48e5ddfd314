"""Hardening: no test hook reachable from the network, request
isolation under prefix caching, prompt positions never exit, fuzzed request
knobs, and the files a deployment trusts.

Two engines for the module:
- `server`: `vllm serve MODEL --model-impl e3` on the deployed embedded model
  (its real ramps and calibration; policy token with gate thresholds set on
  the command line, as the shipped config deploys `full`), prefix caching on
  (vLLM's default), float32 eager,
  32-token KV blocks (the CPU backend's smallest) so short conversations fill blocks;
- `chunky`: `LLM(...)` started for tests (`test_overrides`), every decode
  token forced out at exit 8, a 4-token step budget (prompts arrive in
  1-token chunks while others decode) and prefix caching on (a repeated
  prompt is fully cached, so vLLM recomputes its last token alone).
"""
import json
import os
import random
import re
import stat
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import free_engine, overrides
from servers import planted_model_dir, post, vllm_server

PLUGINS = {"VLLM_PLUGINS": "e3,e3_http"}
# The shipped config deploys `full` (no exit pays on this machine's costs, benchmarks/RESULTS.md),
# so the server sets the gate thresholds an earlier calibration chose for 0.95: real ramps and
# gate decisions make tokens exit, and their filled K/V land in blocks prefix caching may reuse.
SERVER_E3 = {"e3": {"policy": "token", "exits": [16, 20], "thresholds": [0.829718, 0.969999],
                    "confidence": "gate"}}
SERVER_ARGS = ["--model-impl", "e3", "--dtype", "float32", "--enforce-eager", "--served-model-name", "m",
               "--max-model-len", "1024", "--block-size", "32", "--max-num-seqs", "16",
               "--enable-prompt-tokens-details", "--additional-config", json.dumps(SERVER_E3)]
TEST_KEYS = ["_e3_test", "_e3_policy", "_e3_force_exit", "_e3_kv_fill", "_e3_park_when", "_e3"]


def message(body: dict) -> str:
    err = body.get("error")
    return (err.get("message", "") if isinstance(err, dict) else str(err or "")) or json.dumps(body)


@pytest.fixture(scope="module")
def server(deployed_model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    with vllm_server(deployed_model_dir, SERVER_ARGS, log, PLUGINS) as (url, proc):
        yield url, proc


GOOD = [{"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0}
        for p in ("The three primary colors are", "def fibonacci(n):", "Once upon a time,")]


def good_answers(url: str) -> list[str]:
    out = []
    for body in GOOD:
        status, r = post(f"{url}/completions", body)
        assert status == 200, r
        out.append(r["choices"][0]["text"])
    return out


# ---- the crash of the issue, and every test key over HTTP -------------------------------------
@pytest.mark.slow
def test_the_request_that_killed_the_server_gets_400(server):
    url, proc = server
    chat = {"model": "m", "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 16, "temperature": 0}
    status, body = post(f"{url}/chat/completions", {**chat, "vllm_xargs": {"_e3_force_exit": "1"}})
    assert status == 400 and "_e3_force_exit" in message(body), body
    status, body = post(f"{url}/chat/completions", chat)
    assert status == 200 and "Paris" in body["choices"][0]["message"]["content"]
    assert proc.poll() is None


@pytest.mark.slow
@pytest.mark.parametrize("value", ["e3", 0, 1, 0.5, "1", ["full"], [1, 2]])
def test_test_keys_are_refused_over_http(server, value):
    url, _ = server
    for key in TEST_KEYS:
        status, body = post(f"{url}/completions", {**GOOD[0], "vllm_xargs": {key: value}})
        assert status == 400 and key in message(body), (key, value, body)


# ---- offline: the switch, and validated values ------------------------------------------------
def test_overrides_without_the_switch_name_the_key():
    from vllm_e3.knobs import parse_test_overrides

    for key in TEST_KEYS:
        with pytest.raises(ValueError, match=re.escape(repr(key)) + ".*test_overrides"):
            parse_test_overrides({key: {"policy": "full"}}, allowed=False)


def test_two_engines_in_one_process_keep_their_own_admission_rules():
    """Each engine's knobs processor carries its own state in its name, and
    vLLM loads it by that name: a second engine configured in the same
    process (a test module, a second LLM object) does not change what the
    first one admits. A CI run once failed here: the state was per process."""
    from types import SimpleNamespace

    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters

    from vllm_e3.knobs import processor_fqcn

    test_engine = processor_fqcn(False, SimpleNamespace(test_overrides=True, exits=(8, 15, 22)))
    served = processor_fqcn(True, SimpleNamespace(test_overrides=False, exits=(2,)))
    forced = SamplingParams(extra_args={"_e3_test": {"force_exit": {15: 0.5}}})
    target = SamplingParams(extra_args={"e3_target_agreement": 0.99})
    validate_logits_processors_parameters([test_engine], forced)     # admitted
    with pytest.raises(Exception, match="_e3_test.*test_overrides"):
        validate_logits_processors_parameters([served], forced)
    with pytest.raises(Exception, match="_e3_test.force_exit"):      # 15 is not among (2,)
        validate_logits_processors_parameters(
            [processor_fqcn(False, SimpleNamespace(test_overrides=True, exits=(2,)))], forced)
    validate_logits_processors_parameters([served], target)          # it has a table
    with pytest.raises(Exception, match="needs a calibration table"):
        validate_logits_processors_parameters([test_engine], target)
    validate_logits_processors_parameters([test_engine], forced)     # still admitted


@pytest.mark.parametrize("bad, field", [
    ({"policy": "fast"}, "_e3_test.policy"),
    ({"park_when": "never"}, "_e3_test.park_when"),
    ({"kv_fill": 0}, "_e3_test.kv_fill"),
    ({"force_exit": {8: 1.5}}, "_e3_test.force_exit[8]"),
    ({"force_exit": {8: float("nan")}}, "_e3_test.force_exit[8]"),
    ({"force_exit": {9: 0.5}}, "_e3_test.force_exit"),
    ({"force_exit": "8:1"}, "_e3_test.force_exit"),
    ({"thresholds": [0.5]}, "thresholds"),
])
@pytest.mark.slow
def test_bad_override_values_are_refused_by_an_engine_started_for_tests(chunky, bad, field):
    llm, _ = chunky
    from vllm import SamplingParams

    with pytest.raises(Exception, match=re.escape(field)):
        llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args=overrides(**bad)), use_tqdm=False)
    with pytest.raises(Exception, match="_e3_policy"):
        llm.generate(["Hello"], SamplingParams(max_tokens=2, extra_args={"_e3_policy": "full"}), use_tqdm=False)


# ---- prompt positions never exit --------------------------------------------------------------
@pytest.fixture(scope="module")
def chunky(model_dir):
    from vllm import LLM

    llm = LLM(model_dir, model_impl="e3", dtype="float32", enforce_eager=True, seed=0, max_model_len=256,
              max_num_seqs=4, max_num_batched_tokens=4, block_size=32, enable_prefix_caching=True,
              additional_config={"e3": {"policy": "token", "exits": [8], "force_exit": {"8": 1.0},
                                        "test_overrides": True}})
    tok = llm.get_tokenizer()
    text = " ".join(["The river carried old leaves past the mill, and the miller counted them."] * 4)
    ids = tok(text)["input_ids"]
    # four 33-token prompts: a repeat hits the full block, and vLLM
    # recomputes the one token left, the prompt's last, alone
    prompts = [ids[i:i + 33] for i in range(4)]
    yield llm, prompts
    free_engine(llm)


@pytest.mark.slow
def test_prompt_positions_never_exit(chunky, model_dir):
    """Every decode token leaves at exit 8; prompt tokens -- here fed in
    1-token chunks while other requests decode, and then recomputed alone
    when the prompt is fully cached -- run every layer: the tokens are the
    reference's, and the engine counts exactly the decode tokens."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from vllm_e3.tools.reference import ReferenceE3

    llm, prompts = chunky
    n_out = 6
    sp = SamplingParams(temperature=0, max_tokens=n_out, ignore_eos=True)
    ref = ReferenceE3(model_dir, dtype=torch.float32)
    want = [ref.generate(p, n_out, exits=[8], force_exit={8: 1.0})[0] for p in prompts]
    for attempt in ("chunked", "fully cached"):
        llm.collective_rpc("e3_reset_exit_stats")
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
        stats = llm.collective_rpc("e3_exit_stats")[0]
        assert [list(o.outputs[0].token_ids) for o in outs] == want, attempt
        # the first token comes from the prefill; every other one is a decode token at exit 8
        assert stats["decode_tokens"] == len(prompts) * (n_out - 1), (attempt, stats)
        assert stats["exited"] == {8: len(prompts) * (n_out - 1)}, attempt
    assert [o.num_cached_tokens for o in outs] == [32] * 4         # the second round was served from the cache


# ---- isolation under prefix caching -----------------------------------------------------------
A_PROMPTS = ["Write a long story about a lighthouse keeper who finds a message in a bottle on the shore of a "
             "grey northern sea. The message is written in an old hand, in a language he half remembers from "
             "his grandmother, and it names a ship that sank a hundred years ago. Tell what he does next:",
             "Explain step by step, for a beginner who has never programmed before, how a computer program "
             "reads a file line by line and counts the words in it. Say what a file is, what a line is, what "
             "a loop does, and how the count is kept in a variable that grows as the program runs:"]
TARGETS = [None, 0.95, 0.96, 0.97, 0.99, 0.995, 1.0]


@pytest.mark.slow
def test_one_request_never_changes_another_through_the_prefix_cache(server):
    """Client A sends every accepted knob combination; client B's prompts are
    A's prompts + A's outputs (multi-turn chat). B's tokens equal B alone (a
    fresh cache: a cache salt nobody else uses), and B reuses A's prompt
    blocks but never a block holding A's decode tokens."""
    url, _ = server
    base = url[:-len("/v1")]
    combos = [{"e3_enabled": en, **({} if t is None else {"e3_target_agreement": t})}
              for en in (0, 1) for t in TARGETS]

    # Each pair (A, B) shares a cache salt of its own: B may reuse A's blocks
    # and no other pair's (two pairs with the same A output would otherwise
    # share B's legitimately cached prompt blocks and blur the count below).
    salt = f"pair-{time.time()}-"

    def run_a(args):
        i, (prompt, xargs) = args
        status, body = post(f"{url}/completions", {"model": "m", "prompt": prompt, "max_tokens": 48,
                                                    "temperature": 0, "ignore_eos": True, "cache_salt": salt + str(i),
                                                    "return_token_ids": True, "vllm_xargs": xargs})
        assert status == 200, body
        return body

    with ThreadPoolExecutor(8) as pool:
        a_outs = list(pool.map(run_a, enumerate((p, x) for x in combos for p in A_PROMPTS)))
    exited = 0
    for body in a_outs:
        with urllib.request.urlopen(f"{base}/v1/e3/requests/{body['id']}", timeout=30) as r:
            exited += sum(json.loads(r.read())["exited"].values())
    assert exited > 0          # A's decode blocks hold exited tokens' filled K/V

    for i, a in enumerate(a_outs):
        prompt_ids = a["choices"][0]["prompt_token_ids"]
        b_ids = prompt_ids + a["choices"][0]["token_ids"]
        b = {"model": "m", "prompt": b_ids, "max_tokens": 16, "temperature": 0}
        status, shared = post(f"{url}/completions", {**b, "cache_salt": salt + str(i)})
        assert status == 200, shared
        status, alone = post(f"{url}/completions", {**b, "cache_salt": f"fresh-{salt}{i}"})
        assert status == 200, alone
        assert shared["choices"][0]["text"] == alone["choices"][0]["text"], i
        cached = shared["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert 0 < cached <= len(prompt_ids), (i, cached, len(prompt_ids))   # A's prompt blocks only


# ---- fuzzed knobs -----------------------------------------------------------------------------
def _fuzz_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(14)
    if kind == 0:
        return rng.choice([0, 1, -1, 2, 10**30, -10**30, 2**63])
    if kind == 1:
        return rng.choice([0.0, -0.0, 0.5, 0.99, 1.0, 1.0000001, -0.5, 1e308, -1e308, 5e-324])
    if kind == 2:
        return rng.choice([float("nan"), float("inf"), float("-inf")])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 12)))
    if kind == 5:
        return "x" * rng.choice([0, 1, 5000])
    if kind == 6:
        return rng.choice(["true", "false", "0.9", "e3", "full", "token", "{}", "[]", "\u0000", "\U0001F600"])
    if kind in (7, 8) and depth < 3:
        return [_fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    if kind == 9 and depth < 3:
        return {str(_fuzz_value(rng, depth + 1))[:20]: _fuzz_value(rng, depth + 1) for _ in range(rng.randrange(0, 3))}
    if kind == 10:
        return []
    if kind == 11:
        return {}
    return rng.choice([0, 1, 0.9, 0.95, 0.97, 0.99, 1])


def _fuzz_key(rng: random.Random) -> str:
    kind = rng.randrange(8)
    if kind <= 2:
        return rng.choice(["e3_enabled", "e3_target_agreement"])
    if kind == 3:
        return rng.choice(TEST_KEYS + ["_e3_", "_E3_test", "E3_enabled"])
    if kind == 4:
        return "e3_" + "".join(rng.choice("abcxyz_") for _ in range(rng.randrange(1, 10)))
    if kind == 5:
        return "".join(chr(rng.randrange(0x80, 0x2FFF)) for _ in range(rng.randrange(1, 6)))
    if kind == 6:
        return "k" * rng.choice([1, 300, 10000])
    return rng.choice(["session_id", "foo", "", " ", "kv_transfer_params_x"])


def fuzz_payloads(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        body = {"model": "m", "prompt": rng.choice(["Hello", "def f(x):", "Tell me about the sea."]),
                "max_tokens": rng.choice([1, 2, 4]), "temperature": 0}
        kind = rng.randrange(10)
        if kind == 0:
            body["vllm_xargs"] = _fuzz_value(rng)               # not even an object
        elif kind == 1:
            body["vllm_xargs"] = {}
        else:
            body["vllm_xargs"] = {_fuzz_key(rng): _fuzz_value(rng) for _ in range(rng.randrange(1, 5))}
        if rng.random() < 0.3:                                   # vLLM's own fields beside ours
            field = rng.choice(["max_tokens", "temperature", "top_p", "n", "seed", "logprobs", "stop"])
            body[field] = _fuzz_value(rng)
            if field == "max_tokens" and isinstance(body[field], int) and body[field] > 4:
                body[field] = 4
        out.append(body)
    return out


FUZZ_SEED, FUZZ_N = int(os.environ.get("VLLM_E3_FUZZ_SEED", "1234")), 320


@pytest.mark.slow
def test_fuzzed_knobs_get_4xx_or_are_served(server):
    """Seeded (VLLM_E3_FUZZ_SEED replays another draw): every payload gets a
    4xx with a message or is served; an `_e3*` key never gets through; the
    server never crashes or hangs, and answers the good requests as before."""
    url, proc = server
    before = good_answers(url)
    counts = {"ok": 0, "4xx": 0}
    for i, body in enumerate(fuzz_payloads(FUZZ_SEED, FUZZ_N)):
        raw = json.dumps(body, allow_nan=True).encode()     # NaN/Infinity as Python's json writes them
        status, resp = post(f"{url}/completions", raw, timeout=60)
        where = f"payload {i} (seed {FUZZ_SEED}): {raw[:300]!r} -> {status} {str(resp)[:300]}"
        assert status == 200 or 400 <= status < 500, where
        if status == 200:
            counts["ok"] += 1
            xargs = body.get("vllm_xargs")
            assert not (isinstance(xargs, dict) and any(str(k).startswith("_e3") for k in xargs)), where
        else:
            counts["4xx"] += 1
            assert message(resp), where
        assert proc.poll() is None, where
    assert counts["ok"] > 20 and counts["4xx"] > 100, counts    # both sides were exercised
    assert good_answers(url) == before


# ---- files a deployment trusts ----------------------------------------------------------------
def _start(model: str, **e3):
    from vllm.engine.arg_utils import EngineArgs

    EngineArgs(model=model, model_impl="e3", dtype="float32", enforce_eager=True,
               **({"additional_config": {"e3": e3}} if e3 else {})).create_engine_config()


def test_ramps_of_other_weights_are_refused_at_start_up(deployed_model_dir, tmp_path):
    from vllm_e3.ramps import model_hash

    d = planted_model_dir(deployed_model_dir, str(tmp_path / "other"))
    for name in ("ramps.safetensors", "calibration.json", "config.json"):
        os.symlink(os.path.join(deployed_model_dir, "e3", name), os.path.join(d, "e3", name))
    _start(d)                                                    # the same weights: accepted
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["rms_norm_eps"] = cfg["rms_norm_eps"] * 2                # other weights, same shapes
    os.unlink(os.path.join(d, "config.json"))
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(Exception, match="does not belong to the weights") as ei:
        _start(d)
    assert model_hash(d)[:20] in str(ei.value)


def test_model_hash_reads_o1_of_the_weights(tmp_path, prepared_model_dir):
    """Headers and sampled chunks only: a change deep inside a tensor's data
    that no sample covers is not seen, one in a header or config is."""
    import shutil

    from vllm_e3.ramps import model_hash

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(prepared_model_dir, "config.json"), d / "config.json")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1 << 20)}, str(d / "model.safetensors"))   # 4 MiB of data
    h0 = model_hash(str(d))
    with open(d / "model.safetensors", "r+b") as f:          # inside a sampled chunk: seen
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + 10)
        f.write(b"\x01")
    h1 = model_hash(str(d))
    assert h1 != h0 and h0.startswith("e3h2:")
    save_file({"w": torch.zeros(1 << 20), "b": torch.zeros(3)}, str(d / "model.safetensors"))
    assert model_hash(str(d)) not in (h0, h1)                # another header


def test_calibration_for_other_ramps_is_refused(deployed_model_dir, tmp_path):
    cal = json.load(open(os.path.join(deployed_model_dir, "e3", "calibration.json")))
    # the shipped table deploys nothing; make its first row choose its verified gate thresholds
    row = cal["table"][0]
    row.update(policy="token", chosen=row["per_measure"]["gate"])
    for change, msg in ((lambda c: c.update(exits=[16, 20, 24, 26]), "exits \\[26\\]"),
                        (lambda c: c["table"][0]["chosen"].update(measure="entropy"), "'entropy'"),
                        (lambda c: c.update(ramps_data_hash="0" * 64), "made for other ramps")):
        bad = json.loads(json.dumps(cal))
        change(bad)
        d = planted_model_dir(deployed_model_dir, str(tmp_path / f"m{abs(hash(msg))}"),
                              json.load(open(os.path.join(deployed_model_dir, "e3", "config.json"))), bad)
        os.symlink(os.path.join(deployed_model_dir, "e3", "ramps.safetensors"),
                   os.path.join(d, "e3", "ramps.safetensors"))
        with pytest.raises(Exception, match=msg):
            _start(d)
    # a gate-scored table over identity ramps (no ramps file): no gate to score
    d = planted_model_dir(deployed_model_dir, str(tmp_path / "noramps"), {"policy": "full"}, cal)
    with pytest.raises(Exception, match="have no gate"):
        _start(d)


def test_metrics_side_file_is_private(tmp_path):
    from vllm_e3.runtime import ExitStats
    from vllm_e3.metrics import StatsPublisher
    from vllm_e3.runtime import E3Runtime

    runtime = E3Runtime()
    runtime.stats = ExitStats(decode_tokens=3)
    old = os.umask(0o022)
    try:
        pub = StatsPublisher.__new__(StatsPublisher)
        pub.runtime, pub.path, pub._last = runtime, str(tmp_path / "stats.json"), None
        pub.rank, pub.prom = {"dp": 0, "pp": 0, "tp": 0}, None
        pub.publish()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "stats.json").st_mode) == 0o600
    assert json.load(open(tmp_path / "stats.json"))["decode_tokens"] == 3
