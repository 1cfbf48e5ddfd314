"""The one interface between the runner and the E3 model: what the model may
know about the requests behind the rows of the step it runs.

The runner (`vllm_e3.worker.E3CPUModelRunner`) sets a `StepContext` around
each `execute_model` (the forward and `compute_logits`); the model reads it
with `current_step()`. Row `i` of the forward belongs to request
`req_ids[j]` where `j` is row `i`'s request in the attention metadata's
`query_start_loc` order (the input batch's order).

Request state that outlives a step (each request's rules, resolved once at
admission; the parking lot; counters) is the runner's `vllm_e3.runtime.E3Runtime`,
reached as `step.runtime`.

The per-step hand-offs, each in one place:

| hand-off | written by | read by |
|---|---|---|
| `refill`: requests wait and slots are free, so a parked request lets one in | the scheduler (`E3Scheduler.schedule` sets `e3_refill` on its output) -> the runner (`E3CPUModelRunner.execute_model`) | `ExitPlan.build` (vllm_e3.models.rows): may a row park under `park_when: refill` |
| `req_ids`, `rules`, `prompt_lens`, `attn`: who the rows are | the runner (`_model_forward`) | the stage loop (`RowLayout`, `ExitPlan`, `AttentionView`) |
| `parked_req_ids`: requests whose token parked | the stage loop (`_park`) | the runner: discards their samples (`_model_forward`) and reports them (`sample_tokens` -> `e3_parked_req_ids`); the scheduler rolls them back (`update_from_output`) and counts them off the admission cap next step |
| `no_logits`: the same requests, as a per-request mask | the stage loop (`_leave`) | `compute_logits` (vllm_e3.models.e3_model): no head rows for them |
| parked state itself | the stage loop (`_park`), into `runtime.parking` | the next step's stage loop (`_take_resumed`); the runner drops a finished request's (`E3Runtime.finish`) |
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..knobs import RequestRules


@dataclass
class StepContext:
    runtime: object = None                   # vllm_e3.runtime.E3Runtime
    # From the E3 scheduler: requests are waiting and runner slots are free,
    # so a request parked now lets the next step admit one in its place.
    refill: bool = True
    # ---- set by the runner before the forward (E3CPUModelRunner._model_forward)
    req_ids: list[str] = field(default_factory=list)
    rules: list[RequestRules] = field(default_factory=list)     # [R], one per request
    # [R] int64: prompt length of each request. A row is a decode row (may
    # exit) iff it is its request's only row and its position is past the
    # prompt: a 1-token prefill chunk, or the recomputed last token of a fully
    # cached prompt, are prompt positions.
    prompt_lens: torch.Tensor | None = None
    # the step's common attention metadata and attention groups
    # (vllm_e3.models.attention.StepAttention); None: nothing can be restricted
    attn: object = None
    # ---- set by the model's forward, read in the same step
    # requests whose token of this step was parked (policy e3): the runner
    # drops their sample and reports them to the scheduler, which reschedules
    # them at the same position; the model resumes them where they stopped
    parked_req_ids: list[str] = field(default_factory=list)
    # [R] bool: the same requests, for compute_logits (no head rows for them)
    no_logits: torch.Tensor | None = None

    @property
    def bound(self) -> bool:
        return self.attn is not None


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
