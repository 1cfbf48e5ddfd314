"""Soak (hardening): thousands of mixed requests against a policy-e3 server in
E3's setting, with the shipped ramps; nothing may fail, be lost or leak.

    .venv/bin/python benchmarks/soak.py --requests 3000     # make soak

The server: `vllm serve <deployed embedded model> --model-impl e3` with the
shipped ramps and calibration under policy e3, `--max-num-seqs 64
--max-num-active-seqs 32`, float32, vLLM's default compile mode (what
`make serve` runs, with policy e3). The mix (seeded): completions and chat,
streaming and not, knobs off / on / a calibrated target, 10% of streams
cancelled mid-stream, prompts of 8 to 1024 tokens (a few filling the
context exactly), `max_tokens` 1 to 128 with EOS allowed (some stop early,
most hit `max_tokens`). 64 clients at once.

Checks, printed and returned as the exit status:
- every request that was not cancelled completes, with `max_tokens` tokens
  unless it stopped at EOS;
- afterwards the worker holds no parked token, no running-request counter
  and no resolved rules (`GET /v1/e3/stats`); the finished-request LRU is
  bounded (4096) and not counted;
- RSS of the API server, the engine core and the worker each within 10% of
  its value after the first 200 requests, at the end and at every 250
  requests;
- after a quiesce wait, `/metrics`' tokens exited per exit equal the sum of
  the per-request stats of every request (completed and cancelled); decode
  tokens and decoder layers run may exceed the sums by what requests
  cancelled while a token of theirs was parked had computed (named below).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import sys
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

CONTEXT = 1280
ARGS = ["--model-impl", "e3", "--dtype", "float32", "--served-model-name", "m", "--max-model-len", str(CONTEXT),
        "--max-num-seqs", "64", "--max-num-active-seqs", "32",
        "--additional-config", json.dumps({"e3": {"policy": "e3"}})]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def metric_sums(text: str) -> dict:
    out: dict = {"exited": {}}
    for name, labels, value in re.findall(r'^vllm_e3:(\w+)_total(?:\{([^}]*)\})? (\S+)$', text, re.M):
        if name == "tokens_exited":
            e = re.search(r'exit="(\d+)"', labels).group(1)
            out["exited"][e] = out["exited"].get(e, 0) + float(value)
        elif name in ("decode_tokens", "decoder_layers_run", "decoder_layers_full", "tokens_parked"):
            out[name] = out.get(name, 0) + float(value)
    return out


def process_rss(pid: int) -> dict[str, int]:
    """RSS by role: the API server (the `vllm serve` process), the engine
    core and the worker (its descendants, told apart by process title)."""
    import psutil

    root = psutil.Process(pid)
    out = {"api_server": root.memory_info().rss}
    for p in root.children(recursive=True):
        try:
            title = " ".join(p.cmdline()) + " " + p.name()
            rss = p.memory_info().rss
        except psutil.NoSuchProcess:
            continue
        role = "engine_core" if "EngineCore" in title else "worker" if "Worker" in title else None
        if role:
            out[role] = out.get(role, 0) + rss
    return out


def make_plan(n: int, seed: int, tokenizer) -> list[dict]:
    rng = random.Random(seed)
    words = ("river lamp stone quiet market winter engine garden letter window number silver forest "
             "question answer morning paper bridge island machine").split()
    plan = []
    for i in range(n):
        r = rng.random()
        plen = rng.randint(8, 128) if r < 0.8 else rng.randint(128, 512) if r < 0.97 else rng.randint(512, 1024)
        text = " ".join(rng.choice(words) for _ in range(plen))
        ids = tokenizer(text)["input_ids"][:plen]
        max_tokens = rng.choice([1, 2, 4, 8, 16, 32, 64, 128])
        chat = rng.random() < 0.2
        if not chat and rng.random() < 0.003:         # exactly at the context limit
            max_tokens = CONTEXT - len(ids)
        knob = rng.choice([None, {"e3_enabled": 0}, {"e3_enabled": 1}, {"e3_target_agreement": 0.95},
                           {"e3_target_agreement": 0.99}])
        stream = rng.random() < 0.5
        plan.append({"i": i, "chat": chat, "ids": ids, "text": text[:2000], "max_tokens": max_tokens,
                     "xargs": knob, "stream": stream,
                     "cancel_after": rng.randint(1, 4) if stream and rng.random() < 0.2 else None})
    return plan                                      # streams: 50%; cancelled: 20% of them = 10%


async def one(client, req: dict) -> dict:
    extra = {"vllm_xargs": req["xargs"]} if req["xargs"] else {}
    common = dict(model="m", max_tokens=req["max_tokens"], temperature=0, extra_body=extra)
    if req["chat"]:
        call = client.chat.completions.create(messages=[{"role": "user", "content": req["text"]}],
                                              stream=req["stream"], **common)
    else:
        call = client.completions.create(prompt=req["ids"], stream=req["stream"], **common)
    out = {"i": req["i"], "id": None, "tokens": 0, "finish": None, "cancelled": False, "error": None}
    try:
        resp = await call
        if not req["stream"]:
            out["id"] = resp.id
            out["tokens"] = resp.usage.completion_tokens
            out["finish"] = resp.choices[0].finish_reason
            return out
        chunks = 0
        async for c in resp:
            out["id"] = c.id
            chunks += 1
            if c.choices and c.choices[0].finish_reason:
                out["finish"] = c.choices[0].finish_reason
            if req["cancel_after"] and chunks >= req["cancel_after"] and out["finish"] is None:
                await resp.close()
                out["cancelled"] = True
                return out
        out["tokens"] = chunks
    except Exception as e:                     # counted as a failure
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


async def drive(url: str, plan: list[dict], concurrency: int, on_progress) -> list[dict]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=900)
    sem = asyncio.Semaphore(concurrency)
    done: list[dict] = []

    async def run(req):
        async with sem:
            res = await one(client, req)
        done.append(res)
        on_progress(len(done))
        return res

    try:
        return await asyncio.gather(*(run(r) for r in plan))
    finally:
        await client.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--warm", type=int, default=200, help="requests before the RSS baseline")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "soak.json"))
    ap.add_argument("--eager", action="store_true", help="--enforce-eager (faster start, slower decode)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

    from transformers import AutoTokenizer

    from common import machine
    from servers import vllm_server
    from vllm_e3.prepare import deploy_artifact, default_model_dir, model_view

    model = model_view(default_model_dir(), default_model_dir().rstrip(os.sep) + "-deployed")
    deploy_artifact(model, replace=True)
    tok = AutoTokenizer.from_pretrained(model)
    plan = make_plan(args.requests, args.seed, tok)
    log = os.path.join("/tmp", f"soak-{os.getpid()}.log")
    server_args = ARGS + (["--enforce-eager"] if args.eager else [])
    t_start = time.time()
    with vllm_server(model, server_args, log, {"VLLM_PLUGINS": "e3,e3_http"}, timeout=1800) as (url, proc):
        base = url[:-len("/v1")]
        started = time.time() - t_start
        rss = {}

        series = []                                            # (requests done, RSS by role)

        def progress(k):
            if k == args.warm:
                rss["warm"] = process_rss(proc.pid)
            if k % 250 == 0:
                series.append((k, process_rss(proc.pid)))
                print(f"[soak] {k}/{len(plan)} done, {time.time() - t_start:.0f} s, RSS MB "
                      f"{ {r: v >> 20 for r, v in series[-1][1].items()} }", flush=True)

        t0 = time.time()
        results = asyncio.run(drive(url, plan, args.concurrency, progress))
        wall = time.time() - t0
        time.sleep(2.0)                                        # quiesce: the worker publishes every 0.25 s
        rss["end"] = process_rss(proc.pid)
        live = get_json(f"{base}/v1/e3/stats")
        with urllib.request.urlopen(f"{base}/metrics", timeout=60) as r:
            metrics = metric_sums(r.read().decode())
        per_req = {}
        for res in results:
            if res["id"]:
                try:
                    per_req[res["i"]] = get_json(f"{base}/v1/e3/requests/{res['id']}")
                except Exception as e:
                    per_req[res["i"]] = {"error": str(e)}
        alive = proc.poll() is None

    failures = [r for r in results if r["error"]]
    completed = [r for r in results if not r["error"] and not r["cancelled"]]
    cancelled = [r for r in results if r["cancelled"]]
    short = [r for r in completed if r["finish"] == "length" and r["tokens"] != plan[r["i"]]["max_tokens"]
             and not plan[r["i"]]["stream"]]
    missing_stats = [i for i, s in per_req.items() if "error" in s]
    sums = {"exited": {}, "tokens": 0, "layers_run": 0, "layers_full": 0, "parked": 0}
    for s in per_req.values():
        if "error" in s:
            continue
        for e, k in s["exited"].items():
            sums["exited"][e] = sums["exited"].get(e, 0) + k
        for key in ("tokens", "layers_run", "layers_full", "parked"):
            sums[key] += s[key]
    rss_growth = {role: rss["end"].get(role, 0) / v - 1 for role, v in rss.get("warm", {}).items() if v}
    # the largest excursion while serving, not only at the end
    after_warm = [s for k, s in series if k > args.warm] + [rss["end"]]
    rss_max_growth = {role: max(s.get(role, 0) for s in after_warm) / v - 1
                      for role, v in rss.get("warm", {}).items() if v}
    checks = {
        "no request failed": not failures,
        "no request lost (every one answered)": len(results) == len(plan),
        "completions have max_tokens tokens unless stopped": not short,
        "server alive": alive,
        "parked, running counters, rules back to 0": (live.get("parked_now"), live.get("requests_tracked"),
                                                       live.get("requests_admitted")) == (0, 0, 0),
        "per-request stats found for every request": not missing_stats,
        "RSS within 10% of the warm value (each process, at the end and every 250 requests)":
            bool(rss_growth) and all(abs(g) <= 0.10 for g in rss_growth.values())
            and all(g <= 0.10 for g in rss_max_growth.values()),
        "metrics tokens exited == sum of per-request": {e: int(v) for e, v in metrics["exited"].items()}
        == {e: int(v) for e, v in sums["exited"].items()},
        "metrics layers run >= sum of per-request (parked, then cancelled)":
            metrics.get("decoder_layers_run", 0) >= sums["layers_run"],
    }
    report = {
        "command": " ".join(sys.argv), "machine": machine(), "server_args": server_args,
        "requests": len(plan), "completed": len(completed), "cancelled": len(cancelled), "failed": len(failures),
        "failures": failures[:10], "start_s": round(started, 1), "wall_s": round(wall, 1),
        "prompt_tokens": sum(len(p["ids"]) for p in plan), "live_after": live, "rss": rss,
        "rss_growth": rss_growth, "rss_max_growth": rss_max_growth,
        "rss_series_mb": [(k, {r: v >> 20 for r, v in s.items()}) for k, s in series], "metrics": metrics, "per_request_sums": sums,
        "decode_tokens_minus_per_request": metrics.get("decode_tokens", 0) - sums["tokens"],
        "layers_run_minus_per_request": metrics.get("decoder_layers_run", 0) - sums["layers_run"],
        "checks": checks,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({k: report[k] for k in ("requests", "completed", "cancelled", "failed", "start_s", "wall_s",
                                             "live_after", "rss_growth", "rss_max_growth", "decode_tokens_minus_per_request",
                                             "layers_run_minus_per_request")}, indent=1))
    for name, ok in checks.items():
        print(f"[soak] {'PASS' if ok else 'FAIL'}: {name}")
    print(f"[soak] server log: {log}; report: {args.out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
