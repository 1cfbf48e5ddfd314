"""Policy `e3` against policy `token` with the same requests in flight.

For each in-flight budget F (--in-flight, e.g. 16,64): the same queue of
--requests-per-slot x F random prompts, the synthetic middle profile (30% of
decode tokens leave at 8, 25% at 15, 20% at 22), compiled, float32:

- token   `--max-num-seqs F`: one batch of up to F requests, every stage runs
          on the rows that continue;
- e3      `--max-num-seqs F --max-num-active-seqs F/2`, target batch F/2 at
          every stage, `park_when: refill` (E3's setting: half the slots for
          parked requests, vllm_e3/scheduler.py).

Both engines are alive together and timed in interleaved rounds (median of
--runs). Beside each measurement, the planner's simulation
(vllm_e3.simulate) of the same engine and workload on --costs (engine costs
measured here by `vllm-e3 profile`), and the in-flight requests and stage
batches each engine reports.

    python benchmarks/bench_inflight.py --in-flight 16,64 --runs 3 \
        --costs benchmarks/results/engine_costs_curve512.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EXITS = [8, 15, 22]
MIDDLE = {"8": 0.3, "15": 0.357, "22": 0.444}


def predict(args, row: dict, input_len: int, output_len: int) -> None:
    """The planner's simulation (vllm_e3.simulate) of both engines of `row`,
    written into it."""
    from vllm_e3.planner import load_engine_costs
    from vllm_e3.simulate import simulate

    F = row["in_flight"]
    ecosts = load_engine_costs(args.costs)
    if args.boundary_s:
        per = {int(k): float(v) for k, v in (x.split(":") for x in args.boundary_s.split(","))}
        ecosts["exit_s"] = per.get(F, ecosts["exit_s"])
    rates = {int(k): v for k, v in MIDDLE.items()}
    work = {"requests": row["requests"], "prompt_len": input_len, "output_len": output_len}
    sim = {"token": simulate(ecosts, policy="token", exits=EXITS, rates=rates, batch=F, slots=F, **work),
           "e3": simulate(ecosts, policy="e3", exits=EXITS, rates=rates, batch=F // 2, slots=F,
                          target=F // 2, park_when="refill", **work)}
    for c in ("token", "e3"):
        row[c].update({"predicted_tok_s": sim[c]["tok_s"], "predicted_in_flight": sim[c]["in_flight_mean"]})
    row["predicted_e3_vs_token"] = sim["e3"]["tok_s"] / sim["token"]["tok_s"]
    row["predicted_exit_s"] = ecosts["exit_s"]


def report(row: dict) -> None:
    print(f"\nin flight {row['in_flight']}: token {row['token']['tok_s']:.1f} tok/s (predicted "
          f"{row['token']['predicted_tok_s']:.1f}), e3 {row['e3']['tok_s']:.1f} (predicted "
          f"{row['e3']['predicted_tok_s']:.1f}); e3/token {row['e3_vs_token']:.3f} (predicted "
          f"{row['predicted_e3_vs_token']:.3f}); in flight token {row['token']['in_flight_mean']:.1f}, "
          f"e3 {row['e3']['in_flight_mean']:.1f}, parked {row['e3']['parked']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-flight", default="16,64")
    ap.add_argument("--requests-per-slot", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--costs", required=True, help="engine costs for the planner's prediction")
    ap.add_argument("--boundary-s", default=None,
                    help="exit boundary seconds for the prediction, per in-flight budget "
                         "('16:0.000515,64:0.000908'), instead of the costs file's exit_s")
    ap.add_argument("--predict-only", action="store_true",
                    help="recompute the predictions of --out's rows (with --costs, --boundary-s); run nothing")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "inflight_e3_token.json"))
    args = ap.parse_args()
    if args.predict_only:
        d = json.load(open(args.out))
        for row in d["rows"]:
            predict(args, row, d["input_len"], d["output_len"])
            report(row)
        d["costs"], d["boundary_s"] = args.costs, args.boundary_s
        json.dump(d, open(args.out, "w"), indent=1)
        return

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import interleaved_rounds, machine, median, random_prompts
    from vllm_e3.prepare import bare_view, prepare
    from vllm_e3.stats import engine_stats

    model = bare_view(prepare(deploy=False))
    results = []
    for F in (int(x) for x in args.in_flight.split(",")):
        n = args.requests_per_slot * F
        prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(n, args.input_len, 49152)]
        sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
        common = dict(dtype="float32", seed=0, max_num_batched_tokens=max(8192, F * args.input_len),
                      max_model_len=1024, model_impl="e3")
        e3cfg = {"exits": EXITS, "force_exit": MIDDLE}
        engines = {
            "token": LLM(model, **common, max_num_seqs=F,
                         additional_config={"e3": {**e3cfg, "policy": "token"}}),
            "e3": LLM(model, **common, max_num_seqs=F, max_num_active_seqs=F // 2,
                      additional_config={"e3": {**e3cfg, "policy": "e3", "target_batch": F // 2,
                                                "park_when": "refill"}}),
        }
        for llm in engines.values():
            llm.generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        times, _, stats = interleaved_rounds(
            engines, prompts, sp, args.runs, lambda llm: engine_stats(llm.collective_rpc("e3_exit_stats")),
            vanilla=())
        row = {"in_flight": F, "requests": n}
        for c in engines:
            st = stats[c]
            row[c] = {"tok_s": n * args.output_len / median(times[c]), "times": times[c],
                      "in_flight_mean": st["step_reqs"] / max(st["steps"], 1), "parked": st["parked"],
                      "stage_rows": {s: st["stage_rows"][s] / st["stage_runs"][s] for s in st["stage_runs"]}}
        row["e3_vs_token"] = row["e3"]["tok_s"] / row["token"]["tok_s"]
        predict(args, row, args.input_len, args.output_len)
        results.append(row)
        report(row)
        for llm in engines.values():       # the next budget's engines get the memory and cores
            llm.llm_engine.engine_core.shutdown()
        del engines, llm
        gc.collect()
    print(f"\nmachine: {machine()}\nSmolLM2-135M-Instruct (embedded), float32, compiled; middle profile; "
          f"{args.requests_per_slot} x F random prompts of {args.input_len} tokens, {args.output_len} out, "
          f"greedy, ignore_eos; median of {args.runs} interleaved rounds")
    json.dump({"machine": machine(), "input_len": args.input_len, "output_len": args.output_len,
               "runs": args.runs, "costs": args.costs, "rows": results}, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
