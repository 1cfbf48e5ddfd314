"""What isolation under prefix caching costs (hardening): a two-turn chat
workload where turn 2's prompt is turn 1's prompt + answer + a follow-up.

    .venv/bin/python benchmarks/bench_prefix_cache.py --conversations 32 --runs 3

Sides (float32, eager on every side, batch = the conversations):
- `vanilla`: vLLM's prefix caching as is: turn 2 reuses turn 1's prompt AND
  answer blocks (what an E3 engine must not do once an answer token exited);
- `e3-prompt-blocks`: `--model-impl e3`, policy token with exits 8/15/22
  under a synthetic rate 0 (every exit decision is made, none fires, so the
  answers equal vanilla's), prefix caching on: prompt blocks only
  (patches/patch_kv_cache.py);
- `e3-no-cache`: the same with prefix caching off (the other safe option).
Each round runs turn 1 then turn 2 on a fresh cache salt, so rounds are
independent; the turn-2 time and the cached tokens per turn-2 request are
reported (median over rounds, rounds interleaved across sides).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

WORDS = ("river lamp stone quiet market winter engine garden letter window number silver forest "
         "question answer morning paper bridge island machine").split()


def conversations(n: int, prompt_words: int) -> list[str]:
    import random

    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(prompt_words)) + "\nSummarise the above:" for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--answer-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import machine
    from vllm_e3.prepare import bare_view

    model = bare_view()
    common = dict(dtype="float32", enforce_eager=True, max_num_seqs=args.conversations, seed=0,
                  max_model_len=2048, block_size=32)
    e3 = {"e3": {"policy": "token", "exits": [8, 15, 22], "force_exit": {"8": 0.0, "15": 0.0, "22": 0.0}}}
    engines = {
        "vanilla": LLM(model, enable_prefix_caching=True, **common),
        "e3-prompt-blocks": LLM(model, model_impl="e3", enable_prefix_caching=True, additional_config=e3, **common),
        "e3-no-cache": LLM(model, model_impl="e3", enable_prefix_caching=False, additional_config=e3, **common),
    }
    tok = engines["vanilla"].get_tokenizer()
    texts = conversations(args.conversations, args.prompt_words)
    turn1 = SamplingParams(temperature=0, max_tokens=args.answer_tokens, ignore_eos=True)
    turn2 = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    follow = tok("\nNow say it again, shorter:")["input_ids"]
    times = {k: [] for k in engines}
    cached = {k: [] for k in engines}
    for r in range(args.runs):
        for name, llm in engines.items():
            # a fresh cache salt per round and side: rounds start cold
            salt = f"{name}-{r}-{time.time()}"
            p1 = [TokensPrompt(prompt_token_ids=tok(t)["input_ids"], cache_salt=salt) for t in texts]
            out1 = llm.generate(p1, turn1, use_tqdm=False)
            p2 = [TokensPrompt(prompt_token_ids=list(o.prompt_token_ids) + list(o.outputs[0].token_ids) + follow,
                               cache_salt=salt) for o in out1]
            t0 = time.perf_counter()
            out2 = llm.generate(p2, turn2, use_tqdm=False)
            times[name].append(time.perf_counter() - t0)
            cached[name].append(statistics.mean(o.num_cached_tokens or 0 for o in out2))
    base = statistics.median(times["vanilla"])
    print(f"machine: {machine()}; SmolLM2-135M float32 eager; {args.conversations} conversations, "
          f"turn 1: ~{len(p1[0]['prompt_token_ids'])} prompt tokens + {args.answer_tokens} answer tokens, "
          f"turn 2: +{len(follow)} tokens, 16 out; median of {args.runs} interleaved rounds")
    print("| side | turn-2 time s | ratio vs vanilla | mean cached tokens / turn-2 request | turn-2 prompt tokens |")
    print("|---|---:|---:|---:|---:|")
    for name in engines:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.2f} | {t / base:.2f} | {statistics.median(cached[name]):.0f} | "
              f"{len(p2[0]['prompt_token_ids'])} |")


if __name__ == "__main__":
    main()
