"""The scheduler subclass for `--model-impl e3` (`scheduler_cls`).

Policy e3 parks a decode token inside the model: that step the request gets
no token (the runner discards its sample, vllm_e3/worker.py, and reports the
parked requests in its output as `e3_parked_req_ids`). vLLM advanced
`num_computed_tokens` at schedule time (`_update_after_schedule`), and an
empty token list is accepted without a rollback, so the request would never
be scheduled again. This scheduler rolls exactly the reported requests back,
as speculative decoding does for rejected drafts, so each is rescheduled at
the same position with the same input token, and the model resumes it where
it was parked.

Admission. A parked request holds a runner slot but does not run the first
stage, so on a full engine parking would shrink the first stage by the
number parked. vLLM separates the two limits: `--max-num-seqs` sizes the
runner's slots, `--max-num-active-seqs` (default: the same) caps admission
into RUNNING. This scheduler does not count the requests parked in the last
step against the admission cap: it admits while fewer than
`max_num_active_seqs` running requests are unparked, up to `max_num_seqs`.
With `--max-num-seqs 2B --max-num-active-seqs B` the first stage keeps B
requests while up to B more wait parked (E3's setting: more requests in
flight than the batch each stage runs at; the cost is their KV cache).
With the two equal (the default) this changes nothing. A request admitted
while others were parked stays until it finishes, and parked requests are
not held back when they resume, so the unparked requests can exceed B:
measured at B = 16 with 32 slots, stage 0 ran at 23.4 rows on average
(benchmarks/RESULTS.md, "Compiled stages on a quiet machine").

A start-up plan (`"plan": true`) prices every policy at the same requests in
flight (vllm_e3.planner): when it chooses a policy that does not park (the
runner's output says so, `e3_parks`), this scheduler admits up to
`max_num_seqs` from then on, so `token` or `full` runs the slots as one
batch instead of leaving half of them empty.

Refill. Each output carries `e3_refill` (an attribute of this scheduler's
own SchedulerOutput, read by vllm_e3.worker): whether requests are waiting
and runner slots are free. Under `park_when: refill` (the default) the model
parks only then: with nothing to admit, parking only moves a small batch
from a later stage to the first.

Prefix caching. When tokens can exit, only prompt blocks are shared between
requests (patches/patch_kv_cache.py: an exited token's filled K/V is not the
full model's). Policy e3 turns prefix caching off altogether
(patches/patch_arg_utils.py).
"""
from __future__ import annotations

import logging

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from .config import e3_config_from_vllm
from .patches.patch_kv_cache import cache_prompt_blocks_only

logger = logging.getLogger("vllm.e3")


class E3Scheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if e3_config_from_vllm(self.vllm_config).exits_active:
            # an exited token's filled K/V is not the full model's: share
            # prompt blocks only (patches/patch_kv_cache.py)
            cache_prompt_blocks_only(self)
        self.e3_active_cap = self.max_num_active_reqs   # unparked running requests
        self.e3_parked_ids: set[str] = set()            # parked in the last step
        self.e3_planned = e3_config_from_vllm(self.vllm_config).plan

    def schedule(self, *args, **kwargs):
        parked = sum(1 for rid in self.e3_parked_ids if rid in self.requests)
        self.max_num_active_reqs = min(self.max_num_running_reqs, self.e3_active_cap + parked)
        out = super().schedule(*args, **kwargs)
        out.e3_refill = len(self.waiting) > 0 and len(self.running) < self.max_num_running_reqs
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        # the runner's record of the requests whose token parked this step
        # (vllm_e3.runtime: the parking lot is the one source of truth)
        if self.e3_planned and getattr(model_runner_output, "e3_parks", True) is False:
            # the start-up plan chose a policy that never parks: admit as many
            # requests as policy e3 would hold (the planner priced it so:
            # equal in-flight, vllm_e3.planner)
            self.e3_planned = False
            if self.e3_active_cap < self.max_num_running_reqs:
                logger.info("vllm-e3: the start-up plan chose a policy that does not park; admitting "
                            "up to --max-num-seqs %d requests instead of --max-num-active-seqs %d",
                            self.max_num_running_reqs, self.e3_active_cap)
                self.e3_active_cap = self.max_num_running_reqs
        parked = getattr(model_runner_output, "e3_parked_req_ids", None) or ()
        self.e3_parked_ids = set()
        for req_id in parked:
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue      # finished or aborted meanwhile: nothing to reschedule
            # computed, yielded nothing: schedule the same position again
            request.num_computed_tokens -= scheduler_output.num_scheduled_tokens[req_id]
            self.e3_parked_ids.add(req_id)
        return outputs
