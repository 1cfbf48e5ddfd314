"""Exit selection on held-out data: scores, the threshold ladder, the test.

Per decode row r and exit e (vllm_e3.tools.data's capture of held-out prompts):

    agree[r, e]   ramp_e's top-1 == the token vanilla vLLM served
    conf[m][r, e] max_prob | margin (of the ramp's full-vocabulary softmax) | gate
                  | shortlist@K (max_prob over K head rows; its own agreement)

Selection with a stated confidence (Learn-then-Test, fixed-sequence testing;
Angelopoulos et al. 2021): the held-out rows are split by sequence into A
(select) and B (verify). On A, for each measure, a ladder of configurations is
built: for each allowed disagreement rate r (0, 0.05%, ..., 10%) the cheapest
thresholds with disagreement <= r (coordinate descent over per-exit threshold
grids along a Lagrangian path), priced per token (vllm_e3.tools.costs.Costs).
On B, for a target agreement t, the ladder is walked from the most conservative
rung while the one-sided Clopper-Pearson upper bound (vllm_e3.bounds) on the
disagreement rate stays <= 1 - t; the last rung that passes is kept. Only
measures that save anything on A are tested, at level alpha / #tested
(Bonferroni). Whether a choice pays is the engine model's call when it is
given (vllm_e3.tools.costs.EngineModel), else the per-token cost's; the one
that pays most wins. No rung beyond "no exits", or no saving: policy `full`,
said plainly, with the reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..bounds import ALPHA, cp_upper
from ..config import CONFIDENCE_MEASURES, SHORTLIST
from ..ramps import Ramp
from .costs import Costs, EngineModel
from .data import Captured, FrozenHead, _tqdm, ramp_eval


TARGET_GRID = (0.95, 0.97, 0.99, 0.995)


LADDER = (0.0, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05,
          0.075, 0.1)


# Exit fractions whose quantile thresholds form each exit's threshold grid.
_FRACS = tuple(float(f) for f in torch.logspace(math.log10(0.002), math.log10(0.95), 36))


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


def confidence_of(measure: str, hin: torch.Tensor, head: FrozenHead, ramp: Ramp,
                  shortlist: list[int] | None = None) -> torch.Tensor:
    """[m] confidence of head inputs hin [m, d] under `measure`: the gate's
    sigmoid, or max_prob / margin of the head's softmax (shortlist@K: over the
    head rows `shortlist`, its first K ids)."""
    if measure == "gate":
        return torch.sigmoid(hin @ ramp.gate_weight.T + ramp.gate_bias).squeeze(1)
    if measure.startswith(SHORTLIST):
        return torch.softmax(hin @ head.weight[torch.tensor(shortlist)].T, -1).max(-1).values
    p = torch.softmax(head.logits(hin), -1).topk(2, -1).values                      # [m, 2]
    return p[:, 0] - p[:, 1] if measure == "margin" else p[:, 0]


def score(c: Captured, ramps: dict[int, Ramp], head: FrozenHead, progress: bool = False) -> Scores:
    exits = tuple(sorted(ramps))
    agree, conf = [], {m: [] for m in CONFIDENCE_MEASURES}
    for e in _tqdm(exits, desc="score exits", unit="exit", disable=not progress):
        ev = ramp_eval(ramps[e], c.states[e], head)
        agree.append(ev["argmax"] == c.served)
        conf["max_prob"].append(ev["max_prob"])
        conf["margin"].append(ev["margin"])
        r = ramps[e]
        conf["gate"].append(torch.sigmoid(ev["head_in"] @ r.gate_weight.T + r.gate_bias).squeeze(1)
                            if r.has_gate else torch.zeros(c.num_rows))
    return Scores(exits, torch.stack(agree, 1), {m: torch.stack(v, 1) for m, v in conf.items()}, c.seq)


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
                     ks=SHORTLIST_KS, chunk: int = 1024, progress: bool = False) -> dict[int, Scores]:
    """Per K, the Scores of measure shortlist@K: agreement is the ramp's top-1 over the
    first K ids of `order` against the served token, confidence its max-prob over them."""
    exits = tuple(sorted(ramps))
    out = {}
    for K in _tqdm(ks, desc="shortlist scores", unit="K", disable=not progress):
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
    (Mann-Whitney U over average ranks); 0.5 (chance) when a class is empty."""
    n1 = int(label.sum())
    n0 = label.numel() - n1
    if n1 == 0 or n0 == 0:
        return 0.5
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


def evaluate(s: Scores, measure: str, thresholds, costs: Costs, L: int) -> Outcome:
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
    best = evaluate(s, measure, thr, costs, L)
    best_val = objective(best) if feasible(best) else math.inf
    for _ in range(sweeps):
        changed = False
        for j in range(len(thr)):
            for t in (None, *grids[j]):
                if t == thr[j]:
                    continue
                cand = list(thr)
                cand[j] = t
                o = evaluate(s, measure, cand, costs, L)
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
            singles.append((j, one, evaluate(s, measure, one, costs, L)))
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
        best, best_cost = prev, evaluate(s, measure, prev, costs, L).cost
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
        o = evaluate(s, measure, thr, costs, L)
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
                      "select": evaluate(split[m][0], m, thr, costs, L).summary(L)}
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
                o = evaluate(s, m, thr, costs, L)
                rows.append({"threshold": t, "agreement": 1 - o.errors / o.n, "exit_fraction": o.exit_frac[j],
                             "expected_layers_run": o.layers_run, "expected_net_cost": o.cost / L})
            out[m][str(e)] = {"ramp_agreement": float(s.agree[:, j].float().mean()), "sweep": rows}
    return out
