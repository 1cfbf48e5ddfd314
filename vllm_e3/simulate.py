"""A step-by-step simulation of an E3 engine serving a workload, priced with
the engine's own measured costs (vllm_e3.profile.fit_costs).

The planner's closed-form model (vllm_e3.planner.per_token_cost) prices a
steady state. Policy e3 has none that a formula captures: measured at batch
16 with 32 slots (benchmarks/RESULTS.md), parking let the E3 scheduler admit
past the cap, so the first stage ran at 23.4 rows and only 70 tokens parked,
where the formula assumed 16 rows and parked requests holding slots; it
predicted e3 at 0.875x token and measured 1.193x. So this module replays
what the engine does, step by step, with the rules of the code it models:

- admission (vllm_e3.scheduler.E3Scheduler): a request waiting is admitted
  while fewer than `batch` + (requests parked in the last step) run, up to
  `slots`; admitted requests prefill in that step; a finished request frees
  its slot for the next step; `refill` = requests wait and slots are free;
- the stage loop (vllm_e3.models.loop.StageLoop): parked tokens rejoin at the
  stage they stopped before it runs; a stage with no rows is not run; at an
  exit each decode row leaves with the profile's rate there (rates of the
  tokens reaching it, as `force_exit` gives them); under policy e3 the group
  continuing past an exit parks when it (with the tokens parked there
  before) is below the exit's target batch, no prompt row is in the step,
  parking may refill (`park_when: refill`) and no token has waited
  `max_park_steps`;
- KV blocks, as vLLM's scheduler hands them out: a step needs blocks for
  every token of a request (prompt + made); a running request that cannot get
  them preempts the newest running request (freed, back to the front of the
  queue, recomputed from its prompt when readmitted: its prompt and tokens
  made so far are prompt rows then); admission needs the blocks and the
  token budget, and none happens in a step that preempted;
- costs per step: each stage run, layers x (layer(decode rows) + prompt
  rows x prompt_s); each exit boundary run where rows can leave (an exit
  with no threshold costs nothing: the loop finds no candidate and moves
  on), with `check_s` per row checked when the costs give it (the ramp and
  confidence of a measured exit decision; a profile's `exit_s` already holds
  the decision it ran); KV fill per row-layer skipped; the head per token
  yielded; and the
  rest of the step, step_s + row_s x requests scheduled + prompt_rest_s x
  prompt rows (parked requests are scheduled: they pay scheduling, input
  preparation and the loop's bookkeeping).

Exits are drawn at random (seeded), so the parking decisions see integer
groups as the engine does; `simulate` averages `seeds` runs.
"""
from __future__ import annotations

import bisect
import random
from collections import deque


def layer_curve(layer: dict):
    """Seconds of one decoder layer on m rows, as a function of m: linear
    between measured row counts; beyond the largest, the least-squares line
    through the upper half of them (a layer's cost is affine in its rows over
    a range: a fixed part, weights read once, and a part per row)."""
    val = {int(k): float(v) for k, v in layer.items()}
    keys = sorted(val)
    top = [k for k in keys if k >= keys[-1] / 2]
    if len(top) >= 2:
        mx, my = sum(top) / len(top), sum(val[k] for k in top) / len(top)
        slope = max(0.0, sum((k - mx) * (val[k] - my) for k in top)
                    / sum((k - mx) ** 2 for k in top))
    else:
        slope = val[keys[-1]] / keys[-1]

    def at(m: int) -> float:
        if m in val:
            return val[m]
        if m <= keys[0]:
            return val[keys[0]]
        if m > keys[-1]:
            return val[keys[-1]] + slope * (m - keys[-1])
        i = bisect.bisect_left(keys, m)
        lo, hi = keys[i - 1], keys[i]
        return val[lo] + (val[hi] - val[lo]) * (m - lo) / (hi - lo)

    return at


def smooth_layer(layer: dict, width: int = 2) -> dict:
    """Layer times averaged over neighbouring measured row counts (a stage
    call is timed once, so single counts are noisy)."""
    keys = sorted(int(k) for k in layer)
    val = {int(k): float(v) for k, v in layer.items()}
    return {k: sum(val[j] for j in keys[max(0, i - width):i + width + 1])
            / len(keys[max(0, i - width):i + width + 1]) for i, k in enumerate(keys)}


def simulate_once(costs: dict, *, policy: str, exits, rates: dict, batch: int, slots: int,
                  requests: int, prompt_len: int, output_len: int, target=0,
                  max_park: int = 4, park_when: str = "refill", seed: int = 0,
                  kv_blocks: int | None = None, block_size: int = 128,
                  token_budget: int = 1 << 30) -> dict:
    rng = random.Random(seed)
    L = costs["num_layers"]
    layer = layer_curve(costs["layer"])
    exits = list(exits) if policy != "full" else []
    bounds = [0, *exits, L]
    tgt = dict(zip(exits, target if isinstance(target, (list, tuple)) else [target] * len(exits)))
    waiting, running = deque(range(requests)), []
    made = [0] * requests
    first, last = [0.0] * requests, [0.0] * requests
    parked: dict[int, tuple[int, int]] = {}          # request -> (stage start, steps waited)
    t, steps, stage_rows, park_count, in_flight, preempted = 0.0, 0, {}, 0, 0, 0
    # KV blocks (vLLM's scheduler): a step needs blocks for every token a
    # request has (prompt + made); a running request that cannot get them
    # preempts the newest running request (its blocks freed, back to the
    # front of the queue, recomputed from its prompt when readmitted)
    held, free = [0] * requests, kv_blocks if kv_blocks is not None else 1 << 62
    need = lambda r: -(-(prompt_len + made[r]) // block_size) - held[r]
    while waiting or running:
        i, preempted_now = 0, preempted
        while i < len(running):
            r = running[i]
            while need(r) > free and running:
                victim = running.pop()
                free += held[victim]
                held[victim] = 0
                parked.pop(victim, None)
                waiting.appendleft(victim)
                preempted += 1
                if victim == r:
                    break
            if i >= len(running) or running[i] != r:
                break
            free -= need(r)
            held[r] += need(r)
            i += 1
        limit = min(slots, batch + sum(1 for r in running if r in parked))
        new, budget = [], token_budget - len(running)
        while (preempted_now == preempted and waiting and len(running) < limit
               and need(waiting[0]) <= free
               and prompt_len + made[waiting[0]] <= budget):
            r = waiting.popleft()
            free -= need(r)
            held[r] += need(r)
            budget -= prompt_len + made[r]
            new.append(r)
            running.append(r)
        refill = bool(waiting) and len(running) < slots
        may_park = policy == "e3" and (refill or park_when == "always") and not new
        prompt_rows = sum(prompt_len + made[r] for r in new)
        join: dict[int, list] = {}
        act = []
        for r in running:
            if r in new:
                continue
            if r in parked:
                s, w = parked[r]
                join.setdefault(s, []).append((r, w))
            else:
                act.append((r, 0))
        cost, yielded, fill_rl, park_now = 0.0, list(new), 0, {}
        for s, e in zip(bounds[:-1], bounds[1:]):
            act += join.pop(s, [])
            if not act and not prompt_rows:
                continue
            cost += (e - s) * ((layer(len(act)) if act else 0.0)
                               + prompt_rows * costs.get("prompt_s", 0.0))
            if act:
                stage_rows.setdefault(s, []).append(len(act))
            if e == L:
                yielded += [r for r, _ in act]
                break
            if not act:
                continue
            rate, keep = rates.get(e, 0.0), []
            if rate > 0.0:                      # else no row can leave: no decision is made
                cost += costs["exit_s"] + costs.get("check_s", 0.0) * len(act)
                for r, w in act:
                    if rng.random() < rate:
                        yielded.append(r)
                        fill_rl += L - e
                    else:
                        keep.append((r, w))
                act = keep
            joining = join.get(e, [])
            if (act and may_park and len(act) + len(joining) < tgt.get(e, 0)
                    and all(w < max_park for _, w in act + joining)):
                for r, w in act + joining:
                    park_now[r] = (e, w + 1)
                join.pop(e, None)
                park_count += len(act) + len(joining)
                act = []
        cost += fill_rl * costs["fill_s"] + len(yielded) * costs["head_s"]
        cost += (costs["step_s"] + costs["row_s"] * len(running)
                 + prompt_rows * costs.get("prompt_rest_s", 0.0))
        t += cost
        steps += 1
        in_flight += len(running)
        for r in yielded:
            made[r] += 1
            if made[r] == 1:
                first[r] = t
            last[r] = t
        parked = park_now
        for r in running:
            if made[r] >= output_len:
                free += held[r]
                held[r] = 0
        running = [r for r in running if made[r] < output_len]
    tpot = sorted((last[r] - first[r]) / (output_len - 1) for r in range(requests)) \
        if output_len > 1 else [0.0]
    return {"seconds": t, "tok_s": requests * output_len / t, "tpot_p50": tpot[len(tpot) // 2],
            "steps": steps, "parked": park_count, "in_flight_mean": in_flight / max(steps, 1),
            "preempted": preempted,
            "stage_batch": {s: sum(v) / len(v) for s, v in sorted(stage_rows.items())}}


def simulate(costs: dict, seeds: int = 3, **kw) -> dict:
    """`simulate_once` averaged over `seeds` seeds (keyword arguments as there)."""
    runs = [simulate_once(costs, seed=s, **kw) for s in range(seeds)]
    out = {k: sum(r[k] for r in runs) / seeds for k in ("seconds", "tpot_p50", "steps", "parked",
                                                         "in_flight_mean", "preempted")}
    n = kw["requests"] * kw["output_len"]
    out["tok_s"] = n / out["seconds"]
    out["stage_batch"] = runs[0]["stage_batch"]
    return out


def rates_of(exits, fractions: dict) -> dict:
    """Per-exit rates of the tokens reaching each exit, from fractions of all
    tokens leaving there (the planner's profile)."""
    out, reach = {}, 1.0
    for e in exits:
        x = float(fractions.get(e, fractions.get(str(e), 0.0)))
        out[e] = x / reach if reach > 0 else 0.0
        reach -= x
    return out


MIN_GAIN = 0.02   # a deployment's exits must model at least this much faster than `full`

# The workloads a deployment must not run slower than vanilla on: the closed
# batches of benchmarks/bench_policies.py (64 prompt tokens, 128 made).
DEPLOY_WORKLOADS = ({"batch": 16, "prompt_len": 64, "output_len": 128},
                    {"batch": 64, "prompt_len": 64, "output_len": 128})


def net_cost(costs: dict, exits, fractions: dict, *, batch: int, prompt_len: int, output_len: int,
             requests: int | None = None, check_s: float = 0.0, seeds: int = 3) -> float:
    """Simulated seconds of policy `token` with exit `fractions` (of all
    tokens, per exit; an exit at 0 never decides) over the seconds of `full`,
    for a closed batch of `requests` (default `batch`): below 1 the exits pay.
    `check_s`: seconds per row of one exit decision (ramp and confidence)
    beyond what the profile's exit boundary holds."""
    kw = dict(batch=batch, slots=batch, requests=requests or batch, prompt_len=prompt_len,
              output_len=output_len)
    full = simulate(costs, seeds=seeds, policy="full", exits=[], rates={}, **kw)
    tok = simulate({**costs, "check_s": check_s}, seeds=seeds, policy="token", exits=list(exits),
                   rates=rates_of(exits, fractions), **kw)
    return tok["seconds"] / full["seconds"]
