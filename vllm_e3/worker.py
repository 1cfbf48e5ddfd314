"""Worker and runner subclasses for `--model-impl e3` (CPU, V1 runner).

`E3CPUWorker` is vLLM's CPUWorker whose model runner is `E3CPUModelRunner`
(cpu_worker.py builds the runner directly, so a worker subclass is the seam).
The runner wraps each model forward in a `vllm_e3.models.step.StepContext` naming
the requests behind the rows; it never reaches into ramps.
"""
from __future__ import annotations

import ctypes
import logging
import time

import torch

from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from vllm.v1.outputs import ModelRunnerOutput

from .models.attention import StepAttention, check_groups
from .patches.patch_attn_capture import capture_common_metadata
from .runtime import E3Runtime
from .models.step import StepContext, current_step, step_context

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
    """vLLM's CPU runner, owning the E3 request state (`e3_runtime`,
    vllm_e3.runtime) and wrapping each `execute_model` in a step context."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.e3_runtime = E3Runtime()
        self._e3_heap = HeapTrim()
        self._e3_common: dict[int, object] = {}     # KV-cache group -> this step's common metadata
        self._e3_parked: list[str] = []             # requests parked by the last forward
        self._e3_parks = False                      # the model's policy (after a start-up plan) parks

    def initialize_kv_cache(self, *args, **kwargs):
        super().initialize_kv_cache(*args, **kwargs)
        cfg = getattr(self.get_model(), "e3", None)
        self._e3_parks = cfg is not None and cfg.policy == "e3"
        if cfg is not None and cfg.exits_active:
            check_groups(self.attn_groups)
            # the builders' input, for restricting stages (patches/patch_attn_capture.py)
            capture_common_metadata(self.attn_groups, self._e3_common.__setitem__)

    def execute_model(self, scheduler_output, *args, **kwargs):
        self._e3_common.clear()
        ctx = StepContext(self.e3_runtime, refill=getattr(scheduler_output, "e3_refill", True))
        prof = self.e3_runtime.profile            # per-step timings, when asked for
        if prof is not None:
            prof.begin()
        with step_context(ctx):
            out = super().execute_model(scheduler_output, *args, **kwargs)
        if prof is not None:
            prof.end()
        self._e3_parked = ctx.parked_req_ids
        self._e3_heap.maybe()
        return out

    def sample_tokens(self, *args, **kwargs):
        out = super().sample_tokens(*args, **kwargs)
        # the one record of which requests parked: the scheduler rolls back
        # exactly these (vllm_e3.scheduler)
        if isinstance(out, ModelRunnerOutput):
            out.e3_parked_req_ids = self._e3_parked
            out.e3_parks = self._e3_parks            # read by the scheduler after a start-up plan
        self._e3_parked = []
        return out

    def _update_states(self, scheduler_output):
        model = self.get_model()
        cfg = getattr(model, "e3", None)
        if cfg is not None:
            # Finished and aborted requests drop their rules and parked state
            # now (the loop also drops any parked state a step does not
            # resume, e.g. preempted).
            if scheduler_output.finished_req_ids:
                self.e3_runtime.finish(scheduler_output.finished_req_ids)
            # Rules are resolved once, at admission (a request resumed after
            # preemption arrives again and resolves to the same rules).
            for new in scheduler_output.scheduled_new_reqs:
                sp = new.sampling_params
                self.e3_runtime.admit(new.req_id, sp.extra_args if sp is not None else None,
                                      cfg, model.e3_table)
        return super()._update_states(scheduler_output)

    def _model_forward(self, *args, **kwargs):
        ctx = current_step()
        if ctx is None or not self._e3_common:      # dummy / profile runs: nothing can exit
            return super()._model_forward(*args, **kwargs)
        batch = self.input_batch
        ctx.req_ids = list(batch.req_ids)
        ctx.rules = self.e3_runtime.rules.of(ctx.req_ids)
        ctx.prompt_lens = torch.from_numpy(batch.num_prompt_tokens[:len(ctx.req_ids)]).long()
        ctx.attn = StepAttention(dict(self._e3_common), self.attn_groups)
        out = super()._model_forward(*args, **kwargs)
        if ctx.parked_req_ids:
            # A parked row yields no token this step: discard its sample the
            # way vLLM discards a partial prefill's (_bookkeeping_sync), and
            # the scheduler (vllm_e3.scheduler) reschedules the same position.
            index = batch.req_id_to_index
            for rid in ctx.parked_req_ids:
                self.discard_request_mask.np[index[rid]] = True
            self.discard_request_mask.copy_to_gpu(batch.num_reqs)
        return out


class E3CPUWorker(CPUWorker):
    def init_device(self):
        super().init_device()
        if not isinstance(self.model_runner, E3CPUModelRunner) and not self.use_v2_model_runner:
            self.model_runner = E3CPUModelRunner(self.vllm_config, torch.device("cpu"))

    def load_model(self, *args, **kwargs):
        out = super().load_model(*args, **kwargs)
        from .metrics import start_publisher

        # counters for /metrics: one file per pipeline rank of each engine
        self._e3_publisher = start_publisher(self._e3_runtime(), self.e3_rank())
        return out

    def e3_rank(self) -> dict[str, int]:
        """This worker's data-, pipeline- and tensor-parallel rank."""
        from vllm.distributed import get_pp_group, get_tp_group

        pc = self.vllm_config.parallel_config
        # a dense model's DP engines run as independent engines with
        # data_parallel_rank 0; data_parallel_index keeps the engine's index
        return {"dp": getattr(pc, "data_parallel_index", pc.data_parallel_rank),
                "pp": get_pp_group().rank_in_group, "tp": get_tp_group().rank_in_group}

    # ---- introspection by name (llm.collective_rpc, vllm_e3.stats, vllm_e3.http)
    def _e3_model(self):
        return self.model_runner.get_model()

    def _e3_runtime(self):
        """The runner's E3 state (vllm_e3.runtime); None on a model without exits config."""
        if getattr(self._e3_model(), "e3", None) is None:
            return None
        return self.model_runner.e3_runtime

    def e3_model_class(self) -> str:
        return type(self._e3_model()).__name__

    def e3_config(self) -> dict | None:
        """The E3 config the model runs (after a start-up plan, if any)."""
        cfg = getattr(self._e3_model(), "e3", None)
        return cfg.to_dict() if cfg is not None else None

    def e3_layers(self) -> list[int] | None:
        """The decoder layers [lo, hi) this worker's pipeline rank holds
        (vllm_e3.models.parallel.PipelineRank); None on a model without exits config."""
        rank = getattr(self._e3_model(), "e3_rank", None)
        return [rank.lo, rank.hi] if rank is not None else None

    def e3_exit_stats(self) -> dict | None:
        from .stats import exit_stats

        return exit_stats(self._e3_runtime(), self.e3_rank())

    def e3_request_stats(self, ids: list[str] | None = None) -> dict[str, dict]:
        """Per-request counters, from one worker per engine: the last
        pipeline rank (it alone sees every token's exit: vllm_e3.models.loop)
        at tensor-parallel rank 0 (the others hold the same); {} elsewhere."""
        from vllm.distributed import get_pp_group, get_tp_group

        from .stats import request_stats

        if not get_pp_group().is_last_rank or get_tp_group().rank_in_group != 0:
            return {}
        return request_stats(self._e3_runtime(), ids)

    def e3_parked_count(self) -> int:
        rt = self._e3_runtime()
        return len(rt.parking) if rt is not None else 0

    def e3_live_state(self) -> dict[str, int]:
        """What the worker holds right now: parked tokens, requests with
        running counters, requests with resolved rules (all 0 once every
        request has ended; the finished-request LRU is bounded and not
        counted)."""
        rt = self._e3_runtime()
        return rt.live_state() if rt is not None else {"parked_now": 0, "requests_tracked": 0,
                                                       "requests_admitted": 0}

    def e3_kv_cache(self) -> dict:
        """The runner's KV cache: blocks and tokens per block (what the
        planner's simulation hands out, vllm_e3.simulate)."""
        runner = self.model_runner
        return {"blocks": runner.kv_cache_config.num_blocks,
                "block_size": runner.cache_config.block_size}

    def e3_profile(self, on: bool = True, count_reads: bool = False) -> None:
        """Start (clearing earlier records) or stop per-step timing
        (vllm_e3.profile); `count_reads`: count each boundary's host reads too."""
        from .profile import StepProfile

        rt = self._e3_runtime()
        if rt is not None:
            rt.profile = StepProfile(count_reads=count_reads) if on else None

    def e3_profile_steps(self) -> list[dict]:
        """The recorded steps (vllm_e3.profile.fit_costs reads them)."""
        rt = self._e3_runtime()
        return list(rt.profile.steps) if rt is not None and rt.profile is not None else []

    def e3_reset_exit_stats(self) -> None:
        rt = self._e3_runtime()
        if rt is not None:
            rt.reset_stats()
