"""One exit boundary, counted in full, against a decoder layer at the same
rows (compiled, float32, the embedded model, a closed batch of decode steps).

A boundary's cost, counted in full:
  in the graph   the deciding stage minus the same layers without the
                 decision: a stage [a, e) ending in exit e's head, ramp, norm,
                 confidence, comparison and partition, against the last stage
                 (no decision) per layer at the same rows. Measured on a
                 profile where every boundary decides and no row leaves
                 (rate 0), so every stage runs at the batch;
  eager          the count read, exited rows to the output, views; the
                 restriction of attention that follows; the share of the exit
                 plan built before the forward (thresholds, the synthetic
                 profile's hash draws). Measured on the middle profile (rows
                 leave at every exit), with the ops and host reads of each
                 region counted (vllm_e3.profile.HostReads).
Confidence: the forced profile (no confidence in the graph) on the bare
model, and with --measures also `gate` and `shortlist@1024` on the shipped
ramps at 16/20/24 (thresholds 1.0: every boundary decides, ~no row leaves).

    python benchmarks/bench_boundary.py --batch 64
    python benchmarks/bench_boundary.py --batch 16
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

EXITS = [8, 15, 22]
MIDDLE = {"8": 0.3, "15": 0.357, "22": 0.444}
SHIPPED = [16, 20, 24]


def _steps(llm, prompts, sp, extra, count_reads=False):
    import copy

    llm.collective_rpc("e3_profile", args=(True, count_reads))
    sp = copy.copy(sp)
    sp.extra_args = extra
    llm.generate(prompts, sp, use_tqdm=False)
    steps = llm.collective_rpc("e3_profile_steps")[0]
    llm.collective_rpc("e3_profile", args=(False,))
    return [st for st in steps if not st["prompt_rows"]]


def in_graph(steps, batch: int, L: int) -> dict:
    """Per deciding stage at the full batch: its seconds less its layers at
    the last stage's per-layer seconds (medians over steps)."""
    from common import median

    by: dict[tuple, list[float]] = {}
    for st in steps:
        for start, end, m, dt in st["stages"]:
            if m == batch:
                by.setdefault((start, end), []).append(dt)
    last = max(by, key=lambda k: k[1])
    per_layer = median(by[last]) / (last[1] - last[0])
    out = {"per_layer_s": per_layer}
    for (a, b), ts in sorted(by.items()):
        if (a, b) != last:
            out[f"{a}-{b}"] = median(ts) - (b - a) * per_layer
    return out


def eager(steps) -> dict:
    from common import median

    bounds = sum(len(st["exits"]) for st in steps)
    ops: dict[str, int] = {}
    for st in steps:
        for k, n in st.get("ops", {}).items():
            ops[k] = ops.get(k, 0) + n
    per_step = lambda f: median([f(st) for st in steps])
    return {
        "boundaries_per_step": bounds / len(steps),
        "exit_s": median([dt for st in steps for dt in st["exits"]]),
        "restrict_s": median([dt for st in steps for dt in st["restrict"]]) if any(st["restrict"] for st in steps)
        else 0.0,
        "restricts_per_step": per_step(lambda st: len(st["restrict"])),
        "plan_s_per_step": per_step(lambda st: st["plan"]),
        "fill_s_per_row_layer": (sum(st["fill"][1] for st in steps) / max(1, sum(st["fill"][0] for st in steps))),
        "fill_row_layers_per_step": per_step(lambda st: st["fill"][0]),
        "reads_per_boundary": {k: sum(st["reads"][k] for st in steps) / bounds for k in ("exit", "restrict", "plan")}
        if steps and "reads" in steps[0] else None,
        "ops_per_boundary": {k: n / bounds for k, n in sorted(ops.items())},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=48)
    ap.add_argument("--measures", default="", help="comma list of gate,shortlist@1024 (shipped ramps)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import machine, random_prompts
    from helpers import free_engine as free
    from vllm_e3.prepare import bare_view, prepare

    B = args.batch
    model = prepare(deploy=False)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(B, args.input_len, 49152)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(max_num_seqs=B, max_num_batched_tokens=max(8192, B * args.input_len), seed=0)
    result = {"machine": machine(), "batch": B, "input_len": args.input_len, "output_len": args.output_len}

    llm = LLM(bare_view(model), model_impl="e3", **common, additional_config={"e3": {
        "policy": "token", "exits": EXITS, "test_overrides": True}})
    llm.generate(prompts[:4], sp, use_tqdm=False)                     # first-step costs out
    rate0 = {"_e3_test": {"policy": "token", "force_exit": {str(e): 0.0 for e in EXITS}}}
    middle = {"_e3_test": {"policy": "token", "force_exit": MIDDLE}}
    g = in_graph(_steps(llm, prompts, sp, rate0), B, 30)
    e = eager(_steps(llm, prompts, sp, middle))
    reads = eager(_steps(llm, prompts, sp, middle, count_reads=True))
    e["reads_per_boundary"], e["ops_per_boundary"] = reads["reads_per_boundary"], reads["ops_per_boundary"]
    result["forced"] = {"in_graph": g, "eager": e}
    free(llm)

    for measure in [m for m in args.measures.split(",") if m]:
        from vllm_e3.prepare import deploy_artifact, model_view

        d = model_view(model, model.rstrip(os.sep) + "-deployed")
        deploy_artifact(d, replace=True)
        llm = LLM(d, model_impl="e3", **common, additional_config={"e3": {
            "policy": "token", "exits": SHIPPED, "thresholds": [1.0] * len(SHIPPED), "confidence": measure}})
        llm.generate(prompts[:4], sp, use_tqdm=False)
        result[measure] = {"in_graph": in_graph(_steps(llm, prompts, sp, None), B, 30)}
        free(llm)

    print(f"machine: {result['machine']}; SmolLM2-135M float32 compiled; batch {B}, "
          f"{args.input_len} in / {args.output_len} out, decode steps only")
    for name, r in result.items():
        if not isinstance(r, dict) or "in_graph" not in r:
            continue
        layer = r["in_graph"]["per_layer_s"]
        print(f"\n{name}: a decoder layer at {B} rows {1e3 * layer:.3f} ms")
        for k, v in r["in_graph"].items():
            if k != "per_layer_s":
                print(f"  in the graph, stage {k}: {1e3 * v:.3f} ms = {v / layer:.3f} layer")
        if "eager" in r:
            x = r["eager"]
            per_b = x["exit_s"] + x["restrict_s"] * x["restricts_per_step"] / x["boundaries_per_step"] \
                + x["plan_s_per_step"] / x["boundaries_per_step"]
            ig = [v for k, v in r["in_graph"].items() if k != "per_layer_s"]
            total = per_b + sum(ig) / len(ig)
            print(f"  eager per boundary: exit {1e3 * x['exit_s']:.3f} ms, restrict {1e3 * x['restrict_s']:.3f} ms "
                  f"x {x['restricts_per_step']:.1f}/step, plan {1e3 * x['plan_s_per_step']:.3f} ms/step over "
                  f"{x['boundaries_per_step']:.1f} boundaries -> {1e3 * per_b:.3f} ms")
            print(f"  a boundary in full: {1e3 * total:.3f} ms = {total / layer:.3f} layer")
            print(f"  KV fill: {1e6 * x['fill_s_per_row_layer']:.2f} us per row-layer "
                  f"({x['fill_row_layers_per_step']:.0f} row-layers/step)")
            print(f"  host reads per boundary: {x['reads_per_boundary']}")
            print("  ops per boundary (region:op count):")
            for k, n in sorted(x["ops_per_boundary"].items(), key=lambda kv: -kv[1]):
                print(f"    {n:6.2f}  {k}")
            r["boundary_s"], r["boundary_layers"] = total, total / layer
    out = args.out or os.path.join(os.path.dirname(__file__), "results", f"boundary_b{B}.json")
    json.dump(result, open(out, "w"), indent=1)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
