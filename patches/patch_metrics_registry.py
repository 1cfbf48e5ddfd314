"""Patch 6 (patches/README.md): the E3 exit metrics on `/metrics` when vLLM
serves it from a multiprocess registry.

Target: vllm/entrypoints/serve/instrumentator/metrics.py, the module's
`get_prometheus_registry` (0.32.0: called once in `attach_router`, line 58).
With several API servers (vLLM's default under `--data-parallel-size N`),
vLLM sets `PROMETHEUS_MULTIPROC_DIR` and each API server builds a fresh
registry with a MultiProcessCollector for its `/metrics`; a collector
registered anywhere else is never scraped. The wrapper calls the original
and, when the registry it returns is not the global one and this process
was started for an `--model-impl e3` engine (`VLLM_E3_STATS_DIR` inherited
from the front end, vllm_e3.metrics), registers an E3Collector in it.
Single-server `/metrics` (the global registry) is left as it is.
"""
from __future__ import annotations

import os

from . import wrap_method


def _make(orig):
    def get_prometheus_registry():
        registry = orig()
        from prometheus_client import REGISTRY

        if registry is not REGISTRY:
            from vllm_e3.metrics import register_collector

            register_collector(registry)
        return registry
    return get_prometheus_registry


def apply() -> None:
    from vllm_e3.metrics import STATS_ENV

    # only processes of an e3 front end under multiprocess metrics (and
    # their children) need it: nothing else imports the HTTP stack for it
    if not (os.environ.get(STATS_ENV) and os.environ.get("PROMETHEUS_MULTIPROC_DIR")):
        return
    from vllm.entrypoints.serve.instrumentator import metrics

    wrap_method(metrics, "get_prometheus_registry", _make)
