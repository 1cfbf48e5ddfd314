"""Every change vllm-e3 makes to vLLM that is not a documented seam.

One target per file, the original kept and wrapped, a marker so applying
twice is a no-op; the ledger is patches/README.md. `apply_all()` is called by
`vllm_e3.register()` (the `vllm.general_plugins` entry point) in every vLLM
process.
"""
from __future__ import annotations

import functools

MARKER = "__vllm_e3_patched__"


def wrap_method(owner, name: str, make_wrapper) -> bool:
    """Replace owner.name by make_wrapper(original) once; returns whether it
    was applied now (False: already patched)."""
    orig = getattr(owner, name)
    if getattr(orig, MARKER, False):
        return False
    wrapper = functools.wraps(orig)(make_wrapper(orig))
    setattr(wrapper, MARKER, True)
    wrapper.__wrapped_original__ = orig
    setattr(owner, name, wrapper)
    return True


def apply_all() -> None:
    from . import patch_arg_utils, patch_compile_cache, patch_model_dtype, patch_registry

    patch_registry.apply()
    patch_arg_utils.apply()
    patch_model_dtype.apply()
    patch_compile_cache.apply()
