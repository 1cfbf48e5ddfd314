"""`vllm-e3 layout`: E3's split-and-replicate across N devices, by simulation.

E3 (SOSP'24) cuts the model into blocks of layers at its exits and
replicates blocks so that each block runs at a good batch although exits thin
the tokens out. This module finds such a layout for decode from the same
measured cost curves `vllm-e3 plan` uses (`planner.measure_costs`: one
decoder layer's time against batch size, per-row decision, KV-fill and head
costs) and an exit profile (fraction of all decode tokens leaving at each
exit). Nothing here runs an engine.

A layout is: stage boundaries (a subset of the candidate exit points; stage s
is the layers [start_s, end_s)), replicas r_s per stage (one stage replica per
device, sum r_s = N), and the exits that fire (exits inside a stage act as
under policy `token`: the stage's later layers run on fewer rows).

The model (closed-loop decode, lockstep rounds):
- Load is C sequences decoding at once (default N x --batch): the same for
  every layout, so "at the same load" means the same concurrency.
- Every round each stage replica runs one step and then sends its rows to the
  next stage; the round period is T = max_s (tau_s + hop_s). A token spends one
  round in every stage it visits and, after its last one, its next token
  enters stage 0 in the next round. So with n0 tokens entering stage 0 per
  round and V_s the fraction of tokens that visit stage s, C = n0 * sum_s V_s,
  throughput = n0 / T tokens/s, and a token that finishes in stage s waits
  (s + 1) rounds. Mean TPOT = C / throughput (Little's law); **p99 TPOT =
  T * k99**, k99 the stage count that 99% of tokens finish within (per token,
  not per request: a request's mean over its tokens is lower, so this is
  conservative). A stage faster than T idles: its extra wait is at most one
  round, E3's batch-formation period at the bottleneck's rate. vLLM PP keeps
  D batches in flight the same way (`max_concurrent_batches` = PP size).
- Early return (E3's design, `early_return=True`): a token finishes in the
  stage where it exits, whose device runs the head for it: V_s = S_s, the
  fraction still running at the start of stage s. Without it (vLLM PP as E3
  runs on it today: the last rank makes logits for every row) every token
  visits all D stages, V_s = 1, and the head runs on the last stage for all.
- Regrouping: the survivors of all r_(s-1) replicas are spread evenly over the
  r_s replicas of stage s, so a replica computes n0 * S(l) / r_s rows at layer
  l (fluid: fractional batches, linear interpolation of the curve between
  measured batches as the planner does). Decode pins each request to one
  replica per stage (its KV cache lives there), so this even spread holds in
  expectation over requests, not row for row.
- tau_s = sum over layers l of the stage of layer(n0 S(l) / r_s)
  + decisions (rows reaching each firing exit e in (start_s, end_s])
  + KV fill (rows that left earlier, for each layer of the stage)
  + the LM head for the rows that finish in the stage.
  Exited rows' pre-ramp state keeps travelling to later stages: the KV fill of
  a layer runs on the device that holds it (as under vLLM PP). So exits
  save compute, never transfer.
- hop_s = hop_latency + hop_cost * n0 / r_s for every stage but the last (rows
  sent by one replica; no overlap of compute and transfer, conservative), and
  hop_latency alone on the last stage when there are several stages (sampled
  ids back to the first stage). One stage (data parallel): no hops.
- Vanilla (the latency reference): the whole model, data parallel on N devices,
  no exits: TPOT = L layer(C/N) + (C/N) head, the same for every token. A layout
  is admissible when its p99 TPOT <= latency_bound x that.
- Not modelled: memory (every layout is assumed to fit), several stages on one
  device, parking across rounds (the single-device e3 policy), prefill.

For N = 1 the search reduces to `planner.plan(..., policies=("token",))`: the
same exits and 1 / throughput equal to its per-token cost.

The search is exhaustive and deterministic: every number of stages D <= N,
every set of D-1 boundaries among the candidates, every composition of N into
D replica counts, every subset of the exits that any token takes; the highest
throughput wins, ties (relative 1e-9) to the lower p99, then to the layout
found first (fewer stages, fewer exits, earlier boundaries).
"""
from __future__ import annotations

import itertools
import json
import sys
from dataclasses import dataclass

from .planner import _interp

TIE = 1e-9


@dataclass(frozen=True)
class Layout:
    boundaries: tuple[int, ...]   # layers where a stage ends and the next starts
    replicas: tuple[int, ...]     # devices per stage, len = len(boundaries) + 1
    exits: tuple[int, ...]        # exits that fire (anywhere, boundary or not)

    def describe(self) -> str:
        return (f"stages {list(self.boundaries)} x{list(self.replicas)}, "
                f"exits {list(self.exits)}")


def normalise_costs(costs: dict) -> dict:
    """Costs as `measure_costs` returns them, with JSON's string batch keys as ints."""
    out = dict(costs)
    out["layer"] = {int(b): float(t) for b, t in costs["layer"].items()}
    out["batches"] = sorted(out["layer"])
    return out


def _survival(exits, fractions) -> callable:
    """S(l): fraction of tokens that compute layer l (left at no exit e <= l)."""
    ex = sorted(exits)

    def S(l: int) -> float:
        return max(0.0, 1.0 - sum(fractions.get(e, 0.0) for e in ex if e <= l))
    return S


def stage_time(costs: dict, start: int, end: int, rows: float, exits, fractions,
               measure: str, early_return: bool = True) -> float:
    """Seconds for one step of a replica of stage [start, end) that receives
    `rows` rows (all tokens of its share, exited ones included). Segments of
    layers between exits run on the surviving rows; the head runs for the rows
    that finish here (early_return) or, on the last stage, for every row; see
    the module docstring."""
    L = costs["num_layers"]
    S = _survival(exits, fractions)
    dec = costs["decision_per_row"].get(measure, 0.0)
    fill = costs["fill_per_row_layer"]
    cuts = sorted({start, end, *(e for e in exits if start < e < end)})
    t = 0.0
    for a, z in zip(cuts[:-1], cuts[1:]):
        b = rows * S(a)
        if b > 0:   # no step for a segment nobody reaches (as per_token_cost skips it)
            t += (z - a) * _interp(costs["layer"], b)
        t += (z - a) * rows * (1.0 - S(a)) * fill
    for e in exits:
        if start < e <= end and e < L:
            before = S(e - 1)
            if before > 0:
                t += rows * before * dec
    if end == L:
        t += rows * (S(start) if early_return else 1.0) * costs["head_per_row"]
    elif early_return:
        t += rows * (S(start) - S(end)) * costs["head_per_row"]
    return t


def evaluate(costs: dict, layout: Layout, fractions, load: float, measure: str = "forced",
             hop_cost: float = 0.0, hop_latency: float = 0.0, early_return: bool = True) -> dict:
    """Throughput (tokens/s), round period, TPOT (mean, p99) and per-stage
    figures of `layout` at `load` sequences in flight."""
    L = costs["num_layers"]
    bounds = [0, *layout.boundaries, L]
    D = len(bounds) - 1
    assert len(layout.replicas) == D and all(r >= 1 for r in layout.replicas), layout
    assert all(a < z for a, z in zip(bounds[:-1], bounds[1:])), layout
    S = _survival(layout.exits, fractions)
    enter = [S(bounds[s]) for s in range(D)]   # S_s: tokens computing the first layer of stage s
    # without early return every token's next one waits for the last stage: D rounds each
    visits = enter if early_return else [1.0] * D
    n0 = load / sum(visits)
    stages = []
    for s in range(D):
        r = layout.replicas[s]
        tau = stage_time(costs, bounds[s], bounds[s + 1], n0 / r, layout.exits, fractions, measure,
                         early_return)
        hop = (hop_latency + hop_cost * n0 / r) if s < D - 1 else (hop_latency if D > 1 else 0.0)
        stages.append({"layers": [bounds[s], bounds[s + 1]], "replicas": r, "rows": n0 / r,
                       "batch": n0 * enter[s] / r, "step_s": tau, "hop_s": hop})
    T = max(st["step_s"] + st["hop_s"] for st in stages)
    # tokens finishing in stage s: those entering it minus those entering the next
    done = [visits[s] - (visits[s + 1] if s + 1 < D else 0.0) for s in range(D)]
    k99, acc = D, 0.0
    for s, p in enumerate(done):
        acc += p
        if acc >= 0.99 - 1e-12:
            k99 = s + 1
            break
    thr = n0 / T
    return {"layout": layout, "throughput": thr, "period_s": T, "tpot_mean_s": load / thr,
            "tpot_p99_s": k99 * T, "stages": stages, "load": load}


def vanilla_tpot(costs: dict, devices: int, load: float) -> float:
    """TPOT of the whole model, data parallel, no exits, at `load` sequences."""
    return stage_time(costs, 0, costs["num_layers"], load / devices, (), {}, "forced")


def uniform_boundaries(num_layers: int, stages: int) -> tuple[int, ...]:
    """vLLM's default PP split (distributed/utils.py:126 get_pp_indices): equal
    parts, the remainder one layer each to the partitions before the last."""
    parts = [num_layers // stages] * stages
    for i in range(2, num_layers % stages + 2):
        parts[-i] += 1
    return tuple(itertools.accumulate(parts))[:-1]


def _compositions(n: int, k: int):
    """Ordered k-tuples of positive ints summing to n, lexicographic."""
    if k == 1:
        yield (n,)
        return
    for first in range(1, n - k + 2):
        for rest in _compositions(n - first, k - 1):
            yield (first, *rest)


def _subsets(items):
    for k in range(len(items) + 1):
        yield from itertools.combinations(items, k)


def _better(new: dict, best: dict | None) -> bool:
    if best is None:
        return True
    a, b = new["throughput"], best["throughput"]
    if a > b * (1 + TIE):
        return True
    return a >= b * (1 - TIE) and new["tpot_p99_s"] < best["tpot_p99_s"] * (1 - TIE)


def search(costs: dict, candidates, fractions, devices: int, load: float, measure: str = "forced",
           hop_cost: float = 0.0, hop_latency: float = 0.0, latency_bound: float | None = 2.0,
           boundaries=None, replicas=None, exits=None, equal_replicas: bool = False,
           early_return: bool = True) -> dict | None:
    """Best admissible layout (None if none is). `boundaries` / `replicas` /
    `exits` fix that part of the layout (a tuple) instead of searching it;
    `equal_replicas` keeps only layouts with as many replicas in every stage
    (what vLLM's DP x PP runs: DP engines, each a whole pipeline)."""
    L = costs["num_layers"]
    limit = None if latency_bound is None else latency_bound * vanilla_tpot(costs, devices, load)
    cands = sorted({int(e) for e in candidates if 0 < int(e) < L})
    firing = sorted(e for e in cands if fractions.get(e, 0.0) > 0)   # the rest cannot pay
    bsets = [tuple(boundaries)] if boundaries is not None else \
        [c for D in range(1, min(devices, len(cands) + 1) + 1) for c in itertools.combinations(cands, D - 1)]
    esets = [tuple(exits)] if exits is not None else list(_subsets(firing))
    best = None
    for bs in bsets:
        rsets = [tuple(replicas)] if replicas is not None else _compositions(devices, len(bs) + 1)
        for rs in rsets:
            if equal_replicas and len(set(rs)) > 1:
                continue
            for ex in esets:
                got = evaluate(costs, Layout(bs, rs, ex), fractions, load, measure, hop_cost,
                               hop_latency, early_return)
                if limit is not None and got["tpot_p99_s"] > limit * (1 + TIE):
                    continue
                if _better(got, best):
                    best = got
    if best is not None:
        best["vanilla_tpot_s"] = vanilla_tpot(costs, devices, load)
        best["latency_limit_s"] = limit
    return best


def compare(costs: dict, candidates, fractions, devices: int, batch: int = 64,
            measure: str = "forced", hop_cost: float = 0.0, hop_latency: float = 0.0,
            latency_bound: float = 2.0) -> dict:
    """DP, uniform PP (each without and with exits), E3's layout, and E3's
    layout as vLLM's DP x PP can run it (equal replicas per stage, boundaries
    via VLLM_PP_LAYER_PARTITION, every row's logits on the last PP rank: no
    early return), at load devices x batch, all by `evaluate`. Baselines are
    not held to the bound (their p99 is reported); both E3 searches are.
    Uniform PP, as vLLM runs it, has no early return either."""
    load = devices * batch
    L = costs["num_layers"]
    common = dict(measure=measure, hop_cost=hop_cost, hop_latency=hop_latency)
    dp = ((), (devices,))
    pp = (uniform_boundaries(L, devices), (1,) * devices)
    out = {
        "dp": search(costs, candidates, fractions, devices, load, latency_bound=None,
                     boundaries=dp[0], replicas=dp[1], exits=(), **common),
        "dp_exits": search(costs, candidates, fractions, devices, load, latency_bound=None,
                           boundaries=dp[0], replicas=dp[1], **common),
        "pp": search(costs, candidates, fractions, devices, load, latency_bound=None,
                     boundaries=pp[0], replicas=pp[1], exits=(), early_return=False, **common),
        "pp_exits": search(costs, candidates, fractions, devices, load, latency_bound=None,
                           boundaries=pp[0], replicas=pp[1], early_return=False, **common),
        "e3": search(costs, candidates, fractions, devices, load, latency_bound=latency_bound, **common),
        "e3_dp_pp": search(costs, candidates, fractions, devices, load, latency_bound=latency_bound,
                           equal_replicas=True, early_return=False, **common),
    }
    vt = vanilla_tpot(costs, devices, load)
    for v in out.values():
        if v is not None:
            v["vs_dp"] = v["throughput"] / out["dp"]["throughput"]
            v["p99_vs_vanilla"] = v["tpot_p99_s"] / vt
    return out


# ---- costs for another model shape -----------------------------------------------------------
def layer_macs(shape: dict) -> dict:
    """Multiply-accumulates per token: one decoder layer's projections and MLP,
    the KV fill (K/V projections) and the LM head. Attention over the context
    is left out (the same share of a layer at either size to first order)."""
    d, nh = shape["hidden_size"], shape["num_attention_heads"]
    nkv = shape.get("num_key_value_heads", nh)
    hd = shape.get("head_dim") or d // nh
    kv = 2 * d * nkv * hd
    return {"layer": 2 * d * nh * hd + kv + 3 * d * shape["intermediate_size"],
            "fill": kv, "head": d * shape["vocab_size"]}


LLAMA_7B = {"num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 11008,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}
SMOLLM2_135M = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536,
                "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}


def scale_costs(costs: dict, src: dict, dst: dict) -> dict:
    """Costs of model `dst` from those measured on `src`, each scaled by its
    ratio of MACs per token: the curve's shape against batch (how per-token
    cost falls with batch) is assumed to carry over. Weight bytes scale by the
    same ratio, so this holds as well for a memory-bound step as for a
    compute-bound one; it does not hold across hardware."""
    a, b = layer_macs(src), layer_macs(dst)
    k = b["layer"] / a["layer"]
    c = normalise_costs(costs)
    out = {**c, "num_layers": dst["num_hidden_layers"],
           "layer": {bb: t * k for bb, t in c["layer"].items()},
           "fill_per_row_layer": c["fill_per_row_layer"] * b["fill"] / a["fill"],
           "head_per_row": c["head_per_row"] * b["head"] / a["head"],
           "scaled_from": {"src": src, "dst": dst, "layer_ratio": k}}
    # the full-vocabulary measures are head-sized; the gate is one dot product of the hidden
    ratio = {"max_prob": b["head"] / a["head"], "margin": b["head"] / a["head"]}
    out["decision_per_row"] = {m: v * ratio.get(m, dst["hidden_size"] / src["hidden_size"])
                               for m, v in c["decision_per_row"].items()}
    return out


def scale_profile(fractions: dict, src_layers: int, dst_layers: int) -> dict:
    """The same fractions at proportionally placed exits (rounded to a layer)."""
    return {max(1, min(dst_layers - 1, round(e * dst_layers / src_layers))): x
            for e, x in fractions.items()}


# ---- CLI -------------------------------------------------------------------------------------
NAMES = ("dp", "dp_exits", "pp", "pp_exits", "e3", "e3_dp_pp")


def _fmt(name: str, r: dict | None) -> str:
    if r is None:
        return f"{name:9s} no layout meets the latency bound"
    return (f"{name:9s} {r['layout'].describe():48s} {r['throughput']:10.0f} tok/s "
            f"{r['vs_dp']:6.3f}x DP  p99 TPOT {1e3 * r['tpot_p99_s']:8.2f} ms "
            f"({r['p99_vs_vanilla']:.2f}x vanilla)")


def main(args) -> int:
    if args.curves:
        costs = normalise_costs(json.load(open(args.curves)))
    elif args.model_dir:
        import torch

        from .planner import measure_costs

        print(f"[vllm-e3 layout] timing stages on this machine ({args.dtype}) ...", file=sys.stderr)
        costs = normalise_costs(measure_costs(args.model_dir, dtype=getattr(torch, args.dtype)))
    else:
        print("vllm-e3 layout: give MODEL_DIR (measure here) or --curves FILE.json", file=sys.stderr)
        return 2
    if args.save_curves:
        json.dump({k: v for k, v in costs.items() if k != "scaled_from"}, open(args.save_curves, "w"),
                  indent=1)
    if args.profile:
        fractions = {int(k): float(v) for k, v in json.loads(args.profile).items()}
    elif args.model_dir:
        from .config import load_e3_config
        from .planner import exit_profile

        fractions = exit_profile(load_e3_config(args.model_dir), args.model_dir)
    else:
        fractions = None
    if fractions is None:
        print("vllm-e3 layout: give --profile '{\"e\": fraction}' (or a model dir whose E3 config "
              "has a profile)", file=sys.stderr)
        return 2
    if args.rates:   # conditional rates of the tokens reaching each exit -> fractions of all
        out, reach = {}, 1.0
        for e in sorted(fractions):
            out[e] = reach * min(1.0, fractions[e])
            reach -= out[e]
        fractions = out
    if args.scale_to:
        dst = LLAMA_7B if args.scale_to == "llama-7b" else json.load(open(args.scale_to))
        src_layers = costs["num_layers"]
        costs = scale_costs(costs, SMOLLM2_135M if args.scale_from is None
                            else json.load(open(args.scale_from)), dst)
        fractions = scale_profile(fractions, src_layers, costs["num_layers"])
    candidates = [int(e) for e in args.exits.split(",")] if args.exits else sorted(fractions)
    measure = args.confidence
    res = compare(costs, candidates, fractions, args.devices, args.batch, measure,
                  args.hop_cost * 1e-6, args.hop_latency * 1e-6, args.latency_bound)
    print(f"{costs['num_layers']} layers, N = {args.devices}, load {args.devices * args.batch} "
          f"sequences, exits {fractions}, {measure}, hop {args.hop_cost} us/token + "
          f"{args.hop_latency} us, p99 TPOT <= {args.latency_bound}x vanilla "
          f"({1e3 * args.latency_bound * vanilla_tpot(costs, args.devices, args.devices * args.batch):.2f} ms)")
    for name in NAMES:
        print(_fmt(name, res[name]))
    if args.json:
        def plain(r):
            return None if r is None else {**r, "layout": r["layout"].__dict__}
        json.dump({k: plain(v) for k, v in res.items()}, sys.stdout if args.json == "-" else
                  open(args.json, "w"), indent=1, default=list)
    return 0
