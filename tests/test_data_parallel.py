"""`vllm serve --data-parallel-size 2 --model-impl e3` (one core per engine):
each engine runs its own E3 scheduler and worker; `/metrics` labels the E3
counters by engine, as vLLM labels its own; `GET /v1/e3/requests/{id}`
finds a request whatever engine served it; `/v1/e3/stats` adds the engines.

vLLM defaults `--api-server-count` to the DP size, so this server runs two
API servers, and `/metrics` comes from vLLM's multiprocess registry: the
workers write multiprocess Prometheus counters there (vllm_e3.metrics,
MultiprocessCounters; no patch). The deployment is the planted one of
tests/servers.py: exits 8/15/22 that never fire by default, and a calibration
table whose 0.9 row sends every decode token out at 15.
"""
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from servers import (COMMON, PLANTED_CONFIG, PLANTED_TABLE, PLUGINS, complete, get, planted_model_dir, post, root,
                     vllm_server)

pytestmark = pytest.mark.slow

PROMPTS = [f"Write one sentence about {s}." for s in
           ("the ocean", "a robot", "the moon", "coffee", "rivers", "winter", "a small cat", "mathematics")]
TOKENS = 6


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    d = planted_model_dir(model_dir, str(tmp_path_factory.mktemp("planted-dp") / "model"),
                          PLANTED_CONFIG, PLANTED_TABLE)
    log = tmp_path_factory.mktemp("dp") / "server.log"
    env = {**PLUGINS, "VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    with vllm_server(d, ["--model-impl", "e3", *COMMON, "--max-num-seqs", "8",
                         "--data-parallel-size", "2"], log, env, timeout=600) as (url, _):
        yield url, log


def test_chat_answers_paris(server):
    url, _ = server
    status, body = post(f"{url}/chat/completions", {
        "model": "m", "temperature": 0, "max_tokens": 16,
        "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert status == 200, body
    assert "Paris" in body["choices"][0]["message"]["content"]


def test_metrics_and_request_stats_cover_both_engines(server):
    url, log = server
    # concurrent requests: the front end balances them over the two engines
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        res = list(pool.map(lambda p: complete(url, p, TOKENS, e3_target_agreement=0.9), PROMPTS * 2))
    assert all(status == 200 for status, _ in res), res
    stats = [get(f"{root(url)}/v1/e3/requests/{body['id']}") for _, body in res]
    assert all(status == 200 for status, _ in stats), stats
    # the 0.9 row: every decode token (all but the prefill's) leaves at 15
    decode = [body["usage"]["completion_tokens"] - 1 for _, body in res]
    assert [s["tokens"] for _, s in stats] == decode and sum(decode) > 0
    assert all(s["exited"] == ({"15": n} if n else {}) for (_, s), n in zip(stats, decode))

    time.sleep(0.6)                                    # the workers publish every 0.25 s
    _, text = get(f"{root(url)}/metrics")
    series = re.findall(r'^vllm_e3:tokens_exited_total\{([^}]*)\} (\S+)$', text, re.M)
    by_engine = {re.search(r'engine="(\d+)"', labels).group(1): float(v)
                 for labels, v in series if 'exit="15"' in labels}
    assert set(by_engine) == {"0", "1"} and min(by_engine.values()) > 0, (by_engine, text[-2000:])
    _, engine = get(f"{root(url)}/v1/e3/stats")
    assert len(engine["engines"]) == 2
    assert engine["exited"]["15"] == sum(by_engine.values()) == sum(decode)
    assert {e["rank"]["dp"] for e in engine["engines"]} == {0, 1}
    assert "Defaulting api_server_count to data_parallel_size (2)" in open(log).read()
