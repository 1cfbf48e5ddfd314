"""The scheduler subclass for `--model-impl e3` (`scheduler_cls`).

Policy e3 parks a decode token inside the model: that step the request gets
no token (the runner discards its sample, vllm_e3/worker.py). vLLM advanced
`num_computed_tokens` at schedule time (`_update_after_schedule`), and an
empty token list is accepted without a rollback, so the request would never
be scheduled again. This scheduler rolls it back, as speculative decoding
does for rejected drafts, so the request is rescheduled at the same position
with the same input token, and the model resumes it where it was parked.
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus


class E3Scheduler(Scheduler):
    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        sampled = model_runner_output.sampled_token_ids
        if not sampled:
            return outputs
        index = model_runner_output.req_id_to_index
        for req_id, n in scheduler_output.num_scheduled_tokens.items():
            request = self.requests.get(req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue
            i = index.get(req_id)
            # a decode step that yielded nothing: every token computed, none added
            if (i is not None and not sampled[i] and request.num_output_tokens > 0
                    and request.num_computed_tokens == request.num_tokens):
                request.num_computed_tokens -= n
        return outputs
