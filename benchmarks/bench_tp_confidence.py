"""The collective an exit decision costs under tensor parallelism: what
vllm_e3.models.parallel does against the alternatives, on vLLM's own
TP group inside a TP = 2 engine (one core per rank).

For a decision over n rows, with the LM head split by vocabulary:
- all_gather   the per-rank partial statistics [4, n] fp32 to every rank,
               each rank merges (vllm_e3.models.parallel.VocabShard: one collective)
- gather+bcast the same partials to rank 0, which decides and broadcasts the
               [n] mask (two collectives)
- logits       every rank's [n, V/2] logit shard to every rank (what vLLM's
               LogitsProcessor does for the final head), V = 49152

The function runs on both workers through collective_rpc, which takes a
callable only with VLLM_ALLOW_INSECURE_SERIALIZATION=1 (set here, for this
benchmark only). Median of --reps calls after 10 warm-up calls.

    python benchmarks/bench_tp_confidence.py
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))


def measure(worker, ns, reps):
    import statistics
    import time

    import torch
    from vllm.distributed import get_tp_group

    g = get_tp_group()
    out = {}
    for n in ns:
        part = torch.randn(1, 4, n)
        mask = torch.zeros(n, dtype=torch.uint8)
        shard = torch.randn(n, 24576)

        def gather_bcast():
            g.gather(part, dst=0, dim=0)
            g.broadcast(mask, src=0)

        cases = {"all_gather": lambda: g.all_gather(part, dim=0), "gather+bcast": gather_bcast,
                 "logits": lambda: g.all_gather(shard, dim=-1)}
        row = {}
        for name, fn in cases.items():
            for _ in range(10):
                fn()
            ts = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            row[name] = statistics.median(ts) * 1e6
        out[n] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,16,64,256")
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "tp_confidence_collectives.json"))
    args = ap.parse_args()

    from vllm import LLM

    from common import machine
    from helpers import tiny_llama

    model = tiny_llama(os.path.join(tempfile.mkdtemp(), "tiny"))
    llm = LLM(model, dtype="float32", tensor_parallel_size=2, enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=256)
    ns = [int(x) for x in args.rows.split(",")]
    res = llm.collective_rpc(measure, args=(ns, args.reps))
    print(f"machine: {machine()}\nvLLM TP group of 2 ranks (one core each), median of {args.reps} calls, µs "
          f"(rank 0 / rank 1)")
    print(f"{'rows':>6} {'all_gather [4,n]':>20} {'gather+bcast':>20} {'logits [n,24576]':>20}")
    for n in ns:
        r0, r1 = res[0][n], res[1][n]
        print(f"{n:>6} " + " ".join(f"{r0[c]:>9.0f} / {r1[c]:<8.0f}" for c in ("all_gather", "gather+bcast", "logits")))
    json.dump({"machine": machine(), "reps": args.reps, "per_rank_us": res}, open(args.out, "w"), indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
