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
    e3   : as token, but a stage after the first with a target batch b_s
           runs at b_s (tokens wait up to max_park_steps) instead of B S_s,
           and the first stage at B0 <= B: parked requests hold runner
           slots, so B0 = min(B, slots / (1 + parked per running request))

(S_s: fraction of tokens entering stage s, x_e: fraction exiting at e;
slots: the engine's `--max-num-seqs`, B its `--max-num-active-seqs`; the E3
scheduler admits past B while requests are parked, vllm_e3/scheduler.py).
Every policy is priced at the same requests in flight: `full` and `token`
run the slots as one batch of B = slots (an engine that does not park has
no use for slots kept apart), `e3` runs B active with the rest parked; so
policy e3 is chosen only where regrouping beats one bigger batch, and when
the start-up plan chooses full or token the E3 scheduler admits up to the
slots (vllm_e3/scheduler.py). It
searches every subset of the exits under token and, under e3, every per-exit
target in {0 (never park), 8, 16, ..., B}, keeps the least modelled cost, and
writes policy `full` when nothing beats the full model: the plan is never
slower than full by construction of the choice (up to the model's error,
which the benchmarks measure). Exits no token takes are never kept.

Latency: by Little's law a request's time per output token is the requests
in flight times the time per token, B0 (1 + sum_s S_s k_s) * cost under e3
(parked requests are in flight too) against B * cost under token. With
`max_tpot_ratio` (E3 config, or `--max-tpot-ratio`) an e3 choice whose
modelled TPOT exceeds that multiple of token's on the same exits is not
taken.

At start-up (`"plan": true` in the E3 config) the model calls
`startup_plan`: the same measurement in the engine's dtype, for the engine's
batch and slots, the profile from `exit_profile`.

With the engine's own costs (`vllm-e3 profile` writes e3/engine_costs.json:
vllm_e3.profile) both `vllm-e3 plan` and the start-up plan simulate the
engine instead (`plan_simulated`, vllm_e3.simulate): the closed form above
prices torch ops on layer 0 and a steady state, while the engine pays ~2.5x
those layer times compiled on one core plus per-step costs that grow with
the requests scheduled, and policy e3 has no steady state: its scheduler
admits past the cap while tokens park (measured at batch 16: predicted e3 /
token 0.875 by the closed form, 1.193 measured; benchmarks/RESULTS.md has
the simulation's figures).
"""
from __future__ import annotations

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
    per measure, fill per row per layer, head per row. Reads the weights of
    layer 0 and the head straight from the checkpoint (no transformers: the
    serving path runs this at start-up when the E3 config asks)."""
    import torch

    with torch.no_grad():
        return _measure(model_dir, dtype or torch.float32, ctx, reps, batches)


def _weight_map(model_dir: str) -> dict[str, str]:
    """Tensor name -> file of a safetensors checkpoint (single file or sharded)."""
    from safetensors import safe_open

    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        return json.load(open(index))["weight_map"]
    with safe_open(os.path.join(model_dir, "model.safetensors"), framework="pt") as f:
        return {name: "model.safetensors" for name in f.keys()}


def _read_weights(model_dir: str, where: dict[str, str], names: list[str], dtype) -> dict:
    """The named tensors, each file opened once (`where`: `_weight_map`)."""
    from safetensors import safe_open

    out = {}
    for file in {where[n] for n in names}:
        with safe_open(os.path.join(model_dir, file), framework="pt") as f:
            out.update({n: f.get_tensor(n).to(dtype) for n in names if where[n] == file})
    return out


def _measure(model_dir, dtype, ctx, reps, batches) -> dict:
    import torch
    import torch.nn.functional as F

    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
    nkv = cfg.get("num_key_value_heads", nh)
    hd = cfg.get("head_dim") or d // nh
    groups, eps = nh // nkv, cfg.get("rms_norm_eps", 1e-6)
    pre = "model.layers.0."
    parts = ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj"]
    where = _weight_map(model_dir)
    head = "lm_head.weight" if "lm_head.weight" in where else "model.embed_tokens.weight"
    w = _read_weights(model_dir, where, [f"{pre}{p}.weight" for p in parts] + [head], dtype)
    n_in, wq, wk, wv, wo, n_post, wg, wu, wd = (w[f"{pre}{p}.weight"] for p in parts)
    head_w = w[head]

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight

    def layer_step(x, K, V):
        b = x.shape[0]
        h = rms(x, n_in)
        q = (h @ wq.T).view(b, nkv, groups, hd)
        h @ wk.T, h @ wv.T
        a = torch.einsum("bkgd,bkcd->bkgc", q, K).softmax(-1)
        o = torch.einsum("bkgc,bkcd->bkgd", a, V).reshape(b, -1)
        x = x + o @ wo.T
        h = rms(x, n_post)
        return x + (F.silu(h @ wg.T) * (h @ wu.T)) @ wd.T

    out = {"layer": {}, "batches": list(batches), "dtype": str(dtype), "ctx": ctx}
    for b in batches:
        x = torch.randn(b, d, dtype=dtype)
        K = torch.randn(b, nkv, ctx, hd, dtype=dtype)
        out["layer"][b] = _time(lambda: layer_step(x, K, K), reps)
    b = 64
    x = torch.randn(b, d, dtype=dtype)
    out["head_per_row"] = _time(lambda: (x @ head_w.T).float().softmax(-1).max(-1), reps) / b
    out["vocab"] = head_w.shape[0]
    out["decision_per_row"] = {
        "max_prob": out["head_per_row"],
        "margin": _time(lambda: (x @ head_w.T).float().topk(2, -1), reps) / b,
        "gate": _time(lambda: torch.sigmoid(x @ x[0]), reps) / b,
    }
    kv_w = torch.cat([wk, wv])
    out["fill_per_row_layer"] = _time(lambda: rms(x, n_in) @ kv_w.T, reps) / b
    out["num_layers"] = cfg["num_hidden_layers"]
    return out


def decision_per_row(costs: dict, measure: str) -> float:
    """Seconds of one exit decision per row: measured for max_prob, margin
    and gate; shortlist@K as the full head's max_prob scaled to K of its
    rows; forced (a synthetic profile) nothing."""
    from .config import shortlist_k

    k = shortlist_k(measure)
    if k is not None:
        return costs["decision_per_row"]["max_prob"] * min(1.0, k / costs.get("vocab", k))
    return costs["decision_per_row"].get(measure, 0.0)


def exit_profile(cfg, model_dir: str) -> dict[int, float] | None:
    """Fraction of decode tokens leaving at each exit under `cfg`: from its
    synthetic profile (rates of the tokens reaching each exit), else from the
    calibration row whose thresholds the config deploys (its held-out
    verification, or any measure's verified choice with those thresholds),
    else None."""
    from .calibration import Calibration
    from .config import CALIBRATION_FILENAME, e3_dir

    if cfg.force_exit:
        out, reach = {}, 1.0
        for e in cfg.exits:
            out[e] = reach * min(1.0, cfg.force_exit.get(e, 0.0))
            reach -= out[e]
        return out
    cal = Calibration.load(os.path.join(e3_dir(model_dir), CALIBRATION_FILENAME))
    if cal is None:
        return None
    return cal.fractions_for({e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None},
                             cfg.confidence)


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


def _targets_of(exits, target) -> list[int]:
    """Per-exit target batches (0: that stage never parks)."""
    if not target:
        return [0] * len(exits)
    if isinstance(target, int):
        return [target] * len(exits)
    return list(target)


def _e3_shape(surv, tgt, B: int, slots: int, max_park: int):
    """Policy e3's steady state: the first stage's batch B0 and the average
    steps k_s a token waits before stage s (see `per_token_cost`)."""
    def waits(B0):
        return [min(max(0.0, t / max(B0 * S, 1e-9) - 1.0), max_park) if t and S > 0 else 0.0
                for S, t in zip(surv, tgt)]

    B0 = float(B)
    for _ in range(30 if any(tgt) else 0):
        B0 = min(float(B), slots / (1.0 + sum(S * k for S, k in zip(surv, waits(B0)))))
    return B0, waits(B0)


def per_token_cost(costs: dict, exits, fractions, B: int, measure: str, policy: str,
                   target=None, slots: int | None = None, max_park: int = 4,
                   tpot: bool = False) -> float:
    """Modelled seconds per output token (see the module docstring).

    Policy e3, `target` one int for every stage after the first or one per
    exit (0: that stage never parks): a stage whose natural batch B0*S_s is
    below its target b_s runs at b_s; its tokens wait
    k_s = min(b_s/(B0*S_s) - 1, max_park) steps on average, and parked
    requests hold their slots, so stage 0 runs at
    B0 = min(B, slots / (1 + sum_s S_s k_s)) (fixed-point iteration; slots
    defaults to B, a full engine): regrouping pays only where the gain in
    per-token cost at later stages beats what the first stage loses.

    `tpot`: the modelled time per output token of one request instead: a
    step makes B0 tokens at this cost each, and a request's token takes
    1 + sum_s S_s k_s steps (its waits parked)."""
    slots = slots or B
    L, layer = costs["num_layers"], costs["layer"]
    dec = decision_per_row(costs, measure)
    bounds = [0, *exits, L]
    surv = [1.0]
    for e in exits:
        surv.append(max(0.0, surv[-1] - fractions.get(e, 0.0)))
    tgt = [0, *_targets_of(exits, target)] if policy == "e3" else [0] * (len(exits) + 1)
    B0, waits = _e3_shape(surv, tgt, B, slots, max_park)
    total = 0.0
    for i, ((s, e), k) in enumerate(zip(zip(bounds[:-1], bounds[1:]), waits)):
        S = surv[i]
        if S <= 0:
            continue
        b = B0 * S * (1.0 + k)
        total += (e - s) * _interp(layer, b) / b * S
        if e < L:
            x = fractions.get(e, 0.0)
            total += S * dec + x * (L - e) * costs["fill_per_row_layer"]
    total += costs["head_per_row"]
    if tpot:
        return total * B0 * (1.0 + sum(S * k for S, k in zip(surv, waits)))
    return total


def plan(costs: dict, allowed_exits, fractions, B: int, measure: str,
         slots: int | None = None, policies=("token", "e3"), max_park: int = 4,
         max_tpot_ratio: float | None = None) -> dict:
    """The exits, policy (`full` or one of `policies`) and per-exit target
    batches (policy e3) with the least modelled cost per token; under
    `max_tpot_ratio`, an e3 choice only if its modelled TPOT is at most that
    many times token's on the same exits."""
    L = costs["num_layers"]
    F = slots or B          # requests in flight: full and token run them as one batch (equal in-flight)
    full = per_token_cost(costs, [], {}, F, measure, "full")
    best = {"policy": "full", "exits": [], "cost": full, "target_batch": []}
    choices = [0] + [b for b in costs["batches"] if 8 <= b <= B]
    taken = sorted(e for e in allowed_exits if fractions.get(e, 0.0) > 0)  # the rest cannot pay

    def e3_options(subset):
        return [list(t) for t in itertools.product(choices, repeat=len(subset)) if any(t)]

    for k in range(1, len(taken) + 1):
        for subset in itertools.combinations(taken, k):
            options = ([("token", [0] * k)] if "token" in policies else []) + \
                      ([("e3", t) for t in e3_options(subset)] if "e3" in policies else [])
            token_tpot = per_token_cost(costs, subset, fractions, F, measure, "token", tpot=True)
            for policy, t in options:
                c = (per_token_cost(costs, subset, fractions, B, measure, policy, t, slots, max_park)
                     if policy == "e3" else per_token_cost(costs, subset, fractions, F, measure, policy))
                if (policy == "e3" and max_tpot_ratio is not None and c < best["cost"]
                        and per_token_cost(costs, subset, fractions, B, measure, policy, t, slots,
                                           max_park, tpot=True) > max_tpot_ratio * token_tpot):
                    continue
                if c < best["cost"]:
                    best = {"policy": policy, "exits": list(subset), "cost": c, "target_batch": t}
    best["full_cost"] = full
    best["relative_cost"] = best["cost"] / full
    best["num_layers"] = L
    if best["exits"]:
        ex = best["exits"]
        best["token_cost_same_exits"] = per_token_cost(costs, ex, fractions, F, measure, "token") / full
        best["e3_cost_same_exits"] = min(
            per_token_cost(costs, ex, fractions, B, measure, "e3", t, slots, max_park)
            for t in e3_options(ex)) / full
        tpot = lambda pol, t=None: per_token_cost(costs, ex, fractions, B if pol == "e3" else F, measure,
                                                  pol, t, slots, max_park, tpot=True)
        best["tpot_vs_token"] = tpot(best["policy"], best["target_batch"]) / tpot("token")
    best["in_flight"] = F
    return best


ENGINE_COSTS_FILENAME = "engine_costs.json"


def load_engine_costs(path: str) -> dict:
    """Engine costs as `vllm-e3 profile` writes them (vllm_e3.profile.fit_costs,
    plus the workload they were measured on)."""
    raw = json.load(open(path))
    raw["layer"] = {int(k): float(v) for k, v in raw["layer"].items()}
    return raw


def plan_simulated(ecosts: dict, allowed_exits, fractions, B: int, slots: int | None,
                   workload: dict, policies=("token", "e3"), max_park: int = 4,
                   max_tpot_ratio: float | None = None, park_when: str = "refill",
                   seeds: int = 3) -> dict:
    """`plan` with the engine's measured costs and the step simulation
    (vllm_e3.simulate) instead of the closed form: for `workload`
    (requests, prompt_len, output_len) on an engine admitting B requests with
    `slots` runner slots, every subset of the exits under token and under e3
    with one target batch in {8, 16, 32, ..., B}; the policy with the most
    simulated throughput, e3 only within `max_tpot_ratio` of token's TPOT p50
    on the same exits. Exit decision costs are in the measured exit
    boundaries (profile with the measure you deploy)."""
    from .simulate import rates_of, simulate

    slots = slots or B
    # equal in-flight: full and token admit as many requests as policy e3 holds (its slots)
    run = lambda policy, exits, target=0: simulate(
        ecosts, seeds=seeds, policy=policy, exits=exits, rates=rates_of(exits, fractions),
        batch=B if policy == "e3" else slots, slots=slots, target=target, max_park=max_park,
        park_when=park_when, **workload)
    full = run("full", [])
    best = {"policy": "full", "exits": [], "target_batch": [], "sim": full}
    alt = None          # the fastest option with exits, even where full beats it: what exits would give
    taken = sorted(e for e in allowed_exits if fractions.get(e, 0.0) > 0)
    targets = [b for b in (8, 16, 32, 64, 128, 256) if b <= B]
    for k in range(1, len(taken) + 1):
        for subset in itertools.combinations(taken, k):
            token = run("token", list(subset))
            options = [("token", [0] * k, token)] if "token" in policies else []
            if "e3" in policies:
                options += [("e3", [t] * k, run("e3", list(subset), t)) for t in targets]
            for policy, t, sim in options:
                if (policy == "e3" and max_tpot_ratio is not None
                        and sim["tpot_p50"] > max_tpot_ratio * token["tpot_p50"]):
                    continue
                if alt is None or sim["tok_s"] > alt["sim"]["tok_s"]:
                    alt = {"policy": policy, "exits": list(subset), "target_batch": t, "sim": sim}
                if sim["tok_s"] > best["sim"]["tok_s"]:
                    best = {"policy": policy, "exits": list(subset), "target_batch": t, "sim": sim,
                            "token_sim": token}
    best["relative_cost"] = full["tok_s"] / best["sim"]["tok_s"]
    best["full_sim"] = full
    best["in_flight"] = slots
    if alt is not None:
        best["best_with_exits"] = {k: alt[k] for k in ("policy", "exits", "target_batch")}
        best["best_with_exits"]["relative_cost"] = full["tok_s"] / alt["sim"]["tok_s"]
    if best["policy"] == "e3":
        best["tpot_vs_token"] = best["sim"]["tpot_p50"] / best["token_sim"]["tpot_p50"]
    return best


def main(args) -> int:
    from .config import load_e3_config

    model_dir = args.model_dir
    cfg = load_e3_config(model_dir)
    exits = [int(e) for e in args.exits.split(",")] if args.exits else list(cfg.exits)
    if args.profile:
        fractions = {int(k): float(v) for k, v in json.loads(args.profile).items()}
    else:
        fractions = exit_profile(cfg, model_dir)
        if fractions is None:
            print("vllm-e3 plan: give --profile '{\"e\": fraction}', a force_exit profile in the "
                  "E3 config, or calibrate first (no calibration row matches the config's "
                  "thresholds)", file=sys.stderr)
            return 2
    if not exits:
        exits = sorted(fractions)
    if getattr(args, "pp", 1) > 1:
        return _main_pp(args, cfg, exits, fractions)
    result = choose(args, cfg, exits, fractions)
    if args.write:
        print(f"wrote {write_plan(model_dir, cfg, result)}")
    return 0


def _main_pp(args, cfg, exits, fractions: dict[int, float]) -> int:
    """`vllm-e3 plan --pp N`: the exits, policy (token, sync or full) and
    partition of the layers over N pipeline ranks (vllm_e3.pipeline), priced
    with the engine's measured costs."""
    from .config import e3_dir
    from .pipeline import describe, plan_pp

    path = args.engine_costs or os.path.join(e3_dir(args.model_dir), ENGINE_COSTS_FILENAME)
    if not os.path.isfile(path):
        print(f"vllm-e3 plan: --pp prices each rank with the engine's own costs, and {path} is "
              f"missing: run `vllm-e3 profile` first, or give --engine-costs", file=sys.stderr)
        return 2
    ecosts = load_engine_costs(path)
    try:
        result = plan_pp(ecosts, exits, fractions, args.batch, args.pp)
    except ValueError as exc:
        print(f"vllm-e3 plan: error: {exc}", file=sys.stderr)
        return 2
    print(f"[vllm-e3 plan] pricing {args.pp} pipeline ranks with {path}", file=sys.stderr)
    for line in describe(result, args.model_dir):
        print(line)
    if args.write:
        print(f"wrote {write_plan(args.model_dir, cfg, {**result, 'target_batch': []})}")
    return 0


def choose(args, cfg, exits, fractions: dict[int, float]) -> dict:
    """`vllm-e3 plan`'s choice for `args` (its arguments) among `exits` with
    exit `fractions`, printed: by simulating the engine with its measured
    costs where `vllm-e3 profile` wrote them, else by the closed form on
    costs timed here. The result of `plan_simulated` or `plan`."""
    from .config import e3_dir

    model_dir = args.model_dir
    can_park = e3_can_park(args.batch, args.slots, cfg.park_when)
    policies = ("token", "e3") if can_park else ("token",)
    max_tpot = args.max_tpot_ratio if args.max_tpot_ratio is not None else cfg.max_tpot_ratio
    engine_costs = args.engine_costs or os.path.join(e3_dir(model_dir), ENGINE_COSTS_FILENAME)
    if os.path.isfile(engine_costs):
        ecosts = load_engine_costs(engine_costs)
        workload = {"requests": args.requests or 3 * args.batch, "prompt_len": args.prompt_len,
                    "output_len": args.output_len}
        print(f"[vllm-e3 plan] simulating {workload} with the engine costs in {engine_costs}",
              file=sys.stderr)
        result = plan_simulated(ecosts, exits, fractions, args.batch, args.slots, workload,
                                policies, cfg.max_park_steps, max_tpot, cfg.park_when)
        print(f"plan: policy {result['policy']}, exits {result['exits']}, target batch "
              f"{result['target_batch']}, simulated {result['sim']['tok_s']:.1f} tok/s against "
              f"full's {result['full_sim']['tok_s']:.1f} (cost {result['relative_cost']:.3f} of full)")
        alt = result.get("best_with_exits")
        if result["policy"] == "full" and alt:
            print(f"plan: the fastest with exits, {alt['policy']} at exits {alt['exits']}, models at "
                  f"{alt['relative_cost']:.3f} of full")
    else:
        import torch

        print(f"[vllm-e3 plan] timing stages on this machine ({args.dtype}) ...", file=sys.stderr)
        costs = measure_costs(model_dir, dtype=getattr(torch, args.dtype))
        measure = args.confidence or cfg.confidence
        result = plan(costs, exits, fractions, args.batch, measure, args.slots, policies,
                      cfg.max_park_steps, max_tpot)
        lay = costs["layer"]
        print("decoder layer, ms per token by batch: " +
              ", ".join(f"{b}:{1e3 * lay[b] / b:.3f}" for b in costs["batches"]))
        dec = decision_per_row(costs, measure)
        print(f"decision per row ({measure}): {dec*1e3:.4f} ms = {dec / (lay[64] / 64):.2f} layers; "
              f"fill per row-layer {costs['fill_per_row_layer'] / (lay[64] / 64):.2f} layers")
        print(f"plan: policy {result['policy']}, exits {result['exits']}, target batch "
              f"{result['target_batch']}, modelled cost {result['relative_cost']:.3f} of full"
              + (f" (same exits: token {result['token_cost_same_exits']:.3f}, e3 {result['e3_cost_same_exits']:.3f})"
                 if result["exits"] else ""))
    if result["policy"] == "e3":
        print(f"modelled TPOT {result['tpot_vs_token']:.2f}x token's"
              + (f" (bound {max_tpot:.2f}x)" if max_tpot is not None else ""))
    if result["policy"] == "e3" and (args.slots or args.batch) > args.batch:
        print(f"serve it with --max-num-seqs {args.slots} --max-num-active-seqs {args.batch}")
    return result


def write_plan(model_dir: str, cfg, result: dict) -> str:
    """The plan `result` (`choose`) put into e3/config.json over `cfg`, the E3
    config it was made from: its policy, exits and target batch, the kept
    exits' thresholds; returns the path."""
    from .config import CONFIG_FILENAME, e3_dir
    from .files import write_json

    path = os.path.join(e3_dir(model_dir), CONFIG_FILENAME)
    raw = json.load(open(path)) if os.path.isfile(path) else {}
    keep = [i for i, e in enumerate(cfg.exits) if e in result["exits"]]
    raw.update({"policy": result["policy"], "exits": result["exits"],
                "target_batch": result["target_batch"]})
    if result["policy"] != "e3":
        raw.pop("target_batch")
    if cfg.exits and len(cfg.thresholds) == len(cfg.exits):
        raw["thresholds"] = [cfg.thresholds[i] for i in keep]
    raw.pop("force_exit", None) if not set(raw.get("force_exit", {})) <= set(map(str, result["exits"])) else None
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, raw, indent=1)
    return path


def e3_can_park(batch: int, slots: int | None, park_when: str) -> bool:
    """Can policy e3 park on an engine admitting `batch` with `slots` runner
    slots? Under park_when "refill" only into spare slots."""
    return (slots or batch) > batch or park_when == "always"


def startup_profile(cfg, model_dir: str) -> tuple[dict[int, float], list[int]]:
    """What a start-up plan chooses among: the exit fractions (`exit_profile`)
    and the exits that can fire (a threshold or a forced rate); raises when
    the config gives no profile."""
    from .config import E3ConfigError

    fractions = exit_profile(cfg, model_dir)
    if fractions is None:
        raise E3ConfigError(
            "e3 config asks for a plan at start-up ('plan': true) but has no exit profile: give "
            "'force_exit', or deploy thresholds from e3/calibration.json (vllm-e3 calibrate)")
    return fractions, [e for e, t in zip(cfg.exits, cfg.thresholds) if t is not None or e in cfg.force_exit]


def planned_config(cfg, best: dict, can_fire) -> object:
    """`cfg` running the plan `best` (policy, exits, and per-exit target
    batches where the plan has them), the plan done. Exits that cannot fire
    only mark a stage boundary and stay unless the plan is `full`."""
    import dataclasses

    exits = () if best["policy"] == "full" else tuple(
        e for e in cfg.exits if e in best["exits"] or e not in can_fire)
    thr = dict(zip(cfg.exits, cfg.thresholds))
    targets = dict(zip(best["exits"], best["target_batch"])) if "target_batch" in best else None
    return dataclasses.replace(
        cfg, policy=best["policy"], exits=exits, thresholds=tuple(thr[e] for e in exits),
        force_exit={e: r for e, r in cfg.force_exit.items() if e in exits},
        target_batch=tuple(targets.get(e, 0) for e in exits) if exits and targets is not None else 0,
        plan=False)


def startup_plan(cfg, model_dir: str, vllm_config):
    """The E3 config the engine runs when its config says `plan: true`: the
    planner's choice for this engine's batch (`max_num_active_seqs`, else
    `max_num_seqs`) and slots (`max_num_seqs`), among `full` and policies no
    stronger than the configured one (token < e3: the engine was set up for
    that policy, e.g. prefix caching off under e3). Exits that only mark a
    stage boundary (no threshold: per-request targets may use them) stay
    unless the plan is `full`."""
    import dataclasses
    import logging

    import torch

    from .config import e3_dir

    log = logging.getLogger("vllm.e3")
    if cfg.policy == "full" or not cfg.exits:
        return dataclasses.replace(cfg, plan=False)
    fractions, can_fire = startup_profile(cfg, model_dir)
    sc = vllm_config.scheduler_config
    batch = getattr(sc, "max_num_active_seqs", None) or sc.max_num_seqs
    dtype = vllm_config.model_config.dtype
    t0 = time.perf_counter()
    measure = "forced" if cfg.force_exit else cfg.confidence
    can_park = e3_can_park(batch, sc.max_num_seqs, cfg.park_when)
    policies = ("token", "e3") if cfg.policy == "e3" and can_park else ("token",)
    path = os.path.join(e3_dir(model_dir), ENGINE_COSTS_FILENAME)
    ecosts = load_engine_costs(path) if os.path.isfile(path) else None
    if ecosts is not None:
        from vllm.config import CompilationMode

        compiled = vllm_config.compilation_config.mode != CompilationMode.NONE
    if ecosts is not None and ecosts.get("compiled", True) != compiled:
        log.info("vllm-e3 plan: %s was measured %s, this engine runs %s: planning with the closed "
                 "form instead", path, "compiled" if ecosts.get("compiled", True) else "eager",
                 "compiled" if compiled else "eager")
        ecosts = None
    if ecosts is not None:       # the engine's measured costs, simulated (vllm-e3 profile)
        workload = ecosts.get("workload") or {"requests": 3 * batch, "prompt_len": 64,
                                              "output_len": 128}
        best = plan_simulated(ecosts, can_fire, fractions, batch, sc.max_num_seqs, workload,
                              policies, cfg.max_park_steps, cfg.max_tpot_ratio, cfg.park_when)
        measure = f"{measure}, simulated with {ENGINE_COSTS_FILENAME}"
    else:
        costs = measure_costs(model_dir, dtype=dtype if isinstance(dtype, torch.dtype) else None)
        best = plan(costs, can_fire, fractions, batch, measure, sc.max_num_seqs, policies,
                    cfg.max_park_steps, cfg.max_tpot_ratio)
    new = planned_config(cfg, best, can_fire)
    log.info("vllm-e3 plan at start-up (%.1f s, batch %d, slots %d, %s): policy %s, exits %s, "
             "target batch %s, modelled cost %.3f of full", time.perf_counter() - t0, batch,
             sc.max_num_seqs, measure, new.policy, list(new.exits), new.target_batch,
             best["relative_cost"])
    return new
