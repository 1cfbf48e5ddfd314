"""Per-step timing of a running E3 engine, and the costs fitted from it.

The planner's own timings (vllm_e3.planner.measure_costs) are torch ops on
layer 0's weights: they give the shape of a layer's cost against batch size,
not what the engine pays. Measured here (2 Xeon cores, SmolLM2-135M float32,
compiled): one decoder layer costs the engine ~4.1 ms per step at 16 decode
rows where the torch ops take 1.7 ms, and a step has costs outside the layers
(scheduling, input preparation, metadata builds, the head, the sampler, the
loop's bookkeeping) that grow with the requests scheduled, parked ones
included. So the costs the simulation (vllm_e3.simulate) plans with are
measured inside the engine, in the mode it serves (compiled stages):

    llm.collective_rpc("e3_profile", args=(True,))    # start recording (clears)
    ... generate ...
    steps = llm.collective_rpc("e3_profile_steps")[0]
    costs = fit_costs(steps, num_layers)

A step's record: requests scheduled (parked ones included), rows and prompt
rows of the forward, each compiled stage call (start, end, rows, seconds),
each exit boundary (decisions, compaction, attention restriction, parking),
the KV fill (row-layers, seconds), the head (rows, seconds), the time inside
`execute_model`, and the period until the next step starts. Off unless asked
for; recording costs two `perf_counter` calls per timed piece.
"""
from __future__ import annotations

import contextlib
import gc
import time
from collections import deque


class StepProfile:
    """Records of the last `keep` steps (see the module docstring)."""

    def __init__(self, keep: int = 50_000):
        self.steps: deque[dict] = deque(maxlen=keep)
        self.cur: dict | None = None

    def begin(self) -> None:
        now = time.perf_counter()
        if self.steps and "period" not in self.steps[-1]:
            self.steps[-1]["period"] = now - self.steps[-1]["t0"]
        self.cur = {"t0": now, "reqs": 0, "rows": 0, "prompt_rows": 0, "parked": 0,
                    "stages": [], "exits": [], "fill": [0, 0.0], "head": [0, 0.0],
                    "audit": [0, 0.0]}

    def end(self) -> None:
        if self.cur is not None:
            self.cur["exec"] = time.perf_counter() - self.cur["t0"]
            if self.cur["rows"]:              # a forward through the stage loop
                self.steps.append(self.cur)
            self.cur = None

    @contextlib.contextmanager
    def timed(self, kind: str, *key):
        """Time a piece of the current step: ("stage", start, end, rows),
        ("exit",), ("fill", row_layers), ("head", rows), ("audit", rows)."""
        t0 = time.perf_counter()
        yield
        dt = time.perf_counter() - t0
        cur = self.cur
        if cur is None:
            return
        if kind == "stage":
            cur["stages"].append((*key, dt))
        elif kind == "exit":
            cur["exits"].append(dt)
        else:                                  # fill, head, audit: [count, seconds]
            cur[kind][0] += key[0]
            cur[kind][1] += dt


def timed(profile: StepProfile | None, kind: str, *key):
    """`profile.timed(...)`, or nothing when no profile records."""
    return profile.timed(kind, *key) if profile is not None else contextlib.nullcontext()


def _median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else 0.0


def _timed(st: dict) -> float:
    """Seconds of a step's record inside the timed pieces."""
    return (sum(dt for *_, dt in st["stages"]) + sum(st["exits"]) + st["fill"][1] + st["head"][1]
            + st.get("audit", (0, 0.0))[1])


def fit_costs(steps: list[dict], num_layers: int) -> dict:
    """Engine costs for vllm_e3.simulate from step records:

    layer[m]       seconds of one decoder layer on m decode rows (mean over
                   the stage calls of steps without prompt rows)
    prompt_s       seconds per prompt token per layer beyond that (prefill
                   steps: stage time less the decode rows' share)
    exit_s         seconds per exit boundary run (decisions, compaction,
                   restriction, parking)
    fill_s         seconds per row-layer of KV fill
    head_s         seconds per head row
    step_s, row_s  the rest of a decode step (its period less the timed
                   pieces) as step_s + row_s * requests scheduled: a line
                   through the median at each request count; periods with
                   idle time in them (over 3x the median) are dropped. Profile
                   at several batch sizes (`vllm-e3 profile` does) or the slope
                   is not measured
    prompt_rest_s  the rest of a prefill step beyond that, per prompt token
    """
    from .simulate import layer_curve

    acc: dict[int, list[float]] = {}
    exit_t, fill, head, rest, prefill = [], [0, 0.0], [0, 0.0], [], []
    for st in steps:
        timed_s = _timed(st)
        exit_t += st["exits"]
        fill[0] += st["fill"][0]; fill[1] += st["fill"][1]
        head[0] += st["head"][0]; head[1] += st["head"][1]
        if st["prompt_rows"]:
            prefill.append(st)
            continue
        for start, end, m, dt in st["stages"]:
            a = acc.setdefault(int(m), [0, 0.0])
            a[0] += 1
            a[1] += dt / (end - start)
        if "period" in st:
            rest.append((st["reqs"], st["period"] - timed_s))
    layer = {m: s / c for m, (c, s) in sorted(acc.items())}
    cut = 3 * _median([y for _, y in rest])
    keep = [(x, y) for x, y in rest if y <= cut]
    n = len(keep)
    # a line through the median of each request count seen at least twice,
    # each count weighted alike: a run sits at one count for most of its
    # steps, and a least-squares fit over steps would take its slope from the
    # few steps of the drain at the end
    by: dict[int, list[float]] = {}
    for x, y in keep:
        by.setdefault(x, []).append(y)
    pts = [(x, _median(ys)) for x, ys in by.items() if len(ys) >= 2]
    if len(pts) >= 2:
        mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
        row_s = max(0.0, sum((x - mx) * (y - my) for x, y in pts)
                    / sum((x - mx) ** 2 for x, _ in pts))
        step_s = my - row_s * mx
    else:
        row_s, step_s = 0.0, _median([y for _, y in keep])
    p_tl, p_rest = [0, 0.0], [0, 0.0]
    decode_layer = layer_curve(layer) if layer else None
    for st in prefill if layer else ():
        p = st["prompt_rows"]
        for start, end, m, dt in st["stages"]:
            p_tl[0] += p
            p_tl[1] += dt / (end - start) - (decode_layer(m - p) if m > p else 0.0)
        if "period" in st:
            timed_s = _timed(st)
            extra = st["period"] - timed_s - (step_s + row_s * st["reqs"])
            if extra <= cut * 10:
                p_rest[0] += p
                p_rest[1] += extra
    return {"num_layers": num_layers, "layer": layer,
            "prompt_s": p_tl[1] / p_tl[0] if p_tl[0] else 0.0,
            "prompt_rest_s": max(0.0, p_rest[1] / p_rest[0]) if p_rest[0] else 0.0,
            "exit_s": sum(exit_t) / len(exit_t) if exit_t else 0.0,
            "fill_s": fill[1] / fill[0] if fill[0] else 0.0,
            "head_s": head[1] / head[0] if head[0] else 0.0,
            "step_s": step_s, "row_s": row_s, "steps": len(steps), "fit_steps": n}


def main(args) -> int:
    """`vllm-e3 profile MODEL_DIR`: measure the engine's costs here and write
    e3/engine_costs.json, which `vllm-e3 plan` and the start-up plan then
    simulate with (vllm_e3.planner.plan_simulated). Runs an offline engine
    with the E3 config's exits under policy `token` (its own thresholds or
    force_exit profile, so the exit boundaries include the decision it
    deploys), compiled unless --enforce-eager: a workload of --requests
    requests at --batch, then closed batches of --batch/2, --batch/4, ... so
    that the layer cost is measured at the row counts later stages run at."""
    import sys

    from .config import E3ConfigError, load_e3_config

    try:
        cfg = load_e3_config(args.model_dir)
    except E3ConfigError as exc:
        print(f"vllm-e3 profile: error: {exc}", file=sys.stderr)
        return 2
    if not cfg.exits:
        print("vllm-e3 profile: the E3 config has no exits: nothing to profile (policy full "
              "runs vanilla's graph)", file=sys.stderr)
        return 2
    costs, path = measure(args, cfg)
    lay = costs["layer"]
    print("layer ms by rows: " + ", ".join(f"{m}:{1e3 * v:.2f}" for m, v in lay.items()
                                             if m & (m - 1) == 0))
    print(f"exit boundary {1e3 * costs['exit_s']:.2f} ms, head {1e3 * costs['head_s']:.3f} ms/row, "
          f"rest of a step {1e3 * costs['step_s']:.1f} ms + {1e3 * costs['row_s']:.2f} ms/request")
    print(f"wrote {path}")
    return 0


def measure(args, cfg) -> tuple[dict, str]:
    """The engine costs `main` measures for `args` (`vllm-e3 profile`'s
    arguments) under E3 config `cfg` (with exits), written to args.out
    (default MODEL_DIR/e3/engine_costs.json); returns them and the path."""
    import os

    from .config import e3_dir
    from .files import write_json
    from .planner import ENGINE_COSTS_FILENAME

    from .envs import engine_defaults

    engine_defaults(kv_cache_gib=1)
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(args.model_dir, model_impl="e3", dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_num_seqs=max(args.batch, 16), seed=0,
              max_num_batched_tokens=max(8192, args.batch * args.prompt_len),
              additional_config={"e3": {"policy": "token", "plan": False}})
    vocab = llm.model_config.get_vocab_size()
    g = torch.Generator().manual_seed(0)
    prompts = lambda n, seed: [TokensPrompt(prompt_token_ids=p) for p in torch.randint(
        100, vocab, (n, args.prompt_len), generator=g.manual_seed(seed)).tolist()]
    sp = lambda n: SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    try:
        llm.generate(prompts(4, 1), sp(8), use_tqdm=False)               # first-step costs out
        llm.collective_rpc("e3_profile", args=(True,))
        # the workload is most of the time: its bar shows the time left
        llm.generate(prompts(args.requests or 3 * args.batch, 2), sp(args.output_len), use_tqdm=True)
        b = args.batch // 2
        while b >= 1:
            llm.generate(prompts(b, 3 + b), sp(32), use_tqdm=False)
            b //= 2
        steps = llm.collective_rpc("e3_profile_steps")[0]
        num_layers = llm.model_config.get_total_num_hidden_layers()
    finally:
        # `vllm-e3 tune` goes on in this process: the engine's memory and cores are the next step's
        with contextlib.suppress(Exception):
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    costs = fit_costs(steps, num_layers)
    costs.update({"dtype": args.dtype, "compiled": not args.enforce_eager, "batch": args.batch,
                  "exits": list(cfg.exits), "confidence": cfg.confidence,
                  "workload": {"requests": args.requests or 3 * args.batch,
                               "prompt_len": args.prompt_len, "output_len": args.output_len}})
    path = args.out or os.path.join(e3_dir(args.model_dir), ENGINE_COSTS_FILENAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, costs, indent=1)
    return costs, path
