"""Patch 7 (patches/README.md): compiled starts load their saved AOT artifacts
on CPU.

Target: vllm/compilation/decorators.py, `_try_load_aot_compiled_fn` (0.32.0:
line 285), the module function the compiled model's `__call__` uses, on its
first call, to load `VLLM_CACHE_ROOT/torch_compile_cache/torch_aot_compile/
<hash>/rank_<r>_<dp>/model` (vanilla engines and E3's stages alike).

Why: every compiled start on CPU recompiles. The artifact is saved, but its
load fails with "'function' object has no attribute 'finalize_loading'":
`_try_load_aot_compiled_fn` calls `loaded_fn._artifacts.compiled_fn
.finalize_loading(vllm_config)`, a method of vLLM's own serializable backend
(`VllmSerializableFunction`). On CPU the compile mode is DYNAMO_TRACE_ONCE
with the plain "inductor" string as backend (vllm/platforms/cpu.py), so the
loaded `compiled_fn` is inductor's own callable, already loaded, which has no
such method; the exception sends vLLM to compile again.

How: while the original runs, `torch.compiler.load_compiled_function` (looked
up on `torch.compiler` at call time) is wrapped so that a loaded function
whose `compiled_fn` lacks `finalize_loading` gets a no-op one; everything
else -- the cache key, the check that traced sources did not change, the
guard settings, the fallback to compiling on any other failure -- is vLLM's.
Only the attribute vLLM asks for is added, only on that object.

The cache key (vLLM's): the environment's compile factors, the VllmConfig
hash (additional_config included), vLLM's version, and the compiled
forward's qualname and first line. E3's stage classes put everything their
graph bakes in into that qualname (vllm_e3/models/stage.py), so a changed
`e3/config.json` compiles anew rather than loading another configuration's
graph.
"""
from __future__ import annotations

import contextlib
import logging

from . import wrap_method

logger = logging.getLogger("vllm.e3")


def _noop_finalize(vllm_config) -> None:
    """Inductor's callable is loaded whole; nothing is left to finalize."""


@contextlib.contextmanager
def _finalize_optional():
    import torch.compiler

    orig = torch.compiler.load_compiled_function

    def load(*args, **kwargs):
        fn = orig(*args, **kwargs)
        compiled = getattr(getattr(fn, "_artifacts", None), "compiled_fn", None)
        if compiled is not None and not hasattr(compiled, "finalize_loading"):
            compiled.finalize_loading = _noop_finalize
        return fn

    torch.compiler.load_compiled_function = load
    try:
        yield
    finally:
        torch.compiler.load_compiled_function = orig


def _make(orig):
    def wrapper(model, aot_compilation_path):
        with _finalize_optional():
            return orig(model, aot_compilation_path)

    return wrapper


def apply() -> bool:
    from vllm.compilation import decorators

    return wrap_method(decorators, "_try_load_aot_compiled_fn", _make)
