"""`vllm-e3 tune MODEL_DIR`: a model the project did not ship, ready to serve, in one command.

    vllm-e3 tune MODEL_DIR [--out MODEL_DIR/e3] [--enforce-eager] [sizes ...]

runs the four tools a deployment needs, in order, each through the function
its own subcommand runs (so each stays usable alone, and tune's flags are
theirs, passed through; `vllm-e3 tune --help` lists them):

1. train      ramps and gates by self-distillation (vllm_e3.tools.train):
              ramps.safetensors, train_report.json
2. calibrate  confidence measure, exits and thresholds per target agreement on
              held-out prompts (vllm_e3.tools.calibrate): calibration.json,
              config.json, report.json
3. profile    the serving engine's own step costs (vllm_e3.profile), eager
              with --enforce-eager: engine_costs.json
4. plan       the exits and policy that pay on this machine, by simulating
              the engine with those costs (vllm_e3.planner): config.json

then prints a summary -- every file written, the verified frontier (per
target: measure, thresholds, layers skipped), whether exits pay here and
the modelled speed-up against `full`, and the `vllm serve` line -- and writes
it as JSON to <out>/tune_summary.json.

Why this order: calibrate chooses thresholds by quality (and the per-row cost
model); profile measures the engine with the exits and decision calibrate
deployed; plan then judges in the engine's terms. So calibrate runs without
engine costs (`--no-engine-costs`): with them its choice would depend on a
file that a later step rewrites, and a rerun would never settle. Where
calibration deploys `full` (no exit meets the target and pays per row) there
is nothing to profile or plan: both are skipped, and the summary says why.

Resumable: <out>/tune_state.json records each finished step -- a key (sha256
of its arguments, the model's hash for train, and the previous step's key and
outputs) and the sha256 of each file it wrote. A rerun skips a step whose key
matches and whose files are as the last writer left them; a step whose inputs
changed (or whose files did) runs again, and so does every step after it.
Corpora and captured states are cached under $VLLM_E3_HOME/cache besides
(vllm_e3.tools.data), so even a redone train or calibrate regenerates nothing
it already has. `--force` redoes every step.

Progress: a line per step, "[tune 2/4] calibrate ... (est. N s left)", with
the time left for the run (an estimate from the sizes, corrected by how long
steps took on this machine before: `Estimate`); within a step, progress bars
with their own time left (vLLM's generation, capture, training per exit,
scoring, free-running, profiling).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field

from ..config import CALIBRATION_FILENAME, CONFIG_FILENAME, RAMPS_FILENAME, E3ConfigError, e3_dir
from ..files import write_json
from ..prepare import _sha256 as file_sha
from .data import _log, _sha, cache_root

STATE_FILENAME = "tune_state.json"
SUMMARY_FILENAME = "tune_summary.json"
TIMES_FILENAME = "tune-times.json"

STEPS = ("train", "calibrate", "profile", "plan")
# what each step writes into the e3 folder (report.png too, when matplotlib is there; not tracked)
OUTPUTS = {"train": (RAMPS_FILENAME, "train_report.json"),
           "calibrate": (CALIBRATION_FILENAME, CONFIG_FILENAME, "report.json"),
           "profile": ("engine_costs.json",),
           "plan": (CONFIG_FILENAME,)}
# tune's arguments each step depends on; the steps before it come in through its key
INPUTS = {"train": ("exits", "rank", "text_windows", "text_tokens", "max_prompts", "mse_steps", "steps",
                    "train_batch", "lr", "seed", "max_tokens", "dtype"),
          "calibrate": ("target_agreement", "humaneval", "no_builtin_heldout", "max_heldout",
                        "free_prompts", "free_tokens", "cost_rows"),
          "profile": ("batch", "requests", "prompt_len", "output_len", "enforce_eager"),
          "plan": ("batch", "requests", "prompt_len", "output_len")}


# ---- where: the e3 folder and the model directory it belongs to ------------------------------
def deploy_dir(model_dir: str, out: str | None) -> str:
    """The model directory the steps run on and `vllm serve` names: MODEL_DIR
    itself for its own e3/ folder; for --out elsewhere (a folder named e3: the
    serving path reads MODEL_DIR/e3), its parent, made a view of MODEL_DIR
    (a symlink per file, vllm_e3.prepare.model_view)."""
    from ..config import E3_DIRNAME
    from ..prepare import model_view

    model_dir = os.path.abspath(model_dir)
    if out is None or os.path.abspath(out) == os.path.abspath(e3_dir(model_dir)):
        return model_dir
    out = os.path.abspath(out)
    parent = os.path.dirname(out)
    if os.path.basename(out) != E3_DIRNAME:
        raise E3ConfigError(f"--out {out}: name the folder {E3_DIRNAME!r} (vllm serve reads DIR/{E3_DIRNAME}; "
                            f"its parent becomes a view of {model_dir} to serve)")
    if os.path.commonpath([parent, model_dir]) == model_dir:
        raise E3ConfigError(f"--out {out} lies inside {model_dir}: use {e3_dir(model_dir)} or a folder outside")
    return model_view(model_dir, parent)


# ---- how long: the estimate the step lines print ------------------------------------------------
def _model_shape(model_dir: str) -> dict:
    cfg = json.load(open(os.path.join(model_dir, "config.json")))
    d, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    ff, V = cfg.get("intermediate_size", 4 * d), cfg["vocab_size"]
    kv = d * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    return {"L": L, "d": d, "V": V, "params": L * (2 * d * d + 2 * d * kv + 3 * d * ff) + V * d}


# Rough figures of the 2-core reference machine, fitted to `make ramps` there
# (benchmarks/RESULTS.md: SmolLM2-135M, train ~400 s, calibrate ~350 s) and to
# the tiny model of tests/test_tune.py: an engine's start, eager (compiling adds
# the second), FLOP rates of vLLM's batched decode and of one torch thread, an
# engine step, and a decoder layer's Python overhead in the reference decode loop.
# Only a prior: `Estimate` scales it by how long steps took here before.
ENGINE_START_S, COMPILE_S = 45.0, 60.0
VLLM_FLOPS, TORCH_FLOPS, STEP_S, LAYER_LOOP_S = 5e10, 5e10, 0.01, 1e-3
PROMPT_TOKENS = 60                       # a chat-templated prompt, about


def prior_seconds(step: str, args, shape: dict) -> float:
    """A step's seconds from its sizes (see the constants above)."""
    P, d, V = shape["params"], shape["d"], shape["V"]
    n_train = args.max_prompts or 120                    # the built-in train split
    n_held = args.humaneval + (0 if args.no_builtin_heldout else (args.max_heldout or 30))
    exits = len(args.exits) or 4
    gen = lambda n, t: ENGINE_START_S + n * (t + PROMPT_TOKENS) * 2 * P / VLLM_FLOPS + t * STEP_S
    capture = lambda n, t: n * (t + PROMPT_TOKENS) * 2 * P / TORCH_FLOPS
    if step == "train":                  # both corpora (`warm_corpora`), capture, training
        rows = exits * (4 * args.mse_steps * 2 * d * d + args.steps * 2 * d * V) * args.train_batch * 3
        return (gen(n_train + n_held, args.max_tokens) + capture(n_train, args.max_tokens)
                + rows / TORCH_FLOPS)
    if step == "calibrate":
        heads = n_held * args.max_tokens * exits * 2 * d * V * 2        # scores, then thresholds
        free = args.free_prompts * args.free_tokens * 3 * (2 * P / TORCH_FLOPS + shape["L"] * LAYER_LOOP_S)
        return capture(n_held, args.max_tokens) + heads / TORCH_FLOPS + free + 10.0   # + cost timings
    if step == "profile":
        requests = args.requests or 3 * args.batch
        tokens = requests * args.output_len + 32 * args.batch
        return (gen(0, 0) + (0 if args.enforce_eager else COMPILE_S) + tokens * 2 * P / VLLM_FLOPS
                + (requests / args.batch * args.output_len + 32 * 7) * STEP_S * 3)
    return 10.0                                                         # plan: the simulation


@dataclass
class Estimate:
    """Seconds left, from `prior_seconds` scaled per step by how long that step
    took against its prior on this machine before (`TIMES_FILENAME` in the
    cache), else by how the steps of this run went so far."""
    priors: dict[str, float]
    history: dict[str, list[float]]                 # step -> ratios actual / prior, latest last
    run: list[float] = field(default_factory=list)   # this run's ratios

    def ratio(self, step: str) -> float:
        past = self.history.get(step) or self.run
        return sorted(past)[len(past) // 2] if past else 1.0

    def left(self, steps) -> float:
        return sum(self.priors[s] * self.ratio(s) for s in steps)

    def record(self, step: str, seconds: float) -> None:
        r = seconds / max(self.priors[step], 1e-3)
        self.run.append(r)
        self.history[step] = (self.history.get(step, []) + [r])[-8:]


def _times_path(args) -> str:
    return os.path.join(args.cache_dir or cache_root(), TIMES_FILENAME)


def load_estimate(args, shape: dict) -> Estimate:
    path = _times_path(args)
    history = json.load(open(path)) if os.path.isfile(path) else {}
    return Estimate({s: prior_seconds(s, args, shape) for s in STEPS}, history)


# ---- the steps ------------------------------------------------------------------------------------
@dataclass
class Tuning:
    """One `vllm-e3 tune` run: its arguments, where it writes, and the state so far."""
    args: argparse.Namespace
    model_dir: str                 # what the steps run on and `vllm serve` names
    out: str                       # its e3 folder
    state: dict

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def piece(self, **over) -> argparse.Namespace:
        """A step's arguments: tune's (they share names with the piece's), with `over`."""
        return argparse.Namespace(**{**vars(self.args), "model_dir": self.model_dir, "out": self.out, **over})

    def key(self, step: str) -> str:
        """What the step's outputs depend on: its arguments, and the step before it."""
        a = self.args
        mine = {k: getattr(a, k) for k in INPUTS[step]}
        if step == "train":
            from ..ramps import model_hash

            mine.update(model=model_hash(self.model_dir),
                        prompts=file_sha(a.prompts) if a.prompts else "builtin:train")
        i = STEPS.index(step)
        before = self.state["steps"].get(STEPS[i - 1]) if i else None
        return _sha({"step": step, "args": mine,
                     "before": before and {"key": before["key"], "outputs": before["outputs"]}})


def warm_corpora(t: Tuning) -> None:
    """The corpora train and calibrate read (continuations of the training and
    of the held-out prompts) made by one vanilla vLLM engine into the cache
    they read (vllm_e3.tools.data.build_corpus): each would start its own, and
    on a small model an engine's start is most of a step's time."""
    from transformers import AutoTokenizer

    from ..ramps import model_hash
    from .data import (_vllm_generate, build_corpus, builtin_prompts, chat_token_ids, corpus_path,
                       heldout_prompts, training_prompts)

    a = t.args
    tok = AutoTokenizer.from_pretrained(t.model_dir)
    base = model_hash(t.model_dir)
    sets = [chat_token_ids(tok, training_prompts(a.prompts, a.max_prompts) or builtin_prompts("train")),
            chat_token_ids(tok, heldout_prompts(a.humaneval, not a.no_builtin_heldout, a.max_heldout))]
    todo = [ids for ids in sets
            if not os.path.isfile(corpus_path(base, ids, a.max_tokens, a.dtype, a.cache_dir))]
    if len(todo) < 2:
        return                          # one to make or none: its step makes it
    outs = iter(_vllm_generate(t.model_dir, [p for ids in todo for p in ids], a.max_tokens, a.dtype))
    for ids in todo:
        part = [next(outs) for _ in ids]
        build_corpus(t.model_dir, ids, a.max_tokens, base_hash=base, dtype=a.dtype, cache_dir=a.cache_dir,
                     generate=lambda *_, part=part: part)


def _train(t: Tuning) -> dict:
    from .train import from_args

    warm_corpora(t)
    rep = from_args(t.piece(batch=t.args.train_batch, engine_dtype=t.args.dtype))
    return {"rows_train": rep["rows_train"],
            "agreement": {e: round(r["agree_ramp"], 4) for e, r in rep["exits"].items()}}


def _calibrate(t: Tuning) -> dict:
    from ..simulate import MIN_GAIN
    from .calibrate import from_args

    rep = from_args(t.piece(engine_dtype=t.args.dtype, train_prompts=t.args.prompts,
                            max_train_prompts=t.args.max_prompts, engine_costs=None, no_engine_costs=True,
                            min_gain=MIN_GAIN))
    return {"policy": rep["config"]["policy"]}


def _nothing_deployed(t: Tuning) -> str | None:
    """Why profile and plan have nothing to do: calibration deployed no exit that fires."""
    from ..config import load_e3_config

    cfg = load_e3_config(t.model_dir)
    if cfg.policy != "full" and any(x is not None for x in cfg.thresholds):
        return None
    cal = json.load(open(t.path(CALIBRATION_FILENAME)))
    row = next((r for r in cal["table"] if r["target_agreement"] == cal["target_agreement"]), {})
    return f"calibration deploys full at {cal['target_agreement']}: {row.get('reason') or 'no exit pays'}"


def _profile(t: Tuning) -> dict:
    from ..config import load_e3_config
    from ..profile import measure

    why = _nothing_deployed(t)
    if why:
        return {"skipped": why}
    costs, _ = measure(t.piece(out=t.path(OUTPUTS["profile"][0])), load_e3_config(t.model_dir))
    return {"exit_ms": round(1e3 * costs["exit_s"], 3), "step_ms": round(1e3 * costs["step_s"], 3)}


def _plan(t: Tuning) -> dict:
    from ..config import load_e3_config
    from ..planner import choose, exit_profile, write_plan

    why = _nothing_deployed(t)
    if why:
        return {"skipped": why, "policy": "full", "exits": [], "speedup": 1.0}
    cfg = load_e3_config(t.model_dir)
    # the exits calibration deployed, with the fractions its held-out verification measured
    fractions = exit_profile(cfg, t.model_dir)
    res = choose(t.piece(exits=None, profile=None, slots=None, confidence=None, max_tpot_ratio=None,
                         engine_costs=t.path(OUTPUTS["profile"][0])), cfg, list(cfg.exits), fractions)
    write_plan(t.model_dir, cfg, res)
    alt = res.get("best_with_exits")
    return {"policy": res["policy"], "exits": res["exits"], "target_batch": res["target_batch"],
            "relative_cost": round(res["relative_cost"], 4), "speedup": round(1.0 / res["relative_cost"], 4),
            "tok_s": round(res["sim"]["tok_s"], 2), "full_tok_s": round(res["full_sim"]["tok_s"], 2),
            "fractions": {str(e): round(f, 5) for e, f in fractions.items()},
            "best_with_exits": alt and {**alt, "speedup": round(1.0 / alt["relative_cost"], 4)}}


RUN = {"train": _train, "calibrate": _calibrate, "profile": _profile, "plan": _plan}


def _last_writers(state: dict) -> dict[str, str]:
    """file -> its sha256 as the last step that wrote it left it."""
    final = {}
    for s in STEPS:
        final.update((state["steps"].get(s) or {}).get("outputs", {}))
    return final


def up_to_date(t: Tuning, step: str, key: str) -> bool:
    rec = t.state["steps"].get(step)
    if rec is None or rec["key"] != key:
        return False
    final = _last_writers(t.state)
    return all(os.path.isfile(t.path(f)) and file_sha(t.path(f)) == final[f] for f in rec["outputs"])


def run_steps(t: Tuning, est: Estimate) -> None:
    redo = t.args.force
    for i, step in enumerate(STEPS):
        key = t.key(step)
        head = f"[tune {i + 1}/{len(STEPS)}] {step}"
        if not redo and up_to_date(t, step, key):
            print(f"{head}: up to date, skipped", file=sys.stderr, flush=True)
            continue
        redo = True                     # this step's outputs change: the later steps run again
        for later in STEPS[i:]:
            t.state["steps"].pop(later, None)
        print(f"{head} ... (est. {est.left(STEPS[i:]):.0f} s left)", file=sys.stderr, flush=True)
        t0 = time.time()
        result = RUN[step](t)
        seconds = time.time() - t0
        written = [] if "skipped" in result else OUTPUTS[step]
        t.state["steps"][step] = {"key": key, "outputs": {f: file_sha(t.path(f)) for f in written},
                                  "seconds": round(seconds, 1), "result": result}
        write_json(t.path(STATE_FILENAME), t.state)
        if "skipped" in result:
            print(f"{head}: skipped: {result['skipped']}", file=sys.stderr, flush=True)
        else:
            est.record(step, seconds)
            print(f"{head}: done in {seconds:.0f} s", file=sys.stderr, flush=True)


# ---- the summary ---------------------------------------------------------------------------------
def serve_line(t: Tuning, policy: str) -> str:
    """The `vllm serve` command for what tune deployed: --dtype only where the
    checkpoint's differs from the one tuned for, the engine mode profiled, and
    the batch planned for when exits deploy."""
    cfg = json.load(open(os.path.join(t.model_dir, "config.json")))
    words = ["vllm", "serve", t.model_dir, "--model-impl", "e3"]
    if (cfg.get("dtype") or cfg.get("torch_dtype")) != t.args.dtype:
        words += ["--dtype", t.args.dtype]
    if t.args.enforce_eager:
        words.append("--enforce-eager")
    if policy != "full":
        words += ["--max-num-seqs", str(t.args.batch)]
    return shlex.join(words)


def summary(t: Tuning) -> dict:
    from ..calibration import row_summary

    cal = json.load(open(t.path(CALIBRATION_FILENAME)))
    deployed = json.load(open(t.path(CONFIG_FILENAME)))
    plan = t.state["steps"]["plan"]["result"]
    files = {f: t.path(f) for s in STEPS for f in t.state["steps"][s]["outputs"]}
    files.update({n: t.path(n) for n in ("report.png", STATE_FILENAME) if os.path.isfile(t.path(n))})
    files[SUMMARY_FILENAME] = t.path(SUMMARY_FILENAME)
    return {"model_dir": t.model_dir, "e3_dir": t.out, "files": files,
            "frontier": [row_summary(r) for r in cal["table"]],
            "target_agreement": cal["target_agreement"],
            "deployed": {"policy": deployed["policy"], "exits": deployed.get("exits", []),
                         "thresholds": deployed.get("thresholds", []),
                         "confidence": deployed.get("confidence")},
            "exits_pay": deployed["policy"] != "full", "plan": plan,
            "modelled_speedup": plan["speedup"],
            "seconds": {s: t.state["steps"][s]["seconds"] for s in STEPS},
            "serve": serve_line(t, deployed["policy"])}


def format_summary(s: dict) -> str:
    lines = ["vllm-e3 tune: wrote"] + [f"  {name:<20} {path}" for name, path in s["files"].items()]
    lines.append("verified frontier (held-out token agreement with the full model; at least, with 95% "
                 "confidence; decoder layers skipped):")
    for r in s["frontier"]:
        if r["policy"] == "full":
            lines.append(f"  target {r['target']:<6} full  ({r.get('reason') or 'no exit meets it'})")
            continue
        thr = ", ".join(f"{e}: {x:.4g}" for e, x in zip(r["exits"], r["thresholds"]))
        lines.append(f"  target {r['target']:<6} {r['measure']:<14} thresholds {{{thr}}}  "
                     f"agreement {100 * r['agreement']:.2f}% (>= {100 * (1 - r['cp_upper_95']):.2f}%)  "
                     f"layers skipped {100 * r['layers_skipped']:.1f}%")
    p, d = s["plan"], s["deployed"]
    if s["exits_pay"]:
        lines.append(f"exits pay on this machine: policy {d['policy']} at exits {d['exits']}, modelled "
                     f"{p['speedup']:.3f}x full's throughput ({p['tok_s']:.1f} against {p['full_tok_s']:.1f} "
                     f"tok/s, simulated with the measured engine costs)")
    elif "skipped" in p:
        lines.append(f"no exit deployed, policy full ({p['skipped']}); requests asking for a target "
                     f"run the full model")
    else:
        alt = p.get("best_with_exits")
        why = (f"the fastest with exits, {alt['policy']} at exits {alt['exits']}, models {alt['speedup']:.3f}x "
               f"full's throughput with the measured engine costs" if alt else "no exit fires on held-out data")
        lines.append(f"exits do not pay on this machine ({why}): policy full deployed; requests asking for "
                     f"a target run the full model")
    lines.append(f"serve it:\n  {s['serve']}")
    lines.append("  (VLLM_PLUGINS=e3,e3_http in its environment adds GET /v1/e3/requests/{id})")
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------
def tune(args) -> dict:
    """Run the steps that are not up to date; returns the summary (also written)."""
    model_dir = deploy_dir(args.model_dir, args.out)
    out = e3_dir(model_dir)
    os.makedirs(out, exist_ok=True)
    state_path = os.path.join(out, STATE_FILENAME)
    state = json.load(open(state_path)) if os.path.isfile(state_path) else {}
    if state.get("model_dir") != model_dir:
        state = {"model_dir": model_dir, "steps": {}}
    t = Tuning(args, model_dir, out, state)
    est = load_estimate(args, _model_shape(model_dir))
    t0 = time.time()
    try:
        run_steps(t, est)
    finally:
        # what this run learnt about this machine's speed, for the next run's estimates
        os.makedirs(os.path.dirname(_times_path(args)), exist_ok=True)
        write_json(_times_path(args), est.history)
    s = summary(t)
    write_json(t.path(SUMMARY_FILENAME), s)
    print(format_summary(s))
    _log(f"tune: {time.time() - t0:.0f}s")
    return s


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    try:
        tune(args)
    except E3ConfigError as exc:
        print(f"vllm-e3 tune: error: {exc}", file=sys.stderr)
        return 2
    return 0
