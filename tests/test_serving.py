"""Serving: per-request knobs through `vllm_xargs`, exit metrics on
/metrics and per-response statistics, and reliability under load, client
disconnects and bad input.

Three engines (float32, eager, so numerics cannot mask a difference):
- server `knobs` (conftest.knobs_server, shared with test_serve): a planted
  deployment -- exits 8/15/22 that never fire by default, and a calibration
  table whose rows send every token out at 15 (target <= 0.9), at 22
  (target <= 0.95), or nowhere (0.99);
- server `load`: the shipped weights under policy e3 with the synthetic
  "middle" profile (30% of decode tokens leave at 8, 25% at 15, 20% at 22),
  32 requests admitted at a time and 64 runner slots (parked requests wait
  in the other 32); the online audit checks a quarter of the exited tokens;
- `offline`: the session's shared eager engine (conftest.shared_e3) on the
  same weights with identity ramps, where the test-only per-request
  overrides give the forced exits and the full model (exits off) to compare
  the servers with.
"""
import asyncio
import json
import os
import re
import time

import httpx
import pytest

from helpers import MIDDLE, overrides
from servers import COMMON, PLUGINS, complete, get, post, process_tree_rss, root, vllm_server


# 50 distinct prompts of varied length; the load test sends each 10 times
SUBJECTS = ["the ocean", "a robot", "mathematics", "the moon", "a small cat", "coffee", "rivers",
            "an old library", "winter", "electricity"]
FORMS = ["Write one sentence about {}.", "def describe_{}():", "Here is a short story about {}:",
         "Q: What do you know about {}?\nA:", "List three facts about {}:"]
LOAD_PROMPTS = [f.format(s if not f.startswith("def") else s.replace(" ", "_")) for s in SUBJECTS for f in FORMS]
LOAD_TOKENS = 8


@pytest.fixture(scope="module")
def load_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("load") / "server.log"
    # the audit (a quarter of exited tokens) never changes outputs: the KV fill overwrites what it wrote
    e3 = {"e3": {"policy": "e3", "exits": [8, 15, 22], "force_exit": MIDDLE, "target_batch": 32, "audit_rate": 0.25}}
    # E3's setting: 64 clients, 32 admitted at a time, 32 more slots for parked requests
    args = ["--model-impl", "e3", *COMMON, "--max-num-seqs", "64", "--max-num-active-seqs", "32",
            "--additional-config", json.dumps(e3)]
    with vllm_server(model_dir, args, log, PLUGINS) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def offline(shared_e3):
    return shared_e3


def offline_texts(llm, prompts, max_tokens, extra):
    from vllm import SamplingParams

    sp = SamplingParams(max_tokens=max_tokens, temperature=0, extra_args=extra)
    return [o.outputs[0].text for o in llm.generate(prompts, sp, use_tqdm=False)]


# ---- knobs ---------------------------------------------------------------------------------------
KNOB_PROMPTS = ["def fibonacci(n):", "The three primary colors are", "Once upon a time, in a small village"]


@pytest.mark.slow
def test_knobs_pick_the_calibrated_thresholds(knobs_server, offline):
    """Each knob value gives exactly the tokens of the exits its table row
    names; off, 1.0 and the engine default give the full model."""
    full = offline_texts(offline, KNOB_PROMPTS, 8, overrides(policy="full"))
    at15 = offline_texts(offline, KNOB_PROMPTS, 8, overrides(policy="token", force_exit={15: 1.0}))
    at22 = offline_texts(offline, KNOB_PROMPTS, 8, overrides(policy="token", force_exit={22: 1.0}))
    assert at15 != full and at22 != full and at15 != at22   # the cases differ, so the test can fail
    cases = [({}, full), ({"e3_enabled": 0}, full), ({"e3_enabled": False}, full), ({"e3_enabled": 1}, full),
             ({"e3_target_agreement": 0.9}, at15), ({"e3_target_agreement": 0.5}, at15),
             ({"e3_target_agreement": 0.93}, at22), ({"e3_target_agreement": 0.95}, at22),
             ({"e3_target_agreement": 0.97}, full), ({"e3_target_agreement": 1}, full),
             ({"e3_enabled": 0, "e3_target_agreement": 0.9}, full)]
    for xargs, want in cases:
        got = []
        for p in KNOB_PROMPTS:
            status, body = complete(knobs_server, p, **xargs)
            assert status == 200, (xargs, body)
            got.append(body["choices"][0]["text"])
        assert got == want, xargs


@pytest.mark.slow
def test_per_response_stats_and_metrics_agree(knobs_server):
    """GET /v1/e3/requests/{id} counts a response's decode tokens and exits;
    /metrics carries the engine totals in vLLM's Prometheus registry."""
    url = knobs_server
    ids = []
    for xargs in ({"e3_target_agreement": 0.9}, {"e3_target_agreement": 0.95}, {"e3_enabled": 0}):
        status, body = complete(url, "The quick brown fox", max_tokens=9, **xargs)
        assert status == 200 and body["usage"]["completion_tokens"] == 9
        ids.append(body["id"])
    stats = [get(f"{root(url)}/v1/e3/requests/{rid}")[1] for rid in ids]
    # the first token comes from the prefill, which runs every layer
    assert [s["tokens"] for s in stats] == [8, 8, 8]
    assert [s["exited"] for s in stats] == [{"15": 8}, {"22": 8}, {}]
    assert [s["layers_run"] for s in stats] == [8 * 15, 8 * 22, 8 * 30]
    assert all(s["layers_full"] == 8 * 30 for s in stats)
    assert get(f"{root(url)}/v1/e3/requests/cmpl-unknown")[0] == 404

    time.sleep(0.6)   # the worker publishes every 0.25 s
    _, engine = get(f"{root(url)}/v1/e3/stats")
    _, text = get(f"{root(url)}/metrics")
    metric = lambda name, **lab: sum(float(v) for labels, v in re.findall(
        rf'^vllm_e3:{name}_total\{{([^}}]*)\}} (\S+)$', text, re.M)
        if all(f'{k}="{x}"' in labels for k, x in lab.items()))
    assert metric("tokens_exited", exit="15") == engine["exited"]["15"] > 0
    assert metric("tokens_exited", exit="22") == engine["exited"]["22"] > 0
    assert metric("decode_tokens") == engine["decode_tokens"]
    assert metric("decoder_layers_run") == engine["layers_run"] < metric("decoder_layers_full")
    assert metric("kv_fill_rows") == engine["kv_fill_rows"] > 0
    assert engine["parked_now"] == 0 and engine["requests_tracked"] == 0
    assert 'model_name="m"' in text and "vllm:" in text        # vLLM's own metrics are still there


BAD = [
    ({"vllm_xargs": {"e3_enabled": "yes"}}, "e3_enabled"),
    ({"vllm_xargs": {"e3_enabled": 2}}, "e3_enabled"),
    ({"vllm_xargs": {"e3_target_agreement": 1.5}}, "e3_target_agreement"),
    ({"vllm_xargs": {"e3_target_agreement": 0}}, "e3_target_agreement"),
    ({"vllm_xargs": {"e3_target_agreement": "high"}}, "e3_target_agreement"),
    ({"vllm_xargs": {"e3_thresholds": [0.5]}}, "e3_thresholds"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"temperature": -3}, "temperature"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.slow
def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(knobs_server):
    good = {"model": "m", "prompt": "The three primary colors are", "max_tokens": 4, "temperature": 0}
    status, ok = post(f"{knobs_server}/completions", good)
    assert status == 200
    for change, field in BAD:
        status, body = post(f"{knobs_server}/completions", {**good, **change})
        assert 400 <= status < 500, (change, status, body)
        assert field in json.dumps(body), (change, body)
        status, again = post(f"{knobs_server}/completions", good)
        assert status == 200 and again["choices"][0]["text"] == ok["choices"][0]["text"]


@pytest.mark.slow
def test_target_without_calibration_table_is_refused(load_server):
    url, _ = load_server
    status, body = complete(url, "Hello", e3_target_agreement=0.9)
    assert status == 400 and "calibration table" in body["error"]["message"]
    assert complete(url, "Hello", e3_enabled=1)[0] == 200


def test_vanilla_engine_args_are_untouched(model_dir):
    """Nothing of vllm-e3 reaches an engine without --model-impl e3."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_e3.envs import STATS_DIR as STATS_ENV

    before = os.environ.get(STATS_ENV)
    cfg = EngineArgs(model=model_dir, dtype="float32", enforce_eager=True).create_engine_config()
    assert not cfg.model_config.logits_processors
    assert cfg.parallel_config.worker_cls != "vllm_e3.worker.E3CPUWorker"
    assert os.environ.get(STATS_ENV) == before


# ---- load, disconnects ---------------------------------------------------------------------------
async def _stream_all(url: str, prompts: list[str], concurrency: int) -> list[str | Exception]:
    import openai

    # No retries, and a fresh connection per request: a pooled keep-alive
    # connection the server closes as the client reuses it fails a request
    # that never reached the server (a client race, not a lost request).
    http = httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=0), timeout=600)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=600, http_client=http)
    sem = asyncio.Semaphore(concurrency)

    async def one(p):
        async with sem:
            try:
                stream = await client.completions.create(model="m", prompt=p, max_tokens=LOAD_TOKENS,
                                                         temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])
            except Exception as e:   # counted as failed, with what caused it
                return RuntimeError(f"{e!r} caused by {e.__cause__!r}")

    try:
        return await asyncio.gather(*(one(p) for p in prompts))
    finally:
        await client.close()
        await http.aclose()


@pytest.mark.slow
def test_load_500_streaming_requests(load_server, offline):
    """500 requests, 64 concurrent streaming clients, policy e3 with parking:
    none fails or is lost, every output equals the offline run's, and the
    server's memory is flat."""
    url, proc = load_server
    want = dict(zip(LOAD_PROMPTS, offline_texts(offline, LOAD_PROMPTS, LOAD_TOKENS,
                                                overrides(policy="token", force_exit=MIDDLE))))
    warm = asyncio.run(_stream_all(url, LOAD_PROMPTS[:64] + LOAD_PROMPTS[:14], 64))
    assert [w for w in warm if isinstance(w, Exception)] == []
    rss_warm = process_tree_rss(proc.pid)
    prompts = [LOAD_PROMPTS[(i * 7) % len(LOAD_PROMPTS)] for i in range(500)]
    outs = asyncio.run(_stream_all(url, prompts, 64))
    failed = [o for o in outs if isinstance(o, Exception)]
    assert failed == [] and len(outs) == 500
    wrong = [(p, o, want[p]) for p, o in zip(prompts, outs) if o != want[p]]
    assert wrong == []
    rss_after = process_tree_rss(proc.pid)
    assert abs(rss_after - rss_warm) <= 0.10 * rss_warm, (rss_warm, rss_after)
    _, engine = get(f"{root(url)}/v1/e3/stats")
    assert engine["parked"] > 0 and engine["resumed"] > 0          # regrouping happened under load
    assert max(int(k) for k in engine["park_wait_hist"]) <= 4     # max_park_steps


@pytest.mark.slow
def test_disconnects_and_aborts_leave_nothing_stuck(load_server):
    url, _ = load_server

    async def drop_after_two_chunks(n):
        import openai

        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        try:
            async def one(i):
                stream = await client.completions.create(model="m", prompt=LOAD_PROMPTS[i], max_tokens=200,
                                                         temperature=0, stream=True)
                k = 0
                async for _ in stream:
                    k += 1
                    if k == 2:
                        break
                await stream.close()      # the client goes away mid-stream
            await asyncio.gather(*(one(i) for i in range(n)))
        finally:
            await client.close()

    async def cancelled(n):
        import openai

        client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0)
        tasks = [asyncio.create_task(client.completions.create(model="m", prompt=p, max_tokens=200, temperature=0))
                 for p in LOAD_PROMPTS[:n]]
        await asyncio.sleep(1.5)
        for t in tasks:
            t.cancel()                      # the request is aborted while running
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.close()

    asyncio.run(drop_after_two_chunks(24))
    asyncio.run(cancelled(24))
    status, body = complete(url, LOAD_PROMPTS[0], max_tokens=LOAD_TOKENS)
    assert status == 200 and body["usage"]["completion_tokens"] == LOAD_TOKENS
    deadline = time.time() + 30
    while True:
        _, engine = get(f"{root(url)}/v1/e3/stats")
        if engine["parked_now"] == 0 and engine["requests_tracked"] == 0:
            break
        assert time.time() < deadline, engine
        time.sleep(0.5)


# ---- the Grafana dashboard ---------------------------------------------------------------------
@pytest.mark.slow
def test_dashboard_series_are_on_metrics(load_server):
    """Every `vllm_e3:` series the Grafana dashboard queries
    (dashboards/vllm-e3-grafana.json; tests/test_dashboard.py checks its names
    without a server) is on the live /metrics, labelled by engine and model:
    78 requests on 32 admitted slots exit at 8/15/22, park to regroup, and the
    audit checks a quarter of the exited tokens."""
    from test_dashboard import dashboard_metric_names

    from vllm_e3.metrics import FAMILIES, PERIOD_S

    url, _ = load_server
    names = dashboard_metric_names()
    assert {f"vllm_e3:{name}_total" for name, *_ in FAMILIES} <= names, names
    deadline = time.time() + 240
    missing = sorted(names)
    while missing:
        assert time.time() < deadline, missing
        outs = asyncio.run(_stream_all(url, LOAD_PROMPTS + LOAD_PROMPTS[:28], 64))
        assert [o for o in outs if isinstance(o, Exception)] == []
        for _ in range(12):          # the worker publishes every PERIOD_S; the collector reads at each scrape
            time.sleep(PERIOD_S)
            _, text = get(f"{root(url)}/metrics")
            missing = [n for n in sorted(names) if not re.search(
                rf'^{re.escape(n)}\{{(?=[^}}]*engine="\d+")(?=[^}}]*model_name="m")[^}}]*\}} \S+$', text, re.M)]
            if not missing:
                break
