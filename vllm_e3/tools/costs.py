"""What an exit costs, two ways.

`Costs`, per decode row in decoder layers (one layer = 1), timed with torch on
the real weights (`measure_costs`): the full-vocabulary head, the ramp, the
gate, a shortlist head of K rows, one layer's KV fill. The threshold search
(vllm_e3.tools.selection) prices a token with them:

    e + sum_checked (ramp + confidence) + (L - e) * kv_fill

`EngineModel`, in the serving engine's seconds (`vllm-e3 profile`): the
planner's step simulation (vllm_e3.simulate.net_cost, shared with `vllm-e3
plan`) prices each exit boundary per step and each decision per row, and
decides whether a choice pays.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from ..config import SHORTLIST, E3ConfigError, shortlist_k
from ..kernels import confidence_from_logits
from ..ramps import Ramp
from ..simulate import DEPLOY_WORKLOADS, MIN_GAIN, layer_curve, net_cost


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
    workloads: tuple = DEPLOY_WORKLOADS
    min_gain: float = MIN_GAIN

    def check_s(self, costs: "Costs", measure: str) -> float:
        """Seconds per row of one exit decision in the engine: the decision's per-row
        cost in decoder layers (timed here with torch) at the engine's layer time on
        `costs.rows` rows."""
        return costs.confidence(measure) * layer_curve(self.costs["layer"])(costs.rows) / costs.rows

    def net_costs(self, exits, fractions: dict, check_s: float) -> dict[str, float]:
        """Modelled seconds against `full`, per workload ("b16": ...)."""
        return {f"b{w['batch']}": round(net_cost(self.costs, exits, fractions, check_s=check_s, **w), 5)
                for w in self.workloads}

    def to_dict(self) -> dict:
        return {"source": self.source, "min_gain": self.min_gain,
                "workloads": list(self.workloads), "costs": self.costs}

    @classmethod
    def load(cls, path: str, num_layers: int, min_gain: float = MIN_GAIN) -> "EngineModel":
        from ..planner import load_engine_costs

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
