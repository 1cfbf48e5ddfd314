"""Vanilla vLLM on the embedded model in bfloat16 and float32, interleaved:
why the end-to-end benchmarks here run float32 (see RESULTS.md).

    python benchmarks/bench_dtype.py --batch 64 --output-len 32 --runs 3
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import machine, median, random_prompts, timed
    from vllm_e3.prepare import prepare

    model = prepare(deploy=False)   # vanilla engines only
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(args.batch, args.input_len, 49152)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    engines = {dt: LLM(model, dtype=dt, enforce_eager=True, max_num_seqs=args.batch, seed=0)
               for dt in ("bfloat16", "float32")}
    for llm in engines.values():
        llm.generate(prompts[:4], sp, use_tqdm=False)
    times = {dt: [] for dt in engines}
    for _ in range(args.runs):
        for dt, llm in engines.items():
            times[dt].append(timed(lambda: llm.generate(prompts, sp, use_tqdm=False))[0])
    n = args.batch * args.output_len
    print(f"machine: {machine()}; vanilla vLLM eager, batch {args.batch}, {args.input_len} in / "
          f"{args.output_len} out, median of {args.runs} interleaved runs")
    for dt in engines:
        print(f"{dt:9s} {n / median(times[dt]):7.1f} tok/s")
    print(f"float32 / bfloat16 = {median(times['bfloat16']) / median(times['float32']):.2f}x")


if __name__ == "__main__":
    main()
