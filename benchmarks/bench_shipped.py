"""The shipped default against vanilla vLLM, and what the exits it turned down
would have done (benchmarks/RESULTS.md, "Exits that pay, or none").

Engines in this process, built once each, timed in interleaved rounds, median
of --runs; SmolLM2-135M float32, vLLM's default compile mode on every side
unless --mode eager; a closed batch of --batch chat prompts (HumanEval 0..B-1,
ours to use; the first --input-len tokens of each), --output-len tokens each,
greedy, ignore_eos. Cases:

- vanilla              vLLM without the plugin
- shipped              `--model-impl e3` on the deployed model, no E3 flags:
                       whatever `vllm-e3 calibrate` deployed (config.json)
- gate@0.99            the verified gate choice of the calibration's 0.99 row,
                       deployed by hand (what calibrate turned down)
- gate@0.99+audit      the same with the online audit on --audit-rate of exits

Printed per case: tok/s, the ratio to vanilla, exits, and the mean identical
prefix of its outputs against vanilla's (the free-running quality target).

    python benchmarks/bench_shipped.py --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def identical_prefix(a: list[int], b: list[int]) -> float:
    n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return n / max(len(b), 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compile"], default="compile")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--audit-rate", type=float, default=0.1)
    ap.add_argument("--cases", default="vanilla,shipped,gate@0.99,gate@0.99+audit")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "shipped_default.json"))
    args = ap.parse_args()

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import interleaved_rounds, machine, median
    from vllm_e3.tools.data import chat_token_ids, humaneval_prompts
    from vllm_e3.config import CALIBRATION_FILENAME, e3_dir, load_e3_config
    from vllm_e3.prepare import bare_view, prepare

    deployed = prepare()                                     # installs the shipped artifact
    bare = bare_view(deployed)
    cal = json.load(open(os.path.join(e3_dir(deployed), CALIBRATION_FILENAME)))
    row = next(r for r in cal["table"] if r["target_agreement"] == 0.99)
    gate = row["chosen"] or row["per_measure"]["gate"]
    gate_cfg = {"policy": "token", "exits": cal["exits"], "thresholds": gate["thresholds"],
                "confidence": gate["measure"]}
    tok = AutoTokenizer.from_pretrained(deployed)
    ids = [p[:args.input_len] for p in chat_token_ids(tok, humaneval_prompts(args.batch))]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in ids]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(dtype="float32", seed=0, enforce_eager=args.mode == "eager", max_num_seqs=args.batch,
                  max_num_batched_tokens=max(8192, args.batch * args.input_len))
    specs = {"vanilla": (bare, {}),
             "shipped": (deployed, {"model_impl": "e3"}),
             "gate@0.99": (deployed, {"model_impl": "e3", "additional_config": {"e3": gate_cfg}}),
             "gate@0.99+audit": (deployed, {"model_impl": "e3", "additional_config": {
                 "e3": {**gate_cfg, "audit_rate": args.audit_rate}}})}
    cases = args.cases.split(",")
    engines = {}
    for c in cases:
        model, kw = specs[c]
        t0 = time.perf_counter()
        engines[c] = LLM(model, **common, **kw)
        engines[c].generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        print(f"{c}: engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    times, outs, stats = interleaved_rounds(engines, prompts, sp, args.runs,
                                            lambda llm: llm.collective_rpc("e3_exit_stats")[0])
    n_out = args.batch * args.output_len
    van = n_out / median(times["vanilla"])
    print(f"\nmachine: {machine()}\nSmolLM2-135M-Instruct float32, {args.mode}, batch {args.batch}, "
          f"{args.input_len} in / {args.output_len} out (HumanEval 0-{args.batch - 1}, chat template, "
          f"first {args.input_len} tokens), greedy, ignore_eos, median of {args.runs} interleaved rounds")
    print(f"shipped config: {load_e3_config(deployed).to_dict()}")
    rows = []
    for c in cases:
        ts = n_out / median(times[c])
        st = stats.get(c) or {}
        prefix = sum(identical_prefix(a, b) for a, b in zip(outs[c], outs["vanilla"])) / args.batch
        exited = sum((st.get("exited") or {}).values())
        audited, agreed = sum((st.get("audited") or {}).values()), sum((st.get("audit_agreed") or {}).values())
        rows.append({"case": c, "tok_s": ts, "vs_vanilla": ts / van, "identical_prefix": prefix,
                     "exited": exited, "decode_tokens": st.get("decode_tokens"),
                     "audited": audited, "audit_agreed": agreed, "times": times[c]})
        print(f"{c:18s} {ts:7.1f} tok/s  {ts / van:.3f}x vanilla  identical prefix {prefix:.3f}  "
              f"exited {exited}" + (f"  audited {audited} (agree {agreed})" if audited else "")
              + f"  rounds {', '.join(f'{t:.1f}' for t in times[c])}")
    json.dump({"machine": machine(), "mode": args.mode, "batch": args.batch, "input_len": args.input_len,
               "output_len": args.output_len, "runs": args.runs, "audit_rate": args.audit_rate,
               "gate_config": gate_cfg, "shipped_config": load_e3_config(deployed).to_dict(), "rows": rows},
              open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
