"""The one interface between the runner and the E3 model: what the model may
know about the requests behind the rows of the step it runs.

The runner (`vllm_e3.worker.E3CPUModelRunner`) sets a `StepContext` around
each model forward; the model reads it with `current_step()`. Row `i` of the
forward belongs to request `req_ids[j]` where `j` is row `i`'s request in the
attention metadata's `query_start_loc` order (the input batch's order).

Each request's rules (`vllm_e3.knobs.RequestRules`: policy, thresholds from
`e3_target_agreement`, `e3_enabled`, and -- on engines started for tests --
the `_e3_test` overrides) are resolved once, when the worker admits the
request (`AdmittedRequests`), never per step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

from .knobs import FULL_RULES, RequestRules, resolve_rules


@dataclass
class StepContext:
    req_ids: list[str] = field(default_factory=list)
    rules: list[RequestRules] = field(default_factory=list)     # [R], one per request
    # [R] int64: prompt length of each request. A row is a decode row (may
    # exit) iff it is its request's only row and its position is past the
    # prompt: a 1-token prefill chunk, or the recomputed last token of a fully
    # cached prompt, are prompt positions.
    prompt_lens: torch.Tensor | None = None
    # Set by the model: requests whose token of this step was parked (policy
    # e3). The runner drops their sampled token; the scheduler reschedules
    # them at the same position, and the model resumes them where they
    # stopped.
    parked_req_ids: list[str] = field(default_factory=list)
    # From the E3 scheduler: requests are waiting and runner slots are free,
    # so a request parked now lets the next step admit one in its place.
    refill: bool = True


class AdmittedRequests:
    """The rules of every request the worker holds, by request id."""

    def __init__(self):
        self.rules: dict[str, RequestRules] = {}

    def admit(self, req_id: str, extra: dict[str, Any] | None, cfg, table) -> None:
        self.rules[req_id] = resolve_rules(cfg, table, extra)

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            self.rules.pop(rid, None)

    def of(self, req_ids: list[str]) -> list[RequestRules]:
        # a request the worker never admitted (cannot happen in vLLM's order
        # of calls) runs the full model
        return [self.rules.get(rid, FULL_RULES) for rid in req_ids]


_current: StepContext | None = None


def current_step() -> StepContext | None:
    return _current


@contextlib.contextmanager
def step_context(ctx: StepContext):
    global _current
    prev, _current = _current, ctx
    try:
        yield ctx
    finally:
        _current = prev
