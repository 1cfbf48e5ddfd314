"""The one interface between the runner and the E3 model: what the model may
know about the requests behind the rows of the step it runs.

The runner (`vllm_e3.worker.E3CPUModelRunner`) sets a `StepContext` around
each model forward; the model reads it with `current_step()`. Row `i` of the
forward belongs to request `req_ids[j]` where `j` is row `i`'s request in the
attention metadata's `query_start_loc` order (the input batch's order).

Per-request extras come from `SamplingParams.extra_args`: the user-facing
knobs of `vllm_e3.knobs` (`e3_enabled`, `e3_target_agreement`) and test- and
benchmark-only keys (not part of the user-facing API; they let one engine
serve many cases, since an engine takes ~25 s to start):
- `_e3_policy`: "full" (this request never exits) | "token" | "sync" | "e3"
- `_e3_force_exit`: {exit point: rate} replacing the engine's synthetic profile
- `_e3_kv_fill`: False skips the KV fill of this request's exited tokens (to
  show the tests fail without it)
- `_e3_park_when`: "refill" | "always", replacing the engine's `park_when`
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

@dataclass
class StepContext:
    req_ids: list[str] = field(default_factory=list)
    extra_args: list[dict[str, Any] | None] = field(default_factory=list)
    # Set by the model: requests whose token of this step was parked (policy
    # e3). The runner drops their sampled token; the scheduler reschedules
    # them at the same position, and the model resumes them where they
    # stopped.
    parked_req_ids: list[str] = field(default_factory=list)
    # From the E3 scheduler: requests are waiting and runner slots are free,
    # so a request parked now lets the next step admit one in its place.
    refill: bool = True

    def has_extras(self) -> bool:
        """Does any request carry extra_args (knobs or test overrides)?"""
        return any(self.extra_args)


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
