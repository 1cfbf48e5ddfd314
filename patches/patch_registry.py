"""Patch 2 (patches/README.md): `--model-impl e3` resolves Llama-family
architectures to their E3 subclasses.

Target: vllm/model_executor/models/registry.py, `_ModelRegistry.inspect_model_cls`
and `_ModelRegistry.resolve_model_cls` (0.32.0: lines ~1323 and ~1377). vLLM
treats an unknown `model_impl` as its own implementation, so without this
patch `e3` would silently serve vanilla vLLM. The wrapper maps
`LlamaForCausalLM` -> `E3LlamaForCausalLM` (registered through the documented
`ModelRegistry.register_model`) only when `model_config.model_impl == "e3"`,
and fails with the list of supported architectures otherwise.
"""
from __future__ import annotations

import logging

from . import wrap_method

logger = logging.getLogger("vllm.e3")


class UnsupportedArchitectureError(ValueError):
    pass


def map_architectures(architectures) -> list[tuple[str, str]]:
    """[(architecture, E3 class name)] for the supported ones; raises for none."""
    from vllm_e3.models import E3_ARCHITECTURES

    archs = [architectures] if isinstance(architectures, str) else list(architectures)
    mapped = [(a, E3_ARCHITECTURES[a]) for a in archs if a in E3_ARCHITECTURES]
    if not mapped:
        raise UnsupportedArchitectureError(
            f"--model-impl e3 does not support architecture {', '.join(archs) or '(none)'}; "
            f"supported architectures: {', '.join(sorted(E3_ARCHITECTURES))}"
        )
    return mapped


def _make(orig, verb: str):
    def wrapper(self, architectures, model_config, *args, **kwargs):
        if getattr(model_config, "model_impl", None) != "e3":
            return orig(self, architectures, model_config, *args, **kwargs)
        mapped = map_architectures(architectures)
        result, e3_arch = orig(self, [m for _, m in mapped], model_config, *args, **kwargs)
        arch = dict((m, a) for a, m in mapped)[e3_arch]
        if verb == "resolve":
            logger.info("vllm-e3: --model-impl e3 resolved %s to %s", arch, e3_arch)
        # The original name keeps vLLM's per-architecture logic unchanged.
        return result, arch

    return wrapper


def apply() -> None:
    from vllm.model_executor.models.registry import _ModelRegistry

    wrap_method(_ModelRegistry, "inspect_model_cls", lambda o: _make(o, "inspect"))
    wrap_method(_ModelRegistry, "resolve_model_cls", lambda o: _make(o, "resolve"))
