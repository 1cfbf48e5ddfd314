"""This tree's E3 engine against an earlier commit's, interleaved in one run.

Each measurement is a fresh process whose PYTHONPATH puts one tree's
`vllm_e3` first (the plugin, its patches and its model class all come from
that tree; vLLM and torch are this venv's), so the two versions never share a
process. Rounds alternate the trees (base, head, base, head, ...) and the
cases within them; median of --runs rounds per tree and case.

    python benchmarks/bench_commits.py --base 3654746 --mode eager --runs 3

Cases: `full` (the E3 class, policy full) and `token/middle` (exits 8/15/22,
synthetic profile), batch 64, 64 in / 128 out, float32, greedy, ignore_eos.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXITS = [8, 15, 22]
CASES = {"full": {"policy": "full", "exits": EXITS},
         "token/middle": {"policy": "token", "exits": EXITS,
                          "force_exit": {"8": 0.3, "15": 0.357, "22": 0.444}}}


def child(args) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    sys.path.insert(0, HERE)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    import vllm_e3
    from common import random_prompts
    from vllm_e3.prepare import bare_view, prepare

    model = bare_view(prepare(deploy=False))
    llm = LLM(model, model_impl="e3", enforce_eager=args.mode == "eager", dtype="float32", seed=0,
              max_num_seqs=args.batch, max_num_batched_tokens=max(8192, args.batch * args.input_len),
              additional_config={"e3": CASES[args.case]})
    prompts = [TokensPrompt(prompt_token_ids=p) for p in random_prompts(args.batch, args.input_len, 49152)]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompts[:4], sp, use_tqdm=False)                 # first-step costs out
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dt = time.perf_counter() - t0
    assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    import vllm_e3.patches

    tree = os.path.dirname(os.path.dirname(vllm_e3.__file__))
    assert os.path.realpath(vllm_e3.patches.__file__).startswith(os.path.realpath(tree)), \
        (vllm_e3.patches.__file__, tree)
    print("RESULT " + json.dumps({"seconds": dt, "tree": tree}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="3654746")
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--cases", default="full,token/middle")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, HERE)
    from common import machine, median

    base_tree = f"/tmp/e3-base-{args.base}"
    if not os.path.isdir(base_tree):
        subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", base_tree, args.base], check=True)
    # the editable install maps vllm_e3.patches/.kernels/.artifacts to this
    # checkout's folders; links inside the base tree's package win over it
    for name in ("patches", "kernels", "artifacts"):
        src, dst = os.path.join(base_tree, name), os.path.join(base_tree, "vllm_e3", name)
        if os.path.isdir(src) and not os.path.exists(dst):
            os.symlink(src, dst)
    trees = {"base": base_tree, "head": ROOT}
    times = {(t, c): [] for t in trees for c in args.cases.split(",")}
    for r in range(args.runs):
        for tree, path in trees.items():
            for case in args.cases.split(","):
                env = {**os.environ, "PYTHONPATH": path + os.pathsep + os.environ.get("PYTHONPATH", "")}
                cmd = [sys.executable, __file__, "--child", tree, "--case", case, "--mode", args.mode,
                       "--batch", str(args.batch), "--input-len", str(args.input_len),
                       "--output-len", str(args.output_len)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    sys.exit(f"{tree} {case} failed:\n{p.stderr[-3000:]}")
                res = json.loads(line[-1][7:])
                assert os.path.realpath(res["tree"]) == os.path.realpath(path), (res, path)
                times[(tree, case)].append(res["seconds"])
                print(f"round {r} {tree} {case:14s} {res['seconds']:7.2f}s", flush=True)
    n_out = args.batch * args.output_len
    rows = []
    print(f"\nmachine: {machine()}\nSmolLM2-135M float32, {args.mode}, batch {args.batch}, "
          f"{args.input_len} in / {args.output_len} out, greedy, median of {args.runs} interleaved rounds")
    for case in args.cases.split(","):
        b, h = median(times[("base", case)]), median(times[("head", case)])
        rows.append({"case": case, "base_tok_s": n_out / b, "head_tok_s": n_out / h, "head_vs_base": b / h})
        print(f"{case:14s} base {args.base} {n_out / b:7.1f} tok/s, head {n_out / h:7.1f} tok/s: "
              f"{b / h:.3f}x")
    out = args.out or os.path.join(HERE, "results", f"commits_{args.mode}_{args.base}.json")
    json.dump({"machine": machine(), "mode": args.mode, "base": args.base, "batch": args.batch,
               "input_len": args.input_len, "output_len": args.output_len, "runs": args.runs,
               "times": {f"{t}:{c}": v for (t, c), v in times.items()}, "rows": rows},
              open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
