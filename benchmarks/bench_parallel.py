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

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--parallel", choices=["tp", "pp"], required=True)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--cases", default="vanilla,zero,middle")
    ap.add_argument("--work", default=os.path.expanduser("~/.cache/vllm-e3/bench"))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import interleaved_rounds, machine, median, random_prompts
    from vllm_e3.prepare import bare_view, prepare
    from vllm_e3.stats import engine_stats

    if args.parallel == "pp":
        model, what = bare_view(prepare()), "SmolLM2-135M-Instruct (embedded), PP 2 (15 + 15 layers)"
        par = {"pipeline_parallel_size": 2}
    else:
        model = wide_llama(os.path.join(args.work, "wide-llama-4h"))
        what = "random Llama 30 x 512 (4 heads, 2 KV heads), TP 2"
        par = {"tensor_parallel_size": 2}
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(args.batch, args.input_len, 49152)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    common = dict(dtype="float32", seed=0, max_num_seqs=args.batch, skip_tokenizer_init=args.parallel == "tp",
                  max_num_batched_tokens=max(8192, args.batch * args.input_len), max_model_len=1024, **par)
    e3 = lambda rates: {"model_impl": "e3", "additional_config": {"e3": {     # noqa: E731
        "policy": "token", "exits": EXITS, "force_exit": rates}}}
    specs = {"vanilla": {}, "zero": e3({str(e): 0.0 for e in EXITS}), "middle": e3(MIDDLE)}
    cases = args.cases.split(",")
    engines = {}
    for c in cases:
        t0 = time.perf_counter()
        engines[c] = LLM(model, **common, **specs[c])
        engines[c].generate(prompts[:4], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        print(f"{c}: engine up in {time.perf_counter() - t0:.0f}s", flush=True)
    times, _, stats = interleaved_rounds(engines, prompts, sp, args.runs,
                                         lambda llm: engine_stats(llm.collective_rpc("e3_exit_stats")))
    n_out = args.batch * args.output_len
    van = n_out / median(times["vanilla"])
    print(f"\nmachine: {machine()}\n{what}; float32, compiled, batch {args.batch}, {args.input_len} in / "
          f"{args.output_len} out (random prompts), greedy, ignore_eos, one core per rank, median of "
          f"{args.runs} interleaved rounds")
    rows = []
    for c in cases:
        ts = n_out / median(times[c])
        st = stats.get(c) or {}
        skipped = 1 - st["layers_run"] / st["layers_full"] if st.get("layers_full") else 0.0
        rows.append({"case": c, "tok_s": ts, "vs_vanilla": ts / van, "layers_skipped": skipped,
                     "exited": st.get("exited"), "times": times[c]})
        print(f"{c:8s} {ts:7.1f} tok/s  {ts / van:.3f}x vanilla  decoder layers skipped {skipped:.1%}  "
              f"rounds {', '.join(f'{t:.1f}' for t in times[c])}")
    out = args.out or os.path.join(HERE, "results", f"parallel_{args.parallel}2.json")
    json.dump({"machine": machine(), "model": what, "batch": args.batch, "input_len": args.input_len,
               "output_len": args.output_len, "runs": args.runs, "rows": rows}, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
