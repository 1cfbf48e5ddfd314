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

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


class HostReads(TorchDispatchMode):
    """Counts host reads while active: ops whose Python value or output shape
    depends on tensor data. The dispatch mode sees `nonzero`, `unique`,
    `masked_select` and indexing with a bool mask; the function mode beside
    it sees the conversions to Python -- `int()`, `bool()`, `float()`,
    `.item()`, `.tolist()`, `.numpy()` -- which under vLLM's inference mode
    never reach a dispatch mode. On a GPU each is a device sync."""

    _DATA_DEPENDENT = ("aten.nonzero", "aten.unique", "aten._unique", "aten.unique_consecutive",
                       "aten.unique_dim", "aten.masked_select")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []          # the host reads
        self.all_ops: dict[str, int] = {}   # every op dispatched, by name (the op-by-op table)
        self._fn = _ToList(self.ops)

    def __enter__(self):
        self._fn.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._fn.__exit__(*exc)
        return out

    @property
    def count(self) -> int:
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.all_ops[name] = self.all_ops.get(name, 0) + 1
        if name.startswith(self._DATA_DEPENDENT) or (
                name.startswith("aten.index.Tensor") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
                    if i is not None)):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _ToList(TorchFunctionMode):
    _TO_PYTHON = frozenset((torch.Tensor.__int__, torch.Tensor.__bool__, torch.Tensor.__float__,
                            torch.Tensor.__index__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy))

    def __init__(self, ops: list[str]):
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self._TO_PYTHON:
            self.ops.append(f"Tensor.{func.__name__}")
        return func(*args, **(kwargs or {}))


def count_host_reads():
    """A context counting the host reads inside it (`HostReads`)."""
    return HostReads()


class StepProfile:
    """Records of the last `keep` steps (see the module docstring).
    `count_reads`: also count the host reads of each boundary, restriction
    and plan (`HostReads`; slower, for tests and `vllm-e3 profile`)."""

    def __init__(self, keep: int = 50_000, count_reads: bool = False):
        self.steps: deque[dict] = deque(maxlen=keep)
        self.cur: dict | None = None
        self.count_reads = count_reads

    def begin(self) -> None:
        now = time.perf_counter()
        if self.steps and "period" not in self.steps[-1]:
            self.steps[-1]["period"] = now - self.steps[-1]["t0"]
        self.cur = {"t0": now, "reqs": 0, "rows": 0, "prompt_rows": 0, "parked": 0,
                    "stages": [], "exits": [], "restrict": [], "plan": 0.0, "fill": [0, 0.0],
                    "head": [0, 0.0], "audit": [0, 0.0], "reads": {"plan": 0, "exit": 0, "restrict": 0},
                    "ops": {}}

    def end(self) -> None:
        if self.cur is not None:
            self.cur["exec"] = time.perf_counter() - self.cur["t0"]
            if self.cur["rows"]:              # a forward through the stage loop
                self.steps.append(self.cur)
            self.cur = None

    @contextlib.contextmanager
    def timed(self, kind: str, *key):
        """Time a piece of the current step: ("stage", start, end, rows),
        ("exit",): a boundary's eager part, ("restrict",), ("plan",): the
        exit plan built before the forward, ("fill", row_layers), ("head",
        rows), ("audit", rows)."""
        reads = HostReads() if self.count_reads and kind in ("exit", "restrict", "plan") else None
        t0 = time.perf_counter()
        if reads is not None:
            with reads:
                yield
        else:
            yield
        dt = time.perf_counter() - t0
        cur = self.cur
        if cur is None:
            return
        if reads is not None:
            cur["reads"][kind] += reads.count
            for name, n in reads.all_ops.items():
                key = f"{kind}:{name}"
                cur["ops"][key] = cur["ops"].get(key, 0) + n
            for name in reads.ops:
                key = f"{kind}:{name}"
                cur["ops"][key] = cur["ops"].get(key, 0) + 1
        if kind == "stage":
            cur["stages"].append((*key, dt))
        elif kind == "exit":
            cur["exits"].append(dt)
        elif kind == "restrict":
            cur["restrict"].append(dt)
        elif kind == "plan":
            cur["plan"] += dt
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
    return (sum(dt for *_, dt in st["stages"]) + sum(st["exits"]) + sum(st.get("restrict", ()))
            + st.get("plan", 0.0) + st["fill"][1] + st["head"][1] + st.get("audit", (0, 0.0))[1])


def decide_tail(steps: list[dict], num_layers: int):
    """Seconds of the exit decision inside a deciding stage's graph against
    its rows m: the deciding stage's time less its layers at the per-layer
    time of the last stage (no decision) at the same rows, on decode steps;
    a line a + b * m through those differences (a constant with one row
    count, 0 with none)."""
    last: dict[int, list[float]] = {}
    decide: dict[int, list[tuple[int, float]]] = {}
    for st in steps:
        if st["prompt_rows"]:
            continue
        for start, end, m, dt in st["stages"]:
            if end == num_layers:
                last.setdefault(int(m), []).append(dt / (end - start))
            else:
                decide.setdefault(int(m), []).append((end - start, dt))
    pts = [(m, _median([dt - n * _median(last[m]) for n, dt in calls])) for m, calls in decide.items() if m in last]
    if not pts:
        return lambda m: 0.0
    if len(pts) == 1:
        return lambda m, c=max(0.0, pts[0][1]): c
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / (sum((x - mx) ** 2 for x, _ in pts) or 1.0)
    a = my - b * mx
    return lambda m: max(0.0, a + b * m)


def fit_costs(steps: list[dict], num_layers: int) -> dict:
    """Engine costs for vllm_e3.simulate from step records:

    layer[m]       seconds of one decoder layer on m decode rows (mean over
                   the stage calls of steps without prompt rows)
    prompt_s       seconds per prompt token per layer beyond that (prefill
                   steps: stage time less the decode rows' share)
    exit_s         seconds per exit boundary of a decode step (steps with
                   prompt rows left out), counted in full: the decision
                   inside a deciding stage's graph (`decide_tail`), its eager
                   part (the count read, exited rows to the output, parking),
                   the restriction of attention that follows it, and its
                   share of the exit plan built before the forward
                   (thresholds, draws)
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

    tail = decide_tail(steps, num_layers)
    acc: dict[int, list[float]] = {}
    exit_t, fill, head, rest, prefill = [0, 0.0], [0, 0.0], [0, 0.0], [], []
    for st in steps:
        timed_s = _timed(st)
        if st["exits"] and not st["prompt_rows"]:     # a decode step's boundaries (prefill
            exit_t[0] += len(st["exits"])             # chunks put thousands of rows through them)
            exit_t[1] += (sum(st["exits"]) + sum(st.get("restrict", ())) + st.get("plan", 0.0)
                          + sum(tail(m) for _, end, m, _ in st["stages"] if end < num_layers))
        fill[0] += st["fill"][0]; fill[1] += st["fill"][1]
        head[0] += st["head"][0]; head[1] += st["head"][1]
        if st["prompt_rows"]:
            prefill.append(st)
            continue
        for start, end, m, dt in st["stages"]:
            a = acc.setdefault(int(m), [0, 0.0])
            a[0] += 1
            a[1] += (dt - (tail(m) if end < num_layers else 0.0)) / (end - start)
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
            "exit_s": exit_t[1] / exit_t[0] if exit_t[0] else 0.0,
            "fill_s": fill[1] / fill[0] if fill[0] else 0.0,
            "head_s": head[1] / head[0] if head[0] else 0.0,
            "step_s": step_s, "row_s": row_s, "steps": len(steps), "fit_steps": n}


def saturation(layer: dict, within: float = 0.05) -> int | None:
    """The least power-of-two row count from which the layer's cost per row
    stays within `within` of the least measured (the batch past which a
    bigger batch buys nothing); None if it still falls at the largest."""
    pts = sorted((int(m), float(v) / int(m)) for m, v in layer.items() if int(m) & (int(m) - 1) == 0)
    if len(pts) < 2:
        return None
    floor = min(c for _, c in pts)
    for i, (m, _) in enumerate(pts):
        if all(c <= floor * (1 + within) for _, c in pts[i:]):
            return m if i < len(pts) - 1 else None
    return None


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
    print("layer µs per row: " + ", ".join(f"{m}:{1e6 * v / m:.1f}" for m, v in lay.items()
                                          if m & (m - 1) == 0))
    flat = saturation(lay)
    if flat is not None:
        print(f"the per-row cost stops falling (within 5%) from {flat} rows")
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

    curve_to = getattr(args, "curve_to", None) or args.batch
    wide = [b for b in (args.batch * 2 ** i for i in range(1, 12)) if b <= curve_to]
    # KV for the widest closed batch: its prompts and 32 tokens, float32, with room
    engine_defaults(kv_cache_gib=max(1, -(-curve_to * (args.prompt_len + 32) // 8192)))
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(args.model_dir, model_impl="e3", dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_num_seqs=max(args.batch, 16, curve_to), seed=0,
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
        for b in wide:                   # the curve beyond the workload's batch (--curve-to)
            llm.generate(prompts(b, 3 + b), sp(32), use_tqdm=False)
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
                  "curve_to": curve_to,
                  "exits": list(cfg.exits), "confidence": cfg.confidence,
                  "workload": {"requests": args.requests or 3 * args.batch,
                               "prompt_len": args.prompt_len, "output_len": args.output_len}})
    path = args.out or os.path.join(e3_dir(args.model_dir), ENGINE_COSTS_FILENAME)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, costs, indent=1)
    return costs, path
