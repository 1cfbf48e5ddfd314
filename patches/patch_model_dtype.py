"""Patch 6 (patches/README.md): on CPU, `--dtype auto` keeps a checkpoint's
declared float32.

Target: vllm/config/model.py, `_resolve_auto_dtype` (0.32.0: line 2405), the
module function `_get_and_verify_dtype` calls by name when `--dtype` is
`auto`, in the front-end process that builds the engine config (vanilla
engines included: the plugin loads in every vLLM process).

Why: vLLM downcasts a float32 checkpoint to the first of the platform's
supported dtypes ("Downcast for float32 models"), which is bfloat16 on x86
and aarch64 CPUs. vLLM 0.32.0 CPU's compiled bfloat16 graph decodes wrong
tokens ("What is the capital of France?" -> "L'Étoile, la Marseillaise,
..."; the same with no plugin loaded), and float32 is faster there
(SmolLM2-135M, batch 64: 230 tok/s float32 compiled, 173 bfloat16 compiled).
`vllm-e3 prepare` writes the embedded model's config as float32 so that a
plain `vllm serve MODEL` or `LLM(MODEL)` computes what `--dtype float32`
computes; without this patch vLLM would still pick bfloat16.

Scope: only `--dtype auto`, only on CPU, only where the checkpoint declares
float32 and vLLM would have picked another dtype. An explicit `--dtype` and
every other checkpoint are untouched. Applied once by `vllm_e3.register()`
(marker).
"""
from __future__ import annotations

import logging

from . import wrap_method

logger = logging.getLogger("vllm.e3")


def _make(orig):
    def wrapper(model_type, config_dtype, *args, **kwargs):
        import torch
        from vllm.platforms import current_platform

        dtype = orig(model_type, config_dtype, *args, **kwargs)
        if (config_dtype == torch.float32 and dtype != torch.float32 and current_platform.is_cpu()
                and torch.float32 in current_platform.supported_dtypes):
            logger.info("vllm-e3: --dtype auto keeps the checkpoint's float32 on CPU (vLLM would pick "
                        "%s; vLLM 0.32 CPU's compiled bfloat16 decodes wrong tokens and float32 is "
                        "faster there; pass --dtype to choose)", dtype)
            return torch.float32
        return dtype

    return wrapper


def apply() -> bool:
    from vllm.config import model

    return wrap_method(model, "_resolve_auto_dtype", _make)
