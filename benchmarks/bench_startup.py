"""Engine start-up time, vanilla vLLM against the E3 model with exits, under
vLLM's default compilation: the time until `LLM(...)` returns, each engine in
a fresh process, with a cold compile cache (a new VLLM_CACHE_ROOT) and then
warm (the same cache again). Rounds are interleaved.

    python benchmarks/bench_startup.py --rounds 1
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))

EXITS = [8, 15, 22]


def start_once(which: str) -> float:
    """Seconds until LLM(...) returns, in this process."""
    from vllm import LLM
    from vllm.config import CompilationMode

    from vllm_e3.prepare import bare_view, prepare

    model = bare_view(prepare(deploy=False))
    kw = dict(dtype="float32", max_model_len=512, seed=0)
    if which == "e3":
        kw.update(model_impl="e3", additional_config={"e3": {"policy": "token", "exits": EXITS}})
    t0 = time.perf_counter()
    llm = LLM(model, **kw)
    dt = time.perf_counter() - t0
    assert llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--one", choices=["vanilla", "e3"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.one:
        print("E3START " + json.dumps({"seconds": start_once(args.one)}), flush=True)
        return

    from common import machine, median

    times: dict[str, list[float]] = {}
    for r in range(args.rounds):
        for which in ("vanilla", "e3"):
            cache = tempfile.mkdtemp(prefix=f"e3start-{which}-")
            for state in ("cold", "warm"):
                env = {**os.environ, "VLLM_CACHE_ROOT": cache}
                res = subprocess.run([sys.executable, __file__, "--one", which], env=env,
                                     capture_output=True, text=True, check=True)
                with open(os.path.join(cache, f"{state}.log"), "w") as f:   # vLLM's own log
                    f.write(res.stdout + res.stderr)
                line = next(x for x in res.stdout.splitlines() if x.startswith("E3START "))
                dt = json.loads(line[len("E3START "):])["seconds"]
                times.setdefault(f"{which}/{state}", []).append(dt)
                print(f"round {r} {which:8s} {state}: {dt:7.1f} s (log: {cache}/{state}.log)", flush=True)
    med = {k: median(v) for k, v in times.items()}
    print(f"\nmachine: {machine()}")
    for state in ("cold", "warm"):
        v, e = med[f"vanilla/{state}"], med[f"e3/{state}"]
        print(f"{state}: vanilla {v:.1f} s, e3 token {e:.1f} s, ratio {e / v:.2f}")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "startup_compile.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump({"machine": machine(), "rounds": args.rounds, "times": times, "median": med},
              open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
