"""`vllm-e3 plan MODEL_DIR`: choose what pays on this machine.

Calibration decides which exits meet quality (their thresholds); the planner
decides which of those pay and how policy e3 groups tokens. It measures, with
the model's own weights and dtype, the time of one decoder layer against
decode batch size b (norm, projections, attention over a context, MLP), the
cost of an exit decision per candidate row (the full-vocabulary head for
`max_prob`/`margin`, a dot product for `gate`), and one layer's KV fill per
exited row (norm + K/V projection). With an exit profile — the fraction of
tokens leaving at each exit, from calibration or given — it models the time
per output token of a decode batch of B tokens:

    full : L t(B)/B + head
    token: sum_s L_s t(B S_s) / B + sum_e S_e dec + sum_e x_e (L - e) fill + head
    e3   : as token, but every stage after the first runs at its target
           batch b_s (per-token cost t(b_s)/b_s) instead of B S_s, and the
           first stage at B0 <= B: parked requests hold runner slots, so
           B0 = min(B, slots / (1 + parked per running request))

(S_s: fraction of tokens entering stage s, x_e: fraction exiting at e;
slots: the engine's `--max-num-seqs`, B its `--max-num-active-seqs`; the E3
scheduler admits past B while requests are parked, vllm_e3/scheduler.py). It
keeps the subset of exits that minimises e3's cost, picks each stage's target
as the smallest batch whose per-token cost is within 10% of a full batch's,
and writes policy `full` when no subset beats the full model: e3 is then never
slower than full by construction of the choice (up to the model's error,
which the benchmarks measure).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def _time(fn, reps: int) -> float:
    """Fastest of `reps` calls: the least disturbed estimate on a shared machine."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_costs(model_dir: str, dtype=None, ctx: int = 128, reps: int = 15,
                  batches=BATCHES) -> dict:
    """Seconds: layer[b] (one decoder layer, b decode tokens), decision per row
    per measure, fill per row per layer, head per row."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return _measure(model_dir, dtype or torch.float32, ctx, reps, batches)


def _measure(model_dir, dtype, ctx, reps, batches) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    cfg = model.config
    layer = model.model.layers[0]
    a = layer.self_attn
    d, hd = cfg.hidden_size, a.head_dim
    nkv = cfg.num_key_value_heads
    groups = cfg.num_attention_heads // nkv
    head_w = model.lm_head.weight

    def layer_step(x, K, V):
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(x.shape[0], nkv, groups, hd)
        a.k_proj(h); a.v_proj(h)
        s = torch.einsum("bkgd,bkcd->bkgc", q, K).softmax(-1)
        o = torch.einsum("bkgc,bkcd->bkgd", s, V).reshape(x.shape[0], -1)
        x = x + a.o_proj(o)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    out = {"layer": {}, "batches": list(batches), "dtype": str(dtype), "ctx": ctx}
    for b in batches:
        x = torch.randn(b, d, dtype=dtype)
        K = torch.randn(b, nkv, ctx, hd, dtype=dtype)
        out["layer"][b] = _time(lambda: layer_step(x, K, K), reps)
    b = 64
    x = torch.randn(b, d, dtype=dtype)
    out["head_per_row"] = _time(lambda: (x @ head_w.T).float().softmax(-1).max(-1), reps) / b
    out["decision_per_row"] = {
        "max_prob": out["head_per_row"],
        "margin": _time(lambda: (x @ head_w.T).float().topk(2, -1), reps) / b,
        "gate": _time(lambda: torch.sigmoid(x @ x[0]), reps) / b,
    }
    kv_w = torch.cat([a.k_proj.weight, a.v_proj.weight])
    out["fill_per_row_layer"] = _time(lambda: layer.input_layernorm(x) @ kv_w.T, reps) / b
    out["num_layers"] = cfg.num_hidden_layers
    return out


def _interp(layer: dict, b: float) -> float:
    """Layer time at batch b, linear between measured batches."""
    bs = sorted(int(k) for k in layer)
    b = max(1.0, b)
    for lo, hi in zip(bs, bs[1:]):
        if b <= hi:
            tl, th = layer[lo] if lo in layer else layer[str(lo)], layer[hi] if hi in layer else layer[str(hi)]
            return tl + (th - tl) * (b - lo) / (hi - lo)
    top = bs[-1]
    return (layer[top] if top in layer else layer[str(top)]) * b / top


def per_token_cost(costs: dict, exits, fractions, B: int, measure: str, policy: str,
                   target: int | None = None, slots: int | None = None) -> float:
    """Modelled seconds per output token (see the module docstring).

    Policy e3 at target b: a stage whose natural batch B0*S_s is below b runs
    at b; its tokens wait k_s = b/(B0*S_s) - 1 steps on average, and parked
    requests hold their slots, so stage 0 runs at
    B0 = min(B, slots / (1 + sum_s S_s k_s)) (fixed-point iteration; slots
    defaults to B, a full engine): regrouping pays only where the gain in
    per-token cost at later stages beats what the first stage loses."""
    slots = slots or B
    L, layer = costs["num_layers"], costs["layer"]
    dec = costs["decision_per_row"].get(measure, 0.0)
    bounds = [0, *exits, L]
    surv = [1.0]
    for e in exits:
        surv.append(max(0.0, surv[-1] - fractions.get(e, 0.0)))
    B0 = float(B)
    for _ in range(20 if policy == "e3" and target else 0):
        wait = sum(S * max(0.0, target / max(B0 * S, 1e-9) - 1.0) for S in surv[1:] if S > 0)
        B0 = min(float(B), slots / (1.0 + wait))
    total = 0.0
    for i, (s, e) in enumerate(zip(bounds[:-1], bounds[1:])):
        S = surv[i]
        if S <= 0:
            continue
        b = B0 * S
        if policy == "e3" and i > 0 and target:
            b = max(b, target)
        total += (e - s) * _interp(layer, b) / b * S
        if e < L:
            x = fractions.get(e, 0.0)
            total += S * dec + x * (L - e) * costs["fill_per_row_layer"]
    return total + costs["head_per_row"]


def plan(costs: dict, allowed_exits, fractions, B: int, measure: str,
         slots: int | None = None) -> dict:
    """The exits, policy and target with the least modelled cost per token."""
    L = costs["num_layers"]
    full = per_token_cost(costs, [], {}, B, measure, "full")
    best = {"policy": "full", "exits": [], "cost": full, "target_batch": B}
    targets = [b for b in costs["batches"] if b <= B]
    for k in range(1, len(allowed_exits) + 1):
        for subset in itertools.combinations(sorted(allowed_exits), k):
            options = [("token", None)] + [("e3", t) for t in targets]
            for policy, t in options:
                c = per_token_cost(costs, subset, fractions, B, measure, policy, t, slots)
                if c < best["cost"]:
                    best = {"policy": policy, "exits": list(subset), "cost": c,
                            "target_batch": t or B}
    best["full_cost"] = full
    best["relative_cost"] = best["cost"] / full
    best["num_layers"] = L
    if best["exits"]:
        best["token_cost_same_exits"] = per_token_cost(
            costs, best["exits"], fractions, B, measure, "token") / full
        best["e3_cost_same_exits"] = min(
            per_token_cost(costs, best["exits"], fractions, B, measure, "e3", t, slots)
            for t in targets) / full
    return best


def main(args) -> int:
    from .config import CONFIG_FILENAME, e3_dir, load_e3_config

    model_dir = args.model_dir
    cfg = load_e3_config(model_dir)
    exits = [int(e) for e in args.exits.split(",")] if args.exits else list(cfg.exits)
    if args.profile:
        fractions = {int(k): float(v) for k, v in json.loads(args.profile).items()}
    else:
        cal = os.path.join(e3_dir(model_dir), "calibration.json")
        if not os.path.isfile(cal):
            print("vllm-e3 plan: give --profile '{\"e\": fraction}' or calibrate first "
                  f"({cal} is missing)", file=sys.stderr)
            return 2
        fractions = {int(k): v for k, v in json.load(open(cal)).get("exit_fractions", {}).items()}
    if not exits:
        exits = sorted(fractions)
    import torch

    dtype = getattr(torch, args.dtype)
    print(f"[vllm-e3 plan] timing stages on this machine ({args.dtype}) ...", file=sys.stderr)
    costs = measure_costs(model_dir, dtype=dtype)
    measure = args.confidence or cfg.confidence
    result = plan(costs, exits, fractions, args.batch, measure, args.slots)
    lay = costs["layer"]
    print(f"decoder layer, ms per token by batch: " +
          ", ".join(f"{b}:{1e3 * lay[b] / b:.3f}" for b in costs["batches"]))
    dec = costs["decision_per_row"].get(measure, 0.0)
    print(f"decision per row ({measure}): {dec*1e3:.4f} ms = {dec / (lay[64] / 64):.2f} layers; "
          f"fill per row-layer {costs['fill_per_row_layer'] / (lay[64] / 64):.2f} layers")
    print(f"plan: policy {result['policy']}, exits {result['exits']}, target batch "
          f"{result['target_batch']}, modelled cost {result['relative_cost']:.3f} of full"
          + (f" (same exits: token {result['token_cost_same_exits']:.3f}, e3 {result['e3_cost_same_exits']:.3f})"
             if result["exits"] else ""))
    if result["policy"] == "e3" and (args.slots or args.batch) > args.batch:
        print(f"serve it with --max-num-seqs {args.slots} --max-num-active-seqs {args.batch}")
    if args.write:
        path = os.path.join(e3_dir(model_dir), CONFIG_FILENAME)
        raw = json.load(open(path)) if os.path.isfile(path) else {}
        keep = [i for i, e in enumerate(cfg.exits) if e in result["exits"]]
        raw.update({"policy": result["policy"], "exits": result["exits"],
                    "target_batch": result["target_batch"]})
        if result["policy"] == "full":
            raw.pop("target_batch")
        if cfg.exits and len(cfg.thresholds) == len(cfg.exits):
            raw["thresholds"] = [cfg.thresholds[i] for i in keep]
        raw.pop("force_exit", None) if not set(raw.get("force_exit", {})) <= set(map(str, result["exits"])) else None
        os.makedirs(os.path.dirname(path), exist_ok=True)
        json.dump(raw, open(path, "w"), indent=1)
        print(f"wrote {path}")
    return 0


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="measure stage costs here and choose exits and targets")
    p.add_argument("model_dir", metavar="MODEL_DIR")
    p.add_argument("--exits", default=None, help="candidate exits (default: the E3 config's)")
    p.add_argument("--profile", default=None,
                   help='exit fractions as JSON, e.g. \'{"8": 0.3, "15": 0.25}\' (default: calibration.json)')
    p.add_argument("--batch", type=int, default=64,
                   help="decode batch to plan for (the engine's --max-num-active-seqs)")
    p.add_argument("--slots", type=int, default=None,
                   help="runner slots (the engine's --max-num-seqs; default --batch): more than "
                        "--batch lets parked requests wait beside a full first stage")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--confidence", default=None, choices=["max_prob", "margin", "gate", "forced"],
                   help="decision cost to assume (default: the E3 config's measure; "
                        "forced = a synthetic profile, no decision cost)")
    p.add_argument("--write", action="store_true", help="write the plan into e3/config.json")
    p.set_defaults(func=main)
    return p
