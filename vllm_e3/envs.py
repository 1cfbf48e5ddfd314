"""Every environment variable the vllm_e3 package reads or sets, in one place
(the kernels read their own, `VLLM_E3_KERNELS`, once at import:
kernels/dispatch.py; they import only torch and Triton).

Read here, nowhere else in the package:
  VLLM_E3_HOME            where `vllm-e3 prepare` puts the embedded model and
                          the tools their caches (default ~/.cache/vllm-e3)
  PROMETHEUS_MULTIPROC_DIR  vLLM's multi-API-server metrics mode: the worker
                          writes prometheus_client counters there
                          (vllm_e3.metrics)
The stats channel from an `--model-impl e3` front end to the engine processes
it starts (vllm_e3.metrics): the front end sets these, its children inherit
and read them.
  VLLM_E3_STATS_DIR       where the workers publish their exit counters
  VLLM_E3_MODEL_NAME      the served model name the counters are labelled with
  VLLM_E3_STATS_OWNER     the pid of the process that made the directory
Set for the engines the tools start (never overriding the user's):
  VLLM_CPU_KVCACHE_SPACE, VLLM_TARGET_DEVICE (vLLM's own).

Each is read when asked for, not at import: the front end sets the stats
channel after vllm_e3 is imported, and tests point VLLM_E3_HOME elsewhere.
"""
from __future__ import annotations

import os

STATS_DIR = "VLLM_E3_STATS_DIR"
MODEL_NAME = "VLLM_E3_MODEL_NAME"
STATS_OWNER = "VLLM_E3_STATS_OWNER"


def home() -> str:
    return os.path.expanduser(os.environ.get("VLLM_E3_HOME", "~/.cache/vllm-e3"))


def prometheus_multiproc() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def stats_channel() -> tuple[str | None, str, str | None]:
    """(stats directory, served model name, owner pid) from the environment."""
    return os.environ.get(STATS_DIR), os.environ.get(MODEL_NAME, ""), os.environ.get(STATS_OWNER)


def set_stats_channel(directory: str, model_name: str) -> None:
    """The front end's half: its engine processes inherit these."""
    os.environ[STATS_DIR] = directory
    os.environ[STATS_OWNER] = str(os.getpid())
    os.environ[MODEL_NAME] = model_name


def engine_defaults(kv_cache_gib: int) -> None:
    """vLLM's CPU settings for an engine a tool starts, unless the user set them."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
