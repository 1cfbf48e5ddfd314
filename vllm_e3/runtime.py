"""Request state of an E3 engine: runner-side, one named home per piece.

The model (vllm_e3.models) holds weights and runs the stage loop; it keeps
no request state. Everything that outlives one forward lives here, owned by
the runner (`vllm_e3.worker.E3CPUModelRunner.e3_runtime`), and reaches the
model through the step context (`vllm_e3.models.step.StepContext.runtime`):

- `rules`    each request's rules (policy, thresholds from
             `e3_target_agreement`, `e3_enabled`, test overrides), resolved
             once, when the runner admits it (`AdmittedRequests`);
- `parking`  tokens parked at a stage boundary under policy e3 (`ParkingLot`).
             It is the one source of truth for which requests are parked: the
             runner reports a step's parked requests in its output
             (`e3_parked_req_ids`), and the scheduler rolls back exactly those;
- `counters` per-request exit counters of running requests and the bounded
             LRU of finished ones (`RequestCounters`);
- `stats`    the engine's exit counters (`ExitStats`, /metrics);
- `profile`  per-step timings when asked for (`vllm_e3.profile.StepProfile`,
             None otherwise): the costs the planner's simulation fits.

The per-step hand-offs (which rows' requests park this step, so get no
logits and no token) live on the step context, which lasts one
`execute_model`.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Any

from .knobs import FULL_RULES, RequestRules, resolve_rules
from .models.rows import Parked
from .profile import StepProfile


@dataclass
class ExitStats:
    """Per-worker counters (read by metrics later)."""
    steps: int = 0
    decode_tokens: int = 0       # decode tokens computed (a parked token once)
    exited: dict[int, int] = dataclasses.field(default_factory=dict)   # exit -> tokens
    layers_run: int = 0          # decoder layers run by decode tokens (a parked one: both parts)
    layers_full: int = 0         # the same had no token exited
    kv_fill_rows: int = 0        # sum over exited rows of layers filled
    mixed_exit_steps: int = 0    # steps whose tokens left at two or more exits
    parked: int = 0              # tokens parked (a token parked twice counts twice)
    resumed: int = 0             # parked tokens that resumed where they stopped
    park_wait_hist: dict[int, int] = dataclasses.field(default_factory=dict)  # steps waited -> tokens
    stage_rows: dict[int, int] = dataclasses.field(default_factory=dict)   # stage start -> decode rows run
    stage_runs: dict[int, int] = dataclasses.field(default_factory=dict)   # stage start -> runs with decode rows
    step_reqs: int = 0           # requests in the forwards, summed (mean in flight = step_reqs / steps)
    step_reqs_max: int = 0       # most requests in one forward (parked ones included)
    audited: dict[int, int] = dataclasses.field(default_factory=dict)      # exit -> exited tokens audited
    audit_agreed: dict[int, int] = dataclasses.field(default_factory=dict)  # exit -> ramp top-1 = full top-1

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RequestExitStats:
    """One request's decode tokens, as a client reads them (vllm_e3.stats)."""
    tokens: int = 0              # decode tokens produced (the prefill's token not included)
    layers_run: int = 0          # decoder layers they ran
    layers_full: int = 0         # the same without exits
    exited: dict[int, int] = dataclasses.field(default_factory=dict)   # exit -> tokens
    parked: int = 0              # times a token of it was parked

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class AdmittedRequests:
    """The rules of every request the runner holds, by request id."""

    def __init__(self):
        self.rules: dict[str, RequestRules] = {}

    def admit(self, req_id: str, extra: dict[str, Any] | None, cfg, table) -> None:
        self.rules[req_id] = resolve_rules(cfg, table, extra)

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            self.rules.pop(rid, None)

    def of(self, req_ids: list[str]) -> list[RequestRules]:
        # a request the runner never admitted (cannot happen in vLLM's order
        # of calls) runs the full model
        return [self.rules.get(rid, FULL_RULES) for rid in req_ids]

    def __len__(self) -> int:
        return len(self.rules)


class ParkingLot:
    """Tokens waiting at the start of a stage (policy e3), by request id: at
    most one per request, its pre-ramp state and where it resumes."""

    def __init__(self):
        self._tokens: dict[str, Parked] = {}

    def park(self, req_id: str, token: Parked) -> None:
        self._tokens[req_id] = token

    def take_all(self) -> dict[str, Parked]:
        """Every parked token, leaving the lot empty: a step resumes those of
        its requests and drops the rest (vllm_e3.models.loop)."""
        out, self._tokens = self._tokens, {}
        return out

    def drop(self, req_ids) -> None:
        for rid in req_ids:
            self._tokens.pop(rid, None)

    def __len__(self) -> int:
        return len(self._tokens)


class RequestCounters:
    """Per-request exit counters: running requests, and the last
    `FINISHED_KEPT` finished ones (an LRU, so clients can read a request's
    counters after it ends; bounded, not state that grows)."""

    FINISHED_KEPT = 4096

    def __init__(self):
        self.running: defaultdict[str, RequestExitStats] = defaultdict(RequestExitStats)
        self.finished: OrderedDict[str, RequestExitStats] = OrderedDict()

    def of(self, req_id: str) -> RequestExitStats:
        return self.running[req_id]

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            # a request that never ran a decode step on the exit path reads as zeros
            self.finished[rid] = self.running.pop(rid, None) or RequestExitStats()
            self.finished.move_to_end(rid)
        while len(self.finished) > self.FINISHED_KEPT:
            self.finished.popitem(last=False)

    def known(self) -> dict[str, RequestExitStats]:
        return {**self.finished, **self.running}


class E3Runtime:
    """The runner's E3 state (see the module docstring)."""

    def __init__(self):
        self.rules = AdmittedRequests()
        self.parking = ParkingLot()
        self.counters = RequestCounters()
        self.stats = ExitStats()
        self.profile: StepProfile | None = None

    def admit(self, req_id: str, extra: dict[str, Any] | None, cfg, table) -> None:
        self.rules.admit(req_id, extra, cfg, table)

    def finish(self, req_ids) -> None:
        """Finished or aborted: drop rules and parked state, keep counters in
        the LRU. Only requests this runner admitted: another data-parallel
        engine's request ids are not this one's to record."""
        mine = [rid for rid in req_ids if rid in self.rules.rules or rid in self.counters.running]
        self.rules.finish(mine)
        self.parking.drop(mine)
        self.counters.finish(mine)

    def live_state(self) -> dict[str, int]:
        """What is held right now (all 0 once every request has ended; the
        finished-request LRU is bounded and not counted)."""
        return {"parked_now": len(self.parking), "requests_tracked": len(self.counters.running),
                "requests_admitted": len(self.rules)}

    def reset_stats(self) -> None:
        self.stats = ExitStats()
