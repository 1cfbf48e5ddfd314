"""Worker and runner subclasses for `--model-impl e3` (CPU, V1 runner).

`E3CPUWorker` is vLLM's CPUWorker whose model runner is `E3CPUModelRunner`
(cpu_worker.py builds the runner directly, so a worker subclass is the seam).
The runner wraps each model forward in a `vllm_e3.step.StepContext` naming
the requests behind the rows; it never reaches into ramps.
"""
from __future__ import annotations

import ctypes
import logging
import time

import torch

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from .step import AdmittedRequests, StepContext, step_context

logger = logging.getLogger("vllm.e3")


class HeapTrim:
    """Give the worker's freed heap back to the OS every `every_s` seconds.

    glibc keeps freed chunks in its heap, and the dynamic mmap threshold
    puts tensors of up to 32 MB there. Steps of changing shape (stage row
    counts vary with the exits) fragment it, so the worker's RSS climbs
    while the bytes in use stay flat: in 4 rounds of 200 soak requests,
    in use 921 -> 1016 MB, RSS before a trim +300 MB each round, after it
    flat (benchmarks/RESULTS.md, "Hardening"). `malloc_trim(0)` returns
    those pages: ~9 ms to release 120 MB of a fragmented heap, so at most
    once per `every_s` it costs < 0.1% (each call's time is logged at
    debug). Not glibc: nothing to do."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self.last = time.monotonic()
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None

    def maybe(self) -> None:
        now = time.monotonic()
        if self._trim is None or now - self.last < self.every_s:
            return
        self._trim(0)
        self.last = time.monotonic()
        logger.debug("vllm-e3: malloc_trim took %.1f ms", (self.last - now) * 1e3)


class E3CPUModelRunner(CPUModelRunner):
    _e3_refill = True
    _e3_admitted: AdmittedRequests | None = None

    def _e3_step_context(self) -> StepContext:
        batch = self.input_batch
        req_ids = list(batch.req_ids)
        prompt_lens = torch.from_numpy(batch.num_prompt_tokens[:len(req_ids)]).long()
        rules = self._e3_admitted.of(req_ids) if self._e3_admitted is not None else []
        return StepContext(req_ids, rules, prompt_lens, refill=self._e3_refill)

    _e3_heap: HeapTrim | None = None

    def execute_model(self, scheduler_output, *args, **kwargs):
        self._e3_refill = getattr(scheduler_output, "e3_refill", True)
        out = super().execute_model(scheduler_output, *args, **kwargs)
        if self._e3_heap is None:
            self._e3_heap = HeapTrim()
        self._e3_heap.maybe()
        return out

    def _update_states(self, scheduler_output):
        model = self.get_model()
        cfg = getattr(model, "e3", None)
        if cfg is not None:
            if self._e3_admitted is None:
                self._e3_admitted = AdmittedRequests()
            # Finished and aborted requests drop their rules and parked state
            # now (the model also drops any state a step does not resume, e.g.
            # preempted).
            dropped = scheduler_output.finished_req_ids
            if dropped:
                self._e3_admitted.finish(dropped)
                model.e3_finish_requests(dropped)
            # Rules are resolved once, at admission (a request resumed after
            # preemption arrives again and resolves to the same rules).
            for new in scheduler_output.scheduled_new_reqs:
                sp = new.sampling_params
                self._e3_admitted.admit(new.req_id, sp.extra_args if sp is not None else None,
                                        cfg, model.e3_table)
        return super()._update_states(scheduler_output)

    def _model_forward(self, *args, **kwargs):
        with step_context(self._e3_step_context()) as ctx:
            out = super()._model_forward(*args, **kwargs)
        if ctx.parked_req_ids:
            # A parked row yields no token this step: discard its sample the
            # way vLLM discards a partial prefill's (_bookkeeping_sync), and
            # the scheduler (vllm_e3.scheduler) reschedules the same position.
            index = self.input_batch.req_id_to_index
            for rid in ctx.parked_req_ids:
                self.discard_request_mask.np[index[rid]] = True
            self.discard_request_mask.copy_to_gpu(self.input_batch.num_reqs)
        return out


class E3CPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        if not isinstance(self.model_runner, E3CPUModelRunner) and not self.use_v2_model_runner:
            self.model_runner = E3CPUModelRunner(self.vllm_config, torch.device("cpu"))

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        from .metrics import start_publisher

        self._e3_publisher = start_publisher(self._e3_model())   # counters for /metrics
        return out

    # ---- introspection by name (llm.collective_rpc, vllm_e3.stats, vllm_e3.http)
    def _e3_model(self):
        return self.model_runner.get_model()

    def e3_model_class(self) -> str:
        return type(self._e3_model()).__name__

    def e3_config(self) -> dict | None:
        """The E3 config the model runs (after a start-up plan, if any)."""
        cfg = getattr(self._e3_model(), "e3", None)
        return cfg.to_dict() if cfg is not None else None

    def e3_exit_stats(self) -> dict | None:
        from .stats import exit_stats

        return exit_stats(self._e3_model())

    def e3_request_stats(self, ids: list[str] | None = None) -> dict[str, dict]:
        from .stats import request_stats

        return request_stats(self._e3_model(), ids)

    def e3_parked_count(self) -> int:
        return len(getattr(self._e3_model(), "e3_parked", {}))

    def e3_live_state(self) -> dict[str, int]:
        """What the worker holds right now: parked tokens, requests with
        running counters, requests with resolved rules (all 0 once every
        request has ended; the finished-request LRU is bounded and not
        counted)."""
        model = self._e3_model()
        admitted = getattr(self.model_runner, "_e3_admitted", None)
        return {"parked_now": len(getattr(model, "e3_parked", {})),
                "requests_tracked": len(getattr(model, "e3_requests", {})),
                "requests_admitted": len(admitted.rules) if admitted is not None else 0}

    def e3_reset_exit_stats(self) -> None:
        from .stats import reset_exit_stats

        reset_exit_stats(self._e3_model())
