"""Patch 3 (patches/README.md): engine-argument defaults and start-up checks
for `--model-impl e3`.

Target: vllm/engine/arg_utils.py, `EngineArgs.create_engine_config` (0.32.0:
line 2205), the one place both `vllm serve` and `LLM(...)` build the engine
config, in the front-end process, before any engine process starts. With
`model_impl == "e3"` the wrapper
- reads and validates the E3 config (model dir + `additional_config["e3"]`)
  and the ramps file against the model, so bad input fails with a message
  that names it and no half-started server;
- defaults `worker_cls` and `scheduler_cls` to vllm_e3's (the runner tells
  the model which requests its rows belong to and drops parked rows' tokens;
  the scheduler reschedules parked requests at the same position);
- turns prefix caching off under policy e3 (a parked token's deep-layer KV is
  written only when it resumes), and async scheduling (refused when asked
  for explicitly: a parked token is rescheduled at the same position);
- adds the logits processor whose `validate_params` checks the per-request
  knobs in the front end (vllm_e3.knobs), and points the front end's exit
  metrics at the file the worker will publish (vllm_e3.metrics);
- runs the exit path eagerly (`enforce_eager`) when exits can fire: the stage
  loop changes the token count inside the forward, which vLLM's single
  compiled graph cannot express. Policy `full` keeps vLLM's compile default.
"""
from __future__ import annotations

import logging
import os

from . import wrap_method

logger = logging.getLogger("vllm.e3")

E3_WORKER_CLS = "vllm_e3.worker.E3CPUWorker"
E3_SCHEDULER_CLS = "vllm_e3.scheduler.E3Scheduler"


def check_e3_engine(engine_args):
    """Pre-config half: E3Config errors surface before vLLM builds anything."""
    from vllm_e3.config import load_e3_config

    model_dir = engine_args.model
    extra = (engine_args.additional_config or {}).get("e3")
    if not os.path.isdir(model_dir):
        # vLLM itself reports a missing model; only local directories carry e3/
        return load_e3_config("/nonexistent", extra)
    return load_e3_config(model_dir, extra)


def check_against_model(e3cfg, vllm_config) -> None:
    from vllm_e3.config import RAMPS_FILENAME, e3_dir
    from vllm_e3.ramps import require_gates, validate_ramps

    hf = vllm_config.model_config.hf_config
    e3cfg.validate_for_model(hf.num_hidden_layers)
    ramps = os.path.join(e3_dir(vllm_config.model_config.model), RAMPS_FILENAME)
    specs = validate_ramps(ramps, e3cfg.exits, hf.hidden_size) if os.path.exists(ramps) else {}
    require_gates(e3cfg, specs, ramps)
    if vllm_config.parallel_config.pipeline_parallel_size != 1:
        raise ValueError("--model-impl e3 does not support pipeline parallelism")


def _add_request_validator(engine_args) -> None:
    """The per-request knobs are checked at admission by the
    `validate_params` hook of a logits processor (vllm_e3.knobs) that leaves
    logits alone; the user's own processors stay."""
    from vllm_e3.knobs import PROCESSOR_FQCN

    procs = list(engine_args.logits_processors or [])
    if PROCESSOR_FQCN not in procs:
        engine_args.logits_processors = [*procs, PROCESSOR_FQCN]


def _prepare_frontend(vllm_config) -> None:
    """Front-end state of this engine: whether it has a calibration table
    (for the knobs' errors) and where its worker publishes exit counters
    (for /metrics)."""
    from vllm_e3.config import CALIBRATION_FILENAME, e3_dir
    from vllm_e3.knobs import set_frontend_table
    from vllm_e3.metrics import prepare_frontend

    mc = vllm_config.model_config
    set_frontend_table(os.path.join(e3_dir(mc.model), CALIBRATION_FILENAME))
    names = mc.served_model_name
    prepare_frontend(names if isinstance(names, str) else (names or [mc.model])[0])


def _make(orig):
    from vllm.config import SchedulerConfig

    def wrapper(self, *args, **kwargs):
        if getattr(self, "model_impl", None) != "e3":
            return orig(self, *args, **kwargs)
        e3cfg = check_e3_engine(self)
        if self.worker_cls == "auto":
            self.worker_cls = E3_WORKER_CLS
        if self.scheduler_cls in (None, SchedulerConfig.scheduler_cls):
            self.scheduler_cls = E3_SCHEDULER_CLS
        if e3cfg.policy == "e3" and self.enable_prefix_caching is not False:
            # A parked token's deep-layer KV is written only when it resumes:
            # a prefix-cache hit in between would read holes.
            logger.info("vllm-e3: policy e3 turns prefix caching off (parked tokens' "
                        "deep-layer KV is written when they resume)")
            self.enable_prefix_caching = False
        if e3cfg.policy == "e3" and getattr(self, "async_scheduling", None) is not False:
            if self.async_scheduling:
                raise ValueError(
                    "--model-impl e3 with policy 'e3' does not support --async-scheduling: a parked "
                    "token yields no output and is rescheduled at the same position, which the async "
                    "scheduler's placeholders cannot express; drop --async-scheduling or use policy 'token'")
            self.async_scheduling = False     # auto: off (the CPU platform turns it off as well)
        if e3cfg.exits_active and not self.enforce_eager:
            logger.info("vllm-e3: policy %s runs the exit path eagerly (enforce_eager)", e3cfg.policy)
            self.enforce_eager = True
        _add_request_validator(self)
        config = orig(self, *args, **kwargs)
        check_against_model(e3cfg, config)
        _prepare_frontend(config)
        return config

    return wrapper


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    wrap_method(EngineArgs, "create_engine_config", _make)
