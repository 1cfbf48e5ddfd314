"""`vllm-e3 calibrate`: exits, confidence measure and thresholds from held-out data.

Held-out data: HumanEval prompts 0..99 and the built-in prompt set's held-out
split, chat-templated, continued greedily by vanilla vLLM and captured
teacher-forced exactly as training does (vllm_e3.tools.data). The rows are
scored (vllm_e3.tools.selection), the costs timed (vllm_e3.tools.costs), the
thresholds chosen per target with a stated confidence, and the result written:
calibration.json (vllm_e3.calibration owns its schema), config.json (the row
for --target-agreement), report.json and report.png.

Whether a choice pays is decided in the serving engine's terms when its costs
are known (`vllm-e3 profile` writes e3/engine_costs.json; `EngineModel`): the
step simulation the planner uses (vllm_e3.simulate.net_cost) runs the choice's
exit fractions on the closed batches of benchmarks/ (16 and 64 requests, 64 in,
128 out) against `full`, each deciding exit boundary priced per step and each
decision per row. The per-token model leaves those step costs out and was
measured optimistic: the 0.99 row it priced at 0.989 ran at 0.96x vanilla.
A choice is deployed only if modelled at most 1 - MIN_GAIN of `full` on every
workload; else `full` is deployed, and requests that ask for a target run the
full model, which meets any target.

Free-running quality (vllm_e3.tools.reference.free_run): a transformers decode
loop that applies the chosen exits and thresholds, with KV fill of every
skipped layer from the pre-ramp state, compared with the same loop without
exits.
"""
from __future__ import annotations

import json
import os
import time

import torch

from ..calibration import row_summary, save as save_calibration
from ..config import CALIBRATION_FILENAME, CONFIG_FILENAME, RAMPS_FILENAME, E3Config, E3ConfigError, e3_dir
from ..files import write_json
from ..ramps import Ramp, check_base_model, load_ramp_tensors, model_hash, read_ramps_header, validate_ramps
from ..simulate import MIN_GAIN
from .costs import EngineModel, measure_costs
from .data import (FrozenHead, _log, build_corpus, builtin_prompts, captured_cached, chat_token_ids,
                   heldout_prompts, load_base, training_prompts)
from .reference import free_running_quality
from .selection import (SHORTLIST_KS, TARGET_GRID, calibrate_scores, confidence_quality, frontier,
                        per_exit_sweeps, score, shortlist_from, shortlist_scores)


def load_ramps(path: str, hidden_size: int, eps: float) -> tuple[dict[int, Ramp], dict[str, str]]:
    """Every exit stored in a ramps file as `Ramp` modules (fp32), plus its metadata."""
    meta, _ = read_ramps_header(path)
    try:
        exits = json.loads(meta.get("exits", "[]"))
    except json.JSONDecodeError as exc:
        raise E3ConfigError(f"{path}: metadata 'exits' is not JSON: {exc}") from exc
    specs = validate_ramps(path, exits, hidden_size)
    tensors = load_ramp_tensors(path, exits)
    ramps = {}
    for e in exits:
        ramp = Ramp(hidden_size, specs[e].rank, specs[e].has_gate, eps)
        for key, param in ramp.param_items(e):
            param.data = tensors[key].float()
        ramps[e] = ramp
    return ramps, meta


# ---- the command ------------------------------------------------------------------
def config_for(row: dict, exits) -> dict:
    """The E3Config dict of one calibration-table row."""
    best = row["chosen"]
    if best is None:
        return E3Config.from_dict({"policy": "full", "exits": list(exits), "confidence": "gate"}).to_dict()
    return E3Config.from_dict({"policy": "token", "exits": best["exits_kept"],
                               "thresholds": [t for t in best["thresholds"] if t is not None],
                               "confidence": best["measure"]}).to_dict()


def deployment_config(table: list[dict], target: float, exits) -> dict:
    """The deployment's E3Config dict: the thresholds of the row for `target`
    at its kept exits, and every other exit that a row of the same measure
    keeps present with no threshold, so that a request's
    `e3_target_agreement` (vllm_e3.knobs) can use that row's exits. An exit
    without a threshold costs a stage boundary, nothing more."""
    row = next(r for r in table if r["target_agreement"] == target)
    best = row["chosen"]
    if best is None:
        return config_for(row, exits)
    measure = best["measure"]
    used = sorted({e for r in table if r["chosen"] and r["chosen"]["measure"] == measure
                   for e in r["chosen"]["exits_kept"]})
    thr = dict(zip(exits, best["thresholds"]))
    return E3Config.from_dict({"policy": "token", "exits": used,
                               "thresholds": [thr[e] if e in best["exits_kept"] else None for e in used],
                               "confidence": measure}).to_dict()


def _e3_json(d: dict) -> dict:
    """E3Config.to_dict minus the synthetic-profile keys a deployment never sets."""
    return {k: v for k, v in d.items() if k not in ("force_exit", "seed")}


def calibrate(model_dir: str, *, target: float = 0.99, out_dir: str | None = None, n_humaneval: int = 100,
              builtin: bool = True, max_tokens: int = 64, free_prompts: int = 8, free_tokens: int = 64,
              cost_rows: int = 64, engine_dtype: str = "float32", cache_dir: str | None = None,
              progress: bool = True, command: str | None = None, engine_costs: str | None = None,
              min_gain: float = MIN_GAIN, prompt_ids: list[list[int]] | None = None,
              train_prompt_ids: list[list[int]] | None = None, generate=None,
              shortlist_ks=SHORTLIST_KS, max_heldout: int = 0, train_prompts: list[str] | None = None,
              find_engine_costs: bool = True) -> dict:
    """Calibrate the ramps in `out_dir` (default MODEL_DIR/e3) on held-out
    prompts; writes calibration.json, config.json, report.json and report.png
    there and returns the report. `command`, the command line that ran it, is
    recorded in calibration.json and the report, beside the training
    command from the ramps' metadata. `engine_costs` (default: the first of
    `out_dir` and MODEL_DIR/e3 holding engine_costs.json, as `vllm-e3
    profile` writes it; not looked for with `find_engine_costs` off) prices
    each choice in the serving engine (EngineModel); without it the per-row
    cost model alone decides. `max_heldout`: the first N prompts of the
    built-in held-out split only (0: all); `train_prompts`: the prompts the
    ramps were trained on (default the built-in train split), whose served
    tokens make the shortlist.
    `prompt_ids` / `train_prompt_ids` (chat-templated token ids of the
    held-out and the training prompts) bypass the tokenizer, and
    `generate(model_dir, prompt_ids, max_tokens)` replaces vLLM as the corpus
    generator (tests, as in `vllm_e3.tools.train.train`)."""
    from transformers import AutoTokenizer

    t_start = time.time()
    out_dir = out_dir or e3_dir(model_dir)
    path = os.path.join(out_dir, RAMPS_FILENAME)
    if not os.path.isfile(path):
        raise E3ConfigError(f"no ramps file at {path}: run `vllm-e3 train {model_dir}` first")
    model = load_base(model_dir)
    mc = model.config
    L = mc.num_hidden_layers
    ramps, meta = load_ramps(path, mc.hidden_size, mc.rms_norm_eps)
    check_base_model(path, meta, model_dir)
    base_hash = model_hash(model_dir)
    if prompt_ids is None or train_prompt_ids is None:
        tok = AutoTokenizer.from_pretrained(model_dir)
        prompt_ids = prompt_ids or chat_token_ids(tok, heldout_prompts(n_humaneval, builtin, max_heldout))
        train_prompt_ids = train_prompt_ids or chat_token_ids(
            tok, train_prompts if train_prompts is not None else builtin_prompts("train"))
    pids = prompt_ids
    corpus = build_corpus(model_dir, pids, max_tokens, base_hash=base_hash, dtype=engine_dtype,
                          cache_dir=cache_dir, generate=generate)
    c = captured_cached(model, base_hash, corpus, sorted(ramps), cache_dir=cache_dir, progress=progress)
    head = FrozenHead.of(model)
    t0 = time.time()
    s = score(c, ramps, head, progress=progress)
    # the shortlist: tokens the full model served on the training corpus (the training
    # prompts, disjoint from the held-out ones; cached where `vllm-e3 train` made it)
    served = build_corpus(model_dir, train_prompt_ids, max_tokens, base_hash=base_hash, dtype=engine_dtype,
                          cache_dir=cache_dir, generate=generate).gen_ids
    V = head.weight.shape[0]
    ks = tuple(K for K in shortlist_ks if K < V)
    order = shortlist_from(served, V, max(ks, default=1))
    short = shortlist_scores(c, ramps, head, order, ks, progress=progress)
    costs = measure_costs(model, ramps[max(ramps)], rows=cost_rows, shortlist_ks=ks)
    engine = (_engine_model(engine_costs, out_dir, model_dir, L, min_gain)
              if engine_costs is not None or find_engine_costs else None)
    t1 = time.time()
    _log(f"calibrate: {c.num_rows} held-out decode rows from {len(pids)} prompts scored at exits "
         f"{list(s.exits)}, costs timed: {t1 - t0:.0f}s")
    # every measure, the shortlist ones too, competes for each target
    cal = calibrate_scores(s, costs, L, (*TARGET_GRID, target), engine=engine,
                           extra={m: sk for sk in short.values() for m in sk.conf})
    cal["shortlist"] = order.tolist()
    quality = confidence_quality([s, *short.values()], costs)
    covered = {K: round(float(torch.isin(c.served, order[:K]).float().mean()), 4) for K in ks}
    _log(f"calibrate: thresholds for targets {sorted({*TARGET_GRID, target})}: {time.time() - t1:.0f}s")
    config = _e3_json(deployment_config(cal["table"], target, s.exits))
    cfgs = {f"target_{target}": E3Config.from_dict(config)} if config["policy"] != "full" else {}
    low = next(r for r in cal["table"] if r["target_agreement"] == min(TARGET_GRID))
    if low["chosen"] and low["target_agreement"] != target:
        cfgs[f"target_{low['target_agreement']}"] = E3Config.from_dict(_e3_json(config_for(low, s.exits)))
    free = None
    if cfgs and free_prompts:
        # alternate HumanEval and built-in held-out prompts
        he, bi = pids[:n_humaneval], pids[n_humaneval:]
        pick = [p for pair in zip(he, bi) for p in pair][:free_prompts] or pids[:free_prompts]
        eos = {mc.eos_token_id} if isinstance(mc.eos_token_id, int) else set(mc.eos_token_id or [])
        t0 = time.time()
        free = free_running_quality(model, head, ramps, cfgs, pick, free_tokens, eos, order.tolist(),
                                    progress=progress)
        _log(f"calibrate: free-running comparison on {len(pick)} prompts: {time.time() - t0:.0f}s")
    cal.update(target_agreement=target, command=command, train_command=meta.get("command"),
               model_dir=os.path.abspath(model_dir), base_model_hash=base_hash, ramps=os.path.abspath(path),
               ramps_data_hash=meta.get("data_hash"), heldout={"humaneval": n_humaneval,
               "builtin_heldout": builtin, "max_builtin_heldout": max_heldout, "prompts": len(pids),
               "max_tokens": max_tokens, "engine_dtype": engine_dtype,
               "rows": c.num_rows, "data_hash": corpus.data_hash()},
               costs_in_layers=costs.__dict__, num_layers=L,
               cost_model="cost/token = exit layer + checks*(ramp + confidence) + skipped layers*kv_fill; "
                          "full = L; the shared final LM head is not counted")
    report = {"command": command, "train_command": meta.get("command"), "target_agreement": target,
              "config": config, "costs_in_layers": costs.__dict__,
              "ramp_agreement": {str(e): float(s.agree[:, j].float().mean()) for j, e in enumerate(s.exits)},
              "per_exit": per_exit_sweeps(s, costs, L), "free_running": free,
              "confidence_quality": quality, "shortlist_coverage": covered,
              "frontier": frontier([cal]),
              "table": [row_summary(r) for r in cal["table"]], "seconds": None}
    os.makedirs(out_dir, exist_ok=True)
    save_calibration(os.path.join(out_dir, CALIBRATION_FILENAME), cal)
    write_json(os.path.join(out_dir, CONFIG_FILENAME), config)
    report["seconds"] = round(time.time() - t_start, 1)
    write_json(os.path.join(out_dir, "report.json"), report)
    _plot(report, os.path.join(out_dir, "report.png"), L)
    print(format_report(report, L))
    return report


def _engine_model(path: str | None, out_dir: str, model_dir: str, L: int, min_gain: float):
    from ..planner import ENGINE_COSTS_FILENAME

    if path is None:
        found = [p for p in (os.path.join(d, ENGINE_COSTS_FILENAME) for d in (out_dir, e3_dir(model_dir)))
                 if os.path.isfile(p)]
        if not found:
            _log("calibrate: no engine costs (run `vllm-e3 profile MODEL_DIR` on the serving machine); "
                 "exits are judged by the per-row cost model alone, which leaves out each exit "
                 "boundary's cost per step")
            return None
        path = found[0]
    engine = EngineModel.load(path, L, min_gain)
    _log(f"calibrate: engine costs from {path}: an exit pays at <= {1 - min_gain:.2f} of full")
    return engine


def format_report(rep: dict, L: int) -> str:
    c = rep["costs_in_layers"]
    lines = [f"costs (decoder layers, {c['rows']} rows, context {c['context']}, {c['threads']} threads, "
             f"layer = {c['layer_ms']:.3f} ms): head {c['head']:.2f}, ramp {c['ramp']:.3f}, "
             f"gate {c['gate']:.4f}, kv fill/layer {c['kv_fill']:.3f}",
             "exit  ramp-agree  best single-exit setting per measure at >= target agreement"]
    tgt = rep["target_agreement"]
    for e, a in rep["ramp_agreement"].items():
        parts = []
        for m, per in rep["per_exit"].items():
            ok = [r for r in per[e]["sweep"] if r["agreement"] >= tgt]
            if ok:
                r = min(ok, key=lambda r: r["expected_net_cost"])
                parts.append(f"{m}@{r['threshold']}: exit {100 * r['exit_fraction']:.1f}% "
                             f"cost {r['expected_net_cost']:.3f}")
        lines.append(f"{e:>4}  {100 * a:9.1f}%  " + ("; ".join(parts) or "-"))
    lines.append("target  policy measure  exits            agreement  CP95-bound  skipped  net cost")
    for r in rep["table"]:
        if r["policy"] == "full":
            lines.append(f"{r['target']:<7} full   ({r.get('reason') or 'no exit meets the target and pays'})")
            continue
        eng = r.get("engine_net_cost")
        lines.append(f"{r['target']:<7} token  {r['measure']:<8} {str(r['exits']):<16} "
                     f"{100 * r['agreement']:8.2f}%  {100 * r['cp_upper_95']:9.2f}%  "
                     f"{100 * r['layers_skipped']:6.2f}%  {r['net_cost']:.4f}"
                     + (f"  engine {', '.join(f'{k} {v:.4f}' for k, v in eng.items())}" if eng else ""))
    q = rep.get("confidence_quality")
    if q:
        lines.append("confidence  check (layers)  AUC per exit (ramp top-1 = full top-1)")
        for m, v in q.items():
            lines.append(f"{m:<16} {v['check_layers']:8.3f}   " + ", ".join(
                f"{e}: {x['auc']:.3f} (agree {100 * x['agreement']:.0f}%)" for e, x in v["exits"].items()))
        lines.append("frontier   measure          exits         agreement  skipped  net cost  engine b16/b64")
        for r in rep.get("frontier", []):
            if r["target"] not in (0.97, 0.99) or not r["exits"]:
                continue
            eng = r.get("engine_net_cost") or {}
            lines.append(f"{r['target']:<10} {r['measure']:<16} {str(r['exits']):<13} "
                         f"{100 * r['agreement']:8.2f}%  {100 * r['layers_skipped']:6.2f}%  "
                         f"{r['net_cost']:.4f}    " + "/".join(f"{x:.4f}" for x in eng.values()))
    fr = rep.get("free_running")
    if fr:
        for name, q in fr["configs"].items():
            lines.append(f"free-running {name}: {100 * q['tokens_before_first_divergence']:.1f}% of tokens before "
                         f"the first divergence, {q['identical_outputs']}/{fr['prompts']} identical; "
                         f"loglik/token {q['loglik_per_token_e3']:.3f} vs {q['loglik_per_token_full']:.3f} (full); "
                         f"exits {100 * q['exit_fraction']:.1f}%, layers skipped "
                         f"{100 * q['layers_skipped_fraction']:.1f}%")
    why = next((r.get("reason") for r in rep["table"] if r["target"] == tgt), None)
    verdict = (f"verdict at {tgt}: policy {rep['config']['policy']}"
               + ("" if rep["config"]["policy"] != "full" else f" -- {why or 'no exit pays at this target'}; "
                  "requests asking for a target run the full model"))
    lines.append(verdict)
    return "\n".join(lines)


def _plot(rep: dict, path: str, L: int) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib missing: report.png not written (pip install matplotlib==3.10.7)")
        return
    m = rep["config"]["confidence"] if rep["config"]["policy"] != "full" else "gate"
    per = rep["per_exit"].get(m) or next(iter(rep["per_exit"].values()))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    keys = [("agreement", "token agreement (all rows)"), ("exit_fraction", "exit fraction"),
            ("expected_layers_run", "expected decoder layers run"), ("expected_net_cost", "expected net cost / full")]
    for ax, (k, label) in zip(axes.flat, keys):
        for e, d in per.items():
            ax.plot([r["threshold"] for r in d["sweep"]], [r[k] for r in d["sweep"]], marker="o", ms=3,
                    label=f"exit {e}")
        ax.set_xlabel(f"{m} threshold")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(rep["target_agreement"], color="k", ls="--", lw=0.8)
    axes[1, 1].axhline(1.0, color="k", ls="--", lw=0.8)
    axes[1, 0].axhline(L, color="k", ls="--", lw=0.8)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"vllm-e3 calibration, each exit alone ({m}); chosen at {rep['target_agreement']}: "
                 f"policy {rep['config']['policy']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def from_args(args) -> dict:
    """`vllm-e3 calibrate`'s arguments (vllm_e3/cli.py) -> `calibrate`'s report."""
    if not 0.0 < args.target_agreement < 1.0:
        raise SystemExit(f"--target-agreement must lie in (0, 1), got {args.target_agreement}")
    return calibrate(args.model_dir, target=args.target_agreement, out_dir=args.out, n_humaneval=args.humaneval,
                     builtin=not args.no_builtin_heldout, max_heldout=args.max_heldout,
                     max_tokens=args.max_tokens, free_prompts=args.free_prompts,
                     free_tokens=args.free_tokens, cost_rows=args.cost_rows, engine_dtype=args.engine_dtype,
                     cache_dir=args.cache_dir, progress=not args.no_progress,
                     command=getattr(args, "command", None), engine_costs=args.engine_costs,
                     find_engine_costs=not args.no_engine_costs, min_gain=args.min_gain,
                     train_prompts=training_prompts(args.train_prompts, args.max_train_prompts))


def run(args) -> int:
    torch.set_num_threads(args.threads)
    from_args(args)
    return 0
