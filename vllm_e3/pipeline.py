"""Where to cut the model between pipeline ranks when exits thin out the later layers.

vLLM's pipeline parallelism gives rank r the layers [lo_r, hi_r): by default an
even split (`even_partition`, vLLM's `get_pp_indices` rule), or the one
`VLLM_PP_LAYER_PARTITION` names. A pipeline moves at its slowest rank's pace.
With exits the work that reaches a layer falls with its depth, so the even
split leaves the first rank the most to do, and the last rank has the LM head
besides. E3 sizes each block of layers by the work that reaches it; under
vLLM's pipeline that is the partition, and this module chooses it.

The model (`rank_times`): a step of b decode rows costs rank r

    sum over its layers l of layer(b S_l)          S_l: the fraction of rows still
                                                   running at layer l
  + exit_s for every exit it decides               (lo < e <= hi: the state after
                                                   layer e-1 is its own)
  + fill_s b (1 - S_l) for each of its layers      the K/V of rows that left earlier
  + head_s b on the last rank                      (every row's logits are computed
                                                   there, vllm_e3.models.loop)
  + step_s + row_s b on the last rank             the rest of a step (sampling, the
                                                   outputs); vLLM's scheduler runs in the
                                                   engine core, beside the ranks

with the engine's own costs (`vllm-e3 profile`: e3/engine_costs.json,
vllm_e3.profile.fit_costs).

How fast the pipeline moves depends on how many batches are in flight.
vLLM's scheduler never schedules a request whose previous step is still in
flight, and schedules every other running request in each step, so the
running requests form groups that take turns: one per step in which new
requests were admitted while the others were in flight. With m groups (m <=
pp, vLLM's `max_concurrent_batches`) a cycle of m steps takes
max(sum_r t_r, m max_r t_r): one group's trip through every rank, or the
slowest rank's m steps (`period`). A closed batch that one step admits whole
(64 prompts of 64 tokens inside vLLM's default budget of 8192) is one group:
the ranks take turns, and the split does not matter. A server under load,
or a closed batch admitted over pp steps (`--max-num-batched-tokens` one
pp-th of its prompt tokens), fills the pipeline; only then does it move at
its slowest rank's pace, and only then does the partition pay. The start-up
plan assumes a full pipeline: pp groups of `--max-num-seqs` / pp rows.
benchmarks/RESULTS.md, "E3's split over vLLM's pipeline", has the ranks'
timelines for both.

`best_partition` is the exact minimax over contiguous splits (a dynamic
program over (rank, first layer), O(pp L^2)); `plan_pp` searches the exits
and policies (`token`, `sync`, or `full`, vanilla's graph) at each one's best
split and reports the speed-up against vanilla at the even split and at
vanilla's own best split. Policy `e3` is not run under pipeline parallelism
(docs/scaling.md).
"""
from __future__ import annotations

import itertools
import logging
import os

PARTITION_ENV = "VLLM_PP_LAYER_PARTITION"

logger = logging.getLogger("vllm.e3")


def even_partition(num_layers: int, pp: int) -> list[int]:
    """vLLM's default split (vllm/distributed/utils.py `get_pp_indices`): L // pp
    each, the remainder one each to the ranks before the last, last first."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    return parts


def parse_partition(text: str, num_layers: int, pp: int) -> list[int]:
    """A partition as VLLM_PP_LAYER_PARTITION spells it ("18,12"), checked."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        raise ValueError(f"{PARTITION_ENV}={text!r}: not a comma-separated list of layer counts") from None
    if len(parts) != pp or sum(parts) != num_layers or min(parts) < 1:
        raise ValueError(f"{PARTITION_ENV}={text!r}: want {pp} positive layer counts adding up to "
                         f"{num_layers}")
    return parts


def spell(parts) -> str:
    return ",".join(str(p) for p in parts)


def running_fractions(num_layers: int, exits, fractions: dict, rows: float, policy: str) -> list[float]:
    """S_l for every layer l: the expected fraction of a step's rows that run it.
    `fractions`: of all tokens, the fraction leaving at each exit. Under `sync`
    a batch stops at an exit only when every row is confident there: with the
    rate r of the tokens reaching it, with probability r^rows."""
    from .simulate import rates_of

    rates = rates_of(list(exits), fractions) if policy != "full" else {}
    S, out = 1.0, []
    for layer in range(num_layers):
        if layer in rates:                       # exit e leaves before layer e runs
            r = rates[layer]
            S *= (1.0 - r ** max(1.0, rows)) if policy == "sync" else (1.0 - r)
        out.append(S)
    return out


def rank_times(ecosts: dict, partition, exits, fractions: dict, rows: float,
               policy: str = "token") -> list[dict]:
    """Seconds per step on each rank, by part (see the module docstring)."""
    price = _pricer(ecosts, exits, fractions, rows, policy)
    out, lo = [], 0
    for r, n in enumerate(partition):
        out.append(price(lo, lo + n, r == len(partition) - 1))
        lo += n
    return out


def _pricer(ecosts: dict, exits, fractions: dict, rows: float, policy: str):
    """price(lo, hi, last): one rank's step, by part, holding layers [lo, hi)."""
    from .simulate import layer_curve

    L = ecosts["num_layers"]
    layer = layer_curve(ecosts["layer"])
    exits = [e for e in exits if 0 < e < L] if policy != "full" else []
    S = running_fractions(L, exits, fractions, rows, policy)
    first = min(exits) if exits else L

    def price(lo: int, hi: int, last: bool) -> dict:
        t = {"layers": sum(_layer_at(layer, rows * S[l]) for l in range(lo, hi)),
             "exits": ecosts["exit_s"] * sum(1 for e in exits if lo < e <= hi),
             "fill": ecosts["fill_s"] * rows * sum(1.0 - S[l] for l in range(max(lo, first), hi)),
             "head": ecosts["head_s"] * rows if last else 0.0,
             "rest": ecosts.get("step_s", 0.0) + ecosts.get("row_s", 0.0) * rows if last else 0.0}
        t["total"] = sum(t.values())
        t["layers_range"] = (lo, hi)
        return t

    return price


def _layer_at(layer, m: float) -> float:
    """A layer on m rows, m possibly fractional (an expectation): linear between
    the integers around it; nothing on no rows."""
    if m <= 0:
        return 0.0
    a = int(m)
    if a == m:
        return layer(a)
    return layer(max(a, 1)) + (layer(a + 1) - layer(max(a, 1))) * (m - a)


def period(times, in_flight: int) -> float:
    """Seconds per step at steady state for per-rank step times `times` with
    `in_flight` batches in the pipeline (see the module docstring)."""
    return max(sum(times), in_flight * max(times)) / in_flight


def bottleneck(ecosts, partition, exits, fractions, rows, policy="token", in_flight=None) -> float:
    """Seconds per step: `period` with `in_flight` batches (default one per rank)."""
    times = [t["total"] for t in rank_times(ecosts, partition, exits, fractions, rows, policy)]
    return period(times, in_flight or len(times))


def best_partition(ecosts: dict, pp: int, exits, fractions: dict, rows: float,
                   policy: str = "token") -> list[int]:
    """The split whose slowest rank is fastest (ties: the earliest in
    lexicographic order of the layer counts), by a dynamic program over
    (ranks left, first layer)."""
    L = ecosts["num_layers"]
    if not 1 <= pp <= L:
        raise ValueError(f"cannot split {L} layers over {pp} pipeline ranks")
    price = _pricer(ecosts, exits, fractions, rows, policy)
    one = {(lo, hi): price(lo, hi, False)["total"] for lo in range(L) for hi in range(lo + 1, L)}
    last = [price(lo, L, True)["total"] for lo in range(L)]     # the last rank holds [lo, L)
    # best[k][lo]: the least slowest-rank time of k ranks over [lo, L)
    INF = float("inf")
    best = [[INF] * (L + 1) for _ in range(pp + 1)]
    cut = [[0] * (L + 1) for _ in range(pp + 1)]
    for lo in range(L):
        best[1][lo] = last[lo]
    for k in range(2, pp + 1):
        for lo in range(L - k + 1):
            for hi in range(lo + 1, L - k + 2):
                v = max(one[lo, hi], best[k - 1][hi])
                if v < best[k][lo] - 1e-15:
                    best[k][lo], cut[k][lo] = v, hi
    parts, lo = [], 0
    for k in range(pp, 1, -1):
        hi = cut[k][lo]
        parts.append(hi - lo)
        lo = hi
    parts.append(L - lo)
    return parts


def plan_pp(ecosts: dict, allowed_exits, fractions: dict, batch: int, pp: int,
            policies=("token", "sync"), partition=None, in_flight: int | None = None) -> dict:
    """The policy (`full` or one of `policies`), exits and partition whose
    steps are fastest at `batch` rows a step with `in_flight` batches in the
    pipeline (default pp: the slowest rank sets the pace); `partition` fixed
    (a user's), or each option at its own best split. Reports the modelled
    speed-up against vanilla at the even split and at vanilla's best."""
    L = ecosts["num_layers"]
    rows = float(batch)
    m = in_flight or pp
    even = even_partition(L, pp)
    van_best = best_partition(ecosts, pp, [], {}, rows, "full")
    van_even_t = bottleneck(ecosts, even, [], {}, rows, "full", m)
    van_best_t = bottleneck(ecosts, van_best, [], {}, rows, "full", m)

    def option(policy, exits):
        parts = list(partition) if partition else best_partition(ecosts, pp, exits, fractions, rows, policy)
        return {"policy": policy, "exits": list(exits), "partition": parts,
                "step_s": bottleneck(ecosts, parts, exits, fractions, rows, policy, m)}

    best = option("full", [])
    taken = sorted(e for e in allowed_exits if fractions.get(e, 0.0) > 0)
    for k in range(1, len(taken) + 1):
        for subset in itertools.combinations(taken, k):
            for policy in policies:
                o = option(policy, list(subset))
                if o["step_s"] < best["step_s"]:
                    best = o
    best.update({
        "pp": pp, "batch": batch, "in_flight": m, "even_partition": even, "vanilla_best_partition": van_best,
        "vs_vanilla_even": van_even_t / best["step_s"], "vs_vanilla_best": van_best_t / best["step_s"],
        "ranks": rank_times(ecosts, best["partition"], best["exits"], fractions, rows, best["policy"]),
    })
    if best["exits"]:
        best["same_exits_even_split"] = van_even_t / bottleneck(ecosts, even, best["exits"], fractions,
                                                                rows, best["policy"], m)
    return best


def describe(result: dict, model: str = "MODEL") -> list[str]:
    """`vllm-e3 plan --pp N`'s lines for a `plan_pp` result."""
    ranks = " | ".join(f"rank {i} layers {t['layers_range'][0]}-{t['layers_range'][1] - 1}: "
                       f"{1e3 * t['total']:.2f} ms" for i, t in enumerate(result["ranks"]))
    lines = [f"plan --pp {result['pp']} ({result['batch']:g} rows a step, {result['in_flight']} in flight): "
             f"policy {result['policy']}, exits {result['exits']}, partition {spell(result['partition'])}",
             f"  modelled per step: {ranks}",
             f"  modelled speed-up: {result['vs_vanilla_even']:.3f}x vanilla PP={result['pp']} at its even "
             f"split {spell(result['even_partition'])}, {result['vs_vanilla_best']:.3f}x at vanilla's "
             f"best split {spell(result['vanilla_best_partition'])}"]
    if result["in_flight"] < result["pp"]:
        lines.append(f"  with {result['in_flight']} group(s) of requests in flight the ranks take turns "
                     f"and the split barely matters (vllm_e3/pipeline.py)")
    if "same_exits_even_split" in result:
        lines.append(f"  the same exits at the even split: {result['same_exits_even_split']:.3f}x "
                     f"vanilla's even split")
    lines.append(f"  apply it: {PARTITION_ENV}={spell(result['partition'])} vllm serve {model} "
                 f"--model-impl e3 --pipeline-parallel-size {result['pp']}"
                 + ("" if result["policy"] == "full" else "   (or \"plan\": true in e3/config.json)"))
    return lines


def startup_pp_plan(cfg, model_dir: str, vllm_config):
    """Under pipeline parallelism with `"plan": true`: the E3 config this
    engine runs (policy, exits) and the partition, from e3/engine_costs.json
    (no timing here: every rank computes the same choice from the same file).
    Sets VLLM_PP_LAYER_PARTITION in this worker's environment before vLLM
    builds the layers, unless the user set it: theirs wins, with a log line,
    and the plan chooses the exits for it. Returns the new config."""
    from .config import E3ConfigError, e3_dir
    from .planner import ENGINE_COSTS_FILENAME, load_engine_costs, planned_config, startup_profile

    pp = vllm_config.parallel_config.pipeline_parallel_size
    path = os.path.join(e3_dir(model_dir), ENGINE_COSTS_FILENAME)
    if not os.path.isfile(path):
        raise E3ConfigError(f"'plan': true under --pipeline-parallel-size {pp} prices the ranks with the "
                            f"engine's own costs, and {path} is missing: run `vllm-e3 profile`")
    ecosts = load_engine_costs(path)
    L = vllm_config.model_config.hf_config.num_hidden_layers
    if ecosts["num_layers"] != L:
        raise E3ConfigError(f"{path} was measured on {ecosts['num_layers']} layers; this model has {L}")
    if cfg.policy == "full" or not cfg.exits:        # no exits: vanilla's graph at its best split
        fractions, can_fire = {}, []
    else:
        fractions, can_fire = startup_profile(cfg, model_dir)
    user = os.environ.get(PARTITION_ENV)
    fixed = parse_partition(user, L, pp) if user else None
    sc = vllm_config.scheduler_config
    m, rows = pp, max(1.0, sc.max_num_seqs / pp)        # a full pipeline (the module docstring)
    policies = ("token", "sync") if cfg.policy == "sync" else ("token",)
    best = plan_pp(ecosts, can_fire, fractions, rows, pp, policies, fixed, m)
    if fixed:
        logger.info("vllm-e3 plan: %s=%s is set: the pipeline keeps it (the plan would choose %s); "
                    "unset it to let the plan choose", PARTITION_ENV, user,
                    spell(plan_pp(ecosts, can_fire, fractions, rows, pp, policies, None, m)["partition"]))
    else:
        os.environ[PARTITION_ENV] = spell(best["partition"])
        _forget_cached_env()
    new = planned_config(cfg, best, can_fire)          # no target batches: policy e3 is not run under PP
    logger.info("vllm-e3 plan at start-up, PP %d, %g rows a step, %d in flight, with %s: policy %s, "
                "exits %s, partition %s: modelled %.3fx vanilla PP at its even split, %.3fx at its best",
                pp, rows, m, path,
                new.policy, list(new.exits), os.environ[PARTITION_ENV] if not fixed else user,
                best["vs_vanilla_even"], best["vs_vanilla_best"])
    return new


def _forget_cached_env() -> None:
    """vLLM caches its environment variables once an engine has started in a
    process (vllm.envs.enable_envs_cache); drop the cache so the partition
    set here is the one `get_pp_indices` reads."""
    import vllm.envs as envs

    getter = getattr(envs, "__getattr__", None)
    if hasattr(getter, "cache_clear"):
        getter.cache_clear()
