"""Vanilla vLLM against the E3 model's policies on the embedded default.

One run: every engine lives in this process at once and the configurations
are timed interleaved (round r runs each once), median of --runs rounds.
Output tokens/s are reported as ratios to vanilla beside the ideal ratio

    ideal = T_vanilla / (T_vanilla - decoder-layer time saved)

where the decoder-layer time per token per layer comes from vanilla vLLM on
copies truncated to 8 and 15 layers and the full 30 (same compile mode; a
least-squares line through the three), and the layers saved from the exit
counts the E3 worker reports.

    python benchmarks/bench_policies.py --mode eager       # or compile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))

EXITS = [8, 15, 22]
PROFILES = {
    "none": {},
    "middle": {"8": 0.3, "15": 0.357, "22": 0.444},
    "half@8": {"8": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policies", default="full,sync,token")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import machine, median, random_prompts, timed, truncated_copy
    from vllm_e3.prepare import prepare

    model = prepare()
    eager = args.mode == "eager"
    prompts = [TokensPrompt(prompt_token_ids=p)
               for p in random_prompts(args.batch, args.input_len, 49152)]
    sp = lambda extra=None: SamplingParams(temperature=0, max_tokens=args.output_len,
                                           ignore_eos=True, extra_args=extra)
    common = dict(enforce_eager=eager, max_num_seqs=max(args.batch, 16), seed=0,
                  max_num_batched_tokens=max(8192, args.batch * args.input_len))
    tmp = tempfile.mkdtemp(prefix="e3bench-")

    engines = {"vanilla": LLM(model, **common)}
    for L in (8, 15):
        engines[f"vanilla-{L}L"] = LLM(truncated_copy(model, L, tmp), **common)
    policies = args.policies.split(",")
    if "full" in policies:
        engines["full"] = LLM(model, model_impl="e3", **common,
                              additional_config={"e3": {"policy": "full", "exits": EXITS}})
    if {"sync", "token"} & set(policies):
        # one engine serves sync and token through the test-only request keys
        engines["exits"] = LLM(model, model_impl="e3", **common,
                               additional_config={"e3": {"policy": "token", "exits": EXITS}})

    cases = [("vanilla", "vanilla", None), ("vanilla-8L", "vanilla-8L", None),
             ("vanilla-15L", "vanilla-15L", None)]
    if "full" in policies:
        cases.append(("full", "full", None))
    for pol in ("sync", "token"):
        if pol in policies:
            for name, prof in PROFILES.items():
                cases.append((f"{pol}/{name}", "exits", {"_e3_policy": pol, "_e3_force_exit": prof}))

    for name, eng, extra in cases:  # warm-up: first-step costs out of the timings
        engines[eng].generate(prompts[:4], sp(extra), use_tqdm=False)
    times = {c[0]: [] for c in cases}
    saved = {}
    for r in range(args.runs):
        for name, eng, extra in cases:
            if eng == "exits":
                engines[eng].collective_rpc("e3_reset_exit_stats")
            dt, outs = timed(lambda: engines[eng].generate(prompts, sp(extra), use_tqdm=False))
            assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
            times[name].append(dt)
            if eng == "exits":
                st = engines[eng].collective_rpc("e3_exit_stats")[0]
                saved[name] = (st["layers_full"] - st["layers_run"], st["decode_tokens"], st["exited"])
            print(f"round {r} {name:18s} {dt:7.2f}s", flush=True)

    n_out = args.batch * args.output_len
    med = {k: median(v) for k, v in times.items()}
    # decoder-layer seconds per token-layer from the vanilla depth sweep
    xs, ys = [8, 15, 30], [med["vanilla-8L"], med["vanilla-15L"], med["vanilla"]]
    mx, my = sum(xs) / 3, sum(ys) / 3
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    per_layer_token = slope / n_out
    layer_share = slope * 30 / med["vanilla"]
    tv = med["vanilla"]
    rows = []
    for name, _, _ in cases:
        if name.startswith("vanilla"):
            continue
        ratio = tv / med[name]
        ideal = 1.0
        if name in saved:
            layers_saved, decode_tokens, _ = saved[name]
            # saved layers counted over decode tokens of one run (+ warm-up-free)
            ideal = tv / (tv - per_layer_token * layers_saved)
        rows.append({"config": name, "seconds": med[name], "tok_s": n_out / med[name],
                     "ratio_vs_vanilla": ratio, "ideal_ratio": ideal,
                     "fraction_of_ideal": ratio / ideal,
                     "exited": saved.get(name, (0, 0, {}))[2]})
    result = {
        "machine": machine(), "model": "SmolLM2-135M-Instruct bf16", "mode": args.mode,
        "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len,
        "runs": args.runs, "exits": EXITS,
        "decoder_layer_ms_per_token_layer": per_layer_token * 1e3,
        "decoder_layer_share_of_vanilla": layer_share,
        "times": times, "rows": rows,
    }
    print(f"\nmachine: {result['machine']}")
    print(f"model SmolLM2-135M bf16, {args.mode}, batch {args.batch}, {args.input_len} in / "
          f"{args.output_len} out, greedy, median of {args.runs} interleaved runs")
    print(f"decoder layers: {per_layer_token*1e3:.4f} ms per token-layer, "
          f"{layer_share*100:.1f}% of a vanilla step")
    print(f"{'config':18s} {'tok/s':>8s} {'ratio':>7s} {'ideal':>7s} {'of ideal':>8s}")
    print(f"{'vanilla':18s} {n_out/tv:8.1f} {1.0:7.3f}")
    for row in rows:
        print(f"{row['config']:18s} {row['tok_s']:8.1f} {row['ratio_vs_vanilla']:7.3f} "
              f"{row['ideal_ratio']:7.3f} {row['fraction_of_ideal']:8.3f}")
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"policies_{args.mode}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(result, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
