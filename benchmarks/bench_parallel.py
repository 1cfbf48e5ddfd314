"""E3 under vLLM's tensor or pipeline parallelism against vanilla vLLM at the
same parallelism.

Engines in this process, built once each, timed in interleaved rounds, median
of --runs; float32, vLLM's default compile mode; a closed batch of --batch
random prompts of --input-len tokens, --output-len tokens each, greedy,
ignore_eos; one core per rank (VLLM_CPU_OMP_THREADS_BIND="0|1"). Cases:

- vanilla     vLLM without the plugin, same parallelism
- zero        `--model-impl e3`, exits 8/15/22 with a synthetic rate of 0:
              the exit machinery runs, nothing leaves (its overhead)
- middle      the same with the synthetic "middle" profile (30% of decode
              tokens leave at 8, 25% at 15, 20% at 22)

and, with --parallel pp, where the layers are cut (vllm_e3/pipeline.py):

- vanilla_best  vanilla at its own best split (the planner's, on the engine
                costs: VLLM_PP_LAYER_PARTITION)
- planned       the middle profile with `"plan": true` on a view of the model
                whose e3/ holds the engine costs (--engine-costs): the ranks
                choose the partition (and exits) at start-up

Each E3 and vanilla case without a partition of its own runs vLLM's even
split. The planner's predictions for every case are printed beside the
measurements (against vanilla at the even split and at its best split).

--parallel pp runs the embedded SmolLM2-135M (30 layers, 15 per rank).
--parallel tp needs a head count that 2 divides, which SmolLM2 (9 heads, 3
KV heads) is not: it runs a random Llama of the same depth and width class
(30 layers, hidden 512, 4 heads of 128, 2 KV heads, intermediate 1536,
vocabulary 49152), built once under --work.

On this 2-core machine these are functional figures: each rank gets one
core, and the ranks talk through shared memory on the same socket.

    python benchmarks/bench_parallel.py --parallel tp --runs 3
    python benchmarks/bench_parallel.py --parallel pp --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# 1 GiB a rank: the pp run holds four engines of two ranks each (with 2 GiB the fourth ran out of memory on 24 GB)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EXITS = [8, 15, 22]
MIDDLE = {"8": 0.3, "15": 0.357, "22": 0.444}


def wide_llama(path: str) -> str:
    """The TP benchmark's random Llama (see the module docstring)."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def pp_partitions(args, model: str) -> tuple[dict, dict]:
    """Per case the partition it runs (VLLM_PP_LAYER_PARTITION; none: vLLM's
    even split, or the plan's for `planned`), the planned case's model view,
    and the planner's predictions."""
    import shutil

    from vllm_e3.pipeline import bottleneck, even_partition, plan_pp, spell
    from vllm_e3.planner import load_engine_costs
    from vllm_e3.prepare import model_view

    c = load_engine_costs(args.engine_costs)
    fr = {int(k): v for k, v in MIDDLE.items()}
    fractions = {}
    reach = 1.0
    for e in EXITS:                                  # of all tokens, from the rates
        fractions[e] = reach * fr[e]
        reach -= fractions[e]
    m = args.groups
    plan = plan_pp(c, EXITS, fractions, args.batch, 2, in_flight=m)
    even = even_partition(c["num_layers"], 2)
    van_even = bottleneck(c, even, [], {}, args.batch, "full", m)
    van_best = bottleneck(c, plan["vanilla_best_partition"], [], {}, args.batch, "full", m)
    mid_even = bottleneck(c, even, EXITS, fractions, args.batch, "token", m)
    view = model_view(model, model.rstrip("/") + "-ppplan")
    os.makedirs(os.path.join(view, "e3"), exist_ok=True)
    shutil.copy(args.engine_costs, os.path.join(view, "e3", "engine_costs.json"))
    parts = {"vanilla_best": spell(plan["vanilla_best_partition"]), "planned_model": view}
    predicted = {
        "vanilla": {"vs_vanilla_even": 1.0, "vs_vanilla_best": van_best / van_even, "partition": spell(even)},
        "vanilla_best": {"vs_vanilla_even": van_even / van_best, "vs_vanilla_best": 1.0,
                         "partition": parts["vanilla_best"]},
        "middle": {"vs_vanilla_even": van_even / mid_even, "vs_vanilla_best": van_best / mid_even,
                   "partition": spell(even)},
        "planned": {"vs_vanilla_even": plan["vs_vanilla_even"], "vs_vanilla_best": plan["vs_vanilla_best"],
                    "partition": spell(plan["partition"]), "exits": plan["exits"]},
    }
    print(f"planner ({args.engine_costs}, batch {args.batch}): planned {plan['policy']} {plan['exits']} at "
          f"{spell(plan['partition'])}; vanilla's best split {parts['vanilla_best']}", flush=True)
    return parts, predicted


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", choices=["tp", "pp"], required=True)
    ap.add_argument("--batch", type=int, default=None,
                    help="rows a step (default 64 for tp, 32 for pp)")
    ap.add_argument("--groups", type=int, default=None,
                    help="groups of --batch requests taking turns in the pipeline: the closed batch is "
                         "groups x --batch requests, admitted one group a step (--max-num-batched-tokens "
                         "= --batch x --input-len), so that as many steps are in flight as there are "
                         "groups (default 2 for pp, 1 for tp; vllm_e3/pipeline.py)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default=None,
                    help="default: vanilla,zero,middle (tp); vanilla,vanilla_best,middle,planned (pp)")
    ap.add_argument("--engine-costs", default=os.path.join(os.path.dirname(HERE), "artifacts",
                                                           "smollm2-135m", "e3", "engine_costs.json"),
                    help="what the pp partition planner prices the ranks with")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/vllm-e3/bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import interleaved_rounds, machine, median, random_prompts
    from vllm_e3.pipeline import PARTITION_ENV
    from vllm_e3.prepare import bare_view, prepare
    from vllm_e3.stats import engine_stats

    if args.parallel == "pp":
        model, what = bare_view(prepare()), "SmolLM2-135M-Instruct (embedded), PP 2"
        par = {"pipeline_parallel_size": 2}
    else:
        model = wide_llama(os.path.join(args.work, "wide-llama-4h"))
        what = "random Llama 30 x 512 (4 heads, 2 KV heads), TP 2"
        par = {"tensor_parallel_size": 2}
    pp = args.parallel == "pp"
    args.batch = args.batch or (32 if pp else 64)
    args.groups = args.groups or (2 if pp else 1)
    n = args.groups * args.batch
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(n, args.input_len, 49152)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    budget = args.batch * args.input_len if args.groups > 1 else max(8192, args.batch * args.input_len)
    common = dict(dtype="float32", seed=0, max_num_seqs=n, skip_tokenizer_init=args.parallel == "tp",
                  max_num_batched_tokens=budget, max_model_len=1024, **par)
    e3 = lambda rates, **kw: {"model_impl": "e3", "additional_config": {"e3": {     # noqa: E731
        "policy": "token", "exits": EXITS, "force_exit": rates, **kw}}}
    specs = {"vanilla": {}, "zero": e3({str(e): 0.0 for e in EXITS}), "middle": e3(MIDDLE),
             "vanilla_best": {}, "planned": e3(MIDDLE, plan=True)}
    cases = (args.cases or ("vanilla,vanilla_best,middle,planned" if args.parallel == "pp"
                            else "vanilla,zero,middle")).split(",")
    parts, predicted = {}, {}
    if args.parallel == "pp":
        parts, predicted = pp_partitions(args, model)
    engines = {}
    for c in cases:
        t0 = time.perf_counter()
        where = parts.get(c)
        if where:                    # the engine's workers read it as they start
            os.environ[PARTITION_ENV] = where
        try:
            engines[c] = LLM(model if c != "planned" else parts["planned_model"], **common, **specs[c])
        finally:
            os.environ.pop(PARTITION_ENV, None)
        engines[c].generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        if c != "vanilla" and c != "vanilla_best":
            got = engines[c].collective_rpc("e3_layers")
            print(f"{c}: layers per rank {got}", flush=True)
            predicted.setdefault(c, {})["layers"] = got
        print(f"{c}: engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    times, _, stats = interleaved_rounds(engines, prompts, sp, args.runs,
                                         lambda llm: engine_stats(llm.collective_rpc("e3_exit_stats")),
                                         vanilla=("vanilla", "vanilla_best"))
    n_out = n * args.output_len
    van = n_out / median(times["vanilla"])
    print(f"\nmachine: {machine()}\n{what}; float32, compiled, {n} requests in {args.groups} group(s) of "
          f"{args.batch} (--max-num-seqs {n}, --max-num-batched-tokens {budget}), {args.input_len} in / "
          f"{args.output_len} out (random prompts), greedy, ignore_eos, one core per rank, median of "
          f"{args.runs} interleaved rounds")
    rows = []
    for c in cases:
        ts = n_out / median(times[c])
        st = stats.get(c) or {}
        skipped = 1 - st["layers_run"] / st["layers_full"] if st.get("layers_full") else 0.0
        row = {"case": c, "tok_s": ts, "vs_vanilla": ts / van, "layers_skipped": skipped,
               "exited": st.get("exited"), "times": times[c],
               "partition": parts.get(c, "the ranks' own plan" if c == "planned" else "even")}
        if "vanilla_best" in times:
            row["vs_vanilla_best"] = ts / (n_out / median(times["vanilla_best"]))
        row.update({f"predicted_{k}": v for k, v in predicted.get(c, {}).items()})
        rows.append(row)
        print(f"{c:12s} {ts:7.1f} tok/s  {ts / van:.3f}x vanilla" +
              (f"  {row['vs_vanilla_best']:.3f}x vanilla at its best split" if "vs_vanilla_best" in row else "")
              + f"  decoder layers skipped {skipped:.1%}  rounds {', '.join(f'{t:.1f}' for t in times[c])}")
        if c in predicted and "vs_vanilla_even" in predicted[c]:
            p = predicted[c]
            print(f"{'':12s} predicted {p['vs_vanilla_even']:.3f}x vanilla, {p['vs_vanilla_best']:.3f}x "
                  f"vanilla at its best split (partition {p['partition']})")
    out = args.out or os.path.join(HERE, "results", f"parallel_{args.parallel}2.json")
    json.dump({"machine": machine(), "model": what, "batch": args.batch, "groups": args.groups,
               "requests": n, "max_num_batched_tokens": budget, "input_len": args.input_len,
               "output_len": args.output_len, "runs": args.runs, "rows": rows,
               "engine_costs": args.engine_costs if args.parallel == "pp" else None},
              open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
