"""Vanilla vLLM against the E3 model's policies on the embedded default.

One run: every engine lives in this process at once and the configurations
are timed interleaved (round r runs each once), median of --runs rounds.
Output tokens/s are reported as ratios to vanilla beside the ideal ratio

    ideal = T_vanilla / (T_vanilla - decoder-layer time saved)

where the decoder-layer time of a decode token per layer comes from the
decode phase of vanilla vLLM on copies truncated to 8 and 15 layers and the
full 30 (same compile mode; a least-squares line through the three decode
times, each the median over requests of last-token minus first-token time),
and the layers saved from the exit counts the E3 worker reports. Prompt
tokens run every layer under every policy, so only decode time can shrink.

--requests N > --batch runs E3's setting: N requests queued, every engine
admits --batch at a time (vLLM's `max_num_active_seqs`), and the E3 engine has
--slots runner slots (`max_num_seqs`, default 2 x batch) so that parked
requests wait beside a full first stage (vllm_e3/scheduler.py). The layer
cost for the ideal then comes from the depth sweep on a closed batch of
--batch prompts (every stage at the full batch is what the ideal means).

    python benchmarks/bench_policies.py --mode eager       # or compile
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
sys.path.insert(0, os.path.dirname(__file__))

EXITS = [8, 15, 22]
PROFILES = {
    "none": {},
    "middle": {"8": 0.3, "15": 0.357, "22": 0.444},
    "half@8": {"8": 0.5},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["eager", "compile"], default="eager")
    ap.add_argument("--batch", type=int, default=64,
                    help="requests each engine admits at once")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per run (default: --batch, a closed batch)")
    ap.add_argument("--slots", type=int, default=None,
                    help="runner slots (max_num_seqs) of the E3 engine (default: 2 x batch "
                         "with --requests > --batch, else --batch)")
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--policies", default="full,sync,token,e3")
    ap.add_argument("--profiles", default="none,middle,half@8")
    ap.add_argument("--dtype", default="float32",
                    help="float32 by default: on CPUs without AVX-512 (this machine: AVX2 only) "
                         "bf16 GEMMs are emulated and ~5x slower than fp32")
    ap.add_argument("--target-batch", default=None,
                    help="policy e3's target batch: one integer, or one per exit "
                         "(comma list, 0 = never park there; default: --batch)")
    ap.add_argument("--max-park-steps", type=int, default=4)
    ap.add_argument("--cases", default=None,
                    help="comma list of policy/profile cases (default: every policy x profile)")
    ap.add_argument("--vanilla-again", action="store_true",
                    help="also build a second vanilla engine after all the others and time it as "
                         "case vanilla-last (in runs here the first engine built ran slower than "
                         "the same graph built later)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from common import machine, median, random_prompts, timed, truncated_copy
    from vllm_e3.prepare import bare_view, prepare

    # the weights without the shipped e3/ folder: the synthetic profiles set their own exits
    model = bare_view(prepare(deploy=False))
    eager = args.mode == "eager"
    n_req = args.requests or args.batch
    queued = n_req > args.batch
    slots = args.slots or (2 * args.batch if queued else args.batch)
    prompts = [TokensPrompt(prompt_token_ids=p)
               for p in random_prompts(n_req, args.input_len, 49152)]
    closed = prompts[:args.batch]      # the depth sweep's batch
    sp = lambda extra=None: SamplingParams(temperature=0, max_tokens=args.output_len,
                                           ignore_eos=True, extra_args=extra)
    common = dict(enforce_eager=eager, max_num_seqs=max(args.batch, 16), seed=0, dtype=args.dtype,
                  max_num_batched_tokens=max(8192, args.batch * args.input_len),
                  disable_log_stats=False)
    # the E3 engine: as many requests admitted, more slots for parked ones
    e3_common = {**common, "max_num_seqs": max(slots, 16), "max_num_active_seqs": args.batch}
    target = args.batch if not args.target_batch else (
        int(args.target_batch) if "," not in args.target_batch
        else [int(t) for t in args.target_batch.split(",")])
    tmp = tempfile.mkdtemp(prefix="e3bench-")

    engines = {"vanilla": LLM(model, **common)}
    for L in (8, 15):
        engines[f"vanilla-{L}L"] = LLM(truncated_copy(model, L, tmp), **common)
    policies = args.policies.split(",")
    if "full" in policies:
        engines["full"] = LLM(model, model_impl="e3", **common,
                              additional_config={"e3": {"policy": "full", "exits": EXITS}})
    if {"sync", "token", "e3"} & set(policies):
        # one engine serves sync, token and e3 through the test-only request overrides (vllm_e3.knobs)
        engines["exits"] = LLM(model, model_impl="e3", **e3_common, additional_config={"e3": {
            "policy": "e3", "exits": EXITS, "target_batch": target,
            "max_park_steps": args.max_park_steps, "test_overrides": True}})

    if args.vanilla_again:
        engines["vanilla-last"] = LLM(model, **common)
    cases = [("vanilla", "vanilla", None), ("vanilla-8L", "vanilla-8L", None),
             ("vanilla-15L", "vanilla-15L", None)]
    if args.vanilla_again:
        cases.append(("vanilla-last", "vanilla-last", None))
    sweep_top = "vanilla-closed" if queued else "vanilla"   # the depth sweep's 30 layers
    if queued:
        cases.append((sweep_top, "vanilla", None))
    sweep = {"vanilla-8L", "vanilla-15L", sweep_top}
    if "full" in policies:
        cases.append(("full", "full", None))
    profiles = {k: PROFILES[k] for k in args.profiles.split(",")}
    wanted = args.cases.split(",") if args.cases else [
        f"{pol}/{name}" for pol in ("sync", "token", "e3") if pol in policies for name in profiles]
    for case in wanted:
        pol, name = case.split("/")
        cases.append((case, "exits", {"_e3_test": {"policy": pol, "force_exit": PROFILES[name]}}))

    for name, eng, extra in cases:  # warm-up: first-step costs out of the timings
        engines[eng].generate(prompts[:4], sp(extra), use_tqdm=False)
    times = {c[0]: [] for c in cases}
    tpot = {c[0]: [] for c in cases}
    decode_s = {c[0]: [] for c in cases}
    saved, stage, profiled = {}, {}, {}
    for r in range(args.runs):
        for name, eng, extra in cases:
            if eng == "exits":
                engines[eng].collective_rpc("e3_reset_exit_stats")
                engines[eng].collective_rpc("e3_profile", args=(True,))
            batch = closed if queued and name in sweep else prompts
            dt, outs = timed(lambda: engines[eng].generate(batch, sp(extra), use_tqdm=False))
            assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
            times[name].append(dt)
            spans = []
            for o in outs:
                m = o.metrics
                if m is not None and m.num_generation_tokens > 1:
                    spans.append(m.last_token_ts - m.first_token_ts)
                    tpot[name].append(spans[-1] / (m.num_generation_tokens - 1))
            decode_s[name].append(median(spans))
            if eng == "exits":
                profiled.setdefault(name, []).extend(engines[eng].collective_rpc("e3_profile_steps")[0])
                engines[eng].collective_rpc("e3_profile", args=(False,))
                st = engines[eng].collective_rpc("e3_exit_stats")[0]
                saved[name] = (st["layers_full"] - st["layers_run"], st["decode_tokens"], st["exited"])
                stage[name] = {s: st["stage_rows"][s] / st["stage_runs"][s] for s in st["stage_runs"]}
                stage[name]["parked"] = st["parked"]
                stage[name]["in_flight_mean"] = st["step_reqs"] / max(st["steps"], 1)
                stage[name]["in_flight_max"] = st["step_reqs_max"]
            print(f"round {r} {name:18s} {dt:7.2f}s", flush=True)

    # untimed: the token cases once more on closed batches of B/2, B/4, B/8,
    # so that the step costs are seen at several request counts (the fit's
    # slope per request; vllm_e3.profile)
    for name, eng, extra in cases:
        if name.startswith("token/"):
            for b in sorted({max(1, args.batch // k) for k in (2, 4, 8)}, reverse=True):
                engines[eng].collective_rpc("e3_profile", args=(True,))
                engines[eng].generate(prompts[:b], SamplingParams(
                    temperature=0, max_tokens=32, ignore_eos=True, extra_args=extra), use_tqdm=False)
                profiled.setdefault(f"sweep:{name}", []).extend(
                    engines[eng].collective_rpc("e3_profile_steps")[0])
            engines[eng].collective_rpc("e3_profile", args=(False,))
    n_out = n_req * args.output_len
    med = {k: median(v) for k, v in times.items()}
    # decoder-layer seconds per decode token per layer from the vanilla depth sweep
    dec = {k: median(v) for k, v in decode_s.items()}
    xs, ys = [8, 15, 30], [dec["vanilla-8L"], dec["vanilla-15L"], dec[sweep_top]]
    mx, my = sum(xs) / 3, sum(ys) / 3
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    per_layer_token = slope / (args.batch * (args.output_len - 1))
    layer_share = slope * 30 / ys[-1]                   # of a vanilla decode step
    decode_share = dec[sweep_top] / med[sweep_top]      # decode phase of a vanilla (closed) run
    tv = med["vanilla"]
    rows = []
    for name, _, _ in cases:
        if name.startswith("vanilla"):
            continue
        ratio = tv / med[name]
        ideal = 1.0
        if name in saved:
            layers_saved, decode_tokens, _ = saved[name]
            # saved layers counted over decode tokens of one run (+ warm-up-free)
            ideal = tv / (tv - per_layer_token * layers_saved)
        tp = sorted(tpot[name])
        rows.append({"config": name, "seconds": med[name], "tok_s": n_out / med[name],
                     "ratio_vs_vanilla": ratio, "ideal_ratio": ideal,
                     "fraction_of_ideal": ratio / ideal,
                     "tpot_p50_ms": 1e3 * tp[len(tp) // 2] if tp else None,
                     "tpot_p99_ms": 1e3 * tp[min(len(tp) - 1, int(0.99 * len(tp)))] if tp else None,
                     "mean_stage_batch": stage.get(name),
                     "exited": saved.get(name, (0, 0, {}))[2]})
    tpv = sorted(tpot["vanilla"])
    result = {
        "machine": machine(), "model": f"SmolLM2-135M-Instruct {args.dtype}", "mode": args.mode,
        "target_batch": target, "max_park_steps": args.max_park_steps,
        "vanilla_tpot_p50_ms": 1e3 * tpv[len(tpv) // 2] if tpv else None,
        "batch": args.batch, "requests": n_req, "e3_slots": slots, "input_len": args.input_len, "output_len": args.output_len,
        "runs": args.runs, "exits": EXITS,
        "decoder_layer_ms_per_token_layer": per_layer_token * 1e3,
        "decoder_layer_share_of_vanilla_decode_step": layer_share,
        "decode_share_of_vanilla_run": decode_share, "decode_seconds": decode_s,
        "times": times, "rows": rows,
    }
    print(f"\nmachine: {result['machine']}")
    print(f"model SmolLM2-135M {args.dtype}, {args.mode}, batch {args.batch}, {n_req} requests, "
          f"e3 slots {slots}, {args.input_len} in / "
          f"{args.output_len} out, greedy, median of {args.runs} interleaved runs")
    print(f"decoder layers: {per_layer_token*1e3:.4f} ms per decode token-layer, "
          f"{layer_share*100:.1f}% of a vanilla decode step; decode is {decode_share*100:.1f}% "
          f"of a vanilla run (the rest: prompts, which run every layer under every policy)")
    print(f"{'config':18s} {'tok/s':>8s} {'ratio':>7s} {'ideal':>7s} {'of ideal':>8s} "
          f"{'tpot p50':>9s} {'p99 ms':>8s}  mean stage batch")
    print(f"{'vanilla':18s} {n_out/tv:8.1f} {1.0:7.3f} {'':7s} {'':8s} "
          f"{result['vanilla_tpot_p50_ms'] or 0:9.1f}")
    if "vanilla-last" in med:
        result["vanilla_last_tok_s"] = n_out / med["vanilla-last"]
        print(f"{'vanilla-last':18s} {n_out / med['vanilla-last']:8.1f} {tv / med['vanilla-last']:7.3f}"
              "   (the same engine as vanilla, built after all the others)")
    for row in rows:
        sb = row["mean_stage_batch"] or {}
        sbs = " ".join(f"{k}:{v:.1f}" for k, v in sb.items())
        print(f"{row['config']:18s} {row['tok_s']:8.1f} {row['ratio_vs_vanilla']:7.3f} "
              f"{row['ideal_ratio']:7.3f} {row['fraction_of_ideal']:8.3f} "
              f"{row['tpot_p50_ms'] or 0:9.1f} {row['tpot_p99_ms'] or 0:8.1f}  {sbs}")
    # what the planner (vllm_e3.planner) predicts for the same cases: its
    # modelled throughput of each case against full, from stage costs timed
    # here in torch ops, beside the measured ratio against vanilla
    from vllm_e3.planner import measure_costs, per_token_cost

    costs = measure_costs(model)
    full_cost = per_token_cost(costs, [], {}, args.batch, "forced", "full")
    predicted, predicted_tpot = {}, {}
    for name, eng, extra in cases:
        if eng != "exits":
            continue
        pol, prof = name.split("/")
        fractions, reach = {}, 1.0
        for e in EXITS:
            fractions[e] = reach * float(PROFILES[prof].get(str(e), 0.0))
            reach -= fractions[e]
        cost = per_token_cost(costs, EXITS, fractions, args.batch, "forced", pol,
                              target if pol == "e3" else None, slots, args.max_park_steps)
        predicted[name] = full_cost / cost
        predicted_tpot[name] = per_token_cost(costs, EXITS, fractions, args.batch, "forced", pol,
                                              target if pol == "e3" else None, slots,
                                              args.max_park_steps, tpot=True)
    for row in rows:
        row["planner_predicted_ratio"] = predicted.get(row["config"])
    measured = {row["config"]: row["ratio_vs_vanilla"] for row in rows}
    for pol_case in [c for c in predicted if c.startswith("e3/")]:
        tok_case = "token/" + pol_case.split("/")[1]
        if tok_case in predicted:
            tp50 = {row["config"]: row["tpot_p50_ms"] for row in rows}
            result.setdefault("e3_over_token", {})[pol_case.split("/")[1]] = {
                "predicted": predicted[pol_case] / predicted[tok_case],
                "measured": measured[pol_case] / measured[tok_case],
                "tpot_predicted": predicted_tpot[pol_case] / predicted_tpot[tok_case],
                "tpot_p50_measured": (tp50[pol_case] / tp50[tok_case]) if tp50[tok_case] else None}
    print("planner, predicted throughput vs full: "
          + ", ".join(f"{k} {v:.3f} (measured vs vanilla {measured[k]:.3f})" for k, v in predicted.items()))
    for prof, v in result.get("e3_over_token", {}).items():
        print(f"e3 / token on {prof}: throughput predicted {v['predicted']:.3f}, measured "
              f"{v['measured']:.3f}; TPOT predicted {v['tpot_predicted']:.2f}, p50 measured "
              f"{v['tpot_p50_measured'] or 0:.2f}")
    # the simulation (vllm_e3.simulate) priced with the engine's own costs,
    # fitted from the step timings of the token cases (vllm_e3.profile): a
    # prediction of every case, e3 included, from runs of token only
    from vllm_e3.profile import fit_costs
    from vllm_e3.simulate import simulate, smooth_layer

    fit_from = [c for c in profiled if c.startswith(("token/", "sweep:token/"))] or list(profiled)
    if fit_from:
        ecosts = fit_costs([s for c in fit_from for s in profiled[c]], 30)
        ecosts["layer"] = smooth_layer(ecosts["layer"])
        result["engine_costs"] = {**ecosts, "fitted_from": fit_from}
        result["profiled_steps"] = profiled          # to refit offline (vllm_e3.profile)
        kv = engines["exits"].collective_rpc("e3_kv_cache")[0]     # every engine: the same KV space
        work = dict(batch=args.batch, requests=n_req, prompt_len=args.input_len,
                    output_len=args.output_len, max_park=args.max_park_steps,
                    kv_blocks=kv["blocks"], block_size=kv["block_size"],
                    token_budget=common["max_num_batched_tokens"])
        result["kv_cache"] = kv
        sim = {}
        for name, eng, extra in cases + [("full", "full", None)]:
            if (eng == "exits" or name == "full") and name not in sim:
                pol, prof = name.split("/") if "/" in name else ("full", "none")
                sim[name] = simulate(ecosts, policy=pol, exits=EXITS,
                                     rates={e: float(PROFILES[prof].get(str(e), 0.0)) for e in EXITS},
                                     slots=slots if eng == "exits" else args.batch,
                                     target=target if pol == "e3" else 0, **work)
        measured_tok = {row["config"]: row["tok_s"] for row in rows}
        if "full" not in measured_tok:       # the same graph: vanilla stands in for full
            measured_tok["full"] = n_out / med.get("vanilla-last", med["vanilla"])
        result["simulated"] = {k: {**v, "measured_tok_s": measured_tok.get(k)} for k, v in sim.items()}
        print(f"engine costs from {fit_from}: layer ms at rows "
              + ", ".join(f"{m}:{1e3 * v:.2f}" for m, v in list(ecosts['layer'].items())[::4])
              + f"; exit boundary {1e3 * ecosts['exit_s']:.2f} ms, head {1e3 * ecosts['head_s']:.3f} ms/row, "
              f"fill {1e6 * ecosts['fill_s']:.1f} us/row-layer, rest of a step "
              f"{1e3 * ecosts['step_s']:.1f} ms + {1e3 * ecosts['row_s']:.2f} ms/request")
        for k, v in sim.items():
            print(f"simulated {k:14s} {v['tok_s']:7.1f} tok/s (measured {measured_tok.get(k, 0):7.1f}), "
                  f"TPOT p50 {1e3 * v['tpot_p50']:.0f} ms, in flight {v['in_flight_mean']:.1f}, "
                  f"parked {v['parked']:.0f}, preempted {v['preempted']:.0f}")
        tp50 = {row["config"]: row["tpot_p50_ms"] for row in rows}
        for prof in profiles:
            e3c, tokc = f"e3/{prof}", f"token/{prof}"
            if e3c in sim and tokc in sim:
                v = result.setdefault("e3_over_token_simulated", {})[prof] = {
                    "predicted": sim[e3c]["tok_s"] / sim[tokc]["tok_s"],
                    "measured": measured_tok[e3c] / measured_tok[tokc],
                    "tpot_predicted": sim[e3c]["tpot_p50"] / sim[tokc]["tpot_p50"],
                    "tpot_p50_measured": tp50[e3c] / tp50[tokc] if tp50[tokc] else None}
                print(f"e3 / token on {prof} (simulated): throughput predicted {v['predicted']:.3f}, "
                      f"measured {v['measured']:.3f} ({100 * (v['predicted'] / v['measured'] - 1):+.1f}%); "
                      f"TPOT predicted {v['tpot_predicted']:.2f}, p50 measured {v['tpot_p50_measured'] or 0:.2f}")
            # the plan's choice among the cases run on this profile, and what it measured
            cands = [c for c in (e3c, tokc, "full") if c in sim]
            if len(cands) > 1:
                pick = max(cands, key=lambda c: sim[c]["tok_s"])
                worst = min(measured_tok[pick] / measured_tok[c] for c in cands)
                result.setdefault("plan_check", {})[prof] = {
                    "choice": pick, "measured_vs_best_rejected": worst}
                print(f"plan on {prof}: {pick} (of {cands}); measured {worst:.3f}x the best it "
                      f"rejected (must be >= 0.98)")
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"policies_{args.mode}_b{args.batch}"
                                   + (f"_n{n_req}" if queued else "") + ".json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    json.dump(result, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
